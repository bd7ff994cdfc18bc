"""How a run trains: its settings read once from the config, its models (sweep members
times folds), and its engine: the backend, the model and the compiled programs that train
the run's (fold, members) cells, grouped as the memory plan allows."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ser_jax import cpu, losses, memory, models, programs, train
from ser_jax.config import ConfigError
from ser_jax.sharding import Topology


@dataclasses.dataclass(frozen=True)
class Member:
  """One model of a (possibly one-member) sweep."""

  gamma: float
  seed: int
  learning_rate: float
  alpha: tuple[float, ...] | str = ()  # Per-class weights, 'inverse_frequency', or none.

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "alpha": _alpha_json(self.alpha)}


def is_sweep(config: ml_collections.ConfigDict) -> bool:
  """Whether any sweep.* list is set: then the sweep's members train, not the single model."""
  return any(config.sweep[key] for key in ("gammas", "seeds", "learning_rates", "alphas"))


def members_of(config: ml_collections.ConfigDict) -> list[Member]:
  """The models trained together: one, or every (gamma, seed, rate, alpha) of the sweep."""
  gamma = float(config.loss.gamma) if config.loss.name == "focal" else 0.0
  sweep = config.sweep
  if not is_sweep(config):
    return [Member(gamma, int(config.seed), float(config.train.learning_rate), config.loss.alpha)]
  return [
    Member(float(g), int(s), float(r), a)
    for g in sweep.gammas or (gamma,)
    for s in sweep.seeds or (config.seed,)
    for r in sweep.learning_rates or (config.train.learning_rate,)
    for a in sweep.alphas or (config.loss.alpha,)
  ]


def _alpha_json(alpha):
  return alpha if isinstance(alpha, str) else [float(a) for a in alpha]


@dataclasses.dataclass(frozen=True)
class Settings:
  """The config's training keys, read once into plain values."""

  num_epochs: int
  batch_size: int
  eval_batch_size: int  # Rounded up to a multiple of the devices.
  checkpoint_every_epochs: int
  seed: int
  models_together: str  # 'vmap', 'map' or 'none' (never 'auto').
  models_per_program: int  # 0: as many as fit.
  on_device: str
  options: programs.Options  # Its stacking is models_together's.

  @classmethod
  def from_config(cls, config, topology: Topology) -> Settings:
    devices = topology.num_devices
    together = models_together(config.train.models_together)
    if together == "none" and config.train.models_per_program > 1:
      logging.warning(
        "train.models_per_program=%d not used: train.models_together='auto' trains one model "
        "at a time here; set it to 'vmap' or 'map' to stack models",
        config.train.models_per_program,
      )
    return cls(
      num_epochs=config.train.num_epochs,
      batch_size=config.train.batch_size,
      eval_batch_size=devices * math.ceil(config.train.eval_batch_size / devices),
      checkpoint_every_epochs=config.train.checkpoint_every_epochs,
      seed=config.seed,
      models_together=together,
      models_per_program=config.train.models_per_program,
      on_device=config.data.on_device,
      options=programs.Options.from_config(config, together),
    )


def models_together(setting: str, platform: str | None = None) -> str:
  """train.models_together, with 'auto' resolved for the platform: one model at a time on
  CPUs, where stacking measured no faster (benchmarks/NOTES.md, "Models together"), and
  vmapped on accelerators."""
  if setting != "auto":
    return setting
  return "none" if (platform or jax.default_backend()) == "cpu" else "vmap"


def stacked_hparams(
  config, members, fold_labels, fold: int, steps_per_epoch: int, class_names: tuple[str, ...]
):
  """Each member's hyperparameters as arrays with a leading member axis.

  fold_labels: the training fold's labels, for 'inverse_frequency' class weights (None
  when only shapes are wanted).
  class_names: the store's classes (data.classes, or the reader's when that is empty).
  """
  n_classes = len(class_names)
  per_member = [
    train.make_hparams(
      gamma=m.gamma,
      learning_rate=m.learning_rate,
      alpha=class_weights(m.alpha, fold_labels, n_classes, class_names),
      label_smoothing=config.train.label_smoothing,
      rng_seed=(m.seed * 1000 + fold) % 2**32,  # Seeds run to 2**32 - 1.
      warmup_steps=steps_per_epoch * config.train.warmup_epochs,
      total_steps=steps_per_epoch * config.train.num_epochs,
    )
    for m in members
  ]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_member)


def class_weights(alpha, fold_labels, n_classes: int, class_names=()) -> np.ndarray:
  """[n_classes] loss weights: given, from the training fold's counts, or all ones."""
  if alpha == "inverse_frequency":
    if fold_labels is None:
      return np.ones(n_classes, np.float32)
    return losses.inverse_frequency_alpha(fold_labels, n_classes, class_names)
  return np.asarray(tuple(alpha) or (1.0,) * n_classes, np.float32)


@dataclasses.dataclass(frozen=True)
class Engine:
  """How a run trains: its backend and model, its cells grouped into programs, and the
  compiled programs for each group's (models, members per cell)."""

  backend: cpu.Backend
  model: models.ResNet
  shapes: programs.Shapes  # The shapes the programs were compiled for.
  groups: tuple[tuple[tuple[int, range], ...], ...]  # (fold, members) cells per program.
  programs: dict  # (n_models, n_members) -> compiled programs.Programs

  def programs_for(self, cells) -> programs.Programs:
    return self.programs[sum(len(c.members) for c in cells), len(cells[0].members)]

  @property
  def num_params(self) -> int:
    """Parameters of one model."""
    return next(iter(self.programs.values())).num_params


def program_shapes(
  settings, members, folds, trained, feature_shape, n_rows, n_classes
) -> programs.Shapes:
  """The Shapes of a run's largest program, from the sizes of its `trained` folds."""
  trained = [folds[k] for k in trained]
  max_steps = max(len(train_idx) // settings.batch_size for train_idx, _ in trained)
  if max_steps == 0:
    smallest = min(len(train_idx) for train_idx, _ in trained)
    raise ConfigError(
      f"a fold has {smallest} training examples, fewer than "
      f"train.batch_size={settings.batch_size}; lower train.batch_size"
    )
  largest_test = max(len(test_idx) for _, test_idx in trained)
  return programs.Shapes(
    n_models=len(trained) * len(members),
    n_members=len(members),
    feature_shape=feature_shape,
    batch_size=settings.batch_size,
    max_steps=max_steps,
    n_rows=n_rows,
    eval_batches=math.ceil(largest_test / settings.eval_batch_size),
    eval_batch_size=settings.eval_batch_size,
    n_classes=n_classes,
  )


def build_engine(config, settings: Settings, members, shapes: programs.Shapes, folds, topology):
  """The backend, the model, the cells' grouping into programs (memory.py's plan) and the
  compiled programs of every group; `shapes` are those of all the run's models at once."""
  make_model = functools.partial(models.create_model, config.model, shapes.n_classes)
  train_shape = (settings.batch_size, *shapes.feature_shape, 1)
  backend = cpu.select_backend(
    config.model.lowering, make_model, [train_shape, (settings.eval_batch_size, *train_shape[1:])]
  )
  logging.info("Lowering: %s; models together: %s", backend.lowering, settings.models_together)
  model = make_model(backend.ops)
  n_members, n_models = len(members), shapes.n_models
  compiled = {}

  def programs_for(k: int, m: int) -> programs.Programs:
    if (k, m) not in compiled:
      made = programs.Programs.create(
        dataclasses.replace(shapes, n_models=k, n_members=m),
        model,
        backend,
        # One model compiles the plain function (train.over_models), whatever the stacking.
        settings.options if k > 1 else dataclasses.replace(settings.options, stacking="vmap"),
        topology,
      )
      hparams = jax.eval_shape(
        lambda: stacked_hparams(
          config, [members[0]] * k, None, 0, 1, tuple(map(str, range(shapes.n_classes)))
        )
      )
      compiled[k, m] = made.compile(hparams, topology)
    return compiled[k, m]

  if shapes.n_rows is None:  # Streamed batches: one fold per program, its members share them.
    n_models = n_members
  rows_bytes = 0 if shapes.n_rows is None else shapes.n_rows * math.prod(shapes.feature_shape) * 4

  def program_bytes(k: int) -> int:
    train_program = _train_program(programs_for(k, min(k, n_members)))
    needed = memory.compiled_bytes(train_program) - rows_bytes
    if jax.default_backend() == "cpu":  # XLA counts per device; a CPU's devices share the host.
      needed *= len(jax.local_devices())
    return needed

  at_most = 1 if settings.models_together == "none" else settings.models_per_program
  per_program, plan = memory.plan_models_per_program(n_models, at_most, program_bytes, rows_bytes)
  logging.info("%s", plan.describe())
  groups = memory.group_cells(folds, n_members, per_program)
  for group in groups:
    programs_for(sum(len(chunk) for _, chunk in group), len(group[0][1]))
  return Engine(backend, model, shapes, tuple(tuple(g) for g in groups), compiled)


def _train_program(made: programs.Programs):
  return made.train_step if made.shapes.n_rows is None else made.train_epoch
