"""Random-effects meta-analysis: one difference pooled over corpora, with its heterogeneity.

Each corpus gives an effect y_i (e.g. the UA difference focal - softmax) and its variance v_i
(the square of its bootstrap standard error). The corpora are taken as a sample of the
corpora the claim is about, so the pooled effect is the mean of a distribution of true
effects whose spread tau^2 is estimated too (a random-effects model):

- tau^2: Paule-Mandel, the tau^2 at which the weighted residual sum of squares
  sum w_i (y_i - mu)^2, w_i = 1 / (v_i + tau^2), equals its expectation k - 1 (zero when
  it is below k - 1 at tau^2 = 0). Recommended over DerSimonian-Laird's one-step moment
  estimate, which is biased low when tau^2 is large and the studies few (Veroniki et al.
  2016, Res. Synth. Methods 7:55; Langan et al. 2019, Res. Synth. Methods 10:83).
- Interval and p-value: Hartung-Knapp-Sidik-Jonkman, Student's t with k - 1 degrees of
  freedom on the variance 1 / sum w_i scaled by q = sum w_i (y_i - mu)^2 / (k - 1), with
  q floored at 1 (Roever et al. 2015, BMC Med. Res. Methodol. 15:99) so that the interval
  is never narrower than the plain random-effects one. DerSimonian-Laird's normal
  interval covers well below 95 % when there are few studies (IntHout et al. 2014, BMC
  Med. Res. Methodol. 14:25); with Paule-Mandel q is exactly 1 whenever tau^2 > 0, so this
  is the random-effects interval with t instead of z quantiles. With two corpora t has
  one degree of freedom (quantile 12.7): the honest statement that two corpora say little
  about corpora in general.
- Heterogeneity: Cochran's Q (inverse-variance weights, chi^2 with k - 1 degrees of
  freedom) and I^2 = max(0, (Q - (k - 1)) / Q), the share of the spread not due to
  within-corpus sampling error (Higgins & Thompson 2002).
- The common-effect (inverse-variance, fixed-effect) estimate with its normal interval
  answers the narrower question "these corpora, pooled"; it is reported beside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

METHOD = (
  "random effects: Paule-Mandel tau^2, Hartung-Knapp-Sidik-Jonkman interval (t, k - 1 df, "
  "scale floored at 1)"
)


@dataclasses.dataclass(frozen=True)
class Pooled:
  """A pooled effect, its 95 % interval and the between-corpus heterogeneity."""

  k: int  # Corpora pooled.
  estimate: float
  standard_error: float  # HKSJ: sqrt(max(1, q) / sum w_i).
  ci95: tuple[float, float]
  p_value: float  # Two-sided, t with k - 1 df.
  tau2: float
  i2: float  # Percent.
  q: float  # Cochran's Q.
  q_df: int
  q_p_value: float
  common_effect: float
  common_effect_ci95: tuple[float, float]
  method: str = METHOD

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _check(effects: Sequence[float], variances: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  y, v = np.asarray(effects, float), np.asarray(variances, float)
  if y.shape != v.shape or y.ndim != 1 or len(y) < 2:
    raise ValueError(
      f"need one variance per effect and at least two effects; got {len(y)} effects and "
      f"{len(v)} variances"
    )
  if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
    raise ValueError(f"effects must be finite and variances finite and > 0; got variances {v}")
  return y, v


def weighted_residuals(effects, variances, tau2: float) -> float:
  """sum w_i (y_i - mu)^2 with w_i = 1 / (v_i + tau2) and mu their weighted mean."""
  y, v = np.asarray(effects, float), np.asarray(variances, float)
  w = 1.0 / (v + tau2)
  mu = w @ y / w.sum()
  return float(w @ (y - mu) ** 2)


def paule_mandel_tau2(effects, variances) -> float:
  """tau^2 solving weighted_residuals(tau^2) = k - 1; zero when it is below that at zero."""
  y, v = _check(effects, variances)
  df = len(y) - 1
  if weighted_residuals(y, v, 0.0) <= df:
    return 0.0
  # The residuals fall with tau^2 and are at most sum (y_i - mean y)^2 / tau^2, so they are
  # below k - 1 beyond this bound.
  upper = 2.0 * float(np.sum((y - y.mean()) ** 2)) / df
  return float(
    optimize.brentq(lambda t: weighted_residuals(y, v, t) - df, 0.0, upper, xtol=1e-14, rtol=1e-12)
  )


def random_effects(effects: Sequence[float], variances: Sequence[float]) -> Pooled:
  """Pools `effects` (one per corpus) with their sampling `variances`; see the module."""
  y, v = _check(effects, variances)
  k, df = len(y), len(y) - 1
  w_fixed = 1.0 / v
  common = float(w_fixed @ y / w_fixed.sum())
  common_se = float(np.sqrt(1.0 / w_fixed.sum()))
  z = float(stats.norm.isf(0.025))
  q = float(w_fixed @ (y - common) ** 2)
  tau2 = paule_mandel_tau2(y, v)
  w = 1.0 / (v + tau2)
  estimate = float(w @ y / w.sum())
  scale = max(1.0, float(w @ (y - estimate) ** 2) / df)
  se = float(np.sqrt(scale / w.sum()))
  t = float(stats.t.isf(0.025, df))
  return Pooled(
    k=k,
    estimate=estimate,
    standard_error=se,
    ci95=(estimate - t * se, estimate + t * se),
    p_value=float(2 * stats.t.sf(abs(estimate) / se, df)),
    tau2=tau2,
    i2=100.0 * max(0.0, (q - df) / q) if q > 0 else 0.0,
    q=q,
    q_df=df,
    q_p_value=float(stats.chi2.sf(q, df)),
    common_effect=common,
    common_effect_ci95=(common - z * common_se, common + z * common_se),
  )
