"""The drivers a snapshot carries for its top customers (`snapshot_drivers_top` of them by clv).

A score message holds no model inputs, so the sink keeps its own copy of the customer states:
it reads the worker's state changelog as a worker's recovery does (per customer, the record of
the highest position wins) into a memory store, about 33 MB per 100,000 customers. At each
snapshot it explains (`export_onnx.explain`) the top customers whose score changed since it last
did, from their state as of their score's as-of time. A customer's drivers are published only
when they add up to the clv its row in the same snapshot holds (the same model, the same state):
a score read before or after its state, or one of another model during a rollout, waits for a
later snapshot. Only the top customers, because each costs 2^G model rows (32 for the shipped
model: 200 customers take about a second on one core) and analysts look at the top first;
`clv score --explain` and the worker's /customers/{id} explain anyone when asked.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import datetime
from typing import Any, Sequence

from export_onnx.explain import MEANINGS, Drivers, Explainer
from export_onnx.runtime import Artifact
from features.aggregate import month_of
from state.live.base.partition import encode_key
from state.live.memory.store import MemoryStore
from state.live.record import StateDecodeError, decode_state
from state.live.recovery import superseding

log = logging.getLogger("clv.snapshot")


def driver_rows(d: Drivers) -> list[tuple[Any, ...]]:
    """A customer's rows of the snapshot's `customer_drivers` (`state.snapshot.tables.DRIVER_COLUMNS`)."""
    return [(d.customer_id, i, name, value, d.reference, MEANINGS[name]) for i, (name, value) in enumerate(d.ranked())]


class TopDrivers:
    """The sink's copy of the customer states and the drivers it last computed."""

    def __init__(self, artifact: Artifact, top: int) -> None:
        self.explainer = Explainer(artifact)  # ArtifactError: a model that carries no reference
        self.version, self.top = artifact.version, top
        self.states = MemoryStore()
        self.done: dict[str, tuple[tuple[Any, ...], list[tuple[Any, ...]]]] = {}  # by score identity
        self.lacking = False  # the last rows lacked a top customer's drivers for want of its state
        self.read_since = False  # changelog records arrived since the last rows

    def next_offset(self, partition: int) -> int:
        """Where the changelog partition is to be read from."""
        return self.states.offset(partition) + 1

    def fold(self, partition: int, records: list[Any]) -> None:
        """Changelog records, as a recovery applies them."""
        if records:
            self.read_since = True
            self.states.open(partition)
            self.states.write(partition, superseding(self.states, partition, records), records[-1].offset)

    def waiting(self) -> bool:
        """A snapshot lacked drivers for want of states that may have arrived since: the sink
        publishes again even if no score changed."""
        return self.lacking and self.read_since

    def rows(self, top: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The `customer_drivers` rows of the top customers (`Snapshots.top` rows) whose drivers
        add up to their row's clv; computed for those whose score changed since last time."""
        started = time.perf_counter()
        self.read_since = False
        wanted = {r["customer_id"]: r for r in top}
        self.done = {c: v for c, v in self.done.items() if c in wanted and v[0] == _identity(wanted[c])}
        todo: dict[datetime, list[tuple[dict[str, Any], Any]]] = defaultdict(list)
        missing = other_model = out_of_step = 0
        for cid, r in wanted.items():
            if cid in self.done:
                continue
            if r["model_version"] != self.version:
                other_model += 1
                continue
            p = r["source_partition"]
            raw = self.states.get(p, encode_key(cid)) if p in self.states.opened() else None
            try:
                state = decode_state(raw) if raw is not None else None
            except StateDecodeError as exc:
                log.warning("state of customer %r unreadable, no drivers for it: %s", cid, exc)
                state = None
            if state is None:
                missing += 1
            elif max(state.months, default=0) > month_of(r["as_of"]):
                out_of_step += 1  # events the score does not include yet: its next score will
            else:
                todo[r["as_of"]].append((r, state))
        computed = 0
        for as_of, pairs in todo.items():
            for (r, _state), d in zip(pairs, self.explainer.drivers([s for _r, s in pairs], as_of)):
                computed += 1
                if abs(d.clv - r["clv"]) > 1e-3 * max(abs(r["clv"]), 0.01):
                    out_of_step += 1  # the state is newer or older than the score: next time
                    continue
                self.done[r["customer_id"]] = (_identity(r), driver_rows(d))
        self.lacking = bool(missing or out_of_step)
        if computed or missing or other_model or out_of_step:
            log.info(
                "drivers of the top %d customers: %d computed in %.2f s; %d whose state and "
                "score are not yet the same, %d without a state yet, %d scored by another "
                "model than %s",
                len(wanted),
                computed,
                time.perf_counter() - started,
                out_of_step,
                missing,
                other_model,
                self.version,
            )
        return [row for _identity_, rows in self.done.values() for row in rows]


def _identity(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a customer's score the same one: its model, clock, event and value."""
    return row["model_version"], row["as_of"], row["event_offset"], row["clv"]
