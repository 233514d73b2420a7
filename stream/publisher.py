"""Scores and changelog records sent in batches per partition, awaited until the broker has them.

One producer call per partition batch instead of one per message, and a flush returns only when
every record is acknowledged: the worker acknowledges the events behind them after that, so its
exactness does not depend on when the framework flushes its own producer.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from state.live.base.partition import Record
from stream.kafka_io import KafkaClient


def home_partition(key: bytes, partitions: int) -> int:
    """The partition a key lives on in every co-partitioned topic: murmur2, as the Java client,
    librdkafka's murmur2_random and aiokafka (so `clv replay`) place keyed messages."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class BatchPublisher:
    def __init__(self, kafka: KafkaClient, publish_timeout_s: float) -> None:
        self.kafka, self.publish_timeout_s = kafka, publish_timeout_s
        self.producer: AIOKafkaProducer | None = None

    async def _started(self) -> AIOKafkaProducer:
        if self.producer is None:
            # A batch the broker has not acknowledged within the timeout fails instead of being
            # retried by the client unseen: the worker's flush policy retries it, and says so.
            producer = AIOKafkaProducer(
                bootstrap_servers=self.kafka.bootstrap_servers,
                acks="all",
                max_batch_size=1 << 20,
                linger_ms=0,
                request_timeout_ms=int(self.publish_timeout_s * 1000),
                **self.kafka.kafka_client_options(),
            )
            await producer.start()
            self.producer = producer
        return self.producer

    async def publish(self, records: Iterable[Record]) -> dict[tuple[str, int], int]:
        """Send and wait for the broker's acknowledgement of every record; returns the offset of
        the last record per topic partition (-1 where the broker did not say)."""
        by_partition: dict[tuple[str, int], list[tuple[bytes, bytes]]] = defaultdict(list)
        for topic, partition, key, value in records:
            by_partition[(topic, partition)].append((key, value))
        if not by_partition:
            return {}
        producer = await self._started()
        pending: list[tuple[tuple[str, int], int, Any]] = []  # (tp, records in batch, future)
        for (topic, partition), items in by_partition.items():
            batch, n = producer.create_batch(), 0
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full
                    pending.append(
                        ((topic, partition), n, await producer.send_batch(batch, topic, partition=partition))
                    )
                    batch, n = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None)
                n += 1
            pending.append(((topic, partition), n, await producer.send_batch(batch, topic, partition=partition)))
        acked = await asyncio.gather(*(future for _, _, future in pending))
        last: dict[tuple[str, int], int] = {}
        for (tp, n, _), meta in zip(pending, acked):
            base = getattr(meta, "offset", -1)
            last[tp] = max(last.get(tp, -1), base + n - 1 if base is not None and base >= 0 else -1)
        return last

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
