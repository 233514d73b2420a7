"""The snapshot sink's copy of the customer states, what it reads the model's view of a score from.

A score message holds no model inputs, so the sink reads the worker's state changelog as a
worker's recovery does (per customer, the record of the highest position wins) into a memory
store, about 33 MB per 100,000 customers. One copy serves everything the sink computes with the
model (`stream.drivers`, `stream.distributions`): `in_step` pairs the snapshot's rows with the
states they were scored from, and `agrees` says whether what the model makes of that state is the
score the row holds (the same model, the same state); a score read before or after its state, or
one of another model during a rollout, waits for a later snapshot.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

from features.aggregate import CustomerState, month_of
from state.live.base.partition import encode_key
from state.live.memory.store import MemoryStore
from state.live.record import StateDecodeError, decode_state
from state.live.recovery import superseding

log = logging.getLogger("clv.snapshot")

Pair = tuple[dict[str, Any], CustomerState]  # a snapshot row and the state it was scored from


@dataclass
class InStep:
    """Rows paired with their states, grouped by as-of time (one model call each), and how many
    could not be: no state yet, a state newer than the score, a score of another model."""

    by_as_of: dict[datetime, list[Pair]] = field(default_factory=lambda: defaultdict(list))
    missing: int = 0
    out_of_step: int = 0
    other_model: int = 0

    def report(self, what: str, computed: int, out_of_step: int, started: float, version: str) -> None:
        """The log line of one pass: `what` its opening words, `out_of_step` this count and the
        rows whose state gave another value than their score."""
        log.info(
            "%s %d computed in %.2f s; %d whose state and score are not yet the same, %d without a "
            "state yet, %d scored by another model than %s",
            what,
            computed,
            time.perf_counter() - started,
            out_of_step,
            self.missing,
            self.other_model,
            version,
        )


class StateCopy:
    """The customer states as of the changelog positions read so far."""

    def __init__(self) -> None:
        self.states = MemoryStore()
        self.folds = 0  # batches of changelog records folded: a reader notices states that arrived

    def next_offset(self, partition: int) -> int:
        """Where the changelog partition is to be read from."""
        return self.states.offset(partition) + 1

    def fold(self, partition: int, records: list[Any]) -> None:
        """Changelog records, as a recovery applies them."""
        if records:
            self.folds += 1
            self.states.open(partition)
            self.states.write(partition, superseding(self.states, partition, records), records[-1].offset)

    def in_step(self, rows: Iterable[dict[str, Any]], version: str) -> InStep:
        """The rows (`customer_id`, `as_of`, `model_version`, `source_partition`) scored by model
        `version` whose state is here and includes no event after the score's month."""
        out = InStep()
        for r in rows:
            if r["model_version"] != version:
                out.other_model += 1
                continue
            state = self._state(r["customer_id"], r["source_partition"])
            if state is None:
                out.missing += 1
            elif max(state.months, default=0) > month_of(r["as_of"]):
                out.out_of_step += 1  # events the score does not include yet: its next score will
            else:
                out.by_as_of[r["as_of"]].append((r, state))
        return out

    def _state(self, customer_id: str, partition: int) -> CustomerState | None:
        raw = self.states.get(partition, encode_key(customer_id)) if partition in self.states.opened() else None
        try:
            return decode_state(raw) if raw is not None else None
        except StateDecodeError as exc:
            log.warning("state of customer %r unreadable, nothing computed for it: %s", customer_id, exc)
            return None


def agrees(computed: float, published: float) -> bool:
    """What the model makes of the state is the row's clv (1e-3 relative, a cent at least): the
    same model and the same state; otherwise the state is newer or older than the score."""
    return abs(computed - published) <= 1e-3 * max(abs(published), 0.01)
