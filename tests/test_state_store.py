"""The stores and their recovery against the real broker: a new store reads the whole changelog
in bulk, a rocksdb store reopened on its directory reads only what was written since, and a store
that is ahead of its changelog is rebuilt from it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from features.aggregate import CustomerState
from state.live.record import encode_state
from state.live.recovery import recover
from stream.replay import ensure_topics
from stream.kafka_io import KafkaChangelog
from stream.settings import Settings
from state.live.memory.store import MemoryStore
from state.live.rocksdb.store import RocksStore
from state.live.stores import open_store


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        try:
            for key, value in records:
                await producer.send(topic, value, key=key, partition=1)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


@pytest.fixture
def changelog(kafka_bootstrap) -> tuple[Settings, str]:
    settings = Settings.from_env({}, bootstrap_servers=kafka_bootstrap, partitions=2)
    topic = f"changelog-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(settings, {topic: {"cleanup.policy": "compact"}}))
    return settings, topic


def state(i: int, offset: int) -> bytes:
    """Customer i's state record, as having applied source offsets up to `offset`."""
    return encode_state(CustomerState(f"c{i:05d}", partition=1, offset=offset))


def customers(n: int, version: int) -> list[tuple[bytes, bytes]]:
    """Every customer's state, each version further on in the source than the one before."""
    return [(f'"c{i:05d}"'.encode(), state(i, version * 1_000_000 + i)) for i in range(n)]


def test_rocksdb_restart_replays_only_the_tail(changelog, tmp_path):
    settings, topic = changelog
    produce(settings.bootstrap_servers, topic, customers(3000, 1))
    store = RocksStore(tmp_path / "db")
    got = asyncio.run(recover(store, KafkaChangelog(settings, topic), 1))
    assert (got.start, got.records) == (0, 3000)
    assert store.offset(1) == 2999 and store.get(1, b'"c00007"') == state(7, 1_000_007)
    store.close_all()

    produce(settings.bootstrap_servers, topic, customers(10, 2) + [(b'"c00008"', None)])
    again = RocksStore(tmp_path / "db")  # a new process on the same directory
    got = asyncio.run(recover(again, KafkaChangelog(settings, topic), 1))
    assert (got.start, got.records) == (3000, 11)  # the tail only
    assert again.get(1, b'"c00007"') == state(7, 2_000_007) and again.get(1, b'"c00008"') is None
    assert again.get(1, b'"c02999"') == state(2999, 1_002_999)
    assert sum(1 for _ in again.customer_keys(1)) == 2999
    again.close_all()


def test_memory_store_recovers_the_whole_partition_in_bulk(changelog):
    settings, topic = changelog
    produce(settings.bootstrap_servers, topic, customers(20_000, 1) + customers(5, 2))
    store = open_store("memory://", "unused", topic)
    assert isinstance(store, MemoryStore)
    got = asyncio.run(recover(store, KafkaChangelog(settings, topic), 1))
    assert got.records == 20_005 and store.count(1) == 20_000
    assert store.get(1, b'"c00004"') == state(4, 2_000_004) and store.get(1, b'"c00005"') == state(5, 1_000_005)
    assert asyncio.run(recover(store, KafkaChangelog(settings, topic), 0)).records == 0  # an empty partition


def test_recovery_keeps_the_state_of_the_highest_position_not_the_last_written(changelog, tmp_path):
    """A stale worker (paused past its session timeout, resumed after another took over) writes
    the states it had after the new owner wrote newer ones: recovery keeps, per customer, the
    state that applied the highest source offset, and the partition record of the latest clock;
    a tombstone still deletes, and equal positions go to the later record."""
    from state.live.base.partition import PartitionMeta, decode_meta, encode_meta
    from state.live.base.store import META_KEY

    settings, topic = changelog
    key = lambda i: f'"c{i:05d}"'.encode()  # noqa: E731
    produce(settings.bootstrap_servers, topic, [
        (key(1), state(1, 50)), (key(2), state(2, 30)), (META_KEY, encode_meta(PartitionMeta(2000))),
        (key(3), state(3, 60)),
        (key(1), state(1, 20)), (key(2), state(2, 70)), (META_KEY, encode_meta(PartitionMeta(1000))),
        (key(3), None)])  # the stale worker's c1 and clock, the new owner's c2, a deletion
    for store in (MemoryStore(), RocksStore(tmp_path / "db")):
        asyncio.run(recover(store, KafkaChangelog(settings, topic), 1))
        assert store.get(1, key(1)) == state(1, 50) and store.get(1, key(2)) == state(2, 70)
        assert store.get(1, key(3)) is None and decode_meta(store.get(1, META_KEY)).clock_ts == 2000
        assert store.offset(1) == 7
    # Read in another fetch than the newer state (a rocksdb restart reads only the tail).
    again = encode_state(CustomerState("c00001", partition=1, offset=50, country="France"))
    produce(settings.bootstrap_servers, topic, [(key(2), state(2, 40)), (key(1), again)])
    asyncio.run(recover(store, KafkaChangelog(settings, topic), 1))
    assert store.get(1, key(2)) == state(2, 70) and store.get(1, key(1)) == again
    assert store.offset(1) == 9
    store.close_all()


def test_a_store_does_not_skip_records_another_worker_wrote_meanwhile(tmp_path):
    """A worker's own records move its store's offset only when they follow what it has read:
    after another worker wrote the partition (this one was paused and lost it), the store's next
    recovery must still read those records."""
    from state.live.base.partition import States

    store = MemoryStore()
    store.open(0)
    store.write(0, [(b'"c00000"', state(0, 5))], 9)  # read up to changelog offset 9
    states = States(store, "changelog")
    states.open(0)["c00000"] = CustomerState("c00000", partition=0, offset=6)
    states.take()
    states.written({0: 10})  # right after: the store reflects offset 10
    assert store.offset(0) == 10
    states.open(0)["c00000"] = CustomerState("c00000", partition=0, offset=7)
    states.take()
    states.written({0: 14})  # offsets 11-13 are another worker's
    assert store.offset(0) == 10 and store.get(0, b'"c00000"') is not None


def test_a_store_ahead_of_its_changelog_is_rebuilt(changelog, tmp_path):
    settings, topic = changelog
    produce(settings.bootstrap_servers, topic, customers(3, 1))
    store = RocksStore(tmp_path / "db")
    store.open(1)
    store.write(1, [(b'"stale"', b"\x01old")], 500)  # e.g. the topic was recreated since
    got = asyncio.run(recover(store, KafkaChangelog(settings, topic), 1))
    assert (got.start, got.records) == (0, 3)
    assert store.get(1, b'"stale"') is None and store.offset(1) == 2
    store.close_all()


def test_states_reach_the_store_only_once_the_changelog_has_them(tmp_path):
    """take -> (publish fails) restore -> take again -> written: the store gets exactly the bytes
    published, with their offset; a state changed meanwhile stays changed."""
    from datetime import datetime, timezone

    from features.aggregate import Folder, contribution
    from features.contract import Line, TransactionEvent
    from state.live.record import decode_state
    from state.live.base.partition import States, encode_key

    def ev(inv: str) -> TransactionEvent:
        return TransactionEvent(inv, "c1", inv, datetime(2011, 1, 5, tzinfo=timezone.utc),
                                (Line("A", 1, 2.0),))

    for store in (MemoryStore(), RocksStore(tmp_path / "db")):
        store.open(0)
        states = States(store, "changelog")
        folder = Folder(13, states.open(0))
        folder.add("c1", contribution(ev("I1")), partition=0, offset=0)
        states.open(0).set_meta(clock_ts=1)
        assert len(states.take()) == 2 and store.get(0, encode_key("c1")) is None
        states.restore()  # the publish failed
        records = states.take()
        folder.add("c1", contribution(ev("I2")), partition=0, offset=1)  # during the publish
        states.written({0: 1})
        assert store.offset(0) == 1
        assert store.get(0, encode_key("c1")) == records[0][3]
        assert decode_state(records[0][3]).totals() == (200, 1, 1)
        assert states.open(0).get("c1").totals() == (400, 2, 2)  # still the newer, changed state
        assert [r[2] for r in states.take()] == [encode_key("c1")]  # and written with the next
        store.close_all()


def test_a_state_key_is_the_customer_id_as_faust_json_wrote_it():
    import json
    import random

    from state.live.base.partition import encode_key

    rng = random.Random(3)
    ids = ["17850", "b0000001", 'a"b', "a\\b", "é", "\x7f", "\x01", "", " x ", "\u2028"]
    ids += ["".join(chr(rng.randint(0, 300)) for _ in range(rng.randint(0, 6))) for _ in range(5000)]
    for customer_id in ids:
        assert encode_key(customer_id) == json.dumps(customer_id).encode(), customer_id
