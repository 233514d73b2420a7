"""Customer states of the partitions a worker owns, over its store, written to the state changelog
once per micro-batch.

Reads: a state changed since the last flush is held as an object until the broker has its
changelog record; any other is decoded from the store when needed. No other per-customer object is
kept, so memory does not grow with customers beyond what the store itself holds (bytes for
`memory://`, nothing resident for `rocksdb://`).

A flush: `take` encodes each changed state once, with the partition's own record
(`PartitionMeta`), as changelog records to the partition the customer lives in (the changelog is
co-partitioned with `transactions`); the worker publishes them with the scores, and once the broker
has acknowledged them `written` puts the same bytes into the store with their changelog offset
(one atomic write: see `state.live.base.store`). A failed publish puts the states back (`restore`), to go
out with the next flush. The events behind them are acknowledged only after all that, so a crash
anywhere redelivers them, which the offset watermark in each state makes harmless.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import msgspec

from features.aggregate import MAX_IDS, CustomerState
from state.live.record import StateDecodeError, decode_state, encode_state, source_offset
from state.live.base.store import META_KEY, Store


log = logging.getLogger("clv.state")
Record = tuple[str, int, bytes, bytes]  # topic, partition, key, value: what stream.publisher sends
NEAR_BOUND = MAX_IDS * 9 // 10  # ids held from which a customer counts as near the state bound
NEAR_BOUND_TRACKED = 10_000  # most customers the near-bound gauge remembers
UNREADABLE = -2  # the position of a changelog record that cannot be read


def encode_key(customer_id: str) -> bytes:
    """What faust's "json" key serializer wrote: the id as a JSON string. A printable ASCII id
    without quotes or backslashes is that between quotes (json.dumps escapes nothing else)."""
    if customer_id.isascii() and customer_id.isprintable() and '"' not in customer_id and "\\" not in customer_id:
        return b'"' + customer_id.encode() + b'"'
    return json.dumps(customer_id).encode()


@dataclass
class PartitionMeta:
    """The partition's own changelog record. `clock_ts` is its event-time clock (newest event);
    every customer of the partition has a published score as of `scored_month` or later, from
    model `model` or a later one. A takeover reads these instead of every score of the partition."""

    clock_ts: int = 0
    scored_month: int | None = None
    model: str = ""


_meta_decoder = msgspec.msgpack.Decoder(tuple[int, int | None, str])


def encode_meta(meta: PartitionMeta) -> bytes:
    return b"\x01" + msgspec.msgpack.encode((meta.clock_ts, meta.scored_month, meta.model))


def decode_meta(data: bytes) -> PartitionMeta:
    if data[:1] != b"\x01":
        raise StateDecodeError(f"unknown partition record format (first byte {data[:1]!r})")
    try:
        return PartitionMeta(*_meta_decoder.decode(memoryview(data)[1:]))
    except msgspec.MsgspecError as exc:
        raise StateDecodeError(f"not a partition record: {exc}") from None


def record_position(key: bytes, value: bytes) -> int:
    """How far a changelog record reflects its partition: a customer state's highest applied
    source offset, the partition record's clock. Of two records of a key, the one of the higher
    position supersedes the other (`state.live.recovery`); an unreadable record is behind every
    readable one (a bootstrapped state's -1 included), so it never replaces one."""
    try:
        return decode_meta(value).clock_ts if key == META_KEY else source_offset(value)
    except StateDecodeError as exc:
        log.warning("changelog record of key %r unreadable, kept only if nothing else is: %s", key[:40], exc)
        return UNREADABLE


class PartitionStates:
    """One partition's states, as the mapping its `Folder` folds into (`get` and assignment)."""

    def __init__(self, store: Store, partition: int) -> None:
        self.store, self.partition = store, partition
        self.dirty: dict[str, CustomerState] = {}
        self.inflight: list[tuple[bytes, bytes]] = []  # records taken, not yet acknowledged
        self.held: dict[str, CustomerState] = {}  # the states behind them
        self.meta_inflight = False
        raw = store.get(partition, META_KEY)
        self.meta = decode_meta(raw) if raw is not None else None
        self.meta_dirty = False
        self.unread = False  # the changelog has records of others the store lacks

    def get(self, customer_id: str, default: None = None) -> CustomerState | None:
        state = self.dirty.get(customer_id) or self.held.get(customer_id)
        if state is not None:
            return state
        raw = self.store.get(self.partition, encode_key(customer_id))
        return default if raw is None else decode_state(raw)

    def __getitem__(self, customer_id: str) -> CustomerState:
        state = self.get(customer_id)
        if state is None:
            raise KeyError(customer_id)
        return state

    def __setitem__(self, customer_id: str, state: CustomerState) -> None:
        self.dirty[customer_id] = state

    def count(self) -> int:
        """Customers the store holds for the partition (rocksdb: its estimate)."""
        return self.store.count(self.partition)

    def customers(self) -> Iterator[str]:
        """Every customer of the partition, lazily: those changed or in flight now (a new
        customer reaches the store only once its record is acknowledged), then the store's
        (some of the first may come again)."""
        pending = list(self.held) + [c for c in self.dirty if c not in self.held]
        stored = (json.loads(k) for k in self.store.customer_keys(self.partition))
        return itertools.chain(pending, stored)

    def set_meta(self, **changes: Any) -> PartitionMeta:
        meta = self.meta or PartitionMeta()
        for name, value in changes.items():
            setattr(meta, name, value)
        self.meta, self.meta_dirty = meta, True
        return meta

    def take(self, topic: str) -> list[Record]:
        records = []
        for cid, state in self.dirty.items():
            key, value = encode_key(cid), encode_state(state)
            self.inflight.append((key, value))
            self.held[cid] = state
            records.append((topic, self.partition, key, value))
        self.dirty = {}
        if self.meta_dirty and self.meta is not None:
            value = encode_meta(self.meta)
            self.inflight.append((META_KEY, value))
            records.append((topic, self.partition, META_KEY, value))
            self.meta_dirty, self.meta_inflight = False, True
        return records

    def written(self, offset: int) -> None:
        """The taken records are in the changelog, the last at `offset`: store them. The store's
        offset moves to `offset` only when they directly follow what it holds: when another
        worker wrote the partition meanwhile (this one was paused past its session timeout and
        the partition moved on), or a failed flush wrote part of its records, the store lacks
        records before these, and its next recovery reads them from where it had read to (and
        keeps the highest position per key)."""
        follows = offset - len(self.inflight) == self.store.offset(self.partition)
        if not follows and offset >= 0 and not self.unread:  # (-1: the broker did not say)
            self.unread = True  # said once: the store's offset stays behind from now on
            log.warning(
                "changelog partition %d holds records this worker has not read (another "
                "worker wrote it since, this one being paused past its session timeout? "
                "or a failed flush wrote part of its records): its store stays at offset "
                "%d, and its next recovery reads on from there",
                self.partition,
                self.store.offset(self.partition),
            )
        self.store.write(self.partition, self.inflight, offset if follows else -1)
        self.inflight.clear()
        self.held.clear()
        self.meta_inflight = False

    def restore(self) -> None:
        """The taken records may not be in the changelog: take them again next time."""
        for cid, state in self.held.items():
            self.dirty.setdefault(cid, state)
        self.meta_dirty = self.meta_dirty or self.meta_inflight
        self.inflight.clear()
        self.held.clear()
        self.meta_inflight = False


class States:
    """The partitions' states of one worker, over one store and one changelog topic."""

    def __init__(self, store: Store, topic: str) -> None:
        self.store, self.topic = store, topic
        self.partitions: dict[int, PartitionStates] = {}
        self.near_bound: set[str] = set()
        self.largest_record = 0

    def open(self, partition: int) -> PartitionStates:
        """The partition's states, once the store holds its changelog (after recovery)."""
        states = self.partitions.get(partition)
        if states is None:
            states = self.partitions[partition] = PartitionStates(self.store, partition)
        return states

    def forget(self, partition: int) -> None:
        """A revoked partition: its changes were flushed; the store keeps its records until the
        rebalance says whether the partition stays (`close_unowned`)."""
        self.partitions.pop(partition, None)

    def close_unowned(self, owned: set[int]) -> None:
        for partition in self.store.opened() - owned:
            self.store.close(partition)

    def changed(self) -> int:
        """States changed since a flush last took them (a failed flush's among them)."""
        return sum(len(states.dirty) for states in self.partitions.values())

    def take(self) -> list[Record]:
        records: list[Record] = []
        for states in self.partitions.values():
            for cid, state in states.dirty.items():
                self._watch(cid, state)
            records += states.take(self.topic)
        for _topic, _p, _key, value in records:
            self.largest_record = max(self.largest_record, len(value))
        return records

    def written(self, offsets: dict[int, int]) -> None:
        for partition, states in self.partitions.items():
            if states.inflight:
                states.written(offsets.get(partition, -1))

    def restore(self) -> None:
        for states in self.partitions.values():
            states.restore()

    def find(self, customer_id: str) -> tuple[int, CustomerState] | None:
        """The customer's partition and state, in whichever owned partition holds it."""
        for partition, states in self.partitions.items():
            state = states.get(customer_id)
            if state is not None:
                return partition, state
        return None

    def _watch(self, customer_id: str, state: CustomerState) -> None:
        """Customers near the id bound: counted for the gauge, each logged once."""
        if state.n_ids < NEAR_BOUND:
            self.near_bound.discard(customer_id)
        elif customer_id not in self.near_bound and len(self.near_bound) < NEAR_BOUND_TRACKED:
            self.near_bound.add(customer_id)
            log.warning(
                "customer %s holds %d event and invoice ids, near the state bound of %d: "
                "past it the oldest are forgotten (%d so far), so a re-published duplicate "
                "or a split invoice older than the newest %d ids would count again; "
                "invoices arriving in one event each still count exactly",
                customer_id,
                state.n_ids,
                MAX_IDS,
                state.ids_forgotten,
                MAX_IDS,
            )
