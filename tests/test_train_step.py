"""The train step learns, is pure, augments only valid frames, and vmaps over members."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ser_jax import train
from ser_jax.models import ResNet18

BATCH, N_BINS, N_FRAMES, N_CLASSES = 8, 16, 32, 4


def _easy_batch() -> dict[str, jax.Array]:
  """Each class has its own level and frequency band: separable at a glance."""
  rng = np.random.default_rng(0)
  labels = np.arange(BATCH) % N_CLASSES
  features = 0.3 * rng.standard_normal((BATCH, N_BINS, N_FRAMES))
  for i, label in enumerate(labels):
    features[i] += label - 1.5
    features[i, 4 * label : 4 * label + 4] += 2.0
  valid = np.array([32, 20, 32, 25, 32, 16, 30, 32])
  return {
    "features": jnp.asarray(features, jnp.float32),
    "labels": jnp.asarray(labels, jnp.int32),
    "valid_frames": jnp.asarray(valid, jnp.int32),
  }


def _hparams(gamma: float = 2.0, rng_seed: int = 0, learning_rate: float = 3e-3):
  return train.make_hparams(
    gamma=gamma,
    learning_rate=learning_rate,
    alpha=(1.0,) * N_CLASSES,
    label_smoothing=0.0,
    rng_seed=rng_seed,
    warmup_steps=1,
    total_steps=200,
  )


MODEL = ResNet18(num_classes=N_CLASSES, width=4)
TX = train.make_optimizer(weight_decay=1e-2)
# Shared by every test: one model and optimiser object keep the state's static fields equal,
# so jitted steps are compiled once. Optimisation level 0 compiles the ResNet's forward and
# backward passes several times faster on CPU; numerics are unchanged within tolerance.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
STEP = functools.partial(train.train_step, augmentation=train.Augmentation())


def _state(seed: int = 0) -> train.TrainState:
  """A fresh train state with random He-style weights and zero running statistics.

  `create_train_state` with the same shapes, minus `model.init`'s random kernels, whose
  compilation dominates the cost on CPU.
  """
  abstract = jax.eval_shape(
    functools.partial(MODEL.init, train=False),
    jax.random.key(0),
    jnp.zeros((BATCH, N_BINS, N_FRAMES, 1)),
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, abstract)
  return train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=TX.init(variables["params"]),
    apply_fn=MODEL.apply,
    tx=TX,
  )


@pytest.fixture(scope="module")
def jitted_step():
  return jax.jit(STEP, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def state() -> train.TrainState:
  return _state(0)


def test_test_state_has_the_structure_of_create_train_state(state):
  """The helper above stands in for `create_train_state`; shapes and dtypes must agree."""
  abstract = jax.eval_shape(
    lambda key: train.create_train_state(MODEL, TX, key, (BATCH, N_BINS, N_FRAMES, 1)),
    jax.random.key(0),
  )
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
    assert (want.shape, want.dtype) == (got.shape, got.dtype)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_loss_decreases_on_a_fixed_easy_batch(jitted_step, state):
  batch, hparams = _easy_batch(), _hparams()
  losses = []
  for _ in range(30):
    state, metrics = jitted_step(state, batch, hparams)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert int(state.step) == 30
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_train_step_is_pure(jitted_step, state):
  batch, hparams = _easy_batch(), _hparams()
  before = jax.tree.map(np.array, state)
  first_state, first_metrics = jitted_step(state, batch, hparams)
  second_state, second_metrics = jitted_step(state, batch, hparams)
  jax.tree.map(np.testing.assert_array_equal, first_state, second_state)
  jax.tree.map(np.testing.assert_array_equal, first_metrics, second_metrics)
  # The input state is unchanged (not donated), and the step did change the output.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, state))
  assert int(first_state.step) == int(state.step) + 1
  assert not np.array_equal(first_state.batch_stats["stem_norm"]["mean"], 0.0)
  first_moment = first_state.opt_state[0].mu["head"]["kernel"]
  assert not np.array_equal(first_moment, state.opt_state[0].mu["head"]["kernel"])


def test_rng_seed_changes_the_augmentation(jitted_step, state):
  batch = _easy_batch()
  _, a = jitted_step(state, batch, _hparams(rng_seed=0))
  _, b = jitted_step(state, batch, _hparams(rng_seed=1))
  assert float(a["loss"]) != float(b["loss"])


def test_learning_rate_schedule_equals_optax_warmup_cosine_decay():
  hparams = train.make_hparams(
    gamma=2.0,
    learning_rate=1e-3,
    alpha=(1.0,) * N_CLASSES,
    label_smoothing=0.0,
    rng_seed=0,
    warmup_steps=10,
    total_steps=100,
  )
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=1e-3, warmup_steps=10, decay_steps=100, end_value=0.0
  )
  steps = np.array([0, 1, 5, 9, 10, 11, 50, 99, 100, 120], np.int32)
  got = jax.jit(jax.vmap(lambda step: train.scheduled_learning_rate(step, hparams)))(steps)
  want = jax.jit(jax.vmap(schedule))(steps)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


# --- augment ---------------------------------------------------------------------------


# Compiled: op-by-op random number generation compiles one small kernel per operation.
AUGMENT = jax.jit(train.augment, static_argnums=3)


def _marked_features(batch: int = 6) -> jax.Array:
  """features[b, k, t] = 10000 b + 100 k + t: each value names its own position."""
  b, k, t = np.meshgrid(np.arange(batch), np.arange(N_BINS), np.arange(N_FRAMES), indexing="ij")
  return jnp.asarray(10000 * b + 100 * k + t, jnp.float32)


def test_time_shift_rotates_valid_frames_and_keeps_padding():
  aug = train.Augmentation(time_shift=True, freq_masks=0, time_masks=0)
  features = _marked_features()
  valid = jnp.array([32, 1, 10, 17, 31, 5], jnp.int32)
  shifted_any = False
  for seed in range(5):
    out = np.asarray(AUGMENT(features, valid, jax.random.key(seed), aug))
    for b, v in enumerate(np.asarray(valid)):
      np.testing.assert_array_equal(out[b, :, v:], np.asarray(features)[b, :, v:])
      frames = out[b, :, :v] - 10000 * b - 100 * np.arange(N_BINS)[:, None]
      # Every bin is shifted by the same amount: one circular shift of frames 0..v-1.
      assert np.all(frames == frames[:1])
      shift = int(frames[0, 0])
      np.testing.assert_array_equal(frames[0], (np.arange(v) + shift) % v)
      np.testing.assert_array_equal(np.sort(frames[0]), np.arange(v))
      shifted_any |= shift != 0
  assert shifted_any


def test_no_augmentation_is_the_identity():
  aug = train.Augmentation(time_shift=False, freq_masks=0, time_masks=0)
  features = _marked_features()
  valid = jnp.array([32, 1, 10, 17, 31, 5], jnp.int32)
  out = AUGMENT(features, valid, jax.random.key(0), aug)
  np.testing.assert_array_equal(out, features)


def test_masks_zero_whole_bins_and_frames_within_their_widths():
  aug = train.Augmentation(
    time_shift=False, freq_masks=2, freq_mask_bins=3, time_masks=1, time_mask_frames=5
  )
  features = _marked_features() + 1.0  # No zero values before masking.
  valid = jnp.full((6,), N_FRAMES, jnp.int32)
  out = np.asarray(AUGMENT(features, valid, jax.random.key(3), aug))
  kept = out != 0
  np.testing.assert_array_equal(out[kept], np.asarray(features)[kept])
  for b in range(6):
    masked = ~kept[b]
    bins = np.flatnonzero(masked.all(axis=1))
    frames = np.flatnonzero(masked.all(axis=0))
    # A masked value lies in a fully masked bin or a fully masked frame.
    assert np.all(
      masked
      == (np.isin(np.arange(N_BINS), bins)[:, None] | np.isin(np.arange(N_FRAMES), frames)[None, :])
    )
    assert len(bins) <= 2 * 3
    assert len(frames) <= 5


# --- over_members ----------------------------------------------------------------------


def test_vmapped_members_equal_separate_runs(jitted_step):
  gammas = (0.0, 1.0, 2.0)
  states = [_state(seed) for seed in range(3)]
  hparams = [_hparams(gamma=g, rng_seed=10 + i) for i, g in enumerate(gammas)]
  batch = _easy_batch()

  separate_states, separate_losses = [], []
  for state, hp in zip(states, hparams, strict=True):
    losses = []
    for _ in range(3):
      state, metrics = jitted_step(state, batch, hp)
      losses.append(metrics["loss"])
    separate_states.append(state)
    separate_losses.append(jnp.stack(losses))

  members = jax.jit(train.over_members(STEP, 3), compiler_options=FAST_COMPILE)
  stacked, stacked_hparams = _stack(states), _stack(hparams)
  losses = []
  for _ in range(3):
    stacked, metrics = members(stacked, batch, stacked_hparams)
    assert metrics["loss"].shape == (3,)
    losses.append(metrics["loss"])
  _assert_trees_close(stacked.params, _stack([s.params for s in separate_states]))
  _assert_trees_close(stacked.batch_stats, _stack([s.batch_stats for s in separate_states]))
  np.testing.assert_allclose(
    jnp.stack(losses, axis=1), jnp.stack(separate_losses), rtol=1e-5, atol=1e-5
  )
  # Different gammas really are different runs.
  assert not np.allclose(separate_losses[0], separate_losses[2])


def test_single_member_equals_the_plain_step(jitted_step, state):
  batch, hparams = _easy_batch(), _hparams(gamma=1.0, rng_seed=5)
  plain_state, plain_metrics = jitted_step(state, batch, hparams)
  # Wrapping the compiled step checks over_members' own work (squeeze, call, re-stack)
  # without compiling the ResNet again.
  one = train.over_members(jitted_step, 1)
  member_state, member_metrics = one(_stack([state]), batch, _stack([hparams]))
  assert member_metrics["loss"].shape == (1,)
  assert member_state.step.shape == (1,)
  _assert_trees_close(jax.tree.map(lambda x: x[0], member_state), plain_state, 0, 0)
  _assert_trees_close(jax.tree.map(lambda x: x[0], member_metrics), plain_metrics, 0, 0)


def test_a_gradients_hook_sees_every_gradient_before_the_update(jitted_step, state):
  """The hook's output is what the optimiser applies; an identity hook changes nothing."""
  batch, hparams = _easy_batch(), _hparams(rng_seed=3)
  doubled = jax.jit(
    functools.partial(STEP, gradients_hook=lambda g: jax.tree.map(lambda x: 2 * x, g)),
    compiler_options=FAST_COMPILE,
  )
  plain_state, _ = jitted_step(state, batch, hparams)
  doubled_state, _ = doubled(state, batch, hparams)
  # Adam is invariant to a constant gradient scale (up to its epsilon) but not its moments.
  _assert_trees_close(doubled_state.params, plain_state.params, 1e-4, 1e-6)
  first_moment = lambda s: s.opt_state[0].mu  # noqa: E731
  _assert_trees_close(
    first_moment(doubled_state),
    jax.tree.map(lambda x: 2 * x, first_moment(plain_state)),
    1e-5,
    1e-7,
  )
  ordered = jax.jit(
    functools.partial(STEP, gradients_hook=lambda g: g), compiler_options=FAST_COMPILE
  )
  want_state, want_metrics = jitted_step(state, batch, hparams)
  got_state, got_metrics = ordered(state, batch, hparams)
  _assert_trees_close(got_state, want_state, 0, 0)
  _assert_trees_close(got_metrics, want_metrics, 0, 0)
