"""The level of the forecasts: how many of the cohort buy in the horizon, and what they spend.

Fitted at training on the cohort at the cutoff, from the two numbers the classic model (BG/NBD +
Gamma-Gamma), data-efficient and the same whatever the training seed, gives of the same customers
over the same horizon: the expected number of buyers (the sum of its P(purchase)) and the
expected total. The network decides who buys and who spends most; the classic model how many buy
and how much the cohort spends.

First one shift of every customer's log-odds of a purchase (`p_purchase`) makes the expected
number of buyers the classic one: a customer sure to buy stays sure, a doubtful one moves most.
Then one factor on every buyer's spend (`clv / p_purchase`) makes the total the classic one. A
level drift between the training origins and the cutoff is partly who comes back and partly what
a buyer spends, and the two parts differ by season: on CDNOW (seed 42, the same network) the
shift alone, fitted to the total, left 1998-03-31 (a quieter April-June for buyers) at RMSE 33.24,
the factor alone moved 1997-12-31's largest customers down with the crowd (56.26); count then
spend gives 32.23 and 55.13 (and 69.15 at 1997-09-30, the best of the three forms there).
Applied with numpy at serving time; ranking by `p_purchase` is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

_BISECTIONS = 200
_MAX_SHIFT = 30.0


class RawPrediction(NamedTuple):
    """The graph's outputs, before the level: the ensemble's expected spend and P(any purchase),
    and each member's P(any purchase) and a buyer's lognormal spend (log-scale mu, sigma); the
    members' are None from a graph of `export_onnx.runtime.LEGACY_OUTPUTS`."""

    clv: np.ndarray
    p_purchase: np.ndarray
    member_p: np.ndarray | None = None
    member_mu: np.ndarray | None = None
    member_sigma: np.ndarray | None = None

    def members(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(member_p, member_mu, member_sigma), or None from a legacy graph."""
        if self.member_p is None or self.member_mu is None or self.member_sigma is None:
            return None
        return self.member_p, self.member_mu, self.member_sigma


class Prediction(NamedTuple):
    """Per customer over the horizon: `clv`, the expected spend (what rankings, tiers and budgets
    use; it adds up over customers), `p_purchase`, the probability of any purchase, and the 80%
    predictive interval of the spend (its 10% and 90% quantiles) with its standard deviation
    (what a sum over customers' range needs)."""

    clv: np.ndarray
    p_purchase: np.ndarray
    clv_low: np.ndarray
    clv_high: np.ndarray
    clv_sd: np.ndarray


@dataclass(frozen=True)
class Calibration:
    logit_shift: float = 0.0  # added to each customer's log-odds of a purchase in the horizon
    factor: float = 1.0  # on each buyer's spend, after the shift
    spread: float = 1.0  # on each member's sigma of a buyer's log spend (features.distribution)

    @classmethod
    def to_cohort(cls, clv: np.ndarray, p: np.ndarray, total: float, buyers: float) -> "Calibration":
        """The shift that makes the expected number of buyers `buyers`, then the factor that
        makes the expected spend add up to `total`."""
        clv64, p64 = np.asarray(clv, np.float64), _open(p)
        current, total, buyers = float(clv64.sum()), float(total), float(buyers)
        if not (np.isfinite(current) and np.isfinite(total) and current > 0 and total > 0):
            raise ValueError(f"cannot set the level: predicted total {current}, target {total}")
        if not (np.isfinite(p64).all() and np.isfinite(buyers) and 0 < buyers < len(p64)):
            raise ValueError(
                f"cannot set the level: {buyers} expected buyers of {len(p64)} "
                "customers, or a purchase probability that is not a number"
            )
        shift = _shift_to_count(p64, buyers)
        if abs(float(_shift(p64, shift).sum()) / buyers - 1) > 1e-6:
            raise ValueError(
                f"cannot set the level: no shift of the purchase probabilities gives {buyers} expected buyers"
            )
        return cls(logit_shift=shift, factor=total / float(_spend(clv64, p64, shift).sum()))

    def apply(self, clv: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clv, p_purchase) at the level."""
        clv64, p64 = np.asarray(clv, np.float64), _open(p)
        return (
            (self.factor * _spend(clv64, p64, self.logit_shift)).astype(np.float32),
            _shift(p64, self.logit_shift).astype(np.float32),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"logit_shift": self.logit_shift, "factor": self.factor, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Calibration":
        d = d or {}
        return cls(float(d.get("logit_shift", 0.0)), float(d.get("factor", 1.0)), float(d.get("spread", 1.0)))


def _open(p: np.ndarray) -> np.ndarray:
    """p in float64, inside (0, 1) as the head bounds it (float32 rounding could reach an end)."""
    return np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)


def _shift(p: np.ndarray, shift: float) -> np.ndarray:
    """sigmoid(logit(p) + shift)."""
    if shift == 0.0:
        return p
    odds = p / (1 - p) * math.exp(shift)
    return odds / (1 + odds)


def _spend(clv: np.ndarray, p: np.ndarray, shift: float) -> np.ndarray:
    """Expected spend with the shift: each buyer's spend (clv / p) kept."""
    return clv * _shift(p, shift) / p


def _shift_to_count(p: np.ndarray, buyers: float) -> float:
    """The shift that makes the probabilities add up to `buyers` (the sum increases with the
    shift, so bisection finds it)."""
    lo, hi = -_MAX_SHIFT, _MAX_SHIFT
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _shift(p, mid).sum() < buyers else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2
