"""A run's jitted programs over a leading model axis, and their compilation ahead of time.

A model is one (fold, sweep member). A program trains several at once, stacked with
`jax.vmap` or `lax.map` (train.over_models); each model has its own batch order,
normalisation, hyperparameters and number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ser_jax import input_pipeline, train
from ser_jax.sharding import Topology

_cache_events = threading.local()
_listening = False


def _count_cache_hit(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _cache_events.hits = getattr(_cache_events, "hits", 0) + 1


def compile_logged(name: str, jitted, *abstract_args):
  """`jitted.lower(*abstract_args).compile()`, logged with its seconds and whether XLA
  compiled it or loaded it from the persistent compilation cache."""
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count_cache_hit)
    _listening = True
  hits = getattr(_cache_events, "hits", 0)
  start = time.perf_counter()
  compiled = jitted.lower(*abstract_args).compile()
  seconds = time.perf_counter() - start
  how = (
    "loaded from the compilation cache" if getattr(_cache_events, "hits", 0) > hits else "compiled"
  )
  logging.info("Program %s: %s in %.1f s", name, how, seconds)
  return compiled


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a run's programs are compiled for, known before the feature store is built."""

  n_models: int  # Models trained in one program.
  n_members: int  # Members of one (fold, members) cell: the models one evaluation reads.
  feature_shape: tuple[int, int]  # [n_bins, n_frames]
  batch_size: int
  max_steps: int  # Train steps in an epoch of the largest fold.
  n_rows: int | None  # Rows of the features on the device; None: batches stream.
  eval_batches: int  # Evaluation batches of the largest test set.
  eval_batch_size: int
  n_classes: int


@dataclasses.dataclass(frozen=True)
class Options:
  """How the programs train and compile."""

  stacking: str = "vmap"  # How a program stacks its models (train.over_models).
  weight_decay: float = 0.0
  augmentation: train.Augmentation = train.Augmentation()
  shard_params: bool = False  # FSDP: large parameters split over the data axis.
  compiler_options: dict = dataclasses.field(default_factory=dict)  # XLA options.

  @classmethod
  def from_config(cls, config, stacking: str = "vmap") -> Options:
    return cls(
      stacking=stacking,
      weight_decay=config.train.weight_decay,
      augmentation=train.Augmentation.from_config(config.train),
      shard_params=config.model.shard_params,
      compiler_options=deterministic_options(config),
    )


def deterministic_options(config) -> dict:
  """XLA options that make the run's programs give the same numbers every time: on a GPU,
  deterministic reductions and scatters (train.deterministic); CPUs and TPUs need none."""
  if config.train.deterministic and jax.default_backend() == "gpu":
    return {"xla_gpu_deterministic_ops": True}
  return {}


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted functions of a run for `Shapes`; `compile` swaps in compiled ones."""

  shapes: Shapes
  # ([models] uint32 seeds, [models] int32 folds) -> stacked TrainState
  init: Callable
  # (state, device rows, [models, max_steps, batch] indices, [models] steps, [models,
  # n_bins] mean and std, hparams) -> (state, metrics [models, max_steps])
  train_epoch: Callable
  # (state, streamed batch shared by the models, hparams) -> (state, metrics [models])
  train_step: Callable
  # (state of one cell's members, [n, batch, n_bins, n_frames] features) ->
  # [members, n, batch, n_classes] probabilities
  evaluate: Callable
  state_sharding: object  # Pytree of the stacked state's shardings.
  num_params: int  # Parameters of one model.
  # (stacked state, first model) -> the state of one cell's `n_members` models, and back.
  take_cell: Callable
  put_cell: Callable

  @classmethod
  def create(
    cls,
    shapes: Shapes,
    model,
    backend,
    options: Options,
    topology: Topology,
  ) -> Programs:
    """backend: a ser_jax.cpu.Backend (its optimiser transformation, evaluation, donation)."""
    compiler_options = options.compiler_options
    tx = train.make_optimizer(options.weight_decay, backend.before_update)
    input_shape = (1, *shapes.feature_shape, 1)
    jit = functools.partial(jax.jit, compiler_options=compiler_options or None)

    def init(seeds, folds):
      keys = jax.vmap(lambda seed, fold: jax.random.fold_in(jax.random.key(seed), fold))(
        seeds, folds
      )
      return jax.vmap(lambda key: train.create_train_state(model, tx, key, input_shape))(keys)

    # Shapes first (eval_shape), then a jitted init that lays the state out.
    abstract = jax.eval_shape(
      init, jnp.zeros((shapes.n_models,), jnp.uint32), jnp.zeros((shapes.n_models,), jnp.int32)
    )
    m = shapes.n_members
    cell_abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((m, *x.shape[1:]), x.dtype), abstract
    )
    if options.shard_params:
      state_sharding, cell_sharding = topology.fsdp(abstract), topology.fsdp(cell_abstract)
    else:
      state_sharding = jax.tree.map(lambda _: topology.replicated, abstract)
      cell_sharding = jax.tree.map(lambda _: topology.replicated, cell_abstract)

    def take_cell(state, first):
      return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, first, m), state)

    def put_cell(state, cell, first):
      return jax.tree.map(
        lambda x, c: jax.lax.dynamic_update_slice_in_dim(x, c, first, 0), state, cell
      )

    def train_step(state, batch, hparams):
      return train.train_step(state, batch, hparams, augmentation=options.augmentation)

    def train_epoch(state, rows, order, n_steps, mean, std, hparams):
      def batch_at(i):
        batch = input_pipeline.device_batch(rows, order[i], mean, std)
        return jax.lax.with_sharding_constraint(batch, topology.batch)

      return train.epoch_loop(train_step, state, hparams, batch_at, n_steps, shapes.max_steps)

    def evaluate(state, features):
      return backend.evaluate(state.apply_fn, train.state_variables(state), features)

    stack = functools.partial(train.over_models, stacking=options.stacking, shared_args=1)
    donate = (0,) if backend.donate_state else ()
    # Init runs once per model, and XLA's optimisations cost it seconds to minutes of
    # compiling (Flax's random initialisers unroll into long integer programs).
    quick = {**(compiler_options or {}), "xla_backend_optimization_level": 0}
    return cls(
      shapes=shapes,
      # Inputs as given (the seeds), not as laid out: `compile` then reuses the trace above.
      init=jax.jit(
        init,
        in_shardings=topology.replicated,
        out_shardings=state_sharding,
        compiler_options=quick,
      ),
      train_epoch=jit(stack(train_epoch, shapes.n_models), donate_argnums=donate),
      train_step=jit(stack(train_step, shapes.n_models), donate_argnums=donate),
      evaluate=jit(stack(evaluate, m)),
      state_sharding=state_sharding,
      num_params=sum(x.size for x in jax.tree.leaves(abstract.params)) // shapes.n_models,
      take_cell=jit(take_cell, out_shardings=cell_sharding),
      put_cell=jit(put_cell, out_shardings=state_sharding),
    )

  def compile(self, hparams, topology: Topology) -> Programs:
    """The programs a run calls, compiled ahead of time (in any thread: XLA releases the
    GIL); each is logged as compiled or loaded from the persistent cache.

    hparams: the stacked hyperparameters (or their shapes) of `n_models` models.
    """
    shapes = self.shapes
    k, n_bins = shapes.n_models, shapes.feature_shape[0]
    seeds = np.zeros(k, np.uint32)
    state = _shaped(jax.eval_shape(self.init, seeds, seeds.astype(np.int32)), self.state_sharding)
    hparams = _shaped(hparams, topology.replicated)
    replicated = functools.partial(_shaped, sharding=topology.replicated)
    label = f"{k} model{'s' if k > 1 else ''}"
    init = compile_logged(f"init ({label})", self.init, seeds, seeds.astype(np.int32))
    if shapes.n_rows is None:
      batch = _batch_shapes(shapes.batch_size, shapes.feature_shape)
      train_program = compile_logged(
        f"train step ({label})", self.train_step, state, _shaped(batch, topology.batch), hparams
      )
      trained = {"train_step": train_program}
    else:
      rows = replicated(
        {
          "features": np.zeros((shapes.n_rows, *shapes.feature_shape), np.float32),
          "labels": np.zeros(shapes.n_rows, np.int32),
          "valid_frames": np.zeros(shapes.n_rows, np.int32),
        }
      )
      args = replicated(
        (
          np.zeros((k, shapes.max_steps, shapes.batch_size), np.int32),
          np.zeros(k, np.int32),
          np.zeros((k, n_bins), np.float32),
          np.zeros((k, n_bins), np.float32),
        )
      )
      train_program = compile_logged(
        f"train epoch ({label}, {shapes.max_steps} steps)",
        self.train_epoch,
        state,
        rows,
        *args,
        hparams,
      )
      trained = {"train_epoch": train_program}
    cell_state = jax.eval_shape(self.take_cell, state, 0)
    features = jax.ShapeDtypeStruct(
      (shapes.eval_batches, shapes.eval_batch_size, *shapes.feature_shape),
      jnp.float32,
      sharding=topology.stacked_batch,
    )
    evaluate = compile_logged(
      f"evaluation ({shapes.n_members} x {shapes.eval_batches} batches of {shapes.eval_batch_size})",
      self.evaluate,
      cell_state,
      features,
    )
    return dataclasses.replace(self, init=init, evaluate=evaluate, **trained)


def _batch_shapes(batch_size: int, feature_shape) -> dict:
  return {
    "features": np.zeros((batch_size, *feature_shape), np.float32),
    "labels": np.zeros(batch_size, np.int32),
    "valid_frames": np.zeros(batch_size, np.int32),
  }


def _shaped(tree, sharding):
  """ShapeDtypeStructs of `tree`'s arrays laid out by `sharding` (one, or a matching tree)."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, sharding
  )
