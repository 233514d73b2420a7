"""Customer states to `clv-scores` records with the ONNX model: shared by `clv score` and the
worker, so a file and the stream agree field for field."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence

from export_onnx.artifact import Artifact, Prediction
from features.aggregate import CustomerState, month_of
from features.clusters import assign_clusters, behaviour
from features.scores import SCORE_SCHEMA_VERSION, ScoreRecord, iso_time
from features.segments import segment
from features.sequences import RFM, Inputs, build_inputs, rfm


def prepare(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> tuple[Inputs, list[RFM]]:
    """Everything that reads the states: model inputs and RFM fields, as of `as_of`."""
    inputs = build_inputs(states, month_of(as_of), artifact.window, artifact.horizon_months)
    as_of_ts = int(as_of.astimezone(timezone.utc).timestamp())
    return inputs, [rfm(s, as_of_ts) for s in states]


def assemble(artifact: Artifact, states: Sequence[CustomerState], fields: list[RFM],
             pred: Prediction, as_of: datetime) -> list[ScoreRecord]:
    """One record per customer: the model's expected spend and purchase probability, RFM
    fields, segment and cluster, stamped with the run's model, horizon, as-of and scoring times."""
    quantiles = artifact.meta["clv_quantiles"]
    clusters = assign_clusters(behaviour(states, fields, month_of(as_of), artifact.window),
                               artifact.clustering)
    version, horizon = artifact.version, artifact.horizon_months
    as_of_text, scored_at = iso_time(as_of), iso_time(datetime.now(timezone.utc))
    return [ScoreRecord(
        schema_version=SCORE_SCHEMA_VERSION, customer_id=s.customer_id, clv=clv, p_purchase=p,
        recency_days=r.recency_days, frequency=r.frequency, monetary=r.monetary,
        tenure_days=r.tenure_days, total_spend=r.total_spend,
        segment=segment(clv, p, r.frequency, r.recency_days, r.tenure_days, quantiles),
        cluster=cluster, horizon_months=horizon, model_version=version, as_of=as_of_text, scored_at=scored_at)
        for s, r, clv, p, cluster in zip(states, fields, pred.clv.tolist(), pred.p_purchase.tolist(),
                                         clusters)]


def score_states(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> list[ScoreRecord]:
    """Score many customers in one onnxruntime call, as of the month of `as_of`."""
    if not states:
        return []
    inputs, fields = prepare(artifact, states, as_of)
    return assemble(artifact, states, fields, artifact.predict(inputs), as_of)
