"""Robust scaling fitted on training inputs only, carried in the model artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.sequences import Inputs


def _robust(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.median(x, axis=0)
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    scale = q75 - q25
    std = x.std(axis=0)
    # Sparse features (most customers zero) have no IQR: fall back to the spread, then to 1.
    scale = np.where(scale > 1e-6, scale, np.where(std > 1e-6, std, 1.0))
    return center.astype(np.float32), scale.astype(np.float32)


CALENDAR = {"moy_sin", "moy_cos", "asof_moy_sin", "asof_moy_cos"}
FIELDS = ("seq_center", "seq_scale", "seq_mask", "static_center", "static_scale", "static_mask")


@dataclass(frozen=True)
class Scaler:
    """Centre and scale each feature; a mask of 0 switches a feature off (it reaches the model
    as a constant 0), so one feature builder serves models trained with and without it."""

    seq_center: np.ndarray
    seq_scale: np.ndarray
    seq_mask: np.ndarray
    static_center: np.ndarray
    static_scale: np.ndarray
    static_mask: np.ndarray

    @classmethod
    def fit(
        cls,
        inputs: Inputs,
        seq_names: tuple[str, ...],
        static_names: tuple[str, ...],
        off: frozenset[str] | set[str] = frozenset(),
    ) -> "Scaler":
        seq = inputs.seq.reshape(-1, inputs.seq.shape[-1])
        seq_mask = np.array([n not in off for n in seq_names], dtype=np.float32)
        static_mask = np.array([n not in off for n in static_names], dtype=np.float32)
        return cls(*_robust(seq), seq_mask, *_robust(inputs.static), static_mask)

    def transform(self, inputs: Inputs) -> Inputs:
        return Inputs(
            ((inputs.seq - self.seq_center) / self.seq_scale * self.seq_mask).astype(np.float32),
            ((inputs.static - self.static_center) / self.static_scale * self.static_mask).astype(np.float32),
            inputs.classic,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scaler":
        return cls(*(np.asarray(d[k], dtype=np.float32) for k in FIELDS))
