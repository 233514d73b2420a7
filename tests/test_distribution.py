"""The predictive distribution served beside `clv` (numpy only): its quantiles, P(spend >= t),
mean and sd agree with draws from the mixture it describes, and the level moves it as it moves
`clv` and `p_purchase`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from features.calibration import Calibration
from features.distribution import SpendDistribution, normal_sf


def _members(n: int = 6, k: int = 3, seed: int = 0, p_low: float = 0.05) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.uniform(p_low, 0.99, (n, k)) ** 2, rng.normal(3, 1, (n, k)), rng.uniform(0.3, 1.2, (n, k)))


def test_normal_tail_matches_math_erfc():
    z = np.linspace(-9, 9, 721)
    want = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z])
    assert np.allclose(normal_sf(z), want, rtol=2e-7, atol=0)


def test_quantiles_tails_mean_and_sd_match_draws_from_the_mixture():
    member_p, mu, sigma = _members()
    dist = SpendDistribution.from_members(member_p.mean(1), member_p, mu, sigma, factor=1.3, spread=1.1)
    rng = np.random.default_rng(1)
    draws = 200_000
    for i in range(len(dist.p)):
        k = rng.choice(dist.weights.shape[1], size=draws, p=dist.weights[i])
        spend = np.where(rng.uniform(size=draws) < dist.p[i],
                         np.exp(dist.mu[i, k] + dist.sigma[i, k] * rng.normal(size=draws)), 0.0)
        for q in (0.1, 0.5, 0.9):
            got = dist.quantile(q)[i]
            assert abs(np.mean(spend <= got) - q) < 0.01 or (got == 0 and np.mean(spend == 0) >= q)
        t = float(np.median(spend[spend > 0]))
        assert dist.prob_at_least(t)[i] == pytest.approx(np.mean(spend >= t), abs=0.01)
        assert dist.mean()[i] == pytest.approx(spend.mean(), rel=0.05)
        assert dist.sd()[i] == pytest.approx(spend.std(), rel=0.1)
    assert (dist.prob_at_least(0.0) == 1).all()


def test_zero_mass_sets_the_low_end_and_the_level_keeps_clv_the_mean():
    """p_purchase < 0.9: the 10% quantile is 0; P(spend > clv_high) is 10% where clv_high > 0
    and p where it is 0. With the level (a shift of p, a factor on spend) the distribution's
    mean is the levelled clv: the interval and `clv` describe one distribution."""
    member_p, mu, sigma = _members(n=200, seed=2, p_low=0.001)
    clv = (member_p * np.exp(mu + sigma**2 / 2)).mean(1)
    p = member_p.mean(1)
    level = Calibration(logit_shift=-0.4, factor=1.7, spread=1.1)
    clv_l, p_l = level.apply(clv, p)
    dist = SpendDistribution.from_members(p_l, member_p, mu, sigma, level.factor, level.spread)
    assert np.allclose(dist.mean(), clv_l, rtol=1e-5)
    low, high = dist.interval()
    assert (low[dist.p < 0.9] == 0).all() and (low[dist.p > 0.9] > 0).all()
    assert (high > 0).any() and (high == 0).any()
    above = dist.prob_at_least(np.where(high > 0, high, 1e-9))  # per customer, at its own clv_high
    assert np.allclose(above[high > 0], 0.1, atol=1e-6)
    assert (above[high == 0] < 0.1).all()  # nobody's chance of spending anything reaches 10%
    with pytest.raises(ValueError):
        dist.quantile(1.0)
