"""`clv snapshot`: consume `clv-scores` and publish DuckDB snapshots every few seconds.

The snapshot is also the sink's checkpoint: it records the next offset of every partition it
covers, and a restarted sink loads the newest snapshot and reads on from those offsets (from the
beginning when there is none). No consumer group is needed, and what a snapshot contains always
matches the offsets it names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from features.scores import parse_score
from state import snapshot
from state.snapshot import SnapshotState
from stream.replay import all_topics, ensure_topics
from stream.settings import Settings

log = logging.getLogger("clv.snapshot")


class Sink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = Path(settings.snapshot_path)
        self.state = SnapshotState()
        self.changed = False
        self.bad = 0
        self.snapshots = 0

    def fold(self, records: list[Any]) -> None:
        for rec in records:
            self.state.offsets[rec.partition] = rec.offset + 1
            key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
            if rec.value is None and key is not None:  # tombstone: the customer was deleted
                self.changed |= self.state.rows.pop(key, None) is not None
                continue
            score = parse_score(rec.value)
            if isinstance(score, str):
                self.bad += 1
                log.warning("skipped unusable score at %s[%d]@%d: %s", rec.topic, rec.partition,
                            rec.offset, score)
                continue
            self.state.rows[score.customer_id] = snapshot.row(score, rec.partition, rec.offset)
            # Times are UTC ISO-8601 (`iso_time`), whose text orders as the instants do.
            if self.state.newest_event_time is None or score.as_of > self.state.newest_event_time:
                self.state.newest_event_time = score.as_of
            self.changed = True

    def publish(self) -> None:
        started = time.perf_counter()
        rows = snapshot.write(self.path, self.state, self.settings.scores_topic)
        self.changed = False
        self.snapshots += 1
        log.info("snapshot %s: %d customers, offsets %s, %.0f ms", self.path, rows,
                 dict(sorted(self.state.offsets.items())), (time.perf_counter() - started) * 1000)

    async def run(self, stop: asyncio.Event) -> None:
        for tmp in snapshot.remove_leftovers(self.path):
            log.warning("removed %s, left by a sink stopped mid-write", tmp)
        self.state = snapshot.load(self.path)
        if self.state.offsets:
            log.info("resuming from %s: %d customers, offsets %s", self.path,
                     len(self.state.rows), dict(sorted(self.state.offsets.items())))
        scores = self.settings.scores_topic
        await ensure_topics(self.settings, {scores: all_topics(self.settings)[scores]})
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers,
                                    group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_poll_records=10000,
                                    metadata_max_age_ms=5000,  # notices added partitions
                                    fetch_max_wait_ms=self.settings.fetch_wait_ms,
                                    **self.settings.kafka_client_options())
        await consumer.start()
        try:
            assigned = await self._assign(consumer, stop)
            next_write = time.monotonic() + self.settings.snapshot_interval_s
            while not stop.is_set():
                if self._grew(consumer, assigned):
                    assigned = await self._assign(consumer, stop)
                batch = await consumer.getmany(timeout_ms=200, max_records=10000)
                for records in batch.values():
                    self.fold(records)
                if time.monotonic() >= next_write:
                    if self.changed:
                        self.publish()
                    next_write = time.monotonic() + self.settings.snapshot_interval_s
            if self.changed or not self.path.exists():
                self.publish()  # the shutdown snapshot
        finally:
            await consumer.stop()

    async def _assign(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> set[int]:
        topic = self.settings.scores_topic
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and not stop.is_set():
            log.info("waiting for the metadata of topic %s", topic)
            await asyncio.sleep(1.0)
            partitions = consumer.partitions_for_topic(topic)
        partitions = set(partitions or ())
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.state.offsets:
                consumer.seek(tp, self.state.offsets[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        return partitions

    def _grew(self, consumer: AIOKafkaConsumer, assigned: set[int]) -> bool:
        """Partitions added to the scores topic while running (scaling out)."""
        now = consumer.partitions_for_topic(self.settings.scores_topic) or set()
        return bool(set(now) - assigned)


def run(settings: Settings) -> int:
    """Run until SIGTERM or Ctrl-C; both write a final snapshot."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sink = Sink(settings)
        await sink.run(stop)
        log.info("stopped after %d snapshots; %d unusable score messages skipped",
                 sink.snapshots, sink.bad)

    asyncio.run(main())
    return 0
