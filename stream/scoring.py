"""Customer states to CLV scores with the ONNX model: shared by `clv score` and the worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Sequence

from export_onnx.artifact import Artifact
from features.aggregate import CustomerState, month_of
from features.sequences import build_inputs, rfm


@dataclass(frozen=True)
class Score:
    customer_id: str
    clv: float
    p_purchase: float
    recency_days: float
    frequency: int
    monetary: float
    tenure_days: float
    total_spend: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def score_states(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> list[Score]:
    """Score many customers in one onnxruntime call, as of the month of `as_of`."""
    if not states:
        return []
    inputs = build_inputs(states, month_of(as_of), artifact.window, artifact.horizon_months)
    clv, p = artifact.predict(inputs)
    as_of_ts = int(as_of.astimezone(timezone.utc).timestamp())
    out = []
    for s, c, pp in zip(states, clv.tolist(), p.tolist()):
        r = rfm(s, as_of_ts)
        out.append(Score(s.customer_id, c, pp, r.recency_days, r.frequency,
                         r.monetary, r.tenure_days, r.total_spend))
    return out
