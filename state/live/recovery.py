"""Bringing a store's partition up to its changelog: read from the offset the store reflects to
the partition's end, in large fetches, and write each fetch to the store as one batch (with its
last offset, so a recovery stopped half-way resumes where it stopped).

Per key, the record of the highest position wins, not the last one written: a worker paused past
its session timeout and resumed after another took over its partitions can still write the states
it had, and those must never roll a customer back. A customer state's position is the highest
source offset it has applied (`state.live.record.source_offset`, read from the record's head
without decoding the rest); the partition's own record's is its clock (`PartitionMeta.clock_ts`,
which never goes back). Between equal positions the later record wins (the same state, written
again); a tombstone deletes whatever came before it.

A store whose offset lies beyond the changelog's end (the topic was recreated, or the directory
belongs to another cluster) no longer describes that changelog: it is wiped and recovered from
the start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from state.live.base.partition import record_position
from state.live.base.store import Store

log = logging.getLogger("clv.recovery")


class Changelog(Protocol):
    """Where a store's partitions are read back from: one changelog topic (on Kafka,
    `stream.kafka_io.KafkaChangelog`)."""

    topic: str

    async def end(self, partition: int) -> int:
        """The partition's next offset: how far a reader must get to be current."""

    def read(self, partition: int, start: int) -> AsyncIterator[list[Any]]:
        """Batches of the partition's records (with `key`, `value`, `offset`) from `start` to its end."""


@dataclass(frozen=True)
class Recovered:
    partition: int
    start: int  # first changelog offset read
    records: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


async def recover(store: Store, changelog: Changelog, partition: int) -> Recovered:
    """Apply the changelog records the store's partition lacks; returns what was read."""
    started = time.perf_counter()
    store.open(partition)
    start = store.offset(partition) + 1
    if start > 0:
        end = await changelog.end(partition)
        if start > end:
            log.warning(
                "state of %s[%d] reflects offset %d but the changelog ends at %d (topic "
                "recreated?): discarding it and recovering from the start",
                changelog.topic,
                partition,
                start - 1,
                end,
            )
            store.wipe(partition)
            start = 0
        elif start == end:  # nothing written since (a restart after a clean stop)
            return Recovered(partition, start, 0, time.perf_counter() - started)
    n = 0
    async for records in changelog.read(partition, start):
        if records:
            store.write(partition, superseding(store, partition, records), records[-1].offset)
            n += len(records)
    return Recovered(partition, start, n, time.perf_counter() - started)


def superseding(store: Store, partition: int, records: list[Any]) -> list[tuple[bytes, bytes | None]]:
    """The batch's records that supersede what the store holds for their keys (see the module
    docstring), one per key."""
    chosen: dict[bytes, bytes | None] = {}
    for r in records:
        if r.key is None:
            continue
        held = chosen[r.key] if r.key in chosen else store.get(partition, r.key)
        if r.value is None or held is None or (record_position(r.key, r.value) >= record_position(r.key, held)):
            chosen[r.key] = r.value
    return list(chosen.items())
