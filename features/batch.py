"""Batch entry point: a transaction file to customer states and model inputs at given cutoffs.

States are folded with the same `CustomerState.apply` the worker uses, in event-time order, and
inputs are taken at each cutoff before any later event is folded in: training on a cutoff can
never see a row after it.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from features.aggregate import CustomerState, Folder, contribution, month_of
from features.cleaning import CleaningPolicy, CleaningReport, clean
from features.contract import TransactionEvent
from features.events import events_from_lines
from features.loaders import load


@dataclass
class History:
    events: list[TransactionEvent]
    report: CleaningReport


def read_lines(
    path: str | Path,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    **policy: object,
) -> tuple[pd.DataFrame, CleaningReport]:
    """A file's cleaned lines and the report of what cleaning dropped: where every file path
    (inspect, score, replay, bootstrap) starts, so all of them see the same lines."""
    loaded = load(path, fmt, mapping)
    return clean(loaded, CleaningPolicy.for_format(loaded.format, **policy))


def read_history(
    path: str | Path,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    **policy: object,
) -> History:
    lines, report = read_lines(path, fmt, mapping, **policy)
    return History(list(events_from_lines(lines)), report)


def end_of(day: date | datetime) -> datetime:
    """A cutoff date means the end of that day, UTC; a datetime is taken as given."""
    if isinstance(day, datetime):
        return day if day.tzinfo else day.replace(tzinfo=timezone.utc)
    return datetime.combine(day, time.max, tzinfo=timezone.utc)


@dataclass
class Snapshot:
    cutoff: datetime
    month: int
    states: dict[str, CustomerState]  # live: valid until the iterator moves on


def snapshots(events: Sequence[TransactionEvent], cutoffs: Sequence[datetime], window: int) -> Iterator[Snapshot]:
    """Fold events in time order, yielding the states at each cutoff (ascending)."""
    states: dict[str, CustomerState] = {}
    folder = Folder(window, states)
    i = 0
    for cutoff in sorted(cutoffs):
        while i < len(events) and events[i].ts <= cutoff:
            folder.add(events[i].customer_id, contribution(events[i]))
            i += 1
        yield Snapshot(cutoff, month_of(cutoff), states)


def fingerprint(events: Sequence[TransactionEvent]) -> str:
    """Hash of the training transactions, so an artifact names the data it came from."""
    h = hashlib.sha256()
    for ev in events:
        h.update(ev.to_json())
    return h.hexdigest()
