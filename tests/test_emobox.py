"""EmoBox corpora: the reader against the metadata read with json, the given folds against
EmoBox's fold files, the scores against scikit-learn on predictions.csv, and a study run as
separate jobs started together, then summarised."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib

import numpy as np
import pytest
import soundfile as sf
from helpers import REPO, run_module, start_module
from sklearn import metrics as sk

from ser_jax import folds, run_data, run_results
from ser_jax.config import ConfigError, default_config, validate_config
from ser_jax.data.corpora import emobox_class, read_corpus
from ser_jax.data.corpus import CorpusError
from ser_jax.features import FeatureParams
from ser_jax.folds import FoldError
from ser_jax.report import main as report
from ser_jax.store import store_key
from ser_jax.study import compose

DATA = pathlib.Path(
  os.environ.get("SER_JAX_DATA") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
)
SPEAKERS = ("03", "08", "09")
# EmoDB's letters, the raw labels EmoBox writes for them, and label_map.json as EmoBox has it:
# a key that differs in case from the labels ('Neutral'), and EmoBox's own 'boredem'.
EMOTIONS = {"W": "anger", "F": "happy", "N": "neutral", "T": "sad"}
LABEL_MAP = {"anger": "Angry", "happy": "Happy", "Neutral": "Neutral", "sad": "Sad"}
MISSING = "09a05Wb"  # Listed, no file.
NEAR_MISS = "09a05Nb"  # Listed as this; the file is 09a05NB.wav.
IN_NO_FOLD = "08a04Tc"  # In the jsonl, in no fold file.
TESTED_TWICE = "03a01Fa"  # In fold_1's test file and fold_3's.
VALID = ("08a01Wa", "09a01Wa")  # fold_1's valid file.
UNLISTED = "16b10Wb"  # In fold_2's test file, not in the jsonl.
# What no run can test: no file, or (by default) a file that differs in letter case, or no
# line in the jsonl.
UNUSABLE = {f"emodb-{MISSING}", f"emodb-{NEAR_MISS}", f"emodb-{UNLISTED}"}


def _row(stem: str, *, rate: int = 16000, length: float = 0.25) -> dict:
  return {
    "key": f"emodb-{stem}",
    "dataset": "emodb",
    "wav": f"downloads/emodb/wav/{stem}.wav",
    "type": "raw",
    "sample_rate": rate,
    "num_frame": length * rate,
    "task": "category",
    "length": length,
    "emo": EMOTIONS[stem[5]],
    "channel": 1,
  }


def _write_jsonl(path: pathlib.Path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_emobox(base: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A small EmoBox EmoDB folder as EmoBox ships it, its audio under base/EmoBox/downloads:
  3 speakers x 4 classes x 3 takes, speaker k held out in fold_k; returns (root, checkout)."""
  checkout = base / "EmoBox"
  root = checkout / "data" / "emodb"
  rows = []
  for speaker in SPEAKERS:
    for code in EMOTIONS:
      for sentence, take in (("a01", "a"), ("a04", "c"), ("a05", "b")):
        stem = f"{speaker}{sentence}{code}{take}"
        # Two files at another rate than listed, one of another length (EmoBox's metadata
        # was made from the original releases).
        rows.append(
          _row(
            stem,
            rate=22050 if stem in ("03a01Wa", "03a04Fc") else 16000,
            length=0.5 if stem == "08a05Tb" else 0.25,
          )
        )
  rng = np.random.default_rng(0)
  for row in rows:
    stem = pathlib.Path(row["wav"]).stem
    if stem == MISSING:
      continue
    name = "09a05NB.wav" if stem == NEAR_MISS else f"{stem}.wav"
    path = checkout / "downloads" / "emodb" / "wav" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pitch = 120.0 * (1 + list(EMOTIONS).index(stem[5]))
    t = np.arange(4000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.01 * rng.normal(size=t.size)
    sf.write(path, wave.astype(np.float32), 16000, subtype="PCM_16")
  _write_jsonl(root / "emodb.jsonl", rows)
  (root / "label_map.json").write_text(json.dumps(LABEL_MAP, indent=4))
  for k, speaker in enumerate(SPEAKERS, start=1):
    key = f"emodb-{TESTED_TWICE}"
    test = [r for r in rows if r["key"][6:8] == speaker and r["key"] != f"emodb-{IN_NO_FOLD}"]
    train = [r for r in rows if r not in test and r["key"] != f"emodb-{IN_NO_FOLD}"]
    valid = []
    if k == 1:
      valid = [r for r in train if r["key"][6:] in VALID]
      train = [r for r in train if r not in valid]
    if k == 2:
      test.append(_row(UNLISTED))
    if k == 3:
      test.append(next(r for r in rows if r["key"] == key))
      train = [r for r in train if r["key"] != key]
    folder = root / f"fold_{k}"
    _write_jsonl(folder / f"emodb_train_fold_{k}.jsonl", train)
    _write_jsonl(folder / f"emodb_test_fold_{k}.jsonl", test)
    if valid:
      _write_jsonl(folder / f"emodb_valid_fold_{k}.jsonl", valid)
    # EmoDB's second set of files, which EmoBox's recipe does not read.
    _write_jsonl(folder / f"emodb_test_fold{k}.jsonl", rows[:3])
  return root, checkout


def _jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fold_keys(root: pathlib.Path, role: str) -> list[set[str]]:
  dataset = root.name
  return [
    {r["key"] for r in _jsonl(folder / f"{dataset}_{role}_{folder.name}.jsonl")}
    if (folder / f"{dataset}_{role}_{folder.name}.jsonl").exists()
    else set()
    for folder in sorted(root.glob("fold_*"), key=lambda p: int(p.name[5:]))
  ]


@pytest.fixture(scope="module")
def emobox(tmp_path_factory):
  return write_emobox(tmp_path_factory.mktemp("emobox"))


def test_labels_go_through_the_label_map_case_insensitively_into_ser_jax_names(emobox):
  root, checkout = emobox
  corpus = read_corpus("emobox", root, ())
  label_map = {k.lower(): v for k, v in json.loads((root / "label_map.json").read_text()).items()}
  expected = {
    r["key"]: emobox_class(label_map[r["emo"].lower()]) for r in _jsonl(root / "emodb.jsonl")
  }
  assert corpus.name == "emobox_emodb"
  assert corpus.class_names == ("anger", "happiness", "neutral", "sadness")
  assert {u.utt_id: u.label for u in corpus.utterances} == {
    k: v for k, v in expected.items() if k not in (f"emodb-{MISSING}", f"emodb-{NEAR_MISS}")
  }
  # The paper's four classes, as configs/mfcc_focal.py asks for them, on any corpus.
  paper = read_corpus("emobox", root, ("neutral", "happiness", "sadness", "anger"))
  assert paper.class_names == ("neutral", "happiness", "sadness", "anger")
  assert [emobox_class(n) for n in ("Angry", "Happy", "Sad", "Surprised", "Sarcastic")] == [
    "anger",
    "happiness",
    "sadness",
    "surprise",
    "sarcastic",
  ]


def test_speakers_from_emodb_naming_and_splits_from_the_fold_files(emobox):
  root, _ = emobox
  corpus = read_corpus("emobox", root, ())
  assert corpus.fold_names == ("fold_1", "fold_2", "fold_3")
  for u in corpus.utterances:
    assert u.speaker == u.group == pathlib.Path(u.path).stem[:2]
  for k in range(len(corpus.fold_names)):
    for name in ("train", "test", "valid"):
      listed = _fold_keys(root, name)[k]
      assert {u.utt_id for u in corpus.utterances if u.splits[k] == name} == listed - UNUSABLE


def test_a_missing_file_and_a_near_miss_by_letter_case_are_listed_skips(emobox):
  root, checkout = emobox
  corpus = read_corpus("emobox", root, ())
  reasons = {pathlib.Path(s.path).name: s.reason for s in corpus.skipped}
  assert reasons == {
    f"{MISSING}.wav": "audio file missing",
    f"{NEAR_MISS}.wav": "audio file missing; a file that differs only in letter case exists: "
    f"{checkout / 'downloads' / 'emodb' / 'wav' / '09a05NB.wav'} "
    "(data.case_insensitive_paths=True reads it)",
  }
  read = read_corpus("emobox", root, (), case_insensitive_paths=True)
  paths = {u.utt_id: u.path for u in read.utterances}
  assert paths[f"emodb-{NEAR_MISS}"].endswith("09a05NB.wav")
  assert [pathlib.Path(s.path).name for s in read.skipped] == [f"{MISSING}.wav"]


def test_metadata_that_disagrees_with_the_files_is_one_line_and_each_file_noted(emobox, caplog):
  root, _ = emobox
  with caplog.at_level(logging.WARNING):
    corpus = read_corpus("emobox", root, ())
  lines = [r.getMessage() for r in caplog.records if "metadata" in r.getMessage()]
  assert len(lines) == 1
  assert f"of 3 of {len(corpus.utterances)} files" in lines[0]
  assert "sample rate 2, e.g. 03a01Wa.wav: 22050 Hz listed, 16000 Hz in the file" in lines[0]
  assert "length 1, e.g. 08a05Tb.wav: 0.500 s listed, 0.250 s in the file" in lines[0]
  assert {pathlib.Path(n.path).name for n in corpus.notes} == {
    "03a01Wa.wav",
    "03a04Fc.wav",
    "08a05Tb.wav",
  }


def test_fold_file_keys_missing_from_the_jsonl_are_one_line(emobox, caplog):
  root, _ = emobox
  with caplog.at_level(logging.WARNING):
    corpus = read_corpus("emobox", root, ())
  assert f"emodb-{UNLISTED}" not in {u.utt_id for u in corpus.utterances}
  assert [r.getMessage() for r in caplog.records if "fold files" in r.getMessage()] == [
    f"emodb: 1 keys of the fold files are not in emodb.jsonl, e.g. emodb-{UNLISTED}; they are "
    "left out"
  ]


def test_audio_root_may_be_the_checkout_downloads_or_the_corpus_folder(emobox):
  root, checkout = emobox
  paths = {u.utt_id: u.path for u in read_corpus("emobox", root, ()).utterances}
  for audio_root in (checkout, checkout / "downloads", checkout / "downloads" / "emodb"):
    corpus = read_corpus("emobox", root, (), audio_root=str(audio_root))
    assert {u.utt_id: u.path for u in corpus.utterances} == paths


def test_bad_folders_are_one_line_errors(emobox, tmp_path):
  root, _ = emobox
  with pytest.raises(CorpusError, match="no data.jsonl"):
    read_corpus("emobox", root.parent, ())
  with pytest.raises(CorpusError, match="applies only to emobox"):
    read_corpus("emodb", root, (), audio_root="/x")
  config = default_config()
  config.data.root, config.data.audio_root = "/x", "/y"
  with pytest.raises(ConfigError, match="data.audio_root='/y' applies only to data.corpus="):
    validate_config(config)


def _config(root, cache, **overrides):
  config = default_config()
  config.data.corpus, config.data.root = "emobox", str(root)
  config.data.classes = ()
  config.data.cache_dir = str(cache)
  config.data.num_workers = 1
  config.features.max_seconds = 0.25
  config.cv.scheme = "given"
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = value
  validate_config(config)
  return config


def test_each_folds_test_utterances_are_exactly_emoboxs(emobox, tmp_path, caplog):
  root, _ = emobox
  config = _config(root, tmp_path)
  store = run_data.prepare_store(config)
  kept = run_data.utterances(config, store)
  with caplog.at_level(logging.INFO):
    made = run_data.cross_validation_folds(config, store, kept)
  ids = np.array([row["utt_id"] for row in store.manifest])
  unusable = UNUSABLE
  for (train, test), listed_test, listed_train in zip(
    made, _fold_keys(root, "test"), _fold_keys(root, "train"), strict=True
  ):
    assert sorted(ids[test]) == sorted(listed_test - unusable)
    assert sorted(ids[train]) == sorted(listed_train - unusable)
  valid = run_data.given_folds(store, kept)[0].valid
  assert sorted(ids[valid]) == sorted(f"emodb-{v}" for v in VALID)
  line = next(r.getMessage() for r in caplog.records if "given folds" in r.getMessage())
  assert line == (
    f"The 3 given folds of emobox_emodb do not partition its {len(store)} utterances: "
    "1 are tested in no fold, 1 in more than one (tested once per fold that lists them); "
    "1 are in no fold at all"
  )
  # The folds survive the store: its key changes when one utterance moves between folds.
  corpus = run_data.load_corpus(config)
  moved = dataclasses.replace(corpus.utterances[0], splits=("test", "test", "train"))
  other = dataclasses.replace(corpus, utterances=(moved, *corpus.utterances[1:]))
  params = FeatureParams.from_config(config.features)
  assert store_key(other, params) != store_key(corpus, params) == store.path.name.split("-")[-1]
  with pytest.raises(FoldError, match="cv.folds contains 3; emobox_emodb has 3 given folds"):
    config.cv.folds = (3,)
    run_data.cross_validation_folds(config, store, kept)


def test_a_manifest_fold_column_and_iemocap_sessions_are_given_folds(tmp_path):
  for i in range(6):
    sf.write(tmp_path / f"{i}.wav", np.zeros(800, np.float32), 16000)
  rows = [
    (f"{i}.wav", ("anger", "sadness")[i % 2], f"s{i % 3}", ("2", "10", "")[i % 3]) for i in range(6)
  ]
  with open(tmp_path / "manifest.csv", "w", newline="") as f:
    csv.writer(f).writerows([("path", "label", "speaker", "fold"), *rows])
  corpus = read_corpus("csv", tmp_path, ())
  assert corpus.fold_names == ("2", "10")
  splits = {u.utt_id: u.splits for u in corpus.utterances}
  assert splits == {
    str(i): tuple("test" if f == rows[i][3] else "train" for f in ("2", "10")) for i in range(6)
  }
  roles, names = folds.session_roles(np.array(["Session2", "Session1", "Session2"]))
  assert names == ("Session1", "Session2")
  assert roles.tolist() == [["train", "test"], ["test", "train"], ["train", "test"]]
  with pytest.raises(FoldError, match="needs the corpus's own folds, and demo has none"):
    folds.given_folds(np.zeros((3, 0), object), (), "demo")


def test_emobox_study_entries_take_an_audio_root():
  corpus = compose.parse_corpus("emodb=emobox:/EmoBox/data/emodb@/audio/emodb")
  assert corpus == compose.Corpus("emodb", "emobox", "/EmoBox/data/emodb", "/audio/emodb")
  assert compose.parse_corpus("emodb=emobox:/EmoBox/data/emodb").audio_root == ""
  corpora = [
    compose.Corpus("a", "emobox", "/a"),
    compose.Corpus("b", "csv", "/b.csv"),
    compose.Corpus("c", "emodb", "/c"),
  ]
  settings = [compose.Setting("softmax", (("loss.name", "softmax"),)), compose.Setting("focal", ())]
  # Runs across corpora (data.test_corpus) do not take EmoBox corpora: every one would fail.
  assert compose.run_paths(corpora, settings, cross=True) == [
    "a/softmax",
    "a/focal",
    "b/softmax",
    "b/focal",
    "c/softmax",
    "c/focal",
    "b-to-c/softmax",
    "c-to-b/softmax",
    "b-to-c/focal",
    "c-to-b/focal",
  ]


@pytest.fixture(scope="module")
def jobs(emobox, tmp_path_factory):
  """A two-run study on the EmoBox corpus, its runs started at once as separate jobs (as a
  SLURM array's tasks), then summarised."""
  root, checkout = emobox
  base = tmp_path_factory.mktemp("jobs")
  workdir = base / "study"
  args = [
    f"--config={REPO / 'configs' / 'focal_study.py'}",
    f"--workdir={workdir}",
    f"--config.study.corpora=('emodb=emobox:{root}@{checkout}',)",
    "--settings=softmax:loss.name=softmax",
    "--settings=focal:loss.gamma=2.0",
    "--config.study.cross_corpus=False",
    "--config.study.resamples=200",
    "--config.data.class_shares=()",
    "--config.data.case_insensitive_paths=True",
    "--config.cv.scheme=given",
    "--config.model.name=resnet10",
    "--config.model.width=4",
    "--config.model.lowering=xla",
    "--config.features.max_seconds=0.25",
    "--config.train.num_epochs=2",
    "--config.train.warmup_epochs=0",
    "--config.train.batch_size=8",
    "--config.data.num_workers=1",
    f"--config.data.cache_dir={base / 'cache'}",
  ]
  listed = run_module("ser_jax.study", [*args, "--list_runs"])
  assert listed.stdout.split("\n")[:2] == ["0\temodb/softmax", "1\temodb/focal"], listed.stderr
  started = [
    start_module("ser_jax.study", [*args, f"--task_index={i}"], output=base / f"task_{i}.log")
    for i in range(2)
  ]
  codes = [p.wait(timeout=600) for p in started]
  logs = [(base / f"task_{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], logs
  summary = run_module("ser_jax.study", [*args, "--summarise"])
  return workdir, logs, summary


def test_runs_started_together_build_their_shared_store_once(jobs):
  _, logs, _ = jobs
  assert sum("Building feature store" in log for log in logs) == 1, logs


def test_the_summary_reads_the_finished_jobs(jobs):
  workdir, _, summary = jobs
  assert summary.returncode == 0, summary.stderr
  assert "Run emodb/focal already finished" in summary.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["within"]["emodb"]["focal"]["difference"]["n_utterances"] > 0
  assert results["corpora"]["emodb"]["cv_scheme"] == "given"


def test_predictions_are_emoboxs_test_folds_and_scores_are_scikit_learns(jobs, emobox):
  workdir, _, _ = jobs
  root, _ = emobox
  run = workdir / "emodb" / "focal"
  results = run_results.read(run)
  model = results.members[0]
  with open(run / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  by_fold = [[r for r in rows if r["fold"] == str(k)] for k in range(3)]
  for k, listed in enumerate(_fold_keys(root, "test")):
    assert sorted(r["utt_id"] for r in by_fold[k]) == sorted(
      listed - {f"emodb-{MISSING}", f"emodb-{UNLISTED}"}
    )
  # EmoBox's four scores; its micro F1 is WA (one label per utterance), which ser_jax gives.
  scores = {
    "wa": sk.accuracy_score,
    "ua": sk.balanced_accuracy_score,
    "micro_f1": lambda y, p: sk.f1_score(y, p, average="micro"),
    "macro_f1": lambda y, p: sk.f1_score(y, p, average="macro"),
  }
  for name, score in scores.items():
    ours = "wa" if name == "micro_f1" else name
    per_fold = [100 * score([r["label"] for r in f], [r["predicted"] for r in f]) for f in by_fold]
    assert [getattr(f, ours) for f in model.folds] == pytest.approx(per_fold)
    assert getattr(model, f"{ours}_fold_mean") == pytest.approx(np.mean(per_fold))
    pooled = 100 * score([r["label"] for r in rows], [r["predicted"] for r in rows])
    assert getattr(model, f"{ours}_pooled") == pytest.approx(pooled)
  assert model.n_test_pooled == len(rows)
  assert [f.given_fold for f in model.folds] == [
    run_results.GivenFold("fold_1", 2),
    run_results.GivenFold("fold_2", 0),
    run_results.GivenFold("fold_3", 0),
  ]
  skipped = {pathlib.Path(s["path"]).name: s["reason"] for s in results.skipped_files}
  assert skipped == {f"{MISSING}.wav": "audio file missing"}
  markdown = (run / "results.md").read_text()
  assert "mean +/- sd over 3 folds (`<score>_fold_mean`)" in markdown
  assert f"pooled over all {len(rows)} test predictions (`<score>_pooled`)" in markdown


def test_report_prints_the_emobox_leaderboard_shape(jobs, capsys):
  workdir, _, _ = jobs
  run = workdir / "emodb" / "focal"
  model = run_results.read(run).members[0]
  assert report(["--emobox", str(run)]) == 0
  line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| emodb |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[:2] == ["emodb", "3 given"]
  assert cells[3:9] == [
    f"{getattr(model, key):.2f}"
    for key in (
      "ua_fold_mean",
      "wa_fold_mean",
      "macro_f1_fold_mean",
      "ua_pooled",
      "wa_pooled",
      "macro_f1_pooled",
    )
  ]


@pytest.mark.skipif(not (DATA / "emobox").is_dir(), reason=f"no EmoBox metadata in {DATA}")
def test_real_emobox_emodb_and_casia_folds_are_emoboxs():
  read = {}
  for dataset, audio in (("emodb", DATA / "emodb"), ("casia", DATA / "casia" / "wav")):
    root = DATA / "emobox" / dataset
    corpus = read_corpus("emobox", root, (), audio_root=str(audio), case_insensitive_paths=True)
    assert len(corpus.utterances) == len(_jsonl(root / f"{dataset}.jsonl"))
    for k, listed in enumerate(_fold_keys(root, "test")):
      assert {u.utt_id for u in corpus.utterances if u.splits[k] == "test"} == listed
    read[dataset] = corpus
  assert len({u.speaker for u in read["casia"].utterances}) == 4
  # Read with exact letter case, the listing's files that exist only in another case are
  # skipped, each with the reason.
  root, audio = DATA / "emobox" / "casia", DATA / "casia" / "wav"
  casia = read_corpus("emobox", root, (), audio_root=str(audio))
  listed = [
    audio.joinpath(*pathlib.PurePosixPath(e["wav"]).parts[2:]) for e in _jsonl(root / "casia.jsonl")
  ]
  case_only = {str(path) for path in listed if not path.is_file()}
  assert case_only and {s.path for s in casia.skipped} == case_only
  assert all("differs only in letter case" in s.reason for s in casia.skipped)


def test_the_emobox_study_config_finds_the_corpora_a_checkout_has_audio_for(emobox, tmp_path):
  _, checkout = emobox
  spec = importlib.util.spec_from_file_location(
    "emobox_study", REPO / "configs" / "emobox_study.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  (checkout / "data" / "casia").mkdir(exist_ok=True)  # Metadata folder, no audio: left out.
  (checkout / "data" / "casia" / "casia.jsonl").write_text("")
  config = module.get_config(str(checkout))
  assert config.study.corpora == (f"emodb=emobox:{checkout / 'data' / 'emodb'}@{checkout}",)
  corpora, _ = compose.study_parts(config)
  assert read_corpus("emobox", corpora[0].root, (), audio_root=corpora[0].audio_root).utterances


@pytest.mark.parametrize(
  "dataset, wav, speaker",
  [
    ("emodb", "downloads/emodb/wav/03a01Fa.wav", ("03", "03")),
    ("ravdess", "downloads/ravdess/Actor_18/03-01-05-01-02-01-18.wav", ("Actor_18", "Actor_18")),
    ("cremad", "downloads/cremad/AudioWAV/1087_IWL_ANG_XX.wav", ("1087", "1087")),
    ("tess", "downloads/tess/OAF_lid_fear.wav", ("OAF", "OAF")),
    (
      "iemocap",
      "downloads/iemocap/Session1/sentences/wav/Ses01F_impro04/Ses01F_impro04_M000.wav",
      ("Ses01_M", "Session1"),
    ),
    ("casia", "downloads/casia/wangzhe/neutral/239.wav", ("wangzhe", "wangzhe")),
    ("savee", "downloads/savee/JE_n23.wav", None),  # No reader: the key stands in.
  ],
)
def test_speakers_follow_the_readers_naming(dataset, wav, speaker):
  from ser_jax.data.corpora import _emobox_speaker

  assert _emobox_speaker(dataset, wav) == speaker
