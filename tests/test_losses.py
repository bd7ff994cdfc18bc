"""The focal loss matches its closed form, stays finite, and reduces to cross entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_softmax, logsumexp

from ser_jax.config import ConfigError
from ser_jax.losses import focal_loss, inverse_frequency_alpha, softmax_loss

N_CLASSES = 4
GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]

# Compiled once per input structure: op-by-op evaluation compiles every primitive separately.
FOCAL = jax.jit(focal_loss)


def _summed(logits, labels, gamma, alpha=None):
  return focal_loss(logits, labels, gamma, alpha).sum()


VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_summed))


def _batch(seed: int = 0, batch: int = 16, scale: float = 3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((batch, N_CLASSES))).astype(np.float32)
  labels = rng.integers(0, N_CLASSES, batch).astype(np.int32)
  return logits, labels


def _reference(logits, labels, gamma, alpha=None, label_smoothing=0.0) -> np.ndarray:
  """-alpha_t (1 - p_t)^gamma sum_k target_k log p_k, naively in float64."""
  z = np.asarray(logits, np.float64)
  log_probs = z - logsumexp(z, axis=-1, keepdims=True)
  rows = np.arange(len(labels))
  p_t = np.exp(log_probs[rows, labels])
  one_hot = np.eye(z.shape[-1])[labels]
  target = one_hot * (1 - label_smoothing) + label_smoothing / z.shape[-1]
  loss = (1.0 - p_t) ** gamma * -(target * log_probs).sum(-1)
  if alpha is not None:
    loss = loss * np.asarray(alpha, np.float64)[labels]
  return loss


def _finite_difference_grad(logits, labels, gamma, alpha=None, h=1e-6) -> np.ndarray:
  """d sum(loss) / d logits by central differences of the float64 reference."""
  z = np.asarray(logits, np.float64)
  grad = np.zeros_like(z)
  for index in np.ndindex(*z.shape):
    up, down = z.copy(), z.copy()
    up[index] += h
    down[index] -= h
    grad[index] = (
      _reference(up, labels, gamma, alpha).sum() - _reference(down, labels, gamma, alpha).sum()
    ) / (2 * h)
  return grad


@pytest.mark.parametrize("gamma", GAMMAS)
def test_focal_loss_equals_closed_form(gamma):
  logits, labels = _batch()
  got = np.asarray(FOCAL(jnp.asarray(logits), jnp.asarray(labels), gamma))
  assert got.shape == (len(labels),)
  np.testing.assert_allclose(got, _reference(logits, labels, gamma), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_focal_loss_with_alpha_equals_closed_form(gamma):
  logits, labels = _batch(seed=1)
  alpha = np.array([0.25, 1.0, 2.0, 0.5], np.float32)
  got = np.asarray(FOCAL(logits, labels, gamma, alpha=alpha))
  np.testing.assert_allclose(got, _reference(logits, labels, gamma, alpha), rtol=2e-5, atol=1e-6)


def test_focal_loss_decreases_with_gamma_for_every_example():
  """(1 - p_t)^gamma < 1, so a larger gamma down-weights every example."""
  logits, labels = _batch(seed=2)
  values = np.stack([np.asarray(FOCAL(logits, labels, g)) for g in GAMMAS])
  assert np.all(np.diff(values, axis=0) < 0)


def test_gamma_zero_equals_optax_softmax_cross_entropy():
  logits, labels = _batch(seed=3)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(FOCAL(logits, labels, 0.0), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "alpha"])
def test_softmax_loss_equals_optax_cross_entropy(weighted, smoothing):
  """alpha_y * optax's cross entropy on the (smoothed) one-hot targets."""
  logits, labels = _batch(seed=4)
  alpha = np.array([0.5, 1.0, 2.0, 4.0], np.float32) if weighted else None
  if smoothing:
    targets = np.eye(N_CLASSES)[labels] * (1 - smoothing) + smoothing / N_CLASSES
    want = optax.softmax_cross_entropy(logits, targets)
  else:
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if weighted:
    want = want * alpha[labels]
  got = jax.jit(softmax_loss)(logits, labels, alpha, smoothing)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9, 1.0, 2.0, 5.0])
def test_focal_loss_with_alpha_and_label_smoothing_equals_closed_form(gamma):
  """-alpha_y (1 - p_y)^gamma sum_k target_k log p_k in float64, gamma < 1 included."""
  logits, labels = _batch(seed=12, scale=2.0)
  alpha = np.array([0.25, 1.0, 2.0, 0.5], np.float32)
  got = np.asarray(FOCAL(logits, labels, gamma, alpha=alpha, label_smoothing=0.2))
  want = _reference(logits, labels, gamma, alpha, label_smoothing=0.2)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.05, 0.1, 0.3])
def test_label_smoothing_with_gamma_zero_equals_optax_on_smoothed_targets(smoothing):
  logits, labels = _batch(seed=5)
  one_hot = np.eye(N_CLASSES)[labels]
  smoothed = one_hot * (1 - smoothing) + smoothing / N_CLASSES
  want = optax.softmax_cross_entropy(logits, smoothed)
  got = FOCAL(logits, labels, 0.0, label_smoothing=smoothing)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_label_smoothing_keeps_the_true_class_modulating_factor():
  logits, labels = _batch(seed=6)
  got = FOCAL(logits, labels, 2.0, label_smoothing=0.1)
  np.testing.assert_allclose(
    got, _reference(logits, labels, 2.0, label_smoothing=0.1), rtol=2e-5, atol=1e-6
  )


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("scale", [50.0, 200.0])
def test_values_and_gradients_finite_when_the_true_class_is_certain(gamma, scale):
  """p_t -> 1 (even p_t == 1 in float32): loss -> 0 and gradients stay finite, also 0<gamma<1."""
  logits = jnp.array([[scale, -scale, -scale, -scale], [-scale, scale, -scale, -scale]])
  labels = jnp.array([0, 1])
  value, grad = VALUE_AND_GRAD(logits, labels, gamma)
  assert np.all(np.isfinite(value))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, 0.0, atol=1e-30)
  np.testing.assert_allclose(grad, 0.0, atol=1e-30)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_values_and_gradients_finite_when_the_true_class_is_impossible(gamma):
  """p_t -> 0: the loss is -log p_t = 2 * 50 + log(1 + 2e^-100) and the gradient p - onehot."""
  logits = jnp.array([[50.0, -50.0, -50.0, -50.0]])
  labels = jnp.array([1])
  value, grad = VALUE_AND_GRAD(logits, labels, gamma)
  np.testing.assert_allclose(value, 100.0, rtol=1e-6)
  np.testing.assert_allclose(grad, [[1.0, -1.0, 0.0, 0.0]], atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0, 5.0])
def test_gradient_matches_finite_differences_of_float64_reference(gamma):
  logits, labels = _batch(seed=7, batch=6, scale=2.0)
  alpha = np.array([0.5, 1.0, 1.5, 2.0])
  _, got = VALUE_AND_GRAD(jnp.asarray(logits), labels, gamma, alpha)
  want = _finite_difference_grad(logits, labels, gamma, alpha)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)


def test_gamma_may_be_a_traced_array_under_jit():
  logits, labels = _batch(seed=8)
  traces = []

  def loss(logits, labels, gamma):
    traces.append(gamma)
    return focal_loss(logits, labels, gamma)

  jitted = jax.jit(loss)
  for gamma in GAMMAS:
    got = jitted(logits, labels, jnp.float32(gamma))
    np.testing.assert_allclose(got, _reference(logits, labels, gamma), rtol=2e-5, atol=1e-6)
  # One trace serves every gamma: gamma is a traced argument, not a constant.
  assert len(traces) == 1
  assert isinstance(traces[0], jax.core.Tracer)


def test_vmap_over_gammas_equals_per_gamma_results():
  logits, labels = _batch(seed=9)
  gammas = jnp.array(GAMMAS, jnp.float32)
  stacked = jax.jit(jax.vmap(lambda g: focal_loss(logits, labels, g)))(gammas)
  assert stacked.shape == (len(GAMMAS), len(labels))
  for i, gamma in enumerate(GAMMAS):
    np.testing.assert_allclose(stacked[i], FOCAL(logits, labels, gamma), rtol=1e-6, atol=1e-7)
  # Gradients too: a vmapped sweep trains each member with its own gamma.
  grads = jax.jit(jax.vmap(lambda g: VALUE_AND_GRAD(jnp.asarray(logits), labels, g)[1]))(gammas)
  for i, gamma in enumerate(GAMMAS):
    _, want = VALUE_AND_GRAD(jnp.asarray(logits), labels, gamma)
    np.testing.assert_allclose(grads[i], want, rtol=1e-5, atol=1e-7)


def test_bfloat16_logits_are_computed_in_float32():
  logits, labels = _batch(seed=10)
  got = FOCAL(jnp.asarray(logits, jnp.bfloat16), labels, 2.0)
  assert got.dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got, _reference(rounded, labels, 2.0), rtol=2e-5, atol=1e-6)


def test_inverse_frequency_alpha_equals_closed_form():
  """Counts 6, 2, 3, 1: sum of 1/count is 2, so alpha_c = 4 / (2 * count_c) = 2 / count_c."""
  labels = np.array([0] * 6 + [1] * 2 + [2] * 3 + [3])
  alpha = inverse_frequency_alpha(np.random.default_rng(0).permutation(labels), N_CLASSES)
  assert alpha.shape == (N_CLASSES,) and alpha.dtype == np.float32
  np.testing.assert_allclose(alpha, [1 / 3, 1.0, 2 / 3, 2.0], rtol=1e-6)


def test_inverse_frequency_alpha_has_mean_one_and_equal_class_totals():
  labels = np.random.default_rng(1).choice(N_CLASSES, 500, p=[0.48, 0.12, 0.27, 0.13])
  alpha = inverse_frequency_alpha(labels, N_CLASSES)
  np.testing.assert_allclose(alpha.mean(), 1.0, rtol=1e-6)
  totals = np.bincount(labels, minlength=N_CLASSES) * alpha
  np.testing.assert_allclose(totals, totals[0], rtol=1e-6)


def test_inverse_frequency_alpha_of_a_balanced_fold_is_one():
  np.testing.assert_allclose(inverse_frequency_alpha(np.arange(40) % N_CLASSES, N_CLASSES), 1.0)


def test_inverse_frequency_alpha_without_a_class_is_an_error_naming_it():
  labels = np.array([0, 1, 3, 3])
  names = ("neutral", "happiness", "sadness", "anger")
  with pytest.raises(ConfigError, match=r"class 'sadness' has none; give loss\.alpha per-class"):
    inverse_frequency_alpha(labels, N_CLASSES, names)
  with pytest.raises(ConfigError, match="class '2' has none"):
    inverse_frequency_alpha(labels, N_CLASSES)


def test_inverse_frequency_alpha_rejects_labels_beyond_the_classes():
  with pytest.raises(ValueError, match=r"labels range over 0\.\.4 but there are 4 classes"):
    inverse_frequency_alpha(np.array([0, 1, 2, 3, 4]), N_CLASSES)


def test_focal_loss_at_gamma_zero_with_inverse_frequency_alpha_is_weighted_cross_entropy():
  """mean(-alpha_y log softmax(z)_y), computed independently with scipy in float64."""
  logits, labels = _batch(seed=11, batch=64)
  alpha = inverse_frequency_alpha(labels, N_CLASSES)
  want = np.mean(
    -alpha[labels] * log_softmax(logits.astype(np.float64), axis=-1)[np.arange(len(labels)), labels]
  )
  got = jnp.mean(FOCAL(logits, labels, 0.0, alpha=alpha))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(jnp.mean(softmax_loss(logits, labels, alpha=alpha)), want, rtol=1e-5)
