"""The level of the forecasts: one factor on the network's expected spend.

Fitted at training so that the cohort's expected total at the cutoff equals what the classic
model (BG/NBD + Gamma-Gamma) expects of the same customers over the same horizon: the network
decides who spends, the classic model, data-efficient and the same whatever the training seed,
how much the cohort spends in total. Measured on CDNOW's cutoffs, a factor fitted on the newest
labels before the cutoff did worse (it carries the season of those months into the horizon),
and so did the network's own level, which moves with the seed. Applied with numpy at serving
time, so the ranking of customers is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Calibration:
    factor: float = 1.0

    @classmethod
    def to_total(cls, pred: np.ndarray, total: float) -> "Calibration":
        """The factor that makes the predictions add up to `total`."""
        current = float(np.sum(pred, dtype=np.float64))
        if not (np.isfinite(current) and np.isfinite(total) and current > 0 and total > 0):
            raise ValueError(f"cannot set the level: predicted total {current}, target {total}")
        return cls(total / current)

    def apply(self, pred: np.ndarray) -> np.ndarray:
        return (np.asarray(pred) * self.factor).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Calibration":
        return cls(float(d["factor"])) if d else cls()
