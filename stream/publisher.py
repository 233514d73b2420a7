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

from stream.settings import Settings

Record = tuple[str, int, bytes, bytes]  # topic, partition, key, value


class BatchPublisher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None

    async def _started(self) -> AIOKafkaProducer:
        if self.producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap_servers,
                                        acks="all", max_batch_size=1 << 20, linger_ms=0,
                                        **self.settings.kafka_client_options())
            await producer.start()
            self.producer = producer
        return self.producer

    async def publish(self, records: Iterable[Record]) -> int:
        """Send and wait for the broker's acknowledgement of every record; returns how many."""
        by_partition: dict[tuple[str, int], list[tuple[bytes, bytes]]] = defaultdict(list)
        n = 0
        for topic, partition, key, value in records:
            by_partition[(topic, partition)].append((key, value))
            n += 1
        if not n:
            return 0
        producer = await self._started()
        pending: list[Any] = []
        for (topic, partition), items in by_partition.items():
            batch = producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
        return n

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
