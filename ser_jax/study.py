"""One study across corpora: `python -m ser_jax.study --config=configs/focal_study.py --workdir=W`.

Every (corpus, setting) pair is an ordinary run in its own folder, which `main`, `predict`
and `report` read as any run; the study then writes one table and its figures:

<W>/config.json                     the study's config; a rerun that would mix results is refused
<W>/<corpus>/<setting>/             cross-validation within the corpus
<W>/<train>-to-<test>/<setting>/    trained on one corpus, tested on another (study.cross_corpus)
<W>/results.json, results.md        per corpus and setting WA, UA and the paired differences from
                                    the reference setting; pooled over corpora (ser_jax.meta)
<W>/forest.png, cross_corpus.png    the UA differences per corpus and pooled; the UA matrices

Each run's config is `study.base`'s, then every ordinary key that the study config sets
away from ser_jax's defaults (or names on the command line), then the corpus, then the
setting's overrides. With cv.scheme='speaker' a corpus gets min(cv.n_folds, its speakers)
folds. A rerun reads finished runs (their files untouched), resumes unfinished ones from
their checkpoints, and retries failed ones. A corpus that cannot be read fails alone, with
one line, and the table says so.

The study runs in one process, or as one job per run: `--list_runs` prints them, `--run=PATH`
or `--task_index=I` (a SLURM array's $SLURM_ARRAY_TASK_ID; launch/slurm_study.sbatch) runs
one, and `--summarise` then writes the table from whatever has finished, running nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence

import ml_collections

from ser_jax import compare, experiment, io_utils, meta, plots
from ser_jax.audio import AudioError
from ser_jax.config import ConfigError, default_config, validate_config
from ser_jax.data import corpora
from ser_jax.data.corpus import CorpusError
from ser_jax.folds import FoldError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Study keys that choose which runs exist and how the table is computed: a rerun may change
# them (corpora and settings may be added or removed, not redefined).
_STUDY_NEUTRAL_KEYS = ("study.corpora", "study.settings", "study.cross_corpus", "study.resamples")
# Keys a study sets itself, per corpus and pair; a setting may not.
_CORPUS_KEYS = ("data.corpus", "data.root", "data.audio_root", "data.test_corpus", "data.test_root")
# Ordinary keys that apply to EmoBox corpora only; a study's other corpora keep the defaults.
_EMOBOX_KEYS = ("data.audio_root", "data.case_insensitive_paths")
# What makes one run fail (and, for the reference setting, its corpus) while the study goes on.
RUN_ERRORS = (
  ConfigError,
  CorpusError,
  FoldError,
  AudioError,
  FileNotFoundError,
  experiment.NonFiniteLossError,
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
# A setting's overrides are split at the commas that start the next `key=`.
_NEXT_OVERRIDE = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")


def default_study_config() -> ml_collections.ConfigDict:
  """Every ordinary key (ser_jax.config) and the `study` group."""
  config = default_config()
  config.study = ml_collections.ConfigDict()
  config.study.base = "configs/mfcc_focal.py"  # Config file (path or path:argument).
  # 'NAME=CORPUS:ROOT' (CORPUS a reader; for csv ROOT is the manifest), and for EmoBox
  # 'NAME=emobox:ROOT@AUDIO_ROOT' (ROOT its data/<dataset>/ folder; @AUDIO_ROOT optional).
  config.study.corpora = ()
  config.study.settings = ()  # 'NAME:key=value,key=value'; the first is the reference.
  config.study.cross_corpus = False  # Also train on each corpus and test on every other.
  config.study.resamples = compare.DEFAULT_RESAMPLES  # Bootstrap resamples and permutations.
  return config


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One corpus of the study: its name, reader and root (and an EmoBox corpus's audio root)."""

  name: str
  reader: str
  root: str
  audio_root: str = ""


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting: its name and its config overrides, in order."""

  name: str
  overrides: tuple[tuple[str, object], ...]

  def describe(self) -> str:
    return ", ".join(f"{key}={value}" for key, value in self.overrides) or "the base config"


@dataclasses.dataclass(frozen=True)
class Run:
  """One ordinary run of the study."""

  path: str  # Relative to the study's workdir.
  setting: str
  config: ml_collections.ConfigDict


def parse_corpus(text: str) -> Corpus:
  """'NAME=CORPUS:ROOT' -> Corpus; ROOT made absolute (it may be empty for 'demo')."""
  name, equals, rest = text.partition("=")
  reader, colon, root = rest.partition(":")
  name, reader, root = name.strip(), reader.strip(), root.strip()
  if not (equals and colon and _NAME.fullmatch(name)):
    raise ConfigError(
      f"study.corpora entry {text!r} is not NAME=CORPUS:ROOT (NAME of letters, digits and _), "
      "e.g. 'emodb=emodb:/data/emodb', 'casia=csv:/data/casia/manifest.csv' or "
      "'emodb=emobox:/EmoBox/data/emodb@/data/emodb'"
    )
  if reader not in corpora.CORPORA:
    raise ConfigError(
      f"study.corpora entry {text!r}: unknown corpus '{reader}'; expected one of: "
      f"{', '.join(sorted(corpora.CORPORA))}"
    )
  if not root and reader != "demo":
    raise ConfigError(f"study.corpora entry {text!r} has no ROOT (only 'demo' is built in)")
  audio_root = ""
  if reader == "emobox":
    root, _, audio_root = root.partition("@")
    audio_root = _absolute(audio_root.strip())
  return Corpus(name, reader, _absolute(root.strip()), audio_root)


def _absolute(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path)) if path else ""


def parse_setting(text: str) -> Setting:
  """'NAME:key=value,key=value' -> Setting; values are Python literals, or else strings."""
  name, _, rest = text.partition(":")
  name = name.strip()
  if not _NAME.fullmatch(name):
    raise ConfigError(
      f"study.settings entry {text!r} is not NAME:key=value,... (NAME of letters, digits "
      "and _), e.g. 'focal:loss.name=focal,loss.gamma=2.0'"
    )
  overrides = []
  for part in _NEXT_OVERRIDE.split(rest) if rest.strip() else ():
    key, equals, value = part.partition("=")
    key = key.strip()
    if not equals or not key:
      raise ConfigError(f"study.settings entry {text!r}: {part!r} is not key=value")
    if key in _CORPUS_KEYS:
      raise ConfigError(
        f"study.settings entry {text!r} sets {key}, which the study sets per corpus; "
        "give corpora in study.corpora"
      )
    overrides.append((key, _literal(value.strip())))
  return Setting(name, tuple(overrides))


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _unique(kind: str, names: Sequence[str]) -> None:
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"study.{kind} repeats the name {repeated[0]!r}; names must differ")


def study_parts(config: ml_collections.ConfigDict) -> tuple[list[Corpus], list[Setting]]:
  """The study's corpora and settings, checked; ConfigError names the bad entry."""
  if not config.study.corpora:
    raise ConfigError("study.corpora is empty; give at least one 'NAME=CORPUS:ROOT'")
  if not config.study.settings:
    raise ConfigError("study.settings is empty; give at least one 'NAME:key=value,...'")
  if config.study.resamples < 2:
    raise ConfigError(f"study.resamples={config.study.resamples} must be at least 2")
  study_corpora = [parse_corpus(text) for text in config.study.corpora]
  settings = [parse_setting(text) for text in config.study.settings]
  _unique("corpora", [c.name for c in study_corpora])
  _unique("settings", [s.name for s in settings])
  return study_corpora, settings


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """get_config() of a config file given as `path` or `path:argument` (as --config takes it);
  a relative path is looked up in the working folder, then in the repository."""
  path, _, argument = spec.partition(":")
  candidates = [pathlib.Path(path).expanduser()]
  if not candidates[0].is_absolute():
    candidates.append(REPO / path)
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise ConfigError(
      f"study.base={spec!r} is not a config file (looked for {', '.join(map(str, candidates))})"
    )
  module_spec = importlib.util.spec_from_file_location(f"_study_base_{found.stem}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _flat(config: ml_collections.ConfigDict, skip: Iterable[str] = ()) -> dict:
  """{'group.key': value} of the config's keys, lists as tuples."""
  out = {}
  for group, value in config.items():
    if group in skip:
      continue
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f"{group}.{key}": _tuples(v) for key, v in value.items()})
    else:
      out[group] = _tuples(value)
  return out


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _set(config: ml_collections.ConfigDict, key: str, value, where: str) -> None:
  *groups, name = key.split(".")
  node = config
  for group in groups:
    if group not in node or not isinstance(node[group], ml_collections.ConfigDict):
      raise ConfigError(f"{where}: unknown config key '{key}'")
    node = node[group]
  if name not in node:
    raise ConfigError(f"{where}: unknown config key '{key}'")
  try:
    node[name] = value
  except (TypeError, ValueError) as error:
    raise ConfigError(f"{where}: {key}={value!r} is not allowed ({error})") from None


def run_config(
  config: ml_collections.ConfigDict,
  corpus: Corpus,
  setting: Setting,
  explicit_keys: Iterable[str] = (),
) -> ml_collections.ConfigDict:
  """The config of `setting` on `corpus` (before the corpus's fold count; see the module)."""
  run = load_config_file(config.study.base)
  defaults = _flat(default_config())
  explicit = set(explicit_keys)
  for key, value in _flat(config, skip=("study",)).items():
    if key in explicit or value != defaults.get(key):
      _set(run, key, value, "study config")
  _set(run, "data.corpus", corpus.reader, f"corpus '{corpus.name}'")
  _set(run, "data.root", corpus.root, f"corpus '{corpus.name}'")
  if corpus.reader == "emobox":
    if corpus.audio_root:  # Else the study's data.audio_root, or the default.
      _set(run, "data.audio_root", corpus.audio_root, f"corpus '{corpus.name}'")
  else:
    for key in _EMOBOX_KEYS:
      _set(run, key, defaults[key], f"corpus '{corpus.name}'")
  for key, value in setting.overrides:
    _set(run, key, value, f"setting '{setting.name}'")
  if run.sweep.gammas or run.sweep.alphas:
    raise ConfigError(
      f"setting '{setting.name}': a study's runs are single models; leave sweep.gammas and "
      "sweep.alphas empty and give each model as a setting"
    )
  return run


def within_runs(
  config: ml_collections.ConfigDict,
  corpus: Corpus,
  settings: Sequence[Setting],
  explicit_keys: Iterable[str] = (),
) -> tuple[list[Run], tuple[str, ...]]:
  """The corpus's cross-validated runs, one per setting, and its classes as listed; raises
  one of RUN_ERRORS when the corpus cannot be used."""
  runs, classes = [], None
  for setting in settings:
    run = run_config(config, corpus, setting, explicit_keys)
    listed = experiment.load_corpus(run)
    classes = classes or tuple(listed.class_names)
    if run.cv.scheme == "speaker":
      speakers = sorted({u.speaker for u in listed.utterances})
      if len(speakers) < 2:
        raise FoldError(
          f"cv.scheme='speaker' needs speaker ids, but corpus '{corpus.name}' has "
          f"{len(speakers)} speaker ({', '.join(speakers)}); give its manifest a speaker "
          "column, or use cv.scheme=stratified"
        )
      if len(speakers) < run.cv.n_folds:
        logging.info(
          "Corpus %s has %d speakers: as many speaker-independent folds (cv.n_folds=%d)",
          corpus.name,
          len(speakers),
          run.cv.n_folds,
        )
        run.cv.n_folds = len(speakers)
    validate_config(run)
    runs.append(Run(f"{corpus.name}/{setting.name}", setting.name, run))
  return runs, classes


def cross_run(
  config: ml_collections.ConfigDict,
  train: Corpus,
  test: Corpus,
  setting: Setting,
  test_classes: Sequence[str],
  explicit_keys: Iterable[str] = (),
) -> Run:
  """`setting` trained on every kept utterance of `train` and tested on `test`, on the
  classes both have (data.class_shares restricted to them)."""
  run = run_config(config, train, setting, explicit_keys)
  train_classes = experiment.load_corpus(run).class_names
  shared = [name for name in train_classes if name in test_classes]
  if len(shared) < 2:
    raise ConfigError(
      f"corpora '{train.name}' and '{test.name}' share {len(shared)} class(es) "
      f"({', '.join(shared) or 'none'}); a run across them needs at least two"
    )
  if run.data.class_shares:
    shares = dict(zip(train_classes, run.data.class_shares, strict=True))
    run.data.class_shares = tuple(shares[name] for name in shared)
  run.data.classes = tuple(shared)
  run.data.test_corpus = test.reader
  run.data.test_root = test.root
  run.cv.folds = ()
  validate_config(run)
  return Run(f"{train.name}-to-{test.name}/{setting.name}", setting.name, run)


# Rerunning ---------------------------------------------------------------------------------------


def _changed_keys(previous: dict, current: dict, neutral: Iterable[str]) -> list[str]:
  """Dotted keys whose values differ between two configs as JSON, apart from `neutral`."""
  flat_previous, flat_current = _flat_json(previous), _flat_json(current)
  return sorted(
    key
    for key in set(flat_previous) | set(flat_current)
    if key not in neutral and flat_previous.get(key) != flat_current.get(key)
  )


def _flat_json(values: dict) -> dict:
  out = {}
  for group, value in values.items():
    if isinstance(value, dict):
      out.update({f"{group}.{key}": v for key, v in value.items()})
    else:
      out[group] = value
  return out


def check_same_study(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses a study config that would mix results with what `workdir` holds: a changed
  ordinary key or base, or a corpus or setting whose name now means something else."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    previous = json.loads(path.read_text())
    changed = _changed_keys(
      previous, current, (*experiment.RESULT_NEUTRAL_KEYS, *_STUDY_NEUTRAL_KEYS)
    )
    for kind in ("corpora", "settings"):
      before = _entries(previous["study"][kind])
      now = _entries(current["study"][kind])
      changed += [
        f"study.{kind}[{n}]" for n in sorted(before.keys() & now.keys()) if before[n] != now[n]
      ]
    if changed:
      raise experiment.ConfigMismatchError(
        f"study workdir {workdir} holds a study with a different config (changed: "
        f"{', '.join(changed)}); use another --workdir, or --fresh to discard it"
      )
  io_utils.atomic_write_json(path, current)


def _entries(texts: Sequence[str]) -> dict[str, str]:
  """{name: definition} of study.corpora or study.settings entries, as written."""
  return {re.split(r"[=:]", text, maxsplit=1)[0].strip(): text.strip() for text in texts}


def _finished(run_dir: pathlib.Path) -> bool:
  # A run writes predictions.csv after results.json, so both mean it finished.
  return (run_dir / "results.json").is_file() and (run_dir / "predictions.csv").is_file()


def _check_finished_run(run: Run, run_dir: pathlib.Path) -> None:
  """A finished run is read only if its config.json is the run's config (as `main` checks)."""
  previous = json.loads((run_dir / "config.json").read_text())
  changed = _changed_keys(
    previous, json.loads(run.config.to_json_best_effort()), experiment.RESULT_NEUTRAL_KEYS
  )
  if changed:
    raise experiment.ConfigMismatchError(
      f"run {run_dir} holds a run with a different config (changed: {', '.join(changed)}); "
      "use another --workdir, or --fresh to discard the study"
    )


def execute(run: Run, workdir: pathlib.Path) -> tuple[dict | None, str | None]:
  """(results.json, None) of a finished, resumed or new run; (None, error line) if it fails."""
  run_dir = workdir / run.path
  if _finished(run_dir):
    _check_finished_run(run, run_dir)
    logging.info("Run %s already finished; reading its results", run.path)
    return json.loads((run_dir / "results.json").read_text()), None
  logging.info("Run %s", run.path)
  try:
    return experiment.train_and_evaluate(run.config, str(run_dir)), None
  except RUN_ERRORS as error:
    logging.error("Run %s failed: %s", run.path, error)
    return None, str(error)


# The study ---------------------------------------------------------------------------------------


def run_paths(study_corpora: Sequence[Corpus], settings: Sequence[Setting], cross: bool):
  """Every run of the study in the order it runs them: `<corpus>/<setting>` for each corpus
  and setting, then `<train>-to-<test>/<setting>` for each setting and pair of corpora. Task
  i of a SLURM array (`--task_index`) is the i-th."""
  paths = [f"{c.name}/{s.name}" for c in study_corpora for s in settings]
  if cross:
    paths += [
      f"{train.name}-to-{test.name}/{s.name}"
      for s in settings
      for train in study_corpora
      for test in study_corpora
      if train.name != test.name
    ]
  return paths


def run_study(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  fresh: bool = False,
  explicit_keys: Iterable[str] = (),
  summarise_only: bool = False,
) -> dict:
  """Runs (or resumes) every run of the study; writes and returns its results. With
  `summarise_only`, runs nothing: the table holds the runs that have finished (those that
  have not are failures of the table, each naming how to run it)."""
  start = time.time()
  study_corpora, settings = study_parts(config)
  # Every run's config is checked before anything runs: a bad key fails the study at once.
  for corpus in study_corpora:
    for setting in settings:
      validate_config(run_config(config, corpus, setting, explicit_keys))
  workdir = pathlib.Path(workdir)
  if fresh and workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  act = read_finished if summarise_only else execute
  # A summary waits for a whole study running in the same workdir; a second whole study is
  # refused. Single runs (run_one) only check the config under this lock.
  with io_utils.exclusive_lock(
    workdir / "study.lock", f"study workdir {workdir}", wait=summarise_only
  ):
    check_same_study(config, workdir)
    failures: dict[str, str] = {}  # Corpus -> why it failed.
    classes: dict[str, tuple[str, ...]] = {}
    outcomes: dict[str, Outcome] = {}
    for corpus in study_corpora:
      try:
        runs, classes[corpus.name] = within_runs(config, corpus, settings, explicit_keys)
      except RUN_ERRORS as error:
        failures[corpus.name] = str(error)
        logging.error("Corpus %s failed: %s; the study goes on without it", corpus.name, error)
        continue
      for run in runs:
        outcomes[run.path] = Outcome(*act(run, workdir))
        if outcomes[run.path].error and run.setting == settings[0].name:
          failures[corpus.name] = f"its {run.setting} run failed: {outcomes[run.path].error}"
          logging.error("Corpus %s failed; the study goes on without it", corpus.name)
          break
    if config.study.cross_corpus:
      usable = [c for c in study_corpora if c.name not in failures]
      for setting in settings:
        for train in usable:
          for test in usable:
            if train.name != test.name:
              path = f"{train.name}-to-{test.name}/{setting.name}"
              try:
                run = cross_run(config, train, test, setting, classes[test.name], explicit_keys)
              except RUN_ERRORS as error:
                logging.error("Run %s failed: %s", path, error)
                outcomes[path] = Outcome(None, str(error))
                continue
              outcomes[path] = Outcome(*act(run, workdir))
    summary = summarise(config, workdir, study_corpora, settings, failures, outcomes)
    summary["wall_seconds"] = time.time() - start
    write_study(workdir, summary)
  return summary


def run_one(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  path: str,
  *,
  explicit_keys: Iterable[str] = (),
) -> Outcome:
  """Runs (or resumes, or reads) the one run `path` of the study (see run_paths), so that
  runs can be separate jobs; `run_study(..., summarise_only=True)` then makes the table.
  Jobs started together are safe: each run has its own workdir lock, and runs that share a
  feature store wait for the one that builds it."""
  study_corpora, settings = study_parts(config)
  paths = run_paths(study_corpora, settings, config.study.cross_corpus)
  if path not in paths:
    raise ConfigError(f"study has no run {path!r}; its runs: {', '.join(paths)}")
  folder, setting_name = path.rsplit("/", 1)
  by_name = {c.name: c for c in study_corpora}
  setting = next(s for s in settings if s.name == setting_name)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with io_utils.exclusive_lock(workdir / "study.lock", f"study workdir {workdir}", wait=True):
    check_same_study(config, workdir)
  try:
    if folder in by_name:
      (run,), _ = within_runs(config, by_name[folder], [setting], explicit_keys)
    else:
      train, test = (by_name[name] for name in folder.split("-to-"))
      _, test_classes = within_runs(config, test, settings[:1], explicit_keys)
      run = cross_run(config, train, test, setting, test_classes, explicit_keys)
  except RUN_ERRORS as error:
    logging.error("Run %s failed: %s", path, error)
    return Outcome(None, str(error))
  return Outcome(*execute(run, workdir))


def read_finished(run: Run, workdir: pathlib.Path) -> tuple[dict | None, str | None]:
  """(results.json, None) of a finished run; (None, why not) of one that has not finished."""
  run_dir = workdir / run.path
  if not _finished(run_dir):
    return None, f"not finished (python -m ser_jax.study ... --run={run.path} runs it)"
  _check_finished_run(run, run_dir)
  logging.info("Run %s already finished; reading its results", run.path)
  return json.loads((run_dir / "results.json").read_text()), None


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A run's results.json, or the line saying why it failed."""

  result: dict | None
  error: str | None = None


# The table ---------------------------------------------------------------------------------------


def paired_difference(run_a: pathlib.Path, run_b: pathlib.Path, n_resamples: int) -> dict:
  """`report --compare run_a run_b` (B - A), whose standard errors come from the draws that
  give its intervals."""
  predictions_a, predictions_b = compare.load_predictions(run_a), compare.load_predictions(run_b)
  summaries = [json.loads((run / "results.json").read_text()) for run in (run_a, run_b)]
  return compare.json_ready(
    compare.compare_runs(predictions_a, predictions_b, *summaries, n_resamples=n_resamples)
  )


def _corpus_facts(run_dir: pathlib.Path, summary: dict) -> dict:
  """Utterances, speakers and class counts as the run trained on them, and its folds."""
  predictions = compare.load_predictions(run_dir)
  first = predictions.member == 0
  folds = sorted(set(predictions.fold[first].tolist()))
  used = summary["class_counts"]["used"]
  return {
    "utterances": int(sum(used.values())),
    "speakers": len(set(predictions.speaker[first].tolist())),
    "class_counts": used,
    "cv_scheme": summary["config"]["cv"]["scheme"],
    "n_folds": len(summary["folds"]),
    "test_speakers_per_fold": [
      len(set(predictions.speaker[first & (predictions.fold == f)].tolist())) for f in folds
    ],
  }


def _run_entry(workdir, outcome: Outcome, path: str, reference: str, n_resamples: int) -> dict:
  """A run's WA and UA (mean +/- sd over folds) and its paired difference from `reference`."""
  if outcome.result is None:
    return {"run": path, "status": "failed", "error": outcome.error}
  entry: dict = {"run": path, "status": "ok"}
  for name in ("overall_accuracy", "class_accuracy"):
    entry[name] = outcome.result[name]
    entry[f"{name}_std"] = outcome.result[f"{name}_std"]
  if path != reference:
    entry["difference"] = paired_difference(workdir / reference, workdir / path, n_resamples)
  return entry


_METRICS = {"ua": "class_accuracy", "wa": "overall_accuracy"}


def _pool(rows: dict[str, dict], metric: str) -> dict:
  """The random-effects pool of the corpora's `metric` ('ua' or 'wa') differences."""
  ok = {name: row["difference"] for name, row in rows.items() if "difference" in row}
  effects = [d[f"{metric}_difference"] for d in ok.values()]
  variances = [d[f"{metric}_standard_error"] ** 2 for d in ok.values()]
  if len(ok) < 2:
    return {
      "corpora": list(ok),
      "not_pooled": f"{len(ok)} corpus with a difference; pooling needs 2",
    }
  zero = [name for name, v in zip(ok, variances, strict=True) if not v > 0]
  if zero:
    return {
      "corpora": list(ok),
      "not_pooled": f"the difference on {', '.join(zero)} has no bootstrap variance (the two "
      "runs predict alike on every utterance), so inverse-variance weights are undefined",
    }
  return {"corpora": list(ok), **meta.random_effects(effects, variances).as_dict()}


def summarise(config, workdir, study_corpora, settings, failures, outcomes) -> dict:
  """The study's results.json: corpora, runs, paired differences, pooled estimates, matrices."""
  reference = settings[0].name
  n_resamples = int(config.study.resamples)
  corpus_rows, within = {}, {}
  for corpus in study_corpora:
    row = {"reader": corpus.reader, "root": corpus.root}
    if corpus.name in failures:
      corpus_rows[corpus.name] = {**row, "status": "failed", "error": failures[corpus.name]}
      continue
    reference_path = f"{corpus.name}/{reference}"
    facts = _corpus_facts(workdir / reference_path, outcomes[reference_path].result)
    corpus_rows[corpus.name] = {**row, "status": "ok", **facts}
    within[corpus.name] = {
      s.name: _run_entry(
        workdir,
        outcomes.get(f"{corpus.name}/{s.name}", Outcome(None, "not run")),
        f"{corpus.name}/{s.name}",
        reference_path,
        n_resamples,
      )
      for s in settings
    }
  summary = {
    "study": {
      "base": config.study.base,
      "reference": reference,
      "settings": {s.name: s.describe() for s in settings},
      "corpora": {
        c.name: f"{c.reader}:{c.root}" + (f"@{c.audio_root}" if c.audio_root else "")
        for c in study_corpora
      },
      "cross_corpus": bool(config.study.cross_corpus),
      "resamples": n_resamples,
      "meta_analysis": meta.METHOD,
    },
    "corpora": corpus_rows,
    "within": within,
    "pooled": {
      s.name: {
        metric: _pool({name: rows[s.name] for name, rows in within.items()}, metric)
        for metric in _METRICS
      }
      for s in settings[1:]
    },
  }
  if config.study.cross_corpus:
    summary["cross_corpus"] = _cross_summary(
      workdir,
      [c.name for c in study_corpora if c.name in within],
      settings,
      outcomes,
      within,
      n_resamples,
    )
  summary["failures"] = [f"corpus {name}: {error}" for name, error in failures.items()] + [
    f"run {path}: {outcome.error}" for path, outcome in outcomes.items() if outcome.error
  ]
  return compare.json_ready(summary)


def _cross_summary(workdir, names, settings, outcomes, within, n_resamples) -> dict:
  """Per setting, the train x test UA matrix (diagonal: within-corpus CV) and, per pair,
  the paired difference from the reference setting."""
  reference = settings[0].name
  matrices, pairs = {}, []
  for setting in settings:
    matrix = []
    for train in names:
      row = []
      for test in names:
        if train == test:
          entry = within[train][setting.name]
          row.append(entry.get("class_accuracy"))
          continue
        outcome = outcomes.get(f"{train}-to-{test}/{setting.name}", Outcome(None))
        row.append(outcome.result["class_accuracy"] if outcome.result else None)
      matrix.append(row)
    matrices[setting.name] = {"corpora": names, "ua": matrix}
  for train in names:
    for test in names:
      if train == test:
        continue
      folder = f"{train}-to-{test}"
      reference_outcome = outcomes.get(f"{folder}/{reference}", Outcome(None))
      classes = reference_outcome.result["class_names"] if reference_outcome.result else None
      for setting in settings[1:]:
        outcome = outcomes.get(f"{folder}/{setting.name}", Outcome(None))
        pair = {"train": train, "test": test, "setting": setting.name, "classes": classes}
        if reference_outcome.result and outcome.result:
          pair["difference"] = paired_difference(
            workdir / folder / reference, workdir / folder / setting.name, n_resamples
          )
        pairs.append(pair)
  return {"ua": matrices, "differences": pairs}


# Writing -----------------------------------------------------------------------------------------


def _pm(entry: dict, name: str) -> str:
  return f"{entry[name]:.1f} +/- {entry[f'{name}_std']:.1f}"


def _interval(difference: dict, metric: str) -> str:
  low, high = difference[f"{metric}_difference_ci95"]
  return f"{difference[f'{metric}_difference']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _p(value: float) -> str:
  return f"{value:.3g}"


def study_markdown(summary: dict) -> str:
  """results.md: corpora, within-corpus results, pooled differences, matrices, failures."""
  study = summary["study"]
  reference = study["reference"]
  settings = list(study["settings"])
  lines = [
    f"# Study: {', '.join(settings)} on {', '.join(study['corpora'])}",
    "",
    f"Every run starts from `{study['base']}`. Settings: "
    + "; ".join(f"{name}: {text}" for name, text in study["settings"].items())
    + f". Reference: {reference}. This invocation took {summary['wall_seconds']:.0f} s.",
    "",
    "## Corpora (as trained by the reference run)",
    "",
    "| corpus | reader | utterances | speakers | class counts | folds | status |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, row in summary["corpora"].items():
    if row["status"] != "ok":
      lines.append(f"| {name} | {row['reader']} | | | | | failed: {row['error']} |")
      continue
    counts = ", ".join(f"{c} {n}" for c, n in row["class_counts"].items())
    folds = f"{row['n_folds']} {row['cv_scheme']}"
    if row["cv_scheme"] == "speaker" and set(row["test_speakers_per_fold"]) == {1}:
      folds += " (leave one speaker out)"
    lines.append(
      f"| {name} | {row['reader']} | {row['utterances']} | {row['speakers']} | {counts} | "
      f"{folds} | ok |"
    )
  lines += [
    "",
    "## Within each corpus",
    "",
    f"WA and UA: mean +/- sd over folds (%). Differences: setting minus {reference} on the same "
    "test utterances (pooled over folds), 95 % paired-bootstrap interval resampled within "
    "folds, p from the paired permutation test (UA) and the exact McNemar test (WA), as "
    "`python -m ser_jax.report --compare` gives them.",
    "",
    f"| corpus | setting | WA | UA | UA - {reference} [95 % CI] | p | WA - {reference} "
    "[95 % CI] | p |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for corpus, rows in summary["within"].items():
    for setting, entry in rows.items():
      if entry["status"] != "ok":
        lines.append(f"| {corpus} | {setting} | failed: {entry['error']} | | | | | |")
        continue
      difference = entry.get("difference")
      if difference is None:
        cells = "(reference) | | | |"
      else:
        cells = (
          f"{_interval(difference, 'ua')} | {_p(difference['ua_p_value'])} | "
          f"{_interval(difference, 'wa')} | {_p(difference['wa_p_value'])} |"
        )
      lines.append(
        f"| {corpus} | {setting} | {_pm(entry, 'overall_accuracy')} | "
        f"{_pm(entry, 'class_accuracy')} | {cells}"
      )
  lines += [
    "",
    "## Pooled across corpora",
    "",
    f"Method: {study['meta_analysis']}, over the per-corpus differences with their bootstrap "
    "variances (see ser_jax/meta.py for why). Common effect: inverse-variance weights, normal "
    "interval (these corpora only).",
    "",
    f"| setting - {reference} | metric | corpora | pooled [95 % CI] | p | tau^2 | I^2 (%) | "
    "Q (df, p) | common effect [95 % CI] |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for setting, metrics in summary["pooled"].items():
    for metric, pooled in metrics.items():
      if "not_pooled" in pooled:
        lines.append(
          f"| {setting} | {metric.upper()} | {len(pooled['corpora'])} | not pooled: "
          f"{pooled['not_pooled']} | | | | | |"
        )
        continue
      low, high = pooled["ci95"]
      common_low, common_high = pooled["common_effect_ci95"]
      lines.append(
        f"| {setting} | {metric.upper()} | {pooled['k']} | {pooled['estimate']:+.2f} "
        f"[{low:+.2f}, {high:+.2f}] | {_p(pooled['p_value'])} | {pooled['tau2']:.2f} | "
        f"{pooled['i2']:.0f} | {pooled['q']:.2f} ({pooled['q_df']}, {_p(pooled['q_p_value'])}) | "
        f"{pooled['common_effect']:+.2f} [{common_low:+.2f}, {common_high:+.2f}] |"
      )
  if "cross_corpus" in summary:
    lines += _cross_markdown(summary["cross_corpus"], reference)
  if summary["failures"]:
    lines += ["", "## Failures", ""] + [f"- {line}" for line in summary["failures"]]
  return "\n".join(lines) + "\n"


def _cross_markdown(cross: dict, reference: str) -> list[str]:
  lines = [
    "",
    "## Across corpora",
    "",
    "UA (%) of the model trained on every kept utterance of the row's corpus and tested on "
    "every utterance of the column's, on the classes both have (features standardised with "
    "the training corpus's statistics); the diagonal is the within-corpus cross-validated UA.",
  ]
  for setting, matrix in cross["ua"].items():
    names = matrix["corpora"]
    lines += ["", f"{setting}:", "", "| trained on \\ tested on | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for name, row in zip(names, matrix["ua"], strict=True):
      cells = ["failed" if v is None else f"{v:.1f}" for v in row]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if cross["differences"]:
    lines += [
      "",
      f"| trained on | tested on | classes | setting | UA - {reference} [95 % CI] | p | "
      f"WA - {reference} [95 % CI] | p |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for pair in cross["differences"]:
      difference = pair.get("difference")
      start = f"| {pair['train']} | {pair['test']} | {', '.join(pair['classes'] or [])} | {pair['setting']} |"
      if difference is None:
        lines.append(f"{start} failed | | | |")
        continue
      lines.append(
        f"{start} {_interval(difference, 'ua')} | {_p(difference['ua_p_value'])} | "
        f"{_interval(difference, 'wa')} | {_p(difference['wa_p_value'])} |"
      )
  return lines


def write_study(workdir: pathlib.Path, summary: dict) -> list[pathlib.Path]:
  """results.json, results.md, forest.png (when there are differences) and cross_corpus.png."""
  io_utils.atomic_write_json(workdir / "results.json", summary)
  io_utils.atomic_write_text(workdir / "results.md", study_markdown(summary))
  written = [workdir / "results.json", workdir / "results.md"]
  reference = summary["study"]["reference"]
  panels = []
  for setting, metrics in summary["pooled"].items():
    rows = [
      {
        "label": corpus,
        "estimate": entry["difference"]["ua_difference"],
        "low": entry["difference"]["ua_difference_ci95"][0],
        "high": entry["difference"]["ua_difference_ci95"][1],
      }
      for corpus, entries in summary["within"].items()
      if "difference" in (entry := entries[setting])
    ]
    pooled = metrics["ua"]
    if "estimate" in pooled:
      rows += [
        {
          "label": f"pooled, random effects ({pooled['k']} corpora)",
          "estimate": pooled["estimate"],
          "low": pooled["ci95"][0],
          "high": pooled["ci95"][1],
          "pooled": True,
        },
        {
          "label": "common effect (these corpora)",
          "estimate": pooled["common_effect"],
          "low": pooled["common_effect_ci95"][0],
          "high": pooled["common_effect_ci95"][1],
          "pooled": True,
          "colour": "tab:grey",
        },
      ]
    if rows:
      panels.append({"title": f"{setting} - {reference}", "rows": rows})
  if panels:
    written.append(workdir / "forest.png")
    plots.plot_forest(panels, written[-1], "UA difference (points), 95 % interval")
  if summary.get("cross_corpus"):
    matrices = [
      {"title": setting, **matrix} for setting, matrix in summary["cross_corpus"]["ua"].items()
    ]
    if matrices and matrices[0]["corpora"]:
      written.append(workdir / "cross_corpus.png")
      plots.plot_cross_corpus(matrices, written[-1])
  return written


# The entry point ---------------------------------------------------------------------------------


def override_keys(argv: Sequence[str]) -> list[str]:
  """The `--config.<key>=` overrides on a command line, as dotted keys."""
  return [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def check_override_keys(argv: Sequence[str]) -> None:
  """Exits with one line when an override names no key of a study config."""
  reference = default_study_config()
  for key in override_keys(argv):
    node = reference
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        print(f"error: unknown config key '{key}' of a study config", file=sys.stderr)
        sys.exit(2)
      node = node[part]


def main() -> None:
  """The command line: flags are defined here, so that importing this module defines none."""
  from absl import app, flags

  from ser_jax import cli

  config_flag = cli.config_flag()
  workdir_flag = cli.workdir_flag()
  fresh_flag = flags.DEFINE_bool("fresh", False, "Discard the whole study and start again.")
  run_flag = flags.DEFINE_string(
    "run", None, "Run only this run, e.g. emodb/focal or emodb-to-casia/focal (--list_runs)."
  )
  task_flag = flags.DEFINE_integer(
    "task_index",
    None,
    "Run only the run of this index in --list_runs (0 first), e.g. $SLURM_ARRAY_TASK_ID.",
  )
  list_flag = flags.DEFINE_bool("list_runs", False, "Print the study's runs, one a line, and exit.")
  summarise_flag = flags.DEFINE_bool(
    "summarise", False, "Run nothing: write the table of the runs that have finished."
  )
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv) -> int:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    modes = [run_flag.value is not None, task_flag.value is not None, summarise_flag.value]
    if sum(modes) > 1 or (fresh_flag.value and any(modes)):
      raise app.UsageError("give at most one of --run, --task_index and --summarise, no --fresh")
    cli.setup_logging()
    cli.use_compilation_cache()
    explicit = [key for key in override_keys(sys.argv) if not key.startswith("study.")]
    with cli.clear_errors():
      study_corpora, settings = study_parts(config_flag.value)
      paths = run_paths(study_corpora, settings, config_flag.value.study.cross_corpus)
      if list_flag.value:
        print("\n".join(f"{i}\t{path}" for i, path in enumerate(paths)))
        return 0
      only = run_flag.value
      if task_flag.value is not None:
        if not 0 <= task_flag.value < len(paths):
          raise app.UsageError(
            f"--task_index={task_flag.value}; the study has runs 0..{len(paths) - 1} "
            "(--list_runs); a SLURM array of them is --array=0-" + str(len(paths) - 1)
          )
        only = paths[task_flag.value]
      if only is not None:
        outcome = run_one(config_flag.value, workdir_flag.value, only, explicit_keys=explicit)
        if outcome.error:
          print(f"failed: run {only}: {outcome.error}", file=sys.stderr)
          return 1
        print(f"finished {pathlib.Path(workdir_flag.value) / only}", file=sys.stderr)
        return 0
      summary = run_study(
        config_flag.value,
        workdir_flag.value,
        fresh=fresh_flag.value,
        explicit_keys=explicit,
        summarise_only=summarise_flag.value,
      )
    for line in summary["failures"]:
      print(f"failed: {line}", file=sys.stderr)
    print(f"wrote {pathlib.Path(workdir_flag.value) / 'results.md'}", file=sys.stderr)
    return 1 if summary["failures"] else 0

  app.run(run)


if __name__ == "__main__":
  from ser_jax import cpu

  cpu.tune_process()
  check_override_keys(sys.argv)
  main()
