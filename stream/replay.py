"""`clv replay`: publish a transaction file as invoice events in event-time order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from features.contract import TransactionEvent
from stream.settings import Settings

log = logging.getLogger("clv.replay")


@dataclass
class ReplaySummary:
    events: int
    lines: int
    customers: int
    seconds: float
    first_ts: str | None
    last_ts: str | None

    def render(self) -> str:
        rate = self.events / self.seconds if self.seconds else 0.0
        return (
            f"published {self.events:,} invoice events ({self.lines:,} lines, {self.customers:,} customers) "
            f"in {self.seconds:.1f}s ({rate:,.0f}/s); event time {self.first_ts} .. {self.last_ts}"
        )


async def ensure_topics(settings: Settings, topics: dict[str, dict[str, str]]) -> dict[str, int]:
    """Create missing topics with the configured partition count, replication factor and
    min.insync.replicas (and their own configs). Existing topics are left as they are. Returns
    the partition count of each topic, as the broker describes it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **settings.kafka_client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                name,
                settings.partitions,
                settings.replication_factor,
                topic_configs={**settings.topic_configs(), **cfg},
            )
            for name, cfg in topics.items()
            if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process created it meanwhile
                await admin.create_topics(new)
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(list(topics))}
    finally:
        await admin.close()


def all_topics(settings: Settings) -> dict[str, dict[str, str]]:
    return {
        settings.transactions_topic: {},
        settings.scores_topic: {"cleanup.policy": "compact"},
        settings.dlq_topic: {},
        settings.control_topic: {},
    }


async def publish(
    settings: Settings, events: Iterable[TransactionEvent], total: int, rate: float | None = None, progress: bool = True
) -> ReplaySummary:
    """Keyed by customer id; `rate` caps events per second (None: as fast as the broker takes)."""
    from tqdm import tqdm

    await ensure_topics(settings, all_topics(settings))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        linger_ms=5,
        max_batch_size=262144,
        acks="all",
        **settings.kafka_client_options(),
    )
    await producer.start()
    started = time.monotonic()
    n = lines = 0
    customers: set[str] = set()
    first = last = None
    bar = tqdm(total=total, unit="ev", disable=not progress, mininterval=0.5)
    try:
        pending = []
        for ev in events:
            pending.append(await producer.send(settings.transactions_topic, ev.to_json(), key=ev.customer_id.encode()))
            n += 1
            lines += len(ev.lines)
            customers.add(ev.customer_id)
            first = first or ev.ts.isoformat()
            last = ev.ts.isoformat()
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
            bar.update(1)
            if rate:
                ahead = n / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        bar.close()
        await producer.stop()
    return ReplaySummary(n, lines, len(customers), time.monotonic() - started, first, last)
