"""Operator commands to the running workers, sent through the control topic.

The control topic has the partition count of `transactions` and the workers consume it in the
same group, so a command sent to partition p reaches whichever worker owns p now or next.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer

from stream.replay import all_topics, ensure_topics
from stream.settings import Settings


async def rescore_all(settings: Settings) -> int:
    """Ask every partition's owner to rescore all its customers; returns partitions asked."""
    await ensure_topics(settings, all_topics(settings))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", **settings.kafka_client_options()
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(settings.control_topic))
        body = json.dumps({"command": "rescore_all", "requested_at": datetime.now(timezone.utc).isoformat()}).encode()
        for p in partitions:
            await producer.send_and_wait(settings.control_topic, body, partition=p)
    finally:
        await producer.stop()
    return len(partitions)
