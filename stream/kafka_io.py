"""Reading partitions to their true end.

The end of a partition is taken from fetch responses (their high watermark), never from
ListOffsets alone: the embedded broker answers ListOffsets(latest) with the base offset of the
last record batch + 1, so a reader that trusts it stops short of the batch's other records.
On Apache Kafka both agree and these functions cost one extra fetch.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition


class KafkaClient(Protocol):
    """What every Kafka client of the product needs (`stream.settings.Settings` has it): where the
    brokers are, how to authenticate, how long a fetch may wait."""

    @property
    def bootstrap_servers(self) -> str: ...

    @property
    def fetch_wait_ms(self) -> int: ...

    def kafka_client_options(self) -> dict[str, Any]: ...


async def started_consumer(kafka: KafkaClient, **options: Any) -> AIOKafkaConsumer:
    """A started consumer without a group (the caller assigns partitions); one that cannot
    start (no broker) is closed before the error rises.

    It yields to the event loop once before it is returned: aiokafka's group-less consumer
    starts a background task in `start()` and `stop()` cancels it; a task cancelled before it
    first ran makes `stop()` raise CancelledError, so a process asked to stop right after it
    started (SIGTERM during start-up) would end with a traceback instead of cleanly."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=kafka.fetch_wait_ms,
        **options,
        **kafka.kafka_client_options(),
    )
    try:
        await consumer.start()
        await asyncio.sleep(0)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


BULK_FETCH_BYTES = 1 << 20  # per partition fetch; 4 and 32 MB raised peak memory, not the rate


async def read_partition(kafka: KafkaClient, topic: str, partition: int, start: int = 0) -> AsyncIterator[list[Any]]:
    """Batches of up to 10,000 records of one partition from `start` to its end as of the
    first fetch (a recovery reads whole partitions)."""
    consumer = await started_consumer(
        kafka, max_partition_fetch_bytes=BULK_FETCH_BYTES, fetch_max_bytes=BULK_FETCH_BYTES
    )
    tp = TopicPartition(topic, partition)
    try:
        consumer.assign([tp])
        consumer.seek(tp, max(start, 0))
        end = None
        while True:
            records = (await consumer.getmany(tp, timeout_ms=500, max_records=10_000)).get(tp, [])
            if end is None:
                end = consumer.highwater(tp)
            if records:
                yield [r for r in records if end is None or r.offset < end]
            position = await consumer.position(tp)
            if end is not None and position >= end:
                return
            if not records and end is None:
                return  # no fetch answer with a watermark: nothing to read
    finally:
        await consumer.stop()


async def end_offsets(kafka: KafkaClient, topic: str) -> dict[int, int]:
    """The next offset of every partition of `topic`: how far a reader must get to be current."""
    consumer = await started_consumer(kafka)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        listed = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:  # one fetch from just before the listed end reports the real watermark
            consumer.seek(tp, max(listed[tp] - 1, 0))
        out: dict[int, int] = {}
        for _ in range(20):
            await consumer.getmany(timeout_ms=250)
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is not None:
                    out[tp.partition] = max(hw, listed[tp])
            if len(out) == len(tps):
                break
        return {tp.partition: out.get(tp.partition, listed[tp]) for tp in tps}
    finally:
        await consumer.stop()


class KafkaChangelog:
    """A state changelog topic, as recovery reads it (`state.live.recovery.Changelog`)."""

    def __init__(self, kafka: KafkaClient, topic: str) -> None:
        self.kafka, self.topic = kafka, topic

    async def end(self, partition: int) -> int:
        return (await end_offsets(self.kafka, self.topic)).get(partition, 0)

    def read(self, partition: int, start: int) -> AsyncIterator[list[Any]]:
        return read_partition(self.kafka, self.topic, partition, start)
