"""Level calibration of predicted spend against what customers went on to spend.

Fitted on the validation period, the newest labels before the cutoff, so the level of the
predictions follows what the customer base spends now (customer bases age and decay; training
origins are older than the customers being scored). One factor, applied with numpy at serving
time, so the ranking of customers is unchanged. An isotonic (shape) calibration was measured on
CDNOW and did worse on MAE and RMSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Calibration:
    factor: float = 1.0

    @classmethod
    def fit(cls, pred: np.ndarray, actual: np.ndarray) -> "Calibration":
        total = float(np.sum(pred))
        return cls(float(np.sum(actual)) / total if total > 0 else 1.0)

    def apply(self, pred: np.ndarray) -> np.ndarray:
        return (np.asarray(pred) * self.factor).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Calibration":
        return cls(float(d["factor"])) if d else cls()
