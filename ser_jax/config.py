"""The experiment's configuration: every key with its default, and validation.

Config files under `configs/` start from `default_config()` and change what they need,
so every run has the same keys and a misspelt key is an error, not a silent default.
"""

from __future__ import annotations

import math

import ml_collections

LOSSES = ("focal", "softmax")
FEATURE_KINDS = ("logmel", "mfcc")
CV_SCHEMES = ("stratified", "speaker", "given")
COMPUTE_DTYPES = ("float32", "bfloat16")
ON_DEVICE = ("auto", "always", "never")
MODELS_TOGETHER = ("auto", "vmap", "map", "none")
# loss.alpha and sweep.alphas[] may name a rule instead of giving the weights.
ALPHA_RULES = ("inverse_frequency",)


class ConfigError(ValueError):
  """A config key with a value that is not allowed."""


def default_config() -> ml_collections.ConfigDict:
  """The paper's setting (MFCC + focal loss on IEMOCAP), every key present."""
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "iemocap"
  config.data.root = ""  # Corpus folder; for 'demo' empty means <cache_dir>/demo_corpus.
  # EmoBox only: the folder its `wav` paths are relative to (holding downloads/), or
  # downloads/ or downloads/<dataset>/ itself; empty means two folders above data.root.
  config.data.audio_root = ""
  # EmoBox only: a `wav` path that names no file, but one that differs only in letter case,
  # reads that one (each such path is otherwise a skip naming it).
  config.data.case_insensitive_paths = False
  config.data.classes = ("neutral", "happiness", "sadness", "anger")
  config.data.include_scripted = False  # IEMOCAP only.
  config.data.merge_excited = False  # IEMOCAP only: 'exc' counts as happiness.
  config.data.strict = False  # True: a bad audio file is an error, not a logged skip.
  config.data.cache_dir = ""  # Feature stores; empty means $SER_JAX_CACHE or ~/.cache/ser_jax.
  config.data.num_workers = 0  # Preprocessing processes; 0: one per core, >= 64 clips each.
  # Features on the accelerator (or host) once per run, batches gathered there, each epoch
  # one call: 'auto' where they fit (half the memory free) in a one-process run; 'never'
  # streams batches from the store. The same batches and results either way.
  config.data.on_device = "auto"
  # Class weights in class order: keep the largest subset with these class shares, what is
  # dropped spread over speakers (data/shares.py); empty: every utterance as read.
  config.data.class_shares = ()
  config.data.class_shares_seed = 0  # Draws what class_shares drops; apart from `seed`.
  # Across corpora: one fold (0) trained on every kept utterance of data.corpus and tested on
  # every utterance of this corpus with data.classes (which must then name the classes both
  # have); empty: cross-validation within data.corpus.
  config.data.test_corpus = ""
  config.data.test_root = ""  # The test corpus's folder (for csv: the manifest).

  config.features = ml_collections.ConfigDict()
  config.features.kind = "mfcc"
  config.features.sample_rate = 22050
  config.features.max_seconds = 6.0
  config.features.n_fft = 2048
  config.features.win_length = 2048
  config.features.hop_length = 512
  config.features.n_mels = 128
  config.features.n_mfcc = 40

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"
  config.model.width = 64  # Channels of the first stage; 64 is ResNet-18.
  config.model.compute_dtype = "float32"  # 'bfloat16' on accelerators; params stay float32.
  config.model.shard_params = False  # True: params and optimiser state split over devices (FSDP).
  # How convolutions run, same values: 'xla'; 'cpu' (XLA, ser_jax/cpu/kernels.py's
  # gradients); 'onednn' (oneDNN on the CPU); 'auto': 'onednn' on a 1-device CPU where it
  # builds, runs AVX2 or better and passes its self-test, else 'cpu' on a CPU, 'xla' on
  # accelerators.
  config.model.lowering = "auto"

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "focal"
  config.loss.gamma = 2.0
  # Per-class weights in class order; 'inverse_frequency': 1 / count in the training fold,
  # normalised to mean 1 (losses.inverse_frequency_alpha); empty means none. A reference of
  # type object, so a config file or --config.loss.alpha=inverse_frequency can set a string.
  config.loss.alpha = ml_collections.FieldReference((), field_type=object)

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 40
  config.train.batch_size = 32
  config.train.learning_rate = 1e-3
  config.train.warmup_epochs = 2
  config.train.weight_decay = 1e-2
  config.train.label_smoothing = 0.0
  config.train.time_shift = True  # Random circular shift of the valid frames.
  config.train.freq_masks = 2  # SpecAugment masks per example.
  config.train.freq_mask_bins = 4
  config.train.time_masks = 2
  config.train.time_mask_frames = 20
  config.train.checkpoint_every_epochs = 5
  config.train.eval_batch_size = 64
  # The same numbers from the same config and seed, run after run: on a GPU, XLA's
  # deterministic ops (slower; docs/gpus.md, "Reproducibility"). CPUs and TPUs are so already.
  config.train.deterministic = True
  # How a run's models (its folds times its sweep members) train together: 'vmap' (one
  # batched program), 'map' (lax.map over them in one program), 'none' (one at a time);
  # 'auto': 'none' on CPUs, 'vmap' on accelerators (benchmarks/NOTES.md, "Models together").
  config.train.models_together = "auto"
  # Most models in one program; 0: as many as fit in memory (memory.py).
  config.train.models_per_program = 0

  config.cv = ml_collections.ConfigDict()
  # 'stratified' (the paper's), 'speaker', or 'given': the corpus's own folds (EmoBox's
  # fold_<k> files, a csv manifest's fold column, IEMOCAP's sessions), cv.n_folds unused.
  config.cv.scheme = "stratified"
  config.cv.n_folds = 5
  config.cv.folds = ()  # Run only these fold indices (0 is the first); empty means all.

  config.sweep = ml_collections.ConfigDict()
  # Any list set: one model per (gamma, seed, learning rate, alpha), trained together; an
  # empty list means loss.gamma, seed, train.learning_rate or loss.alpha.
  config.sweep.gammas = ()
  config.sweep.seeds = ()
  config.sweep.learning_rates = ()
  config.sweep.alphas = ()  # Entries as loss.alpha: per-class weight tuples, 'inverse_frequency'.

  config.seed = 0
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key, its value and what is allowed."""
  _check_keys(config, default_config(), "")

  def allowed(key: str, value, choices) -> None:
    if value not in choices:
      raise ConfigError(f"{key}={value!r} is not allowed; expected one of: {', '.join(choices)}")

  def at_least(key: str, value, minimum, strict: bool = False) -> None:
    if not math.isfinite(value):
      raise ConfigError(f"{key}={value!r} is not allowed; it must be a finite number")
    if value < minimum or (strict and value == minimum):
      relation = ">" if strict else ">="
      raise ConfigError(f"{key}={value!r} is not allowed; it must be {relation} {minimum}")

  from ser_jax.data import corpora

  allowed("data.corpus", config.data.corpus, sorted(corpora.CORPORA))
  if config.data.corpus != "demo" and not config.data.root:
    raise ConfigError(
      f"data.root is empty; set --config.data.root=/path/to/{config.data.corpus} "
      "(only the 'demo' corpus is built in)"
    )
  for key in ("audio_root", "case_insensitive_paths"):
    if config.data[key] and config.data.corpus != "emobox":
      raise ConfigError(
        f"data.{key}={config.data[key]!r} applies only to data.corpus='emobox', not "
        f"{config.data.corpus!r}; leave it at its default"
      )
  if config.data.test_corpus:
    allowed("data.test_corpus", config.data.test_corpus, sorted(corpora.CORPORA))
    if "emobox" in (config.data.corpus, config.data.test_corpus):
      raise ConfigError(
        "data.test_corpus does not take EmoBox corpora yet (their audio root is not passed "
        "on); run EmoBox corpora within themselves, cv.scheme='given'"
      )
    if config.data.test_corpus != "demo" and not config.data.test_root:
      raise ConfigError(
        f"data.test_root is empty; set --config.data.test_root=/path/to/{config.data.test_corpus}"
      )
    if not config.data.classes:
      raise ConfigError(
        "data.test_corpus needs data.classes: the classes both corpora have, in label order"
      )
    if tuple(config.cv.folds) not in ((), (0,)):
      raise ConfigError(
        f"cv.folds={tuple(config.cv.folds)!r}; a run with data.test_corpus has one fold, 0"
      )
  if len(set(config.data.classes)) != len(config.data.classes):
    raise ConfigError(f"data.classes={tuple(config.data.classes)!r} has repeated class names")
  if len(config.data.classes) == 1:
    (name,) = config.data.classes
    hint = (
      f'; as a tuple: --config.data.classes="{tuple(c.strip() for c in name.split(","))!r}"'
      if "," in name
      else " (empty: every class of the corpus)"
    )
    raise ConfigError(
      f"data.classes={tuple(config.data.classes)!r} names one class; a classifier needs two "
      f"or more{hint}"
    )
  at_least("data.num_workers", config.data.num_workers, 0)
  n_classes = len(config.data.classes)
  if config.data.class_shares:
    _check_weights("data.class_shares", config.data.class_shares, n_classes)
  at_least("data.class_shares_seed", config.data.class_shares_seed, 0)
  allowed("data.on_device", config.data.on_device, ON_DEVICE)
  allowed("features.kind", config.features.kind, FEATURE_KINDS)
  at_least("features.sample_rate", config.features.sample_rate, 1000)
  at_least("features.max_seconds", config.features.max_seconds, 0, strict=True)
  at_least("features.n_fft", config.features.n_fft, 16)
  at_least("features.hop_length", config.features.hop_length, 1)
  if not 1 <= config.features.win_length <= config.features.n_fft:
    raise ConfigError(
      f"features.win_length={config.features.win_length} must be in [1, features.n_fft]"
    )
  at_least("features.n_mels", config.features.n_mels, 1)
  at_least("features.n_mfcc", config.features.n_mfcc, 1)
  if config.features.n_mfcc > config.features.n_mels:
    raise ConfigError(
      f"features.n_mfcc={config.features.n_mfcc} must be <= features.n_mels="
      f"{config.features.n_mels}"
    )
  allowed("model.name", config.model.name, ("resnet10", "resnet18", "resnet34"))
  at_least("model.width", config.model.width, 1)
  allowed("model.compute_dtype", config.model.compute_dtype, COMPUTE_DTYPES)
  allowed("model.lowering", config.model.lowering, ("auto", "xla", "cpu", "onednn"))
  allowed("loss.name", config.loss.name, LOSSES)
  at_least("loss.gamma", config.loss.gamma, 0.0)
  if config.loss.alpha and not isinstance(config.loss.alpha, str):
    _check_weights("loss.alpha", config.loss.alpha, n_classes)
  for index, alpha in enumerate(config.sweep.alphas):
    key = f"sweep.alphas[{index}]"
    if isinstance(alpha, str):
      _check_alpha_rule(key, alpha)
    elif isinstance(alpha, tuple | list):
      if alpha:  # () is no class weights.
        _check_weights(key, alpha, n_classes)
    else:
      raise ConfigError(
        f"{key}={alpha!r} is not allowed; expected a tuple of {n_classes} per-class weights or "
        f"one of: {', '.join(ALPHA_RULES)} (one entry: --config.sweep.alphas='((1, 2, 1, 1),)')"
      )
  for gamma in config.sweep.gammas:
    at_least("sweep.gammas[]", gamma, 0.0)
  allowed("train.models_together", config.train.models_together, MODELS_TOGETHER)
  at_least("train.models_per_program", config.train.models_per_program, 0)
  if config.train.models_together == "none" and config.train.models_per_program > 1:
    raise ConfigError(
      f"train.models_per_program={config.train.models_per_program} with "
      "train.models_together='none' (one model at a time); use 'vmap' or 'map' to stack them"
    )
  for rate in config.sweep.learning_rates:
    at_least("sweep.learning_rates[]", rate, 0.0, strict=True)
  at_least("train.num_epochs", config.train.num_epochs, 1)
  at_least("train.batch_size", config.train.batch_size, 1)
  at_least("train.eval_batch_size", config.train.eval_batch_size, 1)
  at_least("train.learning_rate", config.train.learning_rate, 0.0, strict=True)
  at_least("train.warmup_epochs", config.train.warmup_epochs, 0)
  at_least("train.weight_decay", config.train.weight_decay, 0.0)
  if not 0.0 <= config.train.label_smoothing < 1.0:
    raise ConfigError(f"train.label_smoothing={config.train.label_smoothing} must be in [0, 1)")
  at_least("train.checkpoint_every_epochs", config.train.checkpoint_every_epochs, 1)
  for key in ("freq_masks", "freq_mask_bins", "time_masks", "time_mask_frames"):
    at_least(f"train.{key}", config.train[key], 0)
  for key, seed in [("seed", config.seed), *(("sweep.seeds[]", s) for s in config.sweep.seeds)]:
    if not 0 <= seed < 2**32:
      raise ConfigError(f"{key}={seed!r} is not allowed; seeds are 0 .. 2**32 - 1")
  allowed("cv.scheme", config.cv.scheme, CV_SCHEMES)
  at_least("cv.n_folds", config.cv.n_folds, 2)
  if len(set(config.cv.folds)) != len(config.cv.folds):
    raise ConfigError(f"cv.folds={tuple(config.cv.folds)!r} lists a fold twice")
  for fold in config.cv.folds:
    # Given folds are counted when the corpus is read (run_data.cross_validation_folds).
    if fold < 0 or (config.cv.scheme != "given" and fold >= config.cv.n_folds):
      raise ConfigError(f"cv.folds contains {fold}; folds are 0..{config.cv.n_folds - 1}")


def _check_weights(key: str, weights, n_classes: int) -> None:
  """Per-class weights: one finite number > 0 per class."""
  if n_classes and len(weights) != n_classes:
    raise ConfigError(
      f"{key} has {len(weights)} weights but data.classes has {n_classes} classes; "
      "give one weight per class, in class order"
    )
  for weight in weights:
    number = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not (number and math.isfinite(weight) and weight > 0):
      raise ConfigError(
        f"{key}={tuple(weights)!r} has weight {weight!r}; every weight must be a number > 0"
      )


def _check_alpha_rule(key: str, value: str) -> None:
  if value not in ALPHA_RULES:
    raise ConfigError(
      f"{key}={value!r} is not allowed; expected per-class weights (a tuple) or one of: "
      f"{', '.join(ALPHA_RULES)}"
    )


def _check_keys(config, reference, prefix: str) -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      known = ", ".join(f"{prefix}{k}" for k in sorted(reference.keys()))
      raise ConfigError(f"unknown config key '{name}'; known keys here: {known}")
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f"config key '{name}' must be a group of keys, not {config[key]!r}")
      _check_keys(config[key], reference[key], name + ".")
    else:
      _check_type(name, config[key], reference[key])


def _check_type(name: str, value, reference) -> None:
  if name == "loss.alpha" and isinstance(value, str):
    _check_alpha_rule(name, value)
    return
  if isinstance(reference, bool):
    ok = isinstance(value, bool)
  elif isinstance(reference, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(reference, float):
    ok = isinstance(value, int | float) and not isinstance(value, bool)
  elif isinstance(reference, str):
    ok = isinstance(value, str)
  else:
    ok = isinstance(value, tuple | list)
  if not ok:
    expected = type(reference).__name__
    if name == "loss.alpha":
      expected += f" of per-class weights or one of: {', '.join(ALPHA_RULES)}"
    raise ConfigError(
      f"config key '{name}'={value!r} has type {type(value).__name__}; expected {expected}"
    )
