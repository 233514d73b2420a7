"""Customer states kept in the table's store, written to its changelog once per micro-batch.

Faust writes a changelog record on every table assignment, which costs more than the rest of an
event's processing. Here an assignment updates the store only and remembers the customer; the
flush writes each changed customer's newest state once, in faust's own record format, to the
partition the customer lives in (the table is co-partitioned with `transactions`), together with
the scores, and acknowledges the events only after the broker has both. A crash before that
redelivers the events, which the offset watermark in each state makes harmless.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
import json
from typing import Any

from faust.serializers import codecs

from features.aggregate import CustomerState
from features.state_record import decode_state, encode_state

STATE_CODEC = "clv_state"


def encode_key(customer_id: str) -> bytes:
    return json.dumps(customer_id).encode()  # what faust's "json" key serializer writes


class StateCodec(codecs.Codec):
    """Customer states travel through the changelog as `features.state_record` records."""

    def _dumps(self, obj: Any) -> bytes:
        return encode_state(obj)

    def _loads(self, s: bytes) -> Any:
        return decode_state(s)


codecs.register(STATE_CODEC, StateCodec())


class WriteBehindStates(MutableMapping[str, CustomerState]):
    """Mapping access (`states[cid]`) is for event processing, where a partitioned store (rocksdb)
    finds the partition from the event being processed; `read`, `put` and `partition_items` name
    the partition, for flushes and takeovers, which run outside event processing."""

    def __init__(self, table: Any, changelog_topic: str) -> None:
        self.store = table.data  # the table's store: recovery fills it from the changelog
        self.topic = changelog_topic
        self.pending: dict[str, CustomerState] = {}
        # faust's rocksdb store keeps one database per partition (`_db_for_partition`).
        self.partitioned = hasattr(self.store, "_db_for_partition")

    def requeue(self, customer_id: str) -> None:
        """Write the customer's current state to the changelog with the next batch."""
        state = self.get(customer_id)
        if state is not None:
            self.pending[customer_id] = state

    def read(self, partition: int, customer_id: str) -> CustomerState:
        if not self.partitioned:
            return self.store[customer_id]
        raw = self.store._db_for_partition(partition).get(self.store._encode_key(customer_id))
        if raw is None:
            raise KeyError(customer_id)
        return self.store._decode_value(raw)

    def put(self, partition: int, customer_id: str, state: CustomerState) -> None:
        """Store without queueing a changelog record (the state came from the changelog)."""
        if not self.partitioned:
            self.store[customer_id] = state
            return
        self.store._db_for_partition(partition).put(self.store._encode_key(customer_id),
                                                    self.store._encode_value(state))

    def partition_items(self, partition: int) -> Iterator[tuple[str, CustomerState]]:
        if not self.partitioned:
            yield from ((c, s) for c, s in self.store.items() if s.partition == partition)
            return
        db = self.store._db_for_partition(partition)
        for key, value in self.store._visible_items(db):
            yield self.store._decode_key(key), self.store._decode_value(value)

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
                    self.put(partition, json.loads(rec.key), decode_state(rec.value))
                    n += 1
        return n

    def take_records(self) -> list[tuple[str, int, bytes, bytes]]:
        """The changelog records of every state changed since the last call, one per customer,
        to the partition the customer lives in."""
        pending, self.pending = self.pending, {}
        return [(self.topic, state.partition, encode_key(cid), encode_state(state))
                for cid, state in pending.items()]
