"""The stores and their recovery against the real broker: a new store reads the whole changelog
in bulk, a rocksdb store reopened on its directory reads only what was written since, and a store
that is ahead of its changelog is rebuilt from it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from stream.recovery import recover
from stream.replay import ensure_topics
from stream.settings import Settings
from stream.stores import MemoryStore, RocksStore, open_store


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


def customers(n: int, version: int) -> list[tuple[bytes, bytes]]:
    return [(f'"c{i:05d}"'.encode(), b"\x01v%d-%d" % (version, i)) for i in range(n)]


def test_rocksdb_restart_replays_only_the_tail(changelog, tmp_path):
    settings, topic = changelog
    produce(settings.bootstrap_servers, topic, customers(3000, 1))
    store = RocksStore(tmp_path / "db")
    got = asyncio.run(recover(store, settings, topic, 1))
    assert (got.start, got.records) == (0, 3000)
    assert store.offset(1) == 2999 and store.get(1, b'"c00007"') == b"\x01v1-7"
    store.close_all()

    produce(settings.bootstrap_servers, topic, customers(10, 2) + [(b'"c00008"', None)])
    again = RocksStore(tmp_path / "db")  # a new process on the same directory
    got = asyncio.run(recover(again, settings, topic, 1))
    assert (got.start, got.records) == (3000, 11)  # the tail only
    assert again.get(1, b'"c00007"') == b"\x01v2-7" and again.get(1, b'"c00008"') is None
    assert again.get(1, b'"c02999"') == b"\x01v1-2999"
    assert sum(1 for _ in again.customer_keys(1)) == 2999
    again.close_all()


def test_memory_store_recovers_the_whole_partition_in_bulk(changelog):
    settings, topic = changelog
    produce(settings.bootstrap_servers, topic, customers(20_000, 1) + customers(5, 2))
    store = open_store("memory://", "unused", topic)
    assert isinstance(store, MemoryStore)
    got = asyncio.run(recover(store, settings, topic, 1))
    assert got.records == 20_005 and store.count(1) == 20_000
    assert store.get(1, b'"c00004"') == b"\x01v2-4" and store.get(1, b'"c00005"') == b"\x01v1-5"
    assert asyncio.run(recover(store, settings, topic, 0)).records == 0  # an empty partition


def test_a_store_ahead_of_its_changelog_is_rebuilt(changelog, tmp_path):
    settings, topic = changelog
    produce(settings.bootstrap_servers, topic, customers(3, 1))
    store = RocksStore(tmp_path / "db")
    store.open(1)
    store.write(1, [(b'"stale"', b"\x01old")], 500)  # e.g. the topic was recreated since
    got = asyncio.run(recover(store, settings, topic, 1))
    assert (got.start, got.records) == (0, 3)
    assert store.get(1, b'"stale"') is None and store.offset(1) == 2
    store.close_all()


def test_states_reach_the_store_only_once_the_changelog_has_them(tmp_path):
    """take -> (publish fails) restore -> take again -> written: the store gets exactly the bytes
    published, with their offset; a state changed meanwhile stays changed."""
    from datetime import datetime, timezone

    from features.aggregate import Folder, contribution
    from features.contract import Line, TransactionEvent
    from features.state_record import decode_state
    from stream.state_writes import States, encode_key

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
        states.written({0: 41})
        assert store.offset(0) == 41
        assert store.get(0, encode_key("c1")) == records[0][3]
        assert decode_state(records[0][3]).totals() == (200, 1, 1)
        assert states.open(0).get("c1").totals() == (400, 2, 2)  # still the newer, changed state
        assert [r[2] for r in states.take()] == [encode_key("c1")]  # and written with the next
        store.close_all()
