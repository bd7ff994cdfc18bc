"""Train state, optimiser and the pure, jittable, vmappable train and eval steps."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ser_jax import losses

Batch = dict[str, jax.Array]
HParams = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; a pytree, so it can be stacked over members."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Any = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """SpecAugment-style masking and a circular time shift within each clip's valid frames."""

  time_shift: bool = True
  freq_masks: int = 2
  freq_mask_bins: int = 4
  time_masks: int = 2
  time_mask_frames: int = 20

  @classmethod
  def from_config(cls, train_config) -> Augmentation:
    return cls(**{f.name: train_config[f.name] for f in dataclasses.fields(cls)})


def make_hparams(
  *,
  gamma: float,
  learning_rate: float,
  alpha,
  label_smoothing: float,
  rng_seed: int,
  warmup_steps: int,
  total_steps: int,
) -> HParams:
  """The numbers a sweep may vary, as arrays: members differ only in these.

  The schedule's lengths are arrays too, so folds of different sizes share one program.
  """
  return {
    "gamma": jnp.asarray(gamma, jnp.float32),
    "learning_rate": jnp.asarray(learning_rate, jnp.float32),
    "alpha": jnp.asarray(alpha, jnp.float32),
    "label_smoothing": jnp.asarray(label_smoothing, jnp.float32),
    "rng_seed": jnp.asarray(rng_seed, jnp.uint32),
    "warmup_steps": jnp.asarray(warmup_steps, jnp.float32),
    "total_steps": jnp.asarray(total_steps, jnp.float32),
  }


def make_optimizer(
  weight_decay: float, before_update: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
  """AdamW at unit learning rate; the step scales its update by the scheduled rate.

  Scaling the whole update equals optax.adamw at that rate (the decoupled weight decay
  term scales with it too) and lets the rate and schedule be per-model arrays.
  before_update: applied to the gradients first, with the same values (a backend may
  order work there, see ser_jax.cpu.Backend); the optimiser's state has the same
  structure with or without it.
  """
  adamw = optax.adamw(1.0, b1=0.9, b2=0.999, weight_decay=weight_decay)
  return optax.chain(before_update or optax.identity(), adamw)


def scheduled_learning_rate(step: jax.Array, hparams: HParams) -> jax.Array:
  """Linear warm-up to `learning_rate`, then cosine decay to 0 at `total_steps`."""
  step = step.astype(jnp.float32)
  warmup = jnp.maximum(hparams["warmup_steps"], 1.0)
  decay_steps = jnp.maximum(hparams["total_steps"] - hparams["warmup_steps"], 1.0)
  progress = jnp.clip((step - hparams["warmup_steps"]) / decay_steps, 0.0, 1.0)
  factor = jnp.where(
    step < hparams["warmup_steps"], step / warmup, 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  )
  return hparams["learning_rate"] * factor


def create_train_state(model, tx, rng: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
  """Initialises parameters for inputs of `input_shape` = [batch, n_bins, n_frames, 1]."""
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(params),
    apply_fn=model.apply,
    tx=tx,
  )


def augment(features: jax.Array, valid_frames: jax.Array, rng: jax.Array, aug: Augmentation):
  """Randomly shifts and masks [batch, n_bins, n_frames] standardised features."""
  batch, n_bins, n_frames = features.shape
  shift_key, freq_key, time_key = jax.random.split(rng, 3)
  frames = jnp.arange(n_frames)
  if aug.time_shift:
    offsets = jax.random.randint(shift_key, (batch,), 0, n_frames) % jnp.maximum(valid_frames, 1)
    valid = frames[None, :] < valid_frames[:, None]
    source = jnp.where(valid, (frames[None, :] + offsets[:, None]) % valid_frames[:, None], frames)
    features = jnp.take_along_axis(features, source[:, None, :], axis=2)

  def masks(key, count, width, size):
    start_key, width_key = jax.random.split(key)
    widths = jax.random.randint(width_key, (batch, count), 0, width + 1)
    starts = jax.random.randint(start_key, (batch, count), 0, size)
    positions = jnp.arange(size)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return inside.any(axis=1)  # [batch, size]

  keep = jnp.ones((batch, n_bins, n_frames), bool)
  if aug.freq_masks:
    keep &= ~masks(freq_key, aug.freq_masks, aug.freq_mask_bins, n_bins)[:, :, None]
  if aug.time_masks:
    keep &= ~masks(time_key, aug.time_masks, aug.time_mask_frames, n_frames)[:, None, :]
  return jnp.where(keep, features, 0.0)  # 0 is the training mean after standardisation.


def train_step(
  state: TrainState,
  batch: Batch,
  hparams: HParams,
  *,
  augmentation: Augmentation,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a batch; pure, so it jits, shards over the batch and vmaps."""
  rng = jax.random.fold_in(jax.random.key(hparams["rng_seed"]), state.step)
  features = augment(batch["features"], batch["valid_frames"], rng, augmentation)
  inputs = features[..., None]

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      inputs,
      train=True,
      mutable=["batch_stats"],
    )
    per_example = losses.focal_loss(
      logits,
      batch["labels"],
      hparams["gamma"],
      hparams["alpha"],
      hparams["label_smoothing"],
    )
    return per_example.mean(), (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  learning_rate = scheduled_learning_rate(state.step, hparams)
  updates = jax.tree.map(lambda u: learning_rate * u, updates)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
  )
  metrics = {
    "loss": loss,
    "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"]),
    "learning_rate": learning_rate,
  }
  return new_state, metrics


def epoch_loop(step_fn, state, hparams, batch_at: Callable, n_steps, max_steps: int):
  """`max_steps` iterations of `state, metrics = step_fn(state, batch_at(i), hparams)` in
  one loop on the device (`lax.scan`: the step is traced once), of which the first
  `n_steps` train.

  max_steps is a Python int, so the loop's trip count is known when it compiles (XLA:GPU
  would otherwise copy the loop's predicate to the host every step). n_steps may be
  traced (<= max_steps): a step past it leaves the state unchanged, through a select, so
  folds of different sizes share one program. Returns (state, metrics), each metric
  [max_steps, ...]; rows from n_steps on are those of steps whose results were dropped.
  """

  def body(state, i):
    stepped, metrics = step_fn(state, batch_at(i), hparams)
    trains = i < n_steps
    return jax.tree.map(lambda new, old: jnp.where(trains, new, old), stepped, state), metrics

  return jax.lax.scan(body, state, jnp.arange(max_steps))


def class_probabilities(apply_fn, variables: dict, features: jax.Array) -> jax.Array:
  """[batch, n_classes] probabilities of standardised features [batch, n_bins, n_frames]
  in inference mode (running BatchNorm statistics): training's evaluation and predict."""
  logits = apply_fn(variables, features[..., None], train=False)
  return jax.nn.softmax(logits, axis=-1)


def evaluate_batches(apply_fn, variables: dict, features: jax.Array) -> jax.Array:
  """[n, batch, n_classes] probabilities of [n, batch, n_bins, n_frames] standardised
  features, one batch after another in a loop on the device."""
  return jax.lax.map(functools.partial(class_probabilities, apply_fn, variables), features)


def state_variables(state: TrainState) -> dict:
  """The variables inference reads from a train state."""
  return {"params": state.params, "batch_stats": state.batch_stats}


STACKINGS = ("vmap", "map")


def over_models(fn, n_models: int, stacking: str = "vmap", shared_args: int = 0):
  """`fn(model, *args)` for a leading model axis on `model` and on all but the first
  `shared_args` of args, which every model reads whole.

  stacking: 'vmap', one batched program (convolutions become grouped ones); or 'map',
  `lax.map` over the models, a loop with a known trip count inside the program that runs
  each model's plain convolutions. With one model the axis is squeezed instead, so a
  single model compiles the plain function. The result takes `fn`'s name (the program's
  name in XLA's dumps and profiles).
  """
  if n_models == 1:

    @functools.wraps(fn)
    def single(model, *args):
      squeeze = functools.partial(jax.tree.map, lambda x: x[0])
      shared, own = args[:shared_args], args[shared_args:]
      out = fn(squeeze(model), *shared, *[squeeze(a) for a in own])
      return jax.tree.map(lambda x: x[None], out)

    return single
  if stacking == "vmap":

    @functools.wraps(fn)
    def vmapped(model, *args):
      in_axes = (0,) + (None,) * shared_args + (0,) * (len(args) - shared_args)
      return jax.vmap(fn, in_axes=in_axes)(model, *args)

    return vmapped
  if stacking == "map":

    @functools.wraps(fn)
    def mapped(model, *args):
      shared, own = args[:shared_args], args[shared_args:]
      return jax.lax.map(lambda xs: fn(xs[0], *shared, *xs[1]), (model, tuple(own)))

    return mapped
  raise ValueError(f"unknown stacking {stacking!r}; expected one of: {', '.join(STACKINGS)}")
