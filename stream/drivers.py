"""The drivers a snapshot carries for its top customers (`snapshot_drivers_top` of them by clv).

At each snapshot the sink explains (`export_onnx.explain`) the top customers whose score changed
since it last did, from their state in its copy of the customer states (`stream.state_copy`) as
of their score's as-of time. A customer's drivers are published only when they add up to the clv
its row in the same snapshot holds (the same model, the same state): a score read before or after
its state, or one of another model during a rollout, waits for a later snapshot. Only the top
customers, because each costs 2^G model rows (32 for the shipped model: 200 customers take about
a second on one core) and analysts look at the top first;
`clv score --explain` and the worker's /customers/{id} explain anyone when asked.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from export_onnx.explain import MEANINGS, Drivers, Explainer
from export_onnx.runtime import Artifact
from stream.state_copy import StateCopy, agrees


def driver_rows(d: Drivers) -> list[tuple[Any, ...]]:
    """A customer's rows of the snapshot's `customer_drivers` (`state.snapshot.tables.DRIVER_COLUMNS`)."""
    return [(d.customer_id, i, name, value, d.reference, MEANINGS[name]) for i, (name, value) in enumerate(d.ranked())]


class TopDrivers:
    """The drivers the sink last computed, from its copy of the customer states."""

    def __init__(self, artifact: Artifact, top: int, states: StateCopy) -> None:
        self.explainer = Explainer(artifact)  # ArtifactError: a model that carries no reference
        self.version, self.top = artifact.version, top
        self.states = states
        self.done: dict[str, tuple[tuple[Any, ...], list[tuple[Any, ...]]]] = {}  # by score identity
        self.lacking = False  # the last rows lacked a top customer's drivers for want of its state
        self.seen = 0  # the state copy's folds as of the last rows

    def waiting(self) -> bool:
        """A snapshot lacked drivers for want of states that may have arrived since: the sink
        publishes again even if no score changed."""
        return self.lacking and self.states.folds != self.seen

    def rows(self, top: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The `customer_drivers` rows of the top customers (`Snapshots.top` rows) whose drivers
        add up to their row's clv; computed for those whose score changed since last time."""
        started = time.perf_counter()
        self.seen = self.states.folds
        wanted = {r["customer_id"]: r for r in top}
        self.done = {c: v for c, v in self.done.items() if c in wanted and v[0] == _identity(wanted[c])}
        found = self.states.in_step((r for c, r in wanted.items() if c not in self.done), self.version)
        computed, out_of_step = 0, found.out_of_step
        for as_of, pairs in found.by_as_of.items():
            for (r, _state), d in zip(pairs, self.explainer.drivers([s for _r, s in pairs], as_of)):
                computed += 1
                if not agrees(d.clv, r["clv"]):
                    out_of_step += 1  # the state is newer or older than the score: next time
                    continue
                self.done[r["customer_id"]] = (_identity(r), driver_rows(d))
        self.lacking = bool(found.missing or out_of_step)
        if computed or found.missing or found.other_model or out_of_step:
            found.report(f"drivers of the top {len(wanted)} customers:", computed, out_of_step, started, self.version)
        return [row for _identity_, rows in self.done.values() for row in rows]


def _identity(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a customer's score the same one: its model, clock, event and value."""
    return row["model_version"], row["as_of"], row["event_offset"], row["clv"]
