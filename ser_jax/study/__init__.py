"""One study across corpora: `python -m ser_jax.study --config=configs/focal_study.py --workdir=W`.

Every (corpus, setting) pair is an ordinary run in its own folder, which `main`, `predict`
and `report` read as any run; the study then writes one table and its figures:

<W>/config.json                     the study's config; a rerun that would mix results is refused
<W>/<corpus>/<setting>/             cross-validation within the corpus
<W>/<train>-to-<test>/<setting>/    trained on one corpus, tested on another (study.cross_corpus)
<W>/results.json, results.md        per corpus and setting WA, UA and the paired differences from
                                    the reference setting; pooled over corpora (ser_jax.meta)
<W>/forest.png, cross_corpus.png    the UA differences per corpus and pooled; the UA matrices

The package, in the order a study goes:

compose.py    the study config, its corpora and settings, each run's config (which layer wins
              over which), and the checks that a rerun mixes no results
run.py        runs or resumes every run, or one run as a job of its own
summary.py    the table's numbers: paired differences (ser_jax.compare), pools (ser_jax.meta)
render.py     results.json, results.md (ser_jax.render's tables) and the figures (ser_jax.plots)
__main__.py   the command line: the whole study, --list_runs, --run, --task_index, --summarise
"""
