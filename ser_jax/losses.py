"""Per-example classification losses as pure functions of logits, labels and arrays."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ser_jax.config import ConfigError
from ser_jax.data.shares import class_counts


def focal_loss(
  logits: jax.Array,
  labels: jax.Array,
  gamma: jax.Array | float,
  alpha: jax.Array | None = None,
  label_smoothing: jax.Array | float = 0.0,
) -> jax.Array:
  """Focal loss -alpha_t (1 - p_t)^gamma log p_t per example (Lin et al. 2017).

  Works in log space: (1 - p_t)^gamma = exp(gamma * log1p(-p_t)), with the log of
  1 - p_t computed as logsumexp over the other classes, so values and gradients stay
  finite for every gamma >= 0, including 0 < gamma < 1 and p_t -> 1. `gamma` may be a
  traced array (for sweeps); gamma = 0 gives softmax cross entropy.

  Args:
    logits: [batch, n_classes].
    labels: [batch] integer class indices.
    gamma: focusing parameter, a scalar.
    alpha: optional [n_classes] class weights.
    label_smoothing: mixes the one-hot target with the uniform distribution; the
      modulating factor still uses the true class's probability.

  Returns:
    [batch] losses.
  """
  n_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(labels, n_classes, dtype=log_probs.dtype)
  # log(1 - p_t) = logsumexp of the other classes' log-probabilities; exact and stable.
  log_p_rest = jax.nn.logsumexp(jnp.where(one_hot > 0, -jnp.inf, log_probs), axis=-1)
  modulating = jnp.exp(gamma * log_p_rest)
  target = one_hot * (1.0 - label_smoothing) + label_smoothing / n_classes
  cross_entropy = -jnp.sum(target * log_probs, axis=-1)
  loss = modulating * cross_entropy
  if alpha is not None:
    # A one-hot product instead of alpha[labels]: no gather, so batch sharding propagates.
    loss = loss * jnp.sum(one_hot * jnp.asarray(alpha, dtype=loss.dtype), axis=-1)
  return loss


def softmax_loss(
  logits: jax.Array,
  labels: jax.Array,
  alpha: jax.Array | None = None,
  label_smoothing: jax.Array | float = 0.0,
) -> jax.Array:
  """Softmax cross entropy per example: the focal loss with gamma = 0."""
  return focal_loss(logits, labels, 0.0, alpha, label_smoothing)


def inverse_frequency_alpha(
  labels: np.ndarray, n_classes: int, class_names: Sequence[str] = ()
) -> np.ndarray:
  """Class weights [n_classes] float32 proportional to 1 / count, normalised to mean 1.

  Computed from the training fold's labels [N], so every class carries the same total
  weight (count_c * alpha_c is equal for all c); loss.alpha='inverse_frequency'.
  """
  counts = class_counts(labels, n_classes)
  if not counts.all():
    missing = int(np.argmin(counts))
    name = class_names[missing] if class_names else str(missing)
    raise ConfigError(
      f"loss.alpha='inverse_frequency' needs every class in the training fold, but class "
      f"'{name}' has none; give loss.alpha per-class weights or drop the class from data.classes"
    )
  inverse = 1.0 / counts.astype(np.float64)
  return (inverse / inverse.mean()).astype(np.float32)
