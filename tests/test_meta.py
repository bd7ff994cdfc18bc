"""The random-effects pool against a published meta-analysis, statsmodels and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.meta_analysis import combine_effects

from ser_jax import meta

# BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg): vaccinated (tb, no tb),
# control (tb, no tb).
BCG = np.array(
  [
    [4, 119, 11, 128],
    [6, 300, 29, 274],
    [3, 228, 11, 209],
    [62, 13536, 248, 12619],
    [33, 5036, 47, 5761],
    [180, 1361, 372, 1079],
    [8, 2537, 10, 619],
    [505, 87886, 499, 87892],
    [29, 7470, 45, 7232],
    [17, 1699, 65, 1600],
    [186, 50448, 141, 27197],
    [5, 2493, 3, 2338],
    [27, 16886, 29, 17825],
  ],
  dtype=float,
)


def bcg_log_risk_ratios() -> tuple[np.ndarray, np.ndarray]:
  tb_v, ok_v, tb_c, ok_c = BCG.T
  effects = np.log((tb_v / (tb_v + ok_v)) / (tb_c / (tb_c + ok_c)))
  variances = 1 / tb_v - 1 / (tb_v + ok_v) + 1 / tb_c - 1 / (tb_c + ok_c)
  return effects, variances


def test_bcg_trials_give_the_published_figures():
  """metafor's rma() on dat.bcg (log risk ratios): Q(df = 12) = 152.2330, common effect
  -0.4303 (se 0.0405), Paule-Mandel tau^2 0.3181 and estimate -0.7150."""
  pooled = meta.random_effects(*bcg_log_risk_ratios())
  assert pooled.q == pytest.approx(152.2330, abs=5e-5) and pooled.q_df == 12
  assert pooled.common_effect == pytest.approx(-0.4303, abs=5e-5)
  se = (pooled.common_effect_ci95[1] - pooled.common_effect) / stats.norm.isf(0.025)
  assert se == pytest.approx(0.0405, abs=5e-5)
  assert pooled.tau2 == pytest.approx(0.3181, abs=5e-5)
  assert pooled.estimate == pytest.approx(-0.7150, abs=5e-5)
  assert pooled.i2 == pytest.approx(100 * (152.2330 - 12) / 152.2330, abs=1e-3)


def test_bcg_trials_as_statsmodels_pools_them():
  effects, variances = bcg_log_risk_ratios()
  pooled = meta.random_effects(effects, variances)
  reference = combine_effects(effects, variances, method_re="iterated", atol=1e-12, maxiter=200)
  assert pooled.tau2 == pytest.approx(reference.tau2, rel=1e-9)
  assert pooled.estimate == pytest.approx(reference.mean_effect_re, rel=1e-9)
  # Paule-Mandel makes the HKSJ scale exactly 1: statsmodels' random-effects interval on t.
  np.testing.assert_allclose(pooled.ci95, reference.conf_int(use_t=True)[1], rtol=1e-9)
  np.testing.assert_allclose(pooled.ci95, reference.conf_int(use_t=True)[3], rtol=1e-6)
  np.testing.assert_allclose(pooled.common_effect_ci95, reference.conf_int()[0], rtol=1e-9)
  assert pooled.i2 == pytest.approx(100 * reference.i2, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_paule_mandel_solves_its_equation(seed):
  """The weighted residual sum of squares equals k - 1 at tau^2 (or is below it at zero).
  (statsmodels' iteration gives up with tau^2 = 0 when a Newton step overshoots, so random
  cases are checked against the definition.)"""
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 9))
  effects, variances = rng.normal(0, 3, k), rng.uniform(0.2, 4, k)
  tau2 = meta.paule_mandel_tau2(effects, variances)
  w = 1 / (variances + tau2)
  residuals = w @ (effects - w @ effects / w.sum()) ** 2
  if tau2 > 0:
    assert residuals == pytest.approx(k - 1, rel=1e-9)
  else:
    assert residuals <= k - 1


def test_two_corpora_have_a_closed_form():
  """k = 2: the residuals are (y1 - y2)^2 / (v1 + v2 + 2 tau^2), so tau^2 =
  ((y1 - y2)^2 - v1 - v2) / 2, and the interval uses t with one degree of freedom."""
  effects, variances = np.array([-4.0, 3.0]), np.array([2.0, 5.0])
  pooled = meta.random_effects(effects, variances)
  assert pooled.tau2 == pytest.approx((49 - 7) / 2)
  w = 1 / (variances + pooled.tau2)
  assert pooled.estimate == pytest.approx(w @ effects / w.sum())
  half_width = stats.t.isf(0.025, 1) * np.sqrt(1 / w.sum())
  np.testing.assert_allclose(pooled.ci95, pooled.estimate + np.array([-1, 1]) * half_width)


def test_equal_variances_and_heterogeneity_give_the_one_sample_t_interval():
  """With equal variances and tau^2 > 0 the pool is the effects' mean with the one-sample
  t interval and t-test."""
  effects = np.array([-3.0, 1.5, 4.0, 0.5, 6.0])
  pooled = meta.random_effects(effects, np.full(5, 0.5))
  assert pooled.tau2 == pytest.approx(effects.var(ddof=1) - 0.5)
  assert pooled.estimate == pytest.approx(effects.mean())
  test = stats.ttest_1samp(effects, 0.0)
  np.testing.assert_allclose(pooled.ci95, test.confidence_interval(0.95))
  assert pooled.p_value == pytest.approx(test.pvalue)


def test_homogeneous_effects_floor_the_scale_at_one():
  """Q < k - 1: tau^2 is 0 and the interval is never narrower than the plain one on t."""
  effects, variances = np.array([1.0, 1.2, 0.9]), np.array([1.0, 2.0, 1.5])
  pooled = meta.random_effects(effects, variances)
  assert (
    pooled.tau2 == pytest.approx(0.0, abs=1e-12)
    and pooled.i2 == pytest.approx(0.0, abs=1e-12)
    and pooled.q < 2
  )
  assert pooled.estimate == pytest.approx(pooled.common_effect)
  assert pooled.standard_error == pytest.approx(np.sqrt(1 / np.sum(1 / variances)))


@pytest.mark.parametrize(
  "effects, variances",
  [([1.0], [1.0]), ([1.0, 2.0], [1.0, 0.0]), ([1.0, np.nan], [1.0, 1.0]), ([1.0, 2.0], [1.0])],
)
def test_bad_inputs_are_refused(effects, variances):
  with pytest.raises(ValueError):
    meta.random_effects(effects, variances)
