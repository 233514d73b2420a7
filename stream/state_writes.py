"""Customer states kept in the table's store, written to its changelog once per micro-batch.

Faust writes a changelog record on every table assignment, which costs more than the rest of an
event's processing. Here an assignment updates the store only and remembers the customer; the
flush that precedes publishing scores and acknowledging events writes each changed customer's
newest state once, in faust's own record format, to the partition the customer lives in (the
table is co-partitioned with `transactions`). Offsets are committed only after the producer is
flushed, so no committed event's effect can be missing from the changelog; a crash before that
redelivers the events, which the offset watermark in each state makes harmless.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from faust.serializers import codecs

from features.aggregate import CustomerState


class WriteBehindStates(MutableMapping[str, CustomerState]):
    def __init__(self, table: Any, app: Any, changelog_topic: str, value_codec: str) -> None:
        self.store = table.data  # the table's store: recovery fills it from the changelog
        self.app = app
        self.topic = changelog_topic
        self.value_codec = value_codec
        self.pending: dict[str, CustomerState] = {}

    def __getitem__(self, customer_id: str) -> CustomerState:
        return self.store[customer_id]

    def __setitem__(self, customer_id: str, state: CustomerState) -> None:
        self.store[customer_id] = state
        self.pending[customer_id] = state

    def __delitem__(self, customer_id: str) -> None:
        raise TypeError("customer states are never deleted by the stream")

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.keys())

    def __len__(self) -> int:
        return len(self.store)

    def get(self, customer_id: str, default: Any = None) -> Any:
        try:
            return self.store[customer_id]
        except KeyError:
            return default

    async def catch_up(self, settings: Any, partition: int, start: int) -> int:
        """Apply changelog records from `start` to the partition's true end (faust's recovery
        trusts ListOffsets, which the embedded broker can report short; a no-op on Kafka)."""
        from stream.kafka_io import read_partition

        n = 0
        async for records in read_partition(settings, self.topic, partition, start):
            for rec in records:
                if rec.key is not None and rec.value is not None:
                    self.store[codecs.loads("json", rec.key)] = codecs.loads(self.value_codec, rec.value)
                    n += 1
        return n

    async def flush(self) -> int:
        """Hand every changed state to the producer; returns how many."""
        pending, self.pending = self.pending, {}
        for cid, state in pending.items():
            await self.app.producer.send(self.topic, codecs.dumps("json", cid),
                                     codecs.dumps(self.value_codec, state), state.partition, None, None)
        return len(pending)
