"""Customer states to `clv-scores` records with the ONNX model: shared by the worker, `clv
score` and the API's `POST /score`, so a file and the stream agree field for field."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from export_onnx.runtime import Artifact
from features.calibration import Prediction
from features.aggregate import CustomerState, month_of
from features.batch import end_of, read_history, snapshots
from features.cleaning import CleaningReport
from features import population
from features.clusters import assign_clusters, behaviour
from features.distribution import at_least_column
from features.loaders import LoadError
from features.scores import CUSTOMER_FIELDS, SCORE_SCHEMA_VERSION, Offset, ScoreRecord, iso_time
from features.segments import segment
from features.sequences import RFM, Inputs, build_inputs, rfm


def prepare(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> tuple[Inputs, list[RFM]]:
    """Everything that reads the states: model inputs and RFM fields, as of `as_of`."""
    inputs = build_inputs(states, month_of(as_of), artifact.window, artifact.horizon_months)
    as_of_ts = int(as_of.astimezone(timezone.utc).timestamp())
    return inputs, [rfm(s, as_of_ts) for s in states]


def assemble(
    artifact: Artifact, states: Sequence[CustomerState], fields: list[RFM], pred: Prediction, as_of: datetime
) -> list[ScoreRecord]:
    """One record per customer: the model's expected spend, its 80% interval and sd, and the
    purchase probability, RFM fields, segment, cluster and country, stamped with the run's
    model, horizon, as-of and scoring times, and the source offset its state reflects (what
    orders a customer's scores)."""
    quantiles = artifact.meta["clv_quantiles"]
    clusters = assign_clusters(behaviour(states, fields, month_of(as_of), artifact.window), artifact.clustering)
    version, horizon = artifact.version, artifact.horizon_months
    as_of_text, scored_at = iso_time(as_of), iso_time(datetime.now(timezone.utc))
    return [
        ScoreRecord(
            schema_version=SCORE_SCHEMA_VERSION,
            customer_id=s.customer_id,
            clv=clv,
            clv_low=low,
            clv_high=high,
            clv_sd=sd,
            p_purchase=p,
            recency_days=r.recency_days,
            frequency=r.frequency,
            monetary=r.monetary,
            tenure_days=r.tenure_days,
            total_spend=r.total_spend,
            segment=segment(clv, p, r.frequency, r.recency_days, r.tenure_days, quantiles),
            cluster=cluster,
            country=s.country,
            horizon_months=horizon,
            model_version=version,
            as_of=as_of_text,
            scored_at=scored_at,
            event_offset=Offset(s.offset),
        )
        for s, r, clv, low, high, sd, p, cluster in zip(
            states,
            fields,
            pred.clv.tolist(),
            pred.clv_low.tolist(),
            pred.clv_high.tolist(),
            pred.clv_sd.tolist(),
            pred.p_purchase.tolist(),
            clusters,
        )
    ]


def score_states(artifact: Artifact, states: Sequence[CustomerState], as_of: datetime) -> list[ScoreRecord]:
    """Score many customers in one onnxruntime call, as of the month of `as_of`."""
    return score_cohort(artifact, states, as_of)[0]


def score_cohort(
    artifact: Artifact, states: Sequence[CustomerState], as_of: datetime, at_least: Sequence[float] = ()
) -> tuple[list[ScoreRecord], dict[str, list[float]], Inputs]:
    """`score_states`, with the model inputs the scores came from (what the drift check reads)
    and, for each threshold t of `at_least`, every customer's P(horizon spend >= t) from the same
    predictive distribution, under its column name (`at_least_column`)."""
    inputs, fields = prepare(artifact, states, as_of)
    if not states:
        return [], {at_least_column(t): [] for t in at_least}, inputs
    raw = artifact.raw_predict(inputs)
    records = assemble(artifact, states, fields, artifact.predict_raw(raw), as_of)
    return records, {at_least_column(t): artifact.prob_at_least(raw, t).tolist() for t in at_least}, inputs


@dataclass
class ScoredFile:
    """A transaction file scored as of one time: what `clv score` writes and `POST /score` answers,
    with how its customers compare with the model's training cohort (None: the model records none);
    `at_least` holds the columns of P(spend >= t) asked for (`clv score --at-least t`)."""

    scores: list[ScoreRecord]
    report: CleaningReport
    as_of: datetime
    states: list[CustomerState]  # in the order of `scores`: what explains them (export_onnx.explain)
    drift: population.Verdict | None
    at_least: dict[str, list[float]] = field(default_factory=dict)


def drift(artifact: Artifact, *inputs: Inputs) -> population.Verdict | None:
    """A cohort scored as of one date (its inputs, in one or more batches) against the model's
    training cohort, on every statistic; None when the model records no training cohort."""
    summary = artifact.population
    if summary is None:
        return None
    seen = [population.values(i) for i in inputs]
    return population.check(summary, {name: np.concatenate([s[name] for s in seen]) for name in population.STATISTICS})


def score_file(
    artifact: Artifact, path: str | Path, as_of: date | None = None, at_least: Sequence[float] = (), **file_opts: Any
) -> ScoredFile:
    """Every customer of a file, scored as of the end of `as_of` (default: its newest event),
    with P(spend >= t) for each t of `at_least`; LoadError when nothing is left to score."""
    history = read_history(path, **file_opts)
    if not history.events:
        raise LoadError(f"{path}: no transactions left after cleaning")
    at = end_of(as_of) if as_of else history.events[-1].ts
    states = list(next(snapshots(history.events, [at], artifact.window)).states.values())
    scores, columns, inputs = score_cohort(artifact, states, at, at_least)
    return ScoredFile(scores, history.report, at, states, drift(artifact, inputs), columns)


_customer_columns = attrgetter(*CUSTOMER_FIELDS)  # the run's fields (model, horizon, as-of) go apart


def write_csv(scores: Sequence[ScoreRecord], out: TextIO, extra: dict[str, list[float]] | None = None) -> None:
    """The customer fields of each score as CSV, header first, then any `extra` columns (one
    value per score): a `clv score` file."""
    extra = extra or {}
    more = zip(*extra.values()) if extra else repeat(())
    writer = csv.writer(out)
    writer.writerow([*CUSTOMER_FIELDS, *extra])
    writer.writerows((*_customer_columns(s), *values) for s, values in zip(scores, more))


def score_separately(
    artifact: Artifact, states: Sequence[CustomerState], as_of: datetime
) -> list[ScoreRecord | Exception]:
    """Each customer on its own, its score or what stopped it: after a batch failed, this pins
    the failure on the customers that cause it, and the others are scored all the same."""
    out: list[ScoreRecord | Exception] = []
    for state in states:
        try:
            out.append(score_states(artifact, [state], as_of)[0])
        except Exception as exc:  # noqa: BLE001  any failure is this customer's
            out.append(exc)
    return out
