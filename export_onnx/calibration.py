"""The level of the forecasts: a shift of every customer's log-odds of buying in the horizon.

Fitted at training so that the cohort's expected total at the cutoff equals what the classic
model (BG/NBD + Gamma-Gamma) expects of the same customers over the same horizon: the network
decides who spends, the classic model, data-efficient and the same whatever the training seed,
how much the cohort spends in total.

What moves between the training origins and the cutoff is mostly how many customers come back,
not what a buyer spends: on CDNOW (1997-12-31, 6 months) the network's own forecast was 27% over
the actual total for customers with one purchase day and right for those with ten or more. So the
level shifts the probability of a purchase (`p_purchase`) on the log-odds scale and keeps each
customer's spend given a purchase (`clv / p_purchase`): a customer sure to buy keeps their value,
a doubtful one moves most. One factor on every `clv` (earlier artifacts, still read) pulled the
largest customers down with the crowd: RMSE 56.92 against 55.15 with the shift, same ranking.
Applied with numpy at serving time; ranking by `p_purchase` is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

_BISECTIONS = 200
_MAX_SHIFT = 30.0


@dataclass(frozen=True)
class Calibration:
    logit_shift: float = 0.0  # added to each customer's log-odds of a purchase in the horizon
    factor: float = 1.0  # on clv: what earlier artifacts carried instead of the shift

    @classmethod
    def to_total(cls, clv: np.ndarray, p: np.ndarray, total: float) -> "Calibration":
        """The shift that makes the expected spend add up to `total` (the sum is increasing in
        the shift, so bisection finds it)."""
        clv64, p64 = np.asarray(clv, np.float64), _open(p)
        current = float(clv64.sum())
        if not (np.isfinite(current) and np.isfinite(total) and current > 0 and total > 0):
            raise ValueError(f"cannot set the level: predicted total {current}, target {total}")
        lo, hi = -_MAX_SHIFT, _MAX_SHIFT
        if not _total(clv64, p64, lo) <= total <= _total(clv64, p64, hi):
            raise ValueError(f"cannot set the level: no purchase probabilities give the total {total}")
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _total(clv64, p64, mid) < total else (lo, mid)
            if hi - lo < 1e-12:
                break
        return cls(logit_shift=(lo + hi) / 2)

    def apply(self, clv: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clv, p_purchase) at the level."""
        clv64, p64 = np.asarray(clv, np.float64), _open(p)
        shifted = _shift(p64, self.logit_shift)
        return ((clv64 * self.factor * shifted / p64).astype(np.float32),
                shifted.astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        return {"logit_shift": self.logit_shift, "factor": self.factor}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Calibration":
        d = d or {}
        return cls(float(d.get("logit_shift", 0.0)), float(d.get("factor", 1.0)))


def _open(p: np.ndarray) -> np.ndarray:
    """p in float64, inside (0, 1) as the head bounds it (float32 rounding could reach an end)."""
    return np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)


def _shift(p: np.ndarray, shift: float) -> np.ndarray:
    """sigmoid(logit(p) + shift)."""
    if shift == 0.0:
        return p
    odds = p / (1 - p) * math.exp(shift)
    return odds / (1 + odds)


def _total(clv: np.ndarray, p: np.ndarray, shift: float) -> float:
    return float((clv * _shift(p, shift) / p).sum())
