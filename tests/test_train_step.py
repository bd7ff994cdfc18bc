"""The train step learns, is pure, augments only valid frames, and vmaps over members."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_softmax

from ser_jax import cpu, train
from ser_jax.models import ResNet, ResNet18

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
# One stage of one block: for checks of the optimiser that any model shows, and that
# compile the step anew.
ONE_BLOCK = ResNet(stage_sizes=(1,), num_classes=N_CLASSES, width=4)
TX = train.make_optimizer(weight_decay=1e-2)
# Shared by every test: one model and optimiser object keep the state's static fields equal,
# so jitted steps are compiled once. Optimisation level 0 compiles the ResNet's forward and
# backward passes several times faster on CPU; numerics are unchanged within tolerance.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
STEP = functools.partial(train.train_step, augmentation=train.Augmentation())
NO_AUGMENTATION = train.Augmentation(time_shift=False, freq_masks=0, time_masks=0)


def _state(seed: int = 0, model=MODEL) -> train.TrainState:
  """A fresh train state with random He-style weights and zero running statistics.

  `create_train_state` with the same shapes, minus `model.init`'s random kernels, whose
  compilation dominates the cost on CPU.
  """
  abstract = jax.eval_shape(
    functools.partial(model.init, train=False),
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
    apply_fn=model.apply,
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
  first_moment = first_state.opt_state[1][0].mu["head"]["kernel"]
  assert not np.array_equal(first_moment, state.opt_state[1][0].mu["head"]["kernel"])


@pytest.mark.parametrize("warmup_steps", [10, 0])
def test_learning_rate_schedule_equals_optax_warmup_cosine_decay(warmup_steps):
  hparams = train.make_hparams(
    gamma=2.0,
    learning_rate=1e-3,
    alpha=(1.0,) * N_CLASSES,
    label_smoothing=0.0,
    rng_seed=0,
    warmup_steps=warmup_steps,
    total_steps=100,
  )
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=1e-3, warmup_steps=warmup_steps, decay_steps=100, end_value=0.0
  )
  steps = np.array([0, 1, 5, 9, 10, 11, 50, 99, 100, 120], np.int32)
  got = jax.jit(jax.vmap(lambda step: train.scheduled_learning_rate(step, hparams)))(steps)
  want = jax.jit(jax.vmap(schedule))(steps)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


# A linear classifier in place of the ResNet where the model is not the point: the step's
# loss, gradient and update are the same code, compiled in a fraction of the time.


def _linear_logits(params, inputs):
  return inputs.reshape(len(inputs), -1) @ params["kernel"] + params["bias"]


def _linear_apply(variables, inputs, **_):
  return _linear_logits(variables["params"], inputs), {"batch_stats": variables["batch_stats"]}


def _linear_state(n_inputs: int, tx, seed: int = 0, scale: float = 1.0) -> train.TrainState:
  rng = np.random.default_rng(seed)
  params = {
    "kernel": jnp.asarray(scale * rng.standard_normal((n_inputs, N_CLASSES)), jnp.float32),
    "bias": jnp.asarray(rng.standard_normal(N_CLASSES), jnp.float32),
  }
  return train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats={},
    opt_state=tx.init(params),
    apply_fn=_linear_apply,
    tx=tx,
  )


def _closed_form_focal_gradient(logits, labels, gamma, alpha) -> tuple[float, np.ndarray]:
  """mean(loss) and d mean(loss) / d logits [batch, classes] in float64, for
  L = -alpha_y (1 - p)^gamma log p with p = softmax(z)_y:
  dL/dz_k = alpha_y [gamma (1 - p)^(gamma - 1) p log p - (1 - p)^gamma] (onehot_k - p_k)."""
  z = np.asarray(logits, np.float64)
  probs = np.exp(log_softmax(z, axis=-1))
  one_hot = np.eye(N_CLASSES)[labels]
  p = probs[np.arange(len(labels)), labels]
  loss = -alpha[labels] * (1 - p) ** gamma * np.log(p)
  factor = gamma * (1 - p) ** (gamma - 1) * p * np.log(p) - (1 - p) ** gamma
  return loss.mean(), (alpha[labels] * factor)[:, None] * (one_hot - probs) / len(labels)


@pytest.mark.parametrize(("gamma", "rng_seed", "step"), [(0.0, 0, 0), (0.5, 1, 3), (2.0, 2, 7)])
def test_first_step_moments_are_the_closed_form_loss_gradient(jitted_step, gamma, rng_seed, step):
  """Adam's moments after one update from zero are (1 - b1) g and (1 - b2) g^2, with g the
  gradient of the class-weighted focal loss on this seed's augmentation of the batch at
  this step (train.augment, the step folded into the seed's key): gamma and alpha reach
  the loss, and gamma > 0 scales each example by its closed-form factor."""
  batch = _easy_batch()
  alpha = np.array([0.5, 1.0, 2.0, 1.5])
  state = _linear_state(N_BINS * N_FRAMES, TX, scale=0.05).replace(step=jnp.int32(step))
  hparams = {**_hparams(gamma=gamma, rng_seed=rng_seed), "alpha": jnp.asarray(alpha, jnp.float32)}
  new_state, metrics = jitted_step(state, batch, hparams)  # Compiled for this apply_fn.

  key = jax.random.fold_in(jax.random.key(rng_seed), state.step)
  inputs = np.asarray(
    AUGMENT(batch["features"], batch["valid_frames"], key, train.Augmentation()), np.float64
  ).reshape(BATCH, -1)
  logits = inputs @ np.asarray(state.params["kernel"]) + np.asarray(state.params["bias"])
  labels = np.asarray(batch["labels"])
  loss, dlogits = _closed_form_focal_gradient(logits, labels, gamma, alpha)
  grads = {"kernel": inputs.T @ dlogits, "bias": dlogits.sum(0)}
  if gamma == 0.0:  # Then it is softmax cross entropy's gradient, softmax(z) - onehot.
    want = jax.grad(
      lambda z: jnp.mean(alpha[labels] * optax.softmax_cross_entropy_with_integer_labels(z, labels))
    )(logits)
    np.testing.assert_allclose(dlogits, want, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  adam = new_state.opt_state[1][0]
  for name, g in grads.items():
    scale = np.max(np.abs(g))
    np.testing.assert_allclose(adam.mu[name], 0.1 * g, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(adam.nu[name], 1e-3 * g**2, rtol=2e-4, atol=1e-9 * scale**2)


def test_the_step_is_optax_adamw_at_the_warmup_cosine_schedule():
  """make_optimizer, scaled by scheduled_learning_rate as train_step scales it, takes the
  same steps as optax.adamw(b1=0.9, b2=0.999) with optax's warm-up and cosine schedules."""
  peak, warmup, total, weight_decay = 0.05, 3, 12, 0.1
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, transition_steps=warmup),
      optax.cosine_decay_schedule(peak, decay_steps=total - warmup),
    ],
    boundaries=[warmup],
  )
  reference = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=weight_decay)
  tx = train.make_optimizer(weight_decay)
  state = _linear_state(N_BINS * 2, tx)
  hparams = train.make_hparams(
    gamma=0.0,
    learning_rate=peak,
    alpha=(1.0,) * N_CLASSES,
    label_smoothing=0.0,
    rng_seed=0,
    warmup_steps=warmup,
    total_steps=total,
  )
  step = jax.jit(functools.partial(train.train_step, augmentation=NO_AUGMENTATION))

  @jax.jit
  def reference_step(params, opt_state, batch):
    def loss(params):
      logits = _linear_logits(params, batch["features"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    updates, opt_state = reference.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  want_params, want_opt_state = state.params, reference.init(state.params)
  rng = np.random.default_rng(1)
  for i in range(total + 2):  # Warm-up, decay, then past its end at rate 0.
    batch = {
      "features": jnp.asarray(rng.standard_normal((BATCH, N_BINS, 2)), jnp.float32),
      "labels": jnp.asarray(rng.integers(0, N_CLASSES, BATCH), jnp.int32),
      "valid_frames": jnp.full((BATCH,), 2, jnp.int32),
    }
    state, metrics = step(state, batch, hparams)
    want_params, want_opt_state = reference_step(want_params, want_opt_state, batch)
    np.testing.assert_allclose(metrics["learning_rate"], schedule(i), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
      train.scheduled_learning_rate(jnp.int32(i), hparams), schedule(i), rtol=1e-5, atol=1e-9
    )
    _assert_trees_close(state.opt_state[1][0].mu, want_opt_state[0].mu, rtol=1e-4, atol=1e-7)
    _assert_trees_close(state.opt_state[1][0].nu, want_opt_state[0].nu, rtol=1e-4, atol=1e-9)
    _assert_trees_close(state.params, want_params, rtol=1e-5, atol=1e-6)
  assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)
  assert int(state.step) == total + 2


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


# --- over_models -----------------------------------------------------------------------


@pytest.mark.parametrize("stacking", train.STACKINGS)
def test_stacked_models_equal_separate_runs(jitted_step, stacking):
  """vmap and lax.map over models give each model's own run (shared batch, own hparams)."""
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

  models = jax.jit(
    train.over_models(STEP, 3, stacking, shared_args=1), compiler_options=FAST_COMPILE
  )
  stacked, stacked_hparams = _stack(states), _stack(hparams)
  losses = []
  for _ in range(3):
    stacked, metrics = models(stacked, batch, stacked_hparams)
    assert metrics["loss"].shape == (3,)
    losses.append(metrics["loss"])
  _assert_trees_close(stacked.params, _stack([s.params for s in separate_states]))
  _assert_trees_close(stacked.batch_stats, _stack([s.batch_stats for s in separate_states]))
  np.testing.assert_allclose(
    jnp.stack(losses, axis=1), jnp.stack(separate_losses), rtol=1e-5, atol=1e-5
  )
  # Different gammas really are different runs.
  assert not np.allclose(separate_losses[0], separate_losses[2])


def test_a_single_model_equals_the_plain_step(jitted_step, state):
  batch, hparams = _easy_batch(), _hparams(gamma=1.0, rng_seed=5)
  plain_state, plain_metrics = jitted_step(state, batch, hparams)
  # Wrapping the compiled step checks over_models' own work (squeeze, call, re-stack)
  # without compiling the ResNet again.
  one = train.over_models(jitted_step, 1, "map", shared_args=1)
  model_state, model_metrics = one(_stack([state]), batch, _stack([hparams]))
  assert model_metrics["loss"].shape == (1,)
  assert model_state.step.shape == (1,)
  _assert_trees_close(jax.tree.map(lambda x: x[0], model_state), plain_state, 0, 0)
  _assert_trees_close(jax.tree.map(lambda x: x[0], model_metrics), plain_metrics, 0, 0)


def test_an_unknown_stacking_names_the_choices():
  with pytest.raises(ValueError, match="'pmap'.*vmap, map"):
    train.over_models(STEP, 2, "pmap")


def test_a_transformation_before_the_update_sees_every_gradient():
  """make_optimizer(before_update=) transforms the gradients the optimiser applies, and
  keeps the optimiser state's structure, so checkpoints restore under any backend."""
  state = _state(0, ONE_BLOCK)
  batch, hparams = _easy_batch(), _hparams(rng_seed=3)
  doubled_tx = train.make_optimizer(1e-2, optax.scale(2.0))
  assert jax.tree.structure(doubled_tx.init(state.params)) == jax.tree.structure(state.opt_state)
  step = jax.jit(STEP, compiler_options=FAST_COMPILE)
  plain_state, plain_metrics = step(state, batch, hparams)
  doubled_state, _ = step(state.replace(tx=doubled_tx), batch, hparams)
  # Adam is invariant to a constant gradient scale (up to its epsilon) but not its moments.
  _assert_trees_close(doubled_state.params, plain_state.params, 1e-4, 1e-6)
  first_moment = lambda s: s.opt_state[1][0].mu  # noqa: E731
  _assert_trees_close(
    first_moment(doubled_state),
    jax.tree.map(lambda x: 2 * x, first_moment(plain_state)),
    1e-5,
    1e-7,
  )
  # The CPU backend's transformation orders work only: the same values, bit for bit.
  ordered_state, ordered_metrics = step(
    state.replace(tx=train.make_optimizer(1e-2, cpu.UPDATE_AFTER_GRADIENTS)), batch, hparams
  )
  _assert_trees_close(ordered_state.params, plain_state.params, 0, 0)
  _assert_trees_close(ordered_metrics, plain_metrics, 0, 0)
