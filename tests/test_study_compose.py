"""A study's config: its corpora and settings, each run's config layered base < study config <
corpus < setting < command line, and the shipped study configs naming no folder of their own."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest
from absl import flags
from helpers import REPO, run_module
from ml_collections import config_flags

from ser_jax import cli, experiment, io_utils, memory, trainer
from ser_jax.config import ConfigError, default_config, validate_config
from ser_jax.data.demo import write_demo_corpus
from ser_jax.folds import FoldError
from ser_jax.study import compose
from ser_jax.study import run as study_run

SETTINGS = (
  "softmax:loss.name=softmax",
  # Class weights move a tiny model's predictions far enough from softmax's to differ.
  "focal_weighted:loss.name=focal,loss.gamma=2.0,loss.alpha=inverse_frequency",
)


def write_corpora(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Two small synthetic corpora read through csv manifests (4 and 2 speakers). Of one size:
  their runs within a corpus share compiled programs, and so do those across them."""
  write_demo_corpus(root / "a", n_utterances=48, n_speakers=4, seed=1)
  write_demo_corpus(root / "b", n_utterances=48, n_speakers=2, seed=2)
  return {"a": root / "a" / "manifest.csv", "b": root / "b" / "manifest.csv"}


def write_manifest(source: pathlib.Path, path: pathlib.Path, *, without_label="", columns=None):
  """A csv manifest of `source`'s rows (but those labelled `without_label`) with absolute
  paths, and only `columns` where given."""
  with open(source, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["label"] != without_label]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "path": str(source.parent / r["path"])} for r in rows)
  return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, pathlib.Path]:
  return write_corpora(tmp_path_factory.mktemp("corpora"))


def _study_config(corpora, **study_keys):
  config = compose.load_config_file(str(REPO / "configs" / "focal_study.py"))
  config.study.corpora = tuple(f"{name}=csv:{path}" for name, path in corpora.items())
  config.study.settings = compose.settings_group(SETTINGS)
  config.study.reference = "softmax"
  for key, value in study_keys.items():
    config.study[key] = value
  return config


def _setting(text: str) -> compose.Setting:
  name, overrides = compose.parse_setting(text)
  return compose.Setting(name, tuple(overrides.items()))


# Precedence ---------------------------------------------------------------------------------------

BASE = """
from ser_jax.config import default_config


def get_config():
  config = default_config()
  config.data.corpus = "demo"
  config.data.root = "/base"
  config.cv.n_folds = 10
  config.model.width = 12
  config.loss.gamma = 1.0
  config.train.num_epochs = 11
  return config
"""

STUDY = """
from ser_jax.study.compose import study_config


def get_config():
  config = study_config({base!r})
  config.study.corpora = ({corpus!r},)
  config.study.settings = {{"s": {{"loss": {{"gamma": 4.0}}, "train": {{"num_epochs": 14}}}}}}
  config.study.reference = "s"
  config.data.root = "/study"
  config.cv.n_folds = 5  # ser_jax's default, against the base's 10.
  config.loss.gamma = 3.0
  config.train.num_epochs = 13
  return config
"""


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader.
def test_each_layer_wins_over_the_one_before(tmp_path, corpora):
  """base < study config < corpus < setting < command line, one key per layer that wins."""
  (tmp_path / "base.py").write_text(BASE)
  study_file = tmp_path / "study.py"
  corpus = f"a=csv:{corpora['a']}"
  study_file.write_text(STUDY.format(base=str(tmp_path / "base.py"), corpus=corpus))
  argv = [
    "study",
    f"--config={study_file}",
    "--config.train.num_epochs=15",
    "--config.features.max_seconds=2.0",
  ]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", values, lock_config=True, sys_argv=argv)
  values(argv)  # As the study's command line parses it.
  config = values.config
  (corpus,), (setting,) = compose.study_parts(config)
  run = compose.run_config(config, corpus, setting, cli.override_keys(argv))
  assert run.model.width == 12  # The base's; no later layer sets it.
  assert run.cv.n_folds == 5  # The study config's, though ser_jax's default is also 5.
  assert (run.data.corpus, run.data.root) == ("csv", str(corpora["a"]))  # The corpus's.
  assert run.loss.gamma == 4.0  # The setting's, over the study config's 3.
  assert run.train.num_epochs == 15  # The command line's, over the setting's 14.
  assert run.features.max_seconds == 2.0  # The command line's.
  assert "study" not in run
  # Without the command line named as such, its values are the study config's: below the setting.
  assert compose.run_config(config, corpus, setting).train.num_epochs == 14
  validate_config(run)


def test_the_command_line_may_not_set_what_a_corpus_sets(corpora):
  config = _study_config(corpora)
  corpus = compose.parse_corpus(f"a=csv:{corpora['a']}")
  with pytest.raises(ConfigError, match=r"--config\.data\.root is set per corpus"):
    compose.run_config(config, corpus, _setting(SETTINGS[0]), ["data.root"])


def test_emobox_keys_apply_to_emobox_corpora_only(corpora):
  config = _study_config(corpora)
  config.data.case_insensitive_paths = True
  csv_corpus = compose.parse_corpus(f"a=csv:{corpora['a']}")
  emobox = compose.parse_corpus("e=emobox:/EmoBox/data/emodb@/audio")
  for keys in ((), ["data.case_insensitive_paths"]):
    run = compose.run_config(config, csv_corpus, _setting(SETTINGS[0]), keys)
    assert (run.data.case_insensitive_paths, run.data.audio_root) == (False, "")
    run = compose.run_config(config, emobox, _setting(SETTINGS[0]), keys)
    assert (run.data.case_insensitive_paths, run.data.audio_root) == (True, "/audio")


def test_a_misspelt_setting_key_names_the_nearest_key(corpora):
  config = _study_config(corpora)
  corpus = compose.parse_corpus(f"a=csv:{corpora['a']}")
  with pytest.raises(ConfigError, match=r"setting 'x': unknown config key 'loss\.gama'; did you "):
    compose.run_config(config, corpus, _setting("x:loss.gama=1.0"))


# Settings and corpora -------------------------------------------------------------------------


def test_the_command_line_form_of_a_setting_is_its_group_of_keys():
  group = compose.settings_group(
    ["w:loss.name=softmax,data.classes=('neutral','anger'),seed=3", "plain"]
  )
  assert group.to_dict() == {
    "w": {"loss": {"name": "softmax"}, "data": {"classes": ("neutral", "anger")}, "seed": 3},
    "plain": {},
  }
  with pytest.raises(ConfigError, match="repeats the name 'x'"):
    compose.settings_group(["x:", "x:seed=1"])


def test_study_parts_put_the_reference_first_and_refuse_corpus_keys(corpora):
  config = _study_config(corpora)
  config.study.settings = {"a": {"seed": 1}, "b": {}, "z": {"loss": {"gamma": 0.5}}}
  config.study.reference = "z"
  _, settings = compose.study_parts(config)
  assert [(s.name, s.overrides) for s in settings] == [
    ("z", (("loss.gamma", 0.5),)),
    ("a", (("seed", 1),)),
    ("b", ()),
  ]
  config.study.reference = "y"
  with pytest.raises(ConfigError, match="study.reference='y' names no setting; expected one of: a"):
    compose.study_parts(config)
  config.study.reference = "a"
  config.study.settings = {"a": {"data": {"root": "/elsewhere"}}}
  with pytest.raises(ConfigError, match="sets data.root"):
    compose.study_parts(config)


@pytest.mark.parametrize(
  "text, message",
  [
    ("a=emodb", "NAME=CORPUS:ROOT"),
    ("a b=emodb:/x", "NAME=CORPUS:ROOT"),
    ("a=emodbb:/x", "unknown corpus 'emodbb'"),
    ("a=csv:", "has no ROOT"),
  ],
)
def test_bad_corpus_entries_are_one_line(text, message):
  with pytest.raises(ConfigError, match=message):
    compose.parse_corpus(text)


# The shipped study configs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["focal_study", "emobox_study"])
def test_a_shipped_study_config_reads_its_corpora_from_ser_jax_data_only(name, monkeypatch):
  monkeypatch.delenv("SER_JAX_DATA", raising=False)
  config = compose.load_config_file(str(REPO / "configs" / f"{name}.py"))
  assert config.study.corpora == ()
  with pytest.raises(ConfigError, match=r"^study\.corpora is empty; give --config\.study\.corp"):
    compose.study_parts(config)
  monkeypatch.setenv("SER_JAX_DATA", "/corpora")
  config = compose.load_config_file(str(REPO / "configs" / f"{name}.py"))
  study_corpora, _ = compose.study_parts(config)
  assert len(study_corpora) == 2
  assert all(c.root.startswith("/corpora/") for c in study_corpora)


def test_a_study_without_corpora_stops_with_one_line(tmp_path):
  args = [f"--config={REPO / 'configs' / 'focal_study.py'}", f"--workdir={tmp_path}", "--list_runs"]
  done = run_module("ser_jax.study", args, env={"SER_JAX_DATA": None})
  assert done.returncode == 2
  assert done.stdout == ""
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("error: study.corpora is empty") and "SER_JAX_DATA" in line


def test_study_base_is_not_a_command_line_key(tmp_path):
  args = [
    f"--config={REPO / 'configs' / 'focal_study.py'}",
    f"--workdir={tmp_path}",
    "--config.study.base=configs/logmel_focal.py",
  ]
  done = run_module("ser_jax.study", args)
  assert done.returncode == 2 and "error: study.base is the config" in done.stderr


# Rerun checks and run configs -------------------------------------------------------------------


def test_study_check_allows_new_corpora_and_settings_not_redefined_ones(tmp_path, corpora):
  config = _study_config(corpora)
  compose.check_same_study(config, tmp_path)
  config.study.settings = compose.settings_group((*SETTINGS, "focal:loss.name=focal"))
  config.study.corpora = config.study.corpora[:1]
  config.study.cross_corpus = True
  config.study.reference = "focal"
  compose.check_same_study(config, tmp_path)  # Added, removed, cross-corpus: nothing mixes.
  config.study.settings = compose.settings_group(
    ("softmax:loss.name=softmax,train.label_smoothing=0.1",)
  )
  with pytest.raises(experiment.ConfigMismatchError, match=r"study\.settings\[softmax\]"):
    compose.check_same_study(config, tmp_path)
  config = _study_config(corpora)
  config.study.base = "configs/logmel_focal.py"
  with pytest.raises(experiment.ConfigMismatchError, match="study.base"):
    compose.check_same_study(config, tmp_path)
  config = _study_config(corpora)
  config.cv.n_folds = 3
  with pytest.raises(experiment.ConfigMismatchError, match=r"changed: cv\.n_folds\)"):
    compose.check_same_study(config, tmp_path)


def test_a_study_written_with_settings_as_text_reads_the_same(tmp_path, corpora):
  config = _study_config(corpora)
  compose.check_same_study(config, tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  written["study"]["settings"] = list(SETTINGS)  # As a study wrote them before groups.
  (tmp_path / "config.json").write_text(json.dumps(written))
  compose.check_same_study(config, tmp_path)  # The same definitions.
  written["study"]["settings"] = [SETTINGS[0] + ",seed=1"]
  (tmp_path / "config.json").write_text(json.dumps(written))
  with pytest.raises(experiment.ConfigMismatchError, match=r"study\.settings\[softmax\]"):
    compose.check_same_study(config, tmp_path)


def test_speaker_folds_are_capped_at_the_speakers(corpora):
  config = _study_config(corpora)
  config.cv.n_folds = 5
  runs, classes = compose.within_runs(
    config, compose.parse_corpus(f"b=csv:{corpora['b']}"), [_setting(SETTINGS[0])]
  )
  assert runs[0].config.cv.n_folds == 2 and classes == ("neutral", "happiness", "sadness", "anger")
  config.cv.n_folds = 3
  runs, _ = compose.within_runs(
    config, compose.parse_corpus(f"a=csv:{corpora['a']}"), [_setting(SETTINGS[0])]
  )
  assert runs[0].config.cv.n_folds == 3  # Fewer folds than speakers: as asked.


def test_speaker_folds_need_speaker_ids(corpora, tmp_path):
  manifest = write_manifest(corpora["a"], tmp_path / "manifest.csv", columns=["path", "label"])
  with pytest.raises(FoldError, match="needs speaker ids.*1 speaker"):
    compose.within_runs(
      _study_config(corpora), compose.parse_corpus(f"x=csv:{manifest}"), [_setting(SETTINGS[0])]
    )


def test_cross_runs_use_the_shared_classes_and_their_shares(corpora, tmp_path):
  manifest = write_manifest(corpora["b"], tmp_path / "manifest.csv", without_label="sadness")
  config = _study_config(corpora)
  config.data.classes = ()  # Each corpus's own classes; the run takes those both have.
  config.data.class_shares = ()
  train = compose.parse_corpus(f"a=csv:{corpora['a']}")
  test = compose.parse_corpus(f"b=csv:{manifest}")
  setting = _setting(SETTINGS[0])
  run = compose.cross_run(config, train, test, setting, ("anger", "happiness", "neutral"))
  assert run.path == "a-to-b/softmax" and run.config.data.test_root == str(manifest)
  assert run.config.data.classes == ("anger", "happiness", "neutral")
  config.data.classes = ("neutral", "happiness", "sadness", "anger")
  config.data.class_shares = (4, 1, 3, 2)
  run = compose.cross_run(config, train, test, setting, ("neutral", "happiness", "anger"))
  assert run.config.data.classes == ("neutral", "happiness", "anger")
  assert run.config.data.class_shares == (4, 1, 2)
  with pytest.raises(ConfigError, match="share 1 class"):
    compose.cross_run(config, train, test, setting, ("anger", "fear"))


def test_test_corpus_keys_are_checked():
  config = default_config()
  config.data.corpus, config.data.root = "demo", ""
  config.data.test_corpus = "emodbb"
  with pytest.raises(ConfigError, match="data.test_corpus='emodbb'"):
    validate_config(config)
  config.data.test_corpus = "emodb"
  with pytest.raises(ConfigError, match="data.test_root is empty"):
    validate_config(config)
  config.data.test_root = "/data/emodb"
  config.cv.folds = (1,)
  with pytest.raises(ConfigError, match="one fold, 0"):
    validate_config(config)
  config.cv.folds = ()
  config.data.classes = ()
  with pytest.raises(ConfigError, match="needs data.classes"):
    validate_config(config)


def test_base_config_file_is_found_in_the_repository(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Not the repository: the relative path is the repository's.
  assert compose.study_config("configs/demo.py").model.width == 16
  with pytest.raises(ConfigError, match="config file 'configs/nope.py' does not exist"):
    compose.study_config("configs/nope.py")


def test_a_config_argument_get_config_does_not_take_is_one_line(tmp_path):
  spec = f"{REPO / 'configs' / 'focal_study.py'}:x"
  with pytest.raises(ConfigError, match=r"does not take the argument 'x' \(too many positional"):
    compose.load_config_file(spec)
  (tmp_path / "empty.py").write_text("GAMMA = 2\n")
  with pytest.raises(ConfigError, match=r"empty\.py defines no get_config\(\)"):
    compose.load_config_file(str(tmp_path / "empty.py"))
  done = run_module("ser_jax.study", [f"--config={spec}", f"--workdir={tmp_path}", "--list_runs"])
  assert done.returncode == 2
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("error: config file") and "does not take the argument 'x'" in line


@pytest.mark.parametrize(
  "error",
  [
    memory.MemoryPlanError("not even one sweep member fits"),
    io_utils.LockedError("another process holds runs/x"),
    trainer.NonFiniteLossError("loss is nan"),
  ],
)
def test_a_run_that_cannot_train_fails_alone(error, monkeypatch, tmp_path):
  def train_and_evaluate(config, workdir):
    raise error

  monkeypatch.setattr(experiment, "train_and_evaluate", train_and_evaluate)
  run = compose.Run(path="demo/softmax", setting="softmax", config=default_config())
  outcome = study_run.execute(run, tmp_path)
  assert outcome.result is None and outcome.error == str(error)
