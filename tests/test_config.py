"""Every shipped config validates; a wrong key or value is a ConfigError naming the key."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest
from absl import flags
from helpers import REPO, run_python, session_demo_corpus
from ml_collections import config_flags

from ser_jax import run_results
from ser_jax.config import ConfigError, default_config, validate_config
from ser_jax.data import corpora
from ser_jax.experiment import RESULT_NEUTRAL_KEYS

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))

IEMOCAP_SHARES = (0.482, 0.125, 0.267, 0.127)

REQUIRED_KEYS = (
  "data.corpus",
  "data.root",
  "data.classes",
  "features.kind",
  "features.sample_rate",
  "features.max_seconds",
  "features.n_fft",
  "features.hop_length",
  "features.n_mels",
  "features.n_mfcc",
  "loss.name",
  "loss.gamma",
  "train.num_epochs",
  "train.batch_size",
  "train.learning_rate",
  "cv.n_folds",
  "cv.scheme",
  "seed",
)


def _load(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _with_root(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """As on the command line: real corpora need --config.data.root; 'demo' does not."""
  if config.data.corpus != "demo":
    config.data.root = "/data/corpus"
  return config


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


@pytest.fixture
def config() -> ml_collections.ConfigDict:
  return _with_root(default_config())


def test_config_files_exist():
  assert {p.stem for p in CONFIG_FILES} >= {
    "demo",
    "logmel_focal",
    "logmel_softmax",
    "mfcc_focal",
    "mfcc_softmax",
  }


def test_default_config_validates(config):
  validate_config(config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_config_file_validates(path, monkeypatch):
  monkeypatch.setenv("SER_JAX_DATA", "/data")  # Where a study config finds its corpora.
  config = _load(path)
  if "study" in config:  # A study: its corpora and settings parse; the rest is a run's config.
    from ser_jax.study import compose

    compose.study_parts(config)
    config = ml_collections.ConfigDict({k: v for k, v in config.items() if k != "study"})
  validate_config(_with_root(config))


def test_demo_config_validates_without_a_root():
  config = _load(CONFIG_DIR / "demo.py")
  assert config.data.root == ""
  validate_config(config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_config_has_the_required_keys(path):
  config = _load(path)
  for key in REQUIRED_KEYS:
    _get(config, key)  # Raises KeyError or AttributeError if missing.
  assert config.features.sample_rate == 22050
  assert config.features.n_fft == 2048
  assert config.features.hop_length == 512


def test_paper_configs_match_their_names():
  for stem in ("logmel_focal", "logmel_softmax", "mfcc_focal", "mfcc_softmax"):
    config = _load(CONFIG_DIR / f"{stem}.py")
    kind, loss = stem.split("_")
    assert config.features.kind == kind
    assert config.loss.name == loss
    assert config.loss.gamma == (2.0 if loss == "focal" else 0.0)
    assert config.data.corpus == "iemocap"
    assert config.features.max_seconds == 6.0


def test_unknown_key_is_an_error_naming_it(config):
  with config.unlocked():
    config.train.num_epoch = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'train\.num_epoch'"):
    validate_config(config)


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (
      ["--config=configs/dmeo.py"],
      "error: --config=configs/dmeo.py: there is no config file configs/dmeo.py; configs holds "
      "demo.py, ",
    ),
    (["--config", "nowhere/x.py:demo"], "there is no config file nowhere/x.py\n"),
    (
      ["--config=configs/demo.py", "--config.trian.num_epochs=1"],
      "error: unknown config key 'trian.num_epochs'; did you mean 'train.num_epochs'?",
    ),
  ],
)
def test_command_line_mistakes_are_one_line(argv, message, capsys, monkeypatch):
  from ser_jax import cli

  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as exit_status:
    cli.check_command_line(["main.py", *argv])
  assert exit_status.value.code == 2
  assert message in capsys.readouterr().err
  cli.check_command_line(["main.py", "--config=configs/gamma_sweep.py:demo", "--config.seed=1"])


def test_unknown_top_level_group_is_an_error_naming_it(config):
  with config.unlocked():
    config.optimiser = ml_collections.ConfigDict({"name": "sgd"})
  with pytest.raises(ConfigError, match="unknown config key 'optimiser'"):
    validate_config(config)


@pytest.mark.parametrize(
  ("key", "value", "message"),
  [
    ("loss.gamma", -1.0, r"loss\.gamma=-1\.0 is not allowed; it must be >= 0"),
    ("cv.n_folds", 1, r"cv\.n_folds=1 is not allowed; it must be >= 2"),
    ("train.batch_size", 0, r"train\.batch_size=0 is not allowed; it must be >= 1"),
    ("train.num_epochs", 0, r"train\.num_epochs=0"),
    ("train.learning_rate", 0.0, r"train\.learning_rate=0\.0 is not allowed; it must be > 0"),
    ("features.kind", "mel", r"features\.kind='mel' is not allowed; expected one of: logmel, mfcc"),
    ("loss.name", "hinge", r"loss\.name='hinge'"),
    ("cv.scheme", "random", r"cv\.scheme='random'"),
    ("features.n_mfcc", 200, r"features\.n_mfcc=200 must be <= features\.n_mels=128"),
    ("train.label_smoothing", 1.0, r"train\.label_smoothing=1\.0"),
    ("data.classes", ("neutral",), r"data\.classes=\('neutral',\) names one class"),
    (
      "data.classes",
      ("neutral, anger",),
      r"names one class; .* as a tuple: --config\.data\.classes=\"\('neutral', 'anger'\)\"",
    ),
    ("data.num_workers", -3, r"data\.num_workers=-3 is not allowed; it must be >= 0"),
    ("loss.gamma", float("nan"), r"loss\.gamma=nan is not allowed; it must be a finite number"),
    ("train.learning_rate", float("inf"), r"train\.learning_rate=inf is not allowed; it must be"),
    ("train.weight_decay", float("nan"), r"train\.weight_decay=nan is not allowed"),
    ("features.max_seconds", float("inf"), r"features\.max_seconds=inf is not allowed"),
    ("train.freq_masks", -1, r"train\.freq_masks=-1 is not allowed; it must be >= 0"),
    ("train.time_mask_frames", -5, r"train\.time_mask_frames=-5"),
    ("seed", -1, r"seed=-1 is not allowed; seeds are 0 \.\. 2\*\*32 - 1"),
    ("seed", 2**32, r"seed=4294967296"),
    ("sweep.seeds", (0, -2), r"sweep\.seeds\[\]=-2"),
    ("cv.folds", (0, 0), r"cv\.folds=\(0, 0\) lists a fold twice"),
  ],
)
def test_bad_value_is_an_error_naming_the_key(config, key, value, message):
  if key == "seed":
    config.seed = value
  else:
    group, name = key.split(".")
    config[group][name] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_integer_gamma_minus_one_is_an_error(config):
  config.loss.gamma = -1
  with pytest.raises(ConfigError, match=r"loss\.gamma"):
    validate_config(config)


def test_unknown_corpus_is_an_error_listing_the_known_ones(config):
  config.data.corpus = "iemocapp"
  with pytest.raises(ConfigError, match=r"data\.corpus='iemocapp'") as error:
    validate_config(config)
  assert len(corpora.CORPORA) >= 2
  for name in corpora.CORPORA:
    assert name in str(error.value)


@pytest.mark.parametrize("corpus", sorted(set(corpora.CORPORA) - {"demo"}))
def test_missing_root_for_a_real_corpus_is_an_error(corpus):
  config = default_config()
  config.data.corpus = corpus
  assert config.data.root == ""
  with pytest.raises(ConfigError, match=rf"data\.root is empty.*data\.root=/path/to/{corpus}"):
    validate_config(config)


def test_wrong_type_is_an_error_naming_key_and_types(config):
  # ConfigDict itself refuses `config.train.batch_size = '32'`; a dict-built config does not.
  values = config.to_dict()
  values["train"]["batch_size"] = "32"
  bad = ml_collections.ConfigDict(values)
  with pytest.raises(
    ConfigError, match=r"config key 'train\.batch_size'='32' has type str; expected int"
  ):
    validate_config(bad)


def test_bool_is_not_accepted_for_an_int_key(config):
  values = config.to_dict()
  values["cv"]["n_folds"] = True
  with pytest.raises(ConfigError, match=r"'cv\.n_folds'=True has type bool; expected int"):
    validate_config(ml_collections.ConfigDict(values))


def test_int_is_accepted_for_a_float_key(config):
  values = config.to_dict()
  values["train"]["learning_rate"] = 1
  validate_config(ml_collections.ConfigDict(values))


def test_group_replaced_by_a_value_is_an_error(config):
  values = config.to_dict()
  values["loss"] = "focal"
  with pytest.raises(ConfigError, match="config key 'loss' must be a group of keys"):
    validate_config(ml_collections.ConfigDict(values))


def test_alpha_must_have_one_weight_per_class(config):
  config.loss.alpha = (1.0, 2.0)
  with pytest.raises(ConfigError, match="loss.alpha has 2 weights but data.classes has 4"):
    validate_config(config)
  config.loss.alpha = (1.0, 2.0, 1.0, 0.5)
  validate_config(config)


def test_fold_index_out_of_range_is_an_error(config):
  config.cv.folds = (0, 5)
  with pytest.raises(ConfigError, match=r"cv\.folds contains 5; folds are 0\.\.4"):
    validate_config(config)


def test_repeated_class_is_an_error(config):
  config.data.classes = ("neutral", "anger", "neutral")
  with pytest.raises(ConfigError, match="repeated class names"):
    validate_config(config)


def test_class_shares_and_alpha_rules_validate(config):
  config.data.class_shares = IEMOCAP_SHARES
  config.data.class_shares_seed = 3
  config.loss.alpha = "inverse_frequency"
  config.sweep.alphas = ((1.0, 2.0, 1.0, 1.0), "inverse_frequency", [1, 1, 1, 1])
  validate_config(config)


def test_counts_are_accepted_as_class_shares(config):
  config.data.class_shares = (1099, 284, 608, 289)
  validate_config(config)


@pytest.mark.parametrize(
  ("key", "value", "message"),
  [
    (
      "data.class_shares",
      (1.0, 1.0),
      r"data\.class_shares has 2 weights but data\.classes has 4 classes; give one weight per",
    ),
    (
      "data.class_shares",
      (1.0, 0.0, 1.0, 1.0),
      r"data\.class_shares=\(1\.0, 0\.0, 1\.0, 1\.0\) has weight 0\.0; every weight must be a "
      r"number > 0",
    ),
    ("data.class_shares", (1, -2, 1, 1), r"data\.class_shares=.* has weight -2"),
    ("data.class_shares_seed", -1, r"data\.class_shares_seed=-1 is not allowed; it must be >= 0"),
    ("loss.alpha", (1.0, -1.0, 1.0, 1.0), r"loss\.alpha=.* has weight -1\.0; every weight must"),
    ("loss.alpha", (1.0, float("nan"), 1.0, 1.0), r"loss\.alpha=.* has weight nan"),
    (
      "loss.alpha",
      "inverse",
      r"loss\.alpha='inverse' is not allowed; expected per-class weights \(a tuple\) or one "
      r"of: inverse_frequency$",
    ),
    ("sweep.alphas", ((1.0, 1.0),), r"sweep\.alphas\[0\] has 2 weights but data\.classes has 4"),
    ("sweep.alphas", ("inverse_frequency", (1, 0, 1, 1)), r"sweep\.alphas\[1\]=\(1, 0, 1, 1\)"),
    ("sweep.alphas", ("balanced",), r"sweep\.alphas\[0\]='balanced' is not allowed; expected"),
    (
      "sweep.alphas",
      (1.0, 2.0, 1.0, 1.0),
      r"sweep\.alphas\[0\]=1\.0 is not allowed; expected a tuple of 4 per-class weights or one "
      r"of: inverse_frequency",
    ),
  ],
)
def test_bad_weights_are_an_error_naming_the_key(config, key, value, message):
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(ConfigError, match=message) as error:
    validate_config(config)
  assert "\n" not in str(error.value)


def test_alpha_of_another_type_is_an_error_naming_what_is_allowed(config):
  config.loss.alpha = 1.0
  with pytest.raises(
    ConfigError,
    match=r"'loss\.alpha'=1\.0 has type float; expected tuple of per-class weights or one of: "
    "inverse_frequency",
  ):
    validate_config(config)


def test_alpha_rule_is_accepted_in_a_dict_built_config(config):
  config.loss.alpha = "inverse_frequency"
  validate_config(ml_collections.ConfigDict(config.to_dict()))


def test_class_shares_longer_than_the_classes_is_an_error_after_dropping_a_class(config):
  config.data.classes = ("neutral", "sadness", "anger")
  config.data.class_shares = IEMOCAP_SHARES
  with pytest.raises(
    ConfigError, match=r"data\.class_shares has 4 weights but data\.classes has 3"
  ):
    validate_config(config)


@pytest.mark.parametrize(
  ("override", "key", "want"),
  [
    ("--config.loss.alpha=inverse_frequency", "loss.alpha", "inverse_frequency"),
    ("--config.loss.alpha=(1,2,1,1)", "loss.alpha", (1, 2, 1, 1)),
    (
      "--config.sweep.alphas=((1,2,1,1),'inverse_frequency')",
      "sweep.alphas",
      ((1, 2, 1, 1), "inverse_frequency"),
    ),
    ("--config.data.class_shares=(0.482,0.125,0.267,0.127)", "data.class_shares", IEMOCAP_SHARES),
  ],
)
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader.
def test_weights_and_rules_can_be_set_on_the_command_line(override, key, want):
  """As main.py reads them: a string for loss.alpha, tuples of tuples for sweep.alphas."""
  argv = ["main", f"--config={CONFIG_DIR / 'demo.py'}", override]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Config file.", values, lock_config=True, sys_argv=argv
  )
  values(argv)
  assert _get(values.config, key) == want
  validate_config(values.config)


@pytest.mark.parametrize(
  "key, value",
  [
    ("model.lowering", "xla"),
    ("train.models_together", "map"),
    ("train.models_per_program", 5),
    ("data.num_workers", 7),
    ("train.eval_batch_size", 3),
  ],
)
def test_a_rerun_may_change_result_neutral_keys_only(tmp_path, key, value):
  from ser_jax import experiment

  experiment.check_same_config(default_config(), tmp_path)  # No run there yet.
  experiment.write_config(default_config(), tmp_path)
  neutral = default_config()
  group, name = key.split(".")
  neutral[group][name] = value
  experiment.check_same_config(neutral, tmp_path)  # Accepted.
  changed = default_config()
  changed.loss.gamma = 0.5
  with pytest.raises(experiment.ConfigMismatchError, match=r"\(changed: loss\.gamma\)"):
    experiment.check_same_config(changed, tmp_path)


def test_every_process_of_a_run_refuses_a_changed_config(tmp_path, monkeypatch):
  """Not only process 0, which writes: another would compile and wait for it at its first
  collective. With --fresh, only process 0 empties the workdir and checks."""
  from ser_jax import experiment

  config = default_config()
  config.data.corpus = "emodb"
  config.data.root = str(tmp_path / "nowhere")  # Were it not refused: a CorpusError.
  experiment.write_config(config, tmp_path)
  changed = copy.deepcopy(config)
  changed.loss.gamma = 0.5
  monkeypatch.setattr(experiment.jax, "process_index", lambda: 1)
  with pytest.raises(experiment.ConfigMismatchError, match=r"\(changed: loss\.gamma\)"):
    experiment.train_and_evaluate(changed, str(tmp_path))
  assert (tmp_path / "run.lock.1").exists()  # It held its own process's lock.


# Result-neutral keys, run -----------------------------------------------------------------------

# Runs that change result-neutral keys of the baseline below (experiment.RESULT_NEUTRAL_KEYS),
# several at once: each key's test reads the run that changes it, and a run that matches the
# baseline leaves each of its keys neutral (float results that two keys' effects would have to
# cancel to the last bit). Grouped by how far the probabilities may move.
NEUTRAL_VARIANTS = {
  # float32 rounding where the computation differs: other convolutions, and another batch
  # shape for oneDNN to choose its implementation by. Measured on the AVX-512 EPYC: 6e-8
  # (the CSV's last digit).
  "computation": (
    {
      "model.lowering": "xla",  # The baseline's 'auto' is oneDNN or 'cpu' on a CPU.
      "train.eval_batch_size": 9,  # 160 test clips: 17 batches of 9 and one padded batch of 7.
    },
    1e-5,
  ),
  # The same bits, to the CSV's digits.
  "data": (
    {
      "data.on_device": "never",  # Batches streamed from the store.
      "cv.folds": (),  # Every fold; fold 0 is compared.
      "data.cache_dir": "another",  # A second folder: the store extracted again,
      "data.num_workers": 2,  # by two processes.
    },
    1e-6,
  ),
}
# A fold alone (one model a program) against it stacked by vmap and by lax.map (two):
# test_engine.py's test_folds_of_different_lengths_train_their_own_number_of_steps.
STACKING_KEYS = ("train.models_together", "train.models_per_program")


def _variant_of(key: str) -> str:
  return next(name for name, (changes, _) in NEUTRAL_VARIANTS.items() if key in changes)


# Runs the baseline and every variant in one process: one start-up, one oneDNN self-test.
_RUN_VARIANTS = """
import importlib.util, json, sys
from ser_jax import cpu
cpu.tune_process()
from ser_jax import experiment

runs = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("demo", "configs/demo.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for workdir, settings in runs:
  config = module.get_config()
  for key, value in settings.items():
    group, name = key.split(".")
    config[group][name] = tuple(value) if isinstance(value, list) else value
  experiment.train_and_evaluate(config, workdir)
"""


@pytest.fixture(scope="module")
def neutral_runs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """{'baseline' or a NEUTRAL_VARIANTS group: workdir}: a two-member sweep (gammas 0 and 2)
  of a width-4 ResNet-10 for one epoch on fold 0 of the session's demo corpus (the shapes of
  helpers.tiny_args: its compiled programs and self-test), one run per NEUTRAL_VARIANTS
  group, and then the baseline's fold 1 by a second invocation in its workdir."""
  root = tmp_path_factory.mktemp("neutral")
  baseline = {
    "data.root": str(session_demo_corpus()),
    "data.cache_dir": str(root / "cache"),
    "data.num_workers": 1,
    "features.max_seconds": 1.0,
    "model.name": "resnet10",
    "model.width": 4,
    "sweep.gammas": [0.0, 2.0],
    "train.num_epochs": 1,
    "train.warmup_epochs": 1,
    "train.checkpoint_every_epochs": 1,
    "cv.n_folds": 2,
    "cv.folds": [0],
  }
  runs = [(str(root / "baseline"), baseline)]
  for name, (changes, _) in NEUTRAL_VARIANTS.items():
    changes = {**changes}
    if "data.cache_dir" in changes:
      changes["data.cache_dir"] = str(root / changes["data.cache_dir"])
    runs.append((str(root / name), {**baseline, **changes}))
  # Then fold 1 in the baseline's workdir, which reports both folds from then on (the
  # variants above have compared fold 0 by then).
  runs.append((str(root / "baseline"), {**baseline, "cv.folds": [1]}))
  done = run_python(["-c", _RUN_VARIANTS, json.dumps(runs)])
  assert done.returncode == 0, done.stderr[-5000:]
  return {"baseline": root / "baseline", **{name: root / name for name in NEUTRAL_VARIANTS}}


def _fold_predictions(workdir: pathlib.Path, fold: int = 0) -> dict[tuple[int, str], np.ndarray]:
  """{(member, utt_id): class probabilities} of `fold` in predictions.csv."""
  with open(workdir / "predictions.csv", newline="") as f:
    rows = [row for row in csv.DictReader(f) if row["fold"] == str(fold)]
  return {
    (int(row["member"]), row["utt_id"]): np.array(
      [float(value) for name, value in row.items() if name.startswith("p_")]
    )
    for row in rows
  }


@pytest.mark.parametrize("key", [k for k in RESULT_NEUTRAL_KEYS if k not in STACKING_KEYS])
def test_a_result_neutral_key_leaves_the_results_as_they_are(neutral_runs, key):
  """The run that changes `key` (and no key that is not neutral) has the baseline's test
  predictions and confusion counts."""
  assert any(key in changes for changes, _ in NEUTRAL_VARIANTS.values()), (
    f"add {key} to a run of NEUTRAL_VARIANTS"
  )
  variant = _variant_of(key)
  tolerance = NEUTRAL_VARIANTS[variant][1]
  want = _fold_predictions(neutral_runs["baseline"])
  got = _fold_predictions(neutral_runs[variant])
  assert got.keys() == want.keys()
  assert {member for member, _ in want} == {0, 1}
  for utterance, probabilities in want.items():
    np.testing.assert_allclose(got[utterance], probabilities, rtol=0, atol=tolerance)
  top_two = np.sort(np.array(list(want.values())), axis=1)[:, -2:]
  if np.all(top_two[:, 1] - top_two[:, 0] > 2 * tolerance):  # No class within rounding.
    counts = [
      json.loads((workdir / "fold_0" / "result.json").read_text())["confusion_counts"]
      for workdir in (neutral_runs["baseline"], neutral_runs[variant])
    ]
    assert counts[1] == counts[0]


def test_folds_trained_one_invocation_at_a_time_add_up(neutral_runs):
  """The baseline's workdir, fold 0 and then fold 1 (`cv.folds=(1,)`), reports both folds,
  with the predictions of the run that trained both in one invocation ('data')."""
  one_at_a_time = run_results.read(neutral_runs["baseline"])
  together = run_results.read(neutral_runs["data"])
  for results in (one_at_a_time, together):
    assert [f.fold for f in results.members[0].folds] == [0, 1]
    assert results.n_folds == 2 and results.folds_label == "2"
  assert (
    "2-fold stratified cross-validation\n" in (neutral_runs["baseline"] / "results.md").read_text()
  )
  want, got = (
    _fold_predictions(neutral_runs["data"], 1),
    _fold_predictions(neutral_runs["baseline"], 1),
  )
  assert got.keys() == want.keys() and len(got) > 0
  for utterance, probabilities in want.items():
    np.testing.assert_allclose(got[utterance], probabilities, rtol=0, atol=1e-6)
