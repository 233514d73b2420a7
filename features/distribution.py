"""A customer's predictive distribution of horizon spend, from the graph's outputs: numpy only,
so the worker, `clv score` and the API serve intervals and probabilities without torch.

The head says, per ensemble member k: P(any purchase) p_k, and a buyer's spend lognormal with
log-scale location mu_k and spread sigma_k. The ensemble is their mixture: a purchase with the
published (levelled) `p_purchase`, and a buyer's spend from member k with weight p_k / sum(p),
the mixture whose mean is the ensemble's `clv / p_purchase`; the level's factor on spend scales
every member alike. So the spread between members widens the distribution where they disagree,
and `mean()` is `clv` exactly.

Spend has mass at zero (1 - p): a quantile at or below that mass is 0, so a customer with
p_purchase < 0.9 has clv_low = 0, and P(spend > clv_high) is at most 10% (below it when
p_purchase < 0.1: such a customer's clv_high is 0 too).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

INTERVAL = (0.1, 0.9)  # clv_low, clv_high: the 80% predictive interval's quantiles
# How an evaluation reads the interval against what customers spent (models.metrics computes them;
# `clv evaluate` and the dashboard's model card say what each means in these words).
INTERVAL_FIT = {
    "above_high": "the share of customers who spent more than clv_high",
    "expected_above": "the share above that the distribution itself expects, the mean of min(P(purchase), "
    "10%): a customer unlikely to buy has a clv_high of $0 and exceeds it by buying at all",
    "above_positive_high": "the share above among customers whose clv_high is above $0, 10% when the "
    "interval is calibrated",
    "below_low": "the share of customers who spent less than clv_low",
    "pinball": "the mean pinball loss at 10/50/90% (lower is better)",
}
_BISECTIONS = 60
_SQRT2 = math.sqrt(2.0)
# erfc by Chebyshev fitting (Numerical Recipes' erfcc): fractional error under 1.2e-7.
_ERFC = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


def at_least_column(threshold: float) -> str:
    """The column of P(spend >= threshold) in a file or table: `p_at_least_100` for 100,
    `p_at_least_99.5` (`clv score --at-least`, the snapshot's exports)."""
    return f"p_at_least_{threshold:g}"


def normal_sf(z: np.ndarray) -> np.ndarray:
    """P(Z > z) for a standard normal (numpy has no erf; scipy is not a serving dependency)."""
    x = np.abs(z) / _SQRT2
    t = 1.0 / (1.0 + 0.5 * x)
    poly = np.zeros_like(t)
    for c in reversed(_ERFC):
        poly = c + t * poly
    erfc = t * np.exp(-x * x + poly)
    return np.where(z >= 0, 0.5 * erfc, 1.0 - 0.5 * erfc)


class SpendDistribution(NamedTuple):
    """Per customer (rows) and ensemble member (columns): horizon spend is 0 with 1 - p, else
    lognormal(mu_k, sigma_k) from member k with weight `weights[:, k]`."""

    p: np.ndarray  # (n,) P(any purchase), at the level
    weights: np.ndarray  # (n, K), rows sum to 1
    mu: np.ndarray  # (n, K), at the level
    sigma: np.ndarray  # (n, K)

    @classmethod
    def from_members(
        cls,
        p: np.ndarray,
        member_p: np.ndarray,
        member_mu: np.ndarray,
        member_sigma: np.ndarray,
        factor: float = 1.0,
        spread: float = 1.0,
    ) -> "SpendDistribution":
        """From the graph's member outputs and the level (`p` already shifted, `factor` on every
        buyer's spend); `spread` scales each member's sigma keeping its mean, as fitted on
        held-out customers (`features.calibration`)."""
        mp = np.asarray(member_p, np.float64)
        sigma = np.asarray(member_sigma, np.float64)
        mu = np.asarray(member_mu, np.float64) + math.log(factor)
        wide = sigma * spread
        mu = mu + 0.5 * (sigma**2 - wide**2)  # the same mean with the wider spread
        return cls(np.asarray(p, np.float64), mp / mp.sum(axis=1, keepdims=True), mu, wide)

    def mean(self) -> np.ndarray:
        return self.p * (self.weights * np.exp(self.mu + 0.5 * self.sigma**2)).sum(axis=1)

    def sd(self) -> np.ndarray:
        """Standard deviation of horizon spend (the zero mass and the mixture included)."""
        second = self.p * (self.weights * np.exp(2 * self.mu + 2 * self.sigma**2)).sum(axis=1)
        return np.sqrt(np.maximum(second - self.mean() ** 2, 0.0))

    def _buyer_sf(self, log_t: np.ndarray) -> np.ndarray:
        """P(a buyer's spend > exp(log_t)), per customer."""
        return (self.weights * normal_sf((log_t[:, None] - self.mu) / self.sigma)).sum(axis=1)

    def prob_at_least(self, t: float | np.ndarray) -> np.ndarray:
        """P(horizon spend >= t), one threshold for all or one per customer: 1 for t <= 0
        (spend is never negative here)."""
        t = np.broadcast_to(np.asarray(t, np.float64), self.p.shape)
        positive = t > 0
        log_t = np.log(np.where(positive, t, 1.0))
        return np.where(positive, self.p * self._buyer_sf(log_t), 1.0)

    def quantile(self, q: float) -> np.ndarray:
        """The q-quantile of horizon spend: 0 where the zero mass 1 - p reaches q, else the
        mixture's quantile by bisection on the log scale."""
        if not 0 < q < 1:
            raise ValueError(f"a quantile needs 0 < q < 1, got {q}")
        # P(spend > y) = p * buyer_sf(y) = 1 - q at the quantile.
        target = (1 - q) / np.maximum(self.p, 1e-300)
        lo = (self.mu - 9 * self.sigma).min(axis=1)
        hi = (self.mu + 9 * self.sigma).max(axis=1)
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            above = self._buyer_sf(mid) > target
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return np.where(self.p > 1 - q, np.exp(0.5 * (lo + hi)), 0.0)

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(clv_low, clv_high): the 80% predictive interval."""
        return self.quantile(INTERVAL[0]), self.quantile(INTERVAL[1])
