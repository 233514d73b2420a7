"""Training examples from rolling origins before a cutoff, and the inputs at the cutoff.

Every origin is a month end whose whole horizon ends by the cutoff, so no label and no feature
reads a row after it. Only events up to the cutoff are ever passed in (`history_until`).
"""

from __future__ import annotations

import calendar
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from features.aggregate import contribution, month_of
from features.batch import end_of, snapshots
from features.clusters import behaviour
from features.contract import TransactionEvent
from features.sequences import STATIC_FEATURES, Inputs, build_inputs, rfm


def month_end(month: int) -> datetime:
    year, mon = divmod(month, 12)
    day = calendar.monthrange(year, mon + 1)[1]
    return end_of(datetime(year, mon + 1, day, 23, 59, 59, 999999, tzinfo=timezone.utc))


class NotEnoughHistory(ValueError):
    """The file has too little data around the cutoff for the split asked for."""


def history_until(events: list[TransactionEvent], cutoff: datetime) -> list[TransactionEvent]:
    """The leakage guard: everything downstream of training sees only these events."""
    return [ev for ev in events if ev.ts <= cutoff]


@dataclass
class Examples:
    customer_ids: list[str]
    origin: np.ndarray  # origin month of each example
    inputs: Inputs
    y: np.ndarray  # dollars spent in the horizon after the origin (floored at 0)
    rfm: np.ndarray  # recency_days, frequency, monetary, tenure_days, total_spend

    def take(self, mask: np.ndarray) -> "Examples":
        return Examples(
            [c for c, keep in zip(self.customer_ids, mask) if keep],
            self.origin[mask],
            self.inputs.take(mask),
            self.y[mask],
            self.rfm[mask],
        )


def _concat(parts: list[Examples]) -> Examples:
    return Examples(
        [c for p in parts for c in p.customer_ids],
        np.concatenate([p.origin for p in parts]),
        Inputs(*(np.concatenate([getattr(p.inputs, f) for p in parts]) for f in ("seq", "static", "classic"))),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.rfm for p in parts]),
    )


def _monthly_spend(events: list[TransactionEvent]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for ev in events:
        c = contribution(ev)
        key = (ev.customer_id, c.month)
        out[key] = out.get(key, 0) + c.spend_cents
    return out


def _labels(spend: dict[tuple[str, int], int], ids: list[str], origin: int, horizon: int) -> np.ndarray:
    cents = np.array([sum(spend.get((cid, origin + k), 0) for k in range(1, horizon + 1)) for cid in ids])
    return np.maximum(cents, 0) / 100.0


@dataclass
class Split:
    labelled: Examples  # every origin before the cutoff, labelled up to the cutoff month at most
    scoring: Examples  # every customer at the cutoff; y is the actual horizon spend if known
    last_month: int  # the cutoff's month
    cohort: np.ndarray  # the scoring customers' features.clusters.behaviour, clusters' cohort


def rolling_split(
    events: list[TransactionEvent],
    cutoff: datetime,
    horizon: int,
    window: int,
    max_origins: int = 24,
    actual_events: list[TransactionEvent] | None = None,
) -> Split:
    """Examples from every month end before the cutoff, each labelled with the spend of the
    next min(horizon, months up to the cutoff's) months; that length travels with the inputs
    (`horizons`): the head reads it in closed form, the trees through the classic expectation.

    Recent origins with short labels show the model customers as old as the ones it will score,
    which a full-horizon-only design would never show it. `events` must end at the cutoff;
    `actual_events` (after it) only label the scoring set.
    """
    if any(ev.ts > cutoff for ev in events):
        raise ValueError("training events must not extend past the cutoff")
    if not events:
        raise NotEnoughHistory("no transactions before the cutoff")
    last = month_of(cutoff)
    first_origin = max(month_of(events[0].ts), last - max_origins)
    if last - first_origin < 3:
        raise NotEnoughHistory("need at least three months of transactions before the cutoff")
    spend = _monthly_spend(events)
    origins = [month_end(m) for m in range(first_origin, last)]
    labelled: list[Examples] = []
    at_cutoff: tuple[Examples, np.ndarray] | None = None
    for snap in snapshots(events, [*origins, cutoff], window):
        ids = list(snap.states)
        states = list(snap.states.values())
        as_of = int(snap.cutoff.timestamp())
        fields = [rfm(s, as_of) for s in states]
        r = np.array([list(vars(f).values()) for f in fields], dtype=np.float64)
        if snap.month == last:
            y = (
                _labels(_monthly_spend(actual_events), ids, last, horizon)
                if actual_events
                else np.full(len(ids), np.nan)
            )
            scoring = Examples(ids, np.full(len(ids), last), build_inputs(states, last, window, horizon), y, r)
            at_cutoff = (scoring, behaviour(states, fields, last, window))
            continue
        k = min(horizon, last - snap.month)
        labelled.append(
            Examples(
                ids,
                np.full(len(ids), snap.month),
                build_inputs(states, snap.month, window, k),
                _labels(spend, ids, snap.month, k),
                r,
            )
        )
    if at_cutoff is None or not labelled:
        raise NotEnoughHistory("not enough history before the cutoff for training and validation")
    scoring, cohort = at_cutoff
    return Split(_concat(labelled), scoring, last, cohort)


FOLDS = 5  # a network holds out one customer in five for early stopping


def customer_folds(customer_ids: list[str]) -> np.ndarray:
    """A customer's fold, from its id alone: the same in every run and every model."""
    return np.array([zlib.crc32(c.encode()) % FOLDS for c in customer_ids], dtype=np.int64)


def holdout(split: Split, fold: int) -> tuple[Examples, Examples]:
    """(training, early-stopping) examples of one network: the customers of `fold` are held out
    whole, and their examples labelled up to the cutoff month judge the epochs.

    Held out by customer, not only by time: a customer's earlier-origin labels overlap the later
    ones by all but a month, so a network judged on the same customers is rewarded for memorising
    them. On CDNOW (1997-12-31, 6 months) such a validation loss kept falling for 28 epochs while
    the cutoff's Gini fell from 0.758 to 0.700; judged on held-out customers it turns up after
    2-5 epochs, where the cutoff's scores are best."""
    ex = split.labelled
    held = customer_folds(ex.customer_ids) == fold % FOLDS
    newest = ex.origin + horizons(ex.inputs) == split.last_month
    return ex.take(~held), ex.take(held & newest)


def horizons(inputs: Inputs) -> np.ndarray:
    """The horizon (months) each example is labelled over."""
    return inputs.static[:, STATIC_FEATURES.index("horizon_months")]


def rfm_features(ex: Examples) -> np.ndarray:
    """Aggregated, non-sequential features for the FFNN and the gradient-boosted trees: log
    recency and tenure (days), frequency, log monetary and total spend, active months in the
    last 3/6/12, log spend in the last 3/12 months. The horizon is not among them: the FFNN's
    head takes it in closed form, the trees through the classic expectation."""
    r = ex.rfm
    seq = ex.inputs.seq
    active = seq[..., 3]
    spend = np.expm1(np.abs(seq[..., 0])) * np.sign(seq[..., 0])
    return np.column_stack(
        [
            np.log1p(r[:, 0]),
            np.log1p(r[:, 1]),
            np.sign(r[:, 2]) * np.log1p(np.abs(r[:, 2])),
            np.log1p(r[:, 3]),
            np.sign(r[:, 4]) * np.log1p(np.abs(r[:, 4])),
            active[:, -3:].sum(1),
            active[:, -6:].sum(1),
            active[:, -12:].sum(1),
            np.log1p(np.maximum(spend[:, -3:].sum(1), 0)),
            np.log1p(np.maximum(spend[:, -12:].sum(1), 0)),
        ]
    ).astype(np.float32)
