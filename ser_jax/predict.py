"""Scores audio files with a trained run: `python -m ser_jax.predict --workdir=RUN PATH...`.

Each file gets one JSON line on stdout. Features use the run's own settings and each
fold's training normalisation; by default the fold models vote as an ensemble (mean of
their probabilities). Audio longer than `features.max_seconds` is cut into half-overlapping
windows whose probabilities are averaged, or (`--first_window`) only its first
`max_seconds` are scored, as the run's own test scored its clips.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from ser_jax import (
  audio,
  checkpoints,
  cli,
  command_line,
  config_tree,
  cpu,
  input_pipeline,
  layout,
  models,
  run_results,
)
from ser_jax.config import default_config
from ser_jax.features import FeatureParams, compute_features

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class PredictorError(ValueError):
  """A workdir, fold or member that cannot be used for prediction."""


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run's config: config.json (the whole config) over the defaults, which fill only
  keys that a run made by an older ser_jax did not have."""
  path = pathlib.Path(workdir) / layout.CONFIG
  if not path.exists():
    raise PredictorError(f"{workdir} holds no config.json; is it a training workdir?")
  return config_tree.read_config(path, default_config())


def window_starts(n_samples: int, window: int) -> list[int]:
  """Window starts: hop of half a window, the last window aligned to the end of the audio."""
  if n_samples <= window:
    return [0]
  hop = max(window // 2, 1)
  return [*range(0, n_samples - window, hop), n_samples - window]


class Predictor:
  """Class probabilities of waveforms from one fold's model or the ensemble of all folds."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    class_names: Sequence[str],
    folds: Sequence[int],
    variables: dict,
    means: np.ndarray,
    stds: np.ndarray,
    member: int = 0,
  ):
    """`variables`, `means` and `stds` are stacked over `folds` on a leading axis."""
    self.config = config
    self.class_names = tuple(class_names)
    self.folds = tuple(folds)
    self.member = member
    self.params = FeatureParams.from_config(config.features)
    self.batch_size = int(config.train.eval_batch_size)
    feature_shape = (self.batch_size, self.params.n_bins, self.params.n_frames, 1)
    self._backend = cpu.select_backend(
      config.model.lowering,
      functools.partial(models.create_model, config.model, len(self.class_names)),
      [feature_shape, feature_shape],
    )
    self._model = models.create_model(config.model, len(self.class_names), self._backend.ops)
    self._variables = jax.tree.map(jnp.asarray, variables)
    self._means = jnp.asarray(means)
    self._stds = jnp.asarray(stds)

  @classmethod
  def from_workdir(
    cls, workdir: str | os.PathLike, fold: int | None = None, member: int = 0
  ) -> Predictor:
    """Loads every finished fold of a trained run (or only `fold`), using sweep member `member`."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
      raise PredictorError(f"workdir {workdir} does not exist")
    config = load_run_config(workdir)
    available = layout.finished_folds(workdir)
    if not available:
      raise PredictorError(f"{workdir} has no finished fold (no fold_<k>/result.json)")
    if fold is not None and fold not in available:
      raise PredictorError(
        f"fold {fold} is not a finished fold of {workdir}; finished: "
        f"{', '.join(map(str, available))}"
      )
    folds = available if fold is None else [fold]
    class_names = _class_names(workdir, config)
    fold_variables, means, stds = [], [], []
    for k in folds:
      checkpoint_dir, index = layout.member_checkpoints(workdir, k, member)
      saved_members = layout.n_saved_members(workdir, k)
      if index is None:
        raise PredictorError(
          f"member={member} is out of range; the run has {saved_members} member(s), "
          f"0..{saved_members - 1}"
        )
      try:
        variables = checkpoints.restore_variables(checkpoint_dir)
      except checkpoints.NoCheckpointError as error:
        raise PredictorError(str(error)) from error
      n_members, n_outputs = variables["params"]["head"]["bias"].shape
      if not 0 <= index < n_members:
        raise PredictorError(
          f"member={member} is out of range; the run has {n_members} member(s), 0..{n_members - 1}"
        )
      if n_outputs != len(class_names):
        raise PredictorError(
          f"fold {k}'s model has {n_outputs} outputs but the run lists {len(class_names)} "
          f"classes {class_names}"
        )
      fold_variables.append(jax.tree.map(lambda x, i=index: x[i], variables))
      with np.load(layout.fold_dir(workdir, k) / layout.NORMALISATION) as stats:
        means.append(stats["mean"])
        stds.append(stats["std"])
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *fold_variables)
    return cls(config, class_names, folds, stacked, np.stack(means), np.stack(stds), member)

  def window_probabilities(
    self, waveform: np.ndarray, sample_rate: int, first_window: bool = False
  ) -> tuple[np.ndarray, np.ndarray]:
    """(window starts in seconds [windows], fold-mean probabilities [windows, classes]).

    `waveform` is [n_samples] or [n_samples, n_channels] at `sample_rate` Hz; with
    `first_window`, only its first window (what training and the run's test saw).
    """
    mono = audio.prepare_waveform(waveform, sample_rate, self.params.sample_rate)
    starts = [0] if first_window else window_starts(len(mono), self.params.max_samples)
    features = np.stack(
      [compute_features(mono[s : s + self.params.max_samples], self.params) for s in starts]
    )
    chunks = []
    for begin in range(0, len(features), self.batch_size):
      chunk = features[begin : begin + self.batch_size]
      padded = input_pipeline.pad_rows(
        chunk, input_pipeline.padded_size(len(chunk), self.batch_size)
      )
      probabilities = _fold_probabilities(
        self._model, self._backend.evaluate, self._variables, self._means, self._stds, padded
      )
      chunks.append(np.asarray(probabilities, np.float64)[:, : len(chunk)])
    per_fold = np.concatenate(chunks, axis=1)  # [folds, windows, classes]
    return np.array(starts, np.float64) / self.params.sample_rate, per_fold.mean(axis=0)

  def predict(
    self, waveform: np.ndarray, sample_rate: int, first_window: bool = False
  ) -> dict[str, float]:
    """{class: probability}, averaged over windows (and folds)."""
    probabilities = self.window_probabilities(waveform, sample_rate, first_window)[1]
    return self._named(probabilities.mean(axis=0))

  def predict_file(
    self, path: str | os.PathLike, windows: bool = False, first_window: bool = False
  ) -> dict:
    """{path, label, probabilities[, windows]} for an audio file; raises audio.AudioError."""
    mono = audio.load_audio(path, self.params.sample_rate)
    starts, probabilities = self.window_probabilities(mono, self.params.sample_rate, first_window)
    mean = probabilities.mean(axis=0)
    result = {
      "path": os.fspath(path),
      "label": self.class_names[int(mean.argmax())],
      "probabilities": self._named(mean),
    }
    if windows:
      result["windows"] = self._windows(starts, probabilities)
    return result

  def _windows(self, starts: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    return [
      {"start_seconds": float(s), "probabilities": self._named(p)}
      for s, p in zip(starts, probabilities, strict=True)
    ]

  def _named(self, probabilities: np.ndarray) -> dict[str, float]:
    """To 9 significant digits, as predictions.csv has them (float32's own precision)."""
    return {
      name: float(f"{p:.9g}") for name, p in zip(self.class_names, probabilities, strict=True)
    }


# The model and evaluation are static (hashable), so predictors of the same architecture
# share compilations.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _fold_probabilities(model, evaluate, variables, means, stds, features) -> jax.Array:
  """[folds, batch, classes] probabilities of [batch, n_bins, n_frames] raw features, each
  fold's model on its own standardisation (training's evaluation, Backend.evaluate)."""

  def one_fold(fold_variables, mean, std):
    inputs = input_pipeline.standardise(features, mean, std)
    return evaluate(model.apply, fold_variables, inputs[None])[0]

  return jax.vmap(one_fold)(variables, means, stds)


def _class_names(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """results.json's classes; an unfinished run falls back to data.classes when it names them."""
  if (workdir / layout.RESULTS).exists():
    try:
      return run_results.read(workdir).class_names
    except run_results.ResultsError as error:
      raise PredictorError(str(error)) from error
  if config.data.classes:
    return tuple(config.data.classes)
  raise PredictorError(
    f"{workdir} has no results.json and its config leaves data.classes empty, so the class "
    "order is unknown; finish the run first"
  )


def audio_files(paths: Sequence[str]) -> Iterator[str]:
  """Files as given; folders searched recursively for audio files, in sorted order."""
  for path in paths:
    if os.path.isdir(path):
      found = sorted(
        p
        for p in pathlib.Path(path).rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
      )
      if not found:
        print(f"warning: no {'/'.join(AUDIO_SUFFIXES)} files under {path}", file=sys.stderr)
      yield from map(str, found)
    else:
      yield path


def define_flags(values: flags.FlagValues) -> None:
  """The command line's flags; its positional arguments are audio files or folders."""
  flags.DEFINE_string(
    "workdir", None, "A trained run's workdir.", flag_values=values, required=True
  )
  flags.DEFINE_integer(
    "fold", None, "Use only this fold's model (default: all folds).", flag_values=values
  )
  flags.DEFINE_integer(
    "member",
    0,
    "Sweep member to use: an index into results.json's 'members' list.",
    flag_values=values,
  )
  flags.DEFINE_bool("windows", False, "Add per-window scores.", flag_values=values)
  flags.DEFINE_bool(
    "first_window",
    False,
    "Score only each file's first features.max_seconds, as the run's own test did "
    "(its predictions.csv), not windows over the whole file.",
    flag_values=values,
  )


def predict(values: flags.FlagValues, paths: Sequence[str]) -> int:
  """Scores `paths` (audio files or folders), one JSON line each; returns the exit status."""
  if not paths:
    raise app.UsageError("give the audio files or folders to score: PATH...")
  try:
    predictor = Predictor.from_workdir(values.workdir, fold=values.fold, member=values.member)
  except (PredictorError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  n_failed = 0
  for path in audio_files(paths):
    try:
      result = predictor.predict_file(
        path, windows=values.windows, first_window=values.first_window
      )
    except audio.AudioError as error:
      result = {"path": path, "error": str(error)}
      n_failed += 1
    print(json.dumps(result), flush=True)
  return 1 if n_failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line's `predict` on `argv` (no program name: command_line.run_flags);
  `python -m ser_jax.predict` also sets up logging and the compilation cache."""
  return command_line.run_flags(define_flags, predict, argv)


def _predict_command_line(values: flags.FlagValues, paths: Sequence[str]) -> int:
  """`predict` for the process's command line, its logging set once absl has parsed the
  flags (parsing sets absl's logger, Orbax's, to INFO)."""
  cli.setup_logging()
  cli.use_compilation_cache()
  return predict(values, paths)


if __name__ == "__main__":
  cpu.tune_process()
  sys.exit(command_line.run_flags(define_flags, _predict_command_line))
