"""Customer states to CLV scores with the ONNX model: shared by `clv score` and the worker."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from export_onnx.artifact import Artifact, Prediction
from features.aggregate import CustomerState, month_of
from features.sequences import RFM, Inputs, build_inputs, rfm


@dataclass(frozen=True)
class Score:
    customer_id: str
    clv: float
    p_purchase: float
    expected_clv: float
    recency_days: float
    frequency: int
    monetary: float
    tenure_days: float
    total_spend: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)  # dataclasses.asdict deep-copies: too slow per score


def prepare(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> tuple[Inputs, list[RFM]]:
    """Everything that reads the states: model inputs and RFM fields, as of `as_of`."""
    inputs = build_inputs(states, month_of(as_of), artifact.window, artifact.horizon_months)
    as_of_ts = int(as_of.astimezone(timezone.utc).timestamp())
    return inputs, [rfm(s, as_of_ts) for s in states]


def assemble(states: Sequence[CustomerState], fields: list[RFM], pred: Prediction) -> list[Score]:
    return [Score(s.customer_id, c, pp, e, r.recency_days, r.frequency, r.monetary, r.tenure_days,
                  r.total_spend)
            for s, r, c, e, pp in zip(states, fields, pred.clv.tolist(), pred.expected_clv.tolist(),
                                      pred.p_purchase.tolist())]


def score_states(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> list[Score]:
    """Score many customers in one onnxruntime call, as of the month of `as_of`."""
    if not states:
        return []
    inputs, fields = prepare(artifact, states, as_of)
    return assemble(states, fields, artifact.predict(inputs))
