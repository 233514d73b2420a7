"""`clv snapshot`: consume `clv-scores` and publish DuckDB snapshots every few seconds.

The snapshot is also the sink's checkpoint: it records the next offset of every partition it
covers, and a restarted sink starts from the newest snapshot and reads on from those offsets
(from the beginning when there is none). No consumer group is needed, and what a snapshot
contains always matches the offsets it names. Between snapshots the newest score per customer
lives in DuckDB (`state.snapshot.tables.Snapshots`), not in Python, so memory stays bounded whatever
the customer count. A message the score contract refuses is counted, logged with its partition
and offset, and skipped.

Each snapshot also carries the drivers of its top customers' scores (`snapshot_drivers_top`,
`stream.drivers`) and every customer's predictive distribution of spend (`snapshot_distributions`,
`stream.distributions`): for those the sink reads the worker's state changelog too, from its start
at every start of the sink, into one copy of the customer states (`stream.state_copy`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from export_onnx import ArtifactError
from export_onnx.runtime import Artifact
from features.scores import SCORE_SCHEMA_VERSION, IsoTime, Offset, ScoreRecord, parse_score
from state.snapshot import tables as snapshot
from stream.distributions import Distributions
from stream.drivers import TopDrivers
from stream.kafka_io import started_consumer
from stream.replay import all_topics, ensure_topics
from stream.settings import Settings
from stream.state_copy import StateCopy

log = logging.getLogger("clv.snapshot")


class Sink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = Path(settings.snapshot_path)
        self.store = snapshot.Snapshots(self.path, settings.scores_topic, settings.snapshot_memory_mb)
        self.changed = False
        self.bad = 0
        self.snapshots = 0
        self.states, self.drivers, self.distributions = with_model(settings)

    def fold(self, records: list[Any]) -> None:
        for rec in records:
            self.store.offsets[rec.partition] = rec.offset + 1
            key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
            if rec.value is None and key is not None:  # tombstone: the customer was deleted
                self.store.put(key, None)
                self.changed = True
                continue
            score = parse_score(rec.value)
            if isinstance(score, str):
                self.bad += 1
                log.warning("skipped unusable score at %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, score)
                continue
            self.store.put(score.customer_id, snapshot.row(score, rec.partition, rec.offset))
            self.changed = True

    def publish(self) -> int:
        """Publish a snapshot, with the drivers of its top customers and the distributions of
        the customers whose score changed; returns its customers."""
        started = time.perf_counter()
        drivers = self.drivers.rows(self.store.top(self.drivers.top)) if self.drivers else []
        if self.distributions:
            self.distributions.start()
            for changed in self.store.undistributed(self.distributions.version):
                self.store.keep_distributions(self.distributions.rows(changed))
        rows = self.store.publish(drivers)
        self.changed = False
        self.snapshots += 1
        log.info(
            "snapshot %s: %d customers, offsets %s, %.0f ms; %d unusable score messages skipped so far",
            self.path,
            rows,
            dict(sorted(self.store.offsets.items())),
            (time.perf_counter() - started) * 1000,
            self.bad,
        )
        return rows

    async def run(self, stop: asyncio.Event) -> None:
        for tmp in snapshot.remove_leftovers(self.path):
            log.warning("removed %s, left by a sink stopped mid-write", tmp)
        customers = self.store.open()
        try:
            await self._run(stop, customers)
        finally:
            self.store.close()

    async def _run(self, stop: asyncio.Event, customers: int) -> None:
        if self.store.offsets:
            log.info(
                "resuming from %s: %d customers, offsets %s",
                self.path,
                customers,
                dict(sorted(self.store.offsets.items())),
            )
        scores, changelog = self.settings.scores_topic, self.settings.changelog_topic
        topics = {scores: all_topics(self.settings)[scores]}
        if self.states:  # as the worker and the bootstrap create it
            topics[changelog] = {"cleanup.policy": "compact"}
        await ensure_topics(self.settings, topics)
        consumer = await started_consumer(
            self.settings, auto_offset_reset="earliest", max_poll_records=10000, metadata_max_age_ms=5000
        )  # notices added partitions
        try:
            assigned = await self._assign(consumer, stop)
            next_write = time.monotonic() + self.settings.snapshot_interval_s
            while not stop.is_set():
                if self._grew(consumer, assigned):
                    assigned = await self._assign(consumer, stop)
                batch = await consumer.getmany(timeout_ms=200, max_records=10000)
                for tp, records in batch.items():
                    if tp.topic == scores:
                        self.fold(records)
                    elif self.states:
                        self.states.fold(tp.partition, records)
                if time.monotonic() >= next_write:
                    if self.changed or self._waiting():
                        self.publish()
                    next_write = time.monotonic() + self.settings.snapshot_interval_s
            if self.changed or not self.path.exists() or self._waiting():
                self.publish()  # the shutdown snapshot
        finally:
            await consumer.stop()

    def _waiting(self) -> bool:
        """A snapshot lacked drivers or distributions for want of states that arrived since."""
        return any(part.waiting() for part in (self.drivers, self.distributions) if part)

    async def _assign(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> set[int]:
        """Every partition of the scores topic (and of the state changelog, which is
        co-partitioned with it, for the drivers and distributions), each from where the sink has
        read to."""
        topic = self.settings.scores_topic
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and not stop.is_set():
            log.info("waiting for the metadata of topic %s", topic)
            await asyncio.sleep(1.0)
            partitions = consumer.partitions_for_topic(topic)
        partitions = set(partitions or ())
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        states = (
            [
                TopicPartition(self.settings.changelog_topic, p)
                for p in sorted(consumer.partitions_for_topic(self.settings.changelog_topic) or ())
            ]
            if self.states
            else []
        )
        consumer.assign(tps + states)
        for tp in tps:
            if tp.partition in self.store.offsets:
                consumer.seek(tp, self.store.offsets[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        for tp in states:  # only with a state copy
            consumer.seek(tp, self.states.next_offset(tp.partition) if self.states else 0)
        return partitions

    def _grew(self, consumer: AIOKafkaConsumer, assigned: set[int]) -> bool:
        """Partitions added to the scores topic while running (scaling out)."""
        now = consumer.partitions_for_topic(self.settings.scores_topic) or set()
        return bool(set(now) - assigned)


def with_model(settings: Settings) -> tuple[StateCopy | None, TopDrivers | None, Distributions | None]:
    """The copy of the customer states, what explains the top customers' scores and what computes
    distributions: None for a part not asked for, or one the model cannot give (a model that
    carries no reference customer gives no drivers, one trained before the distribution none: the
    log says why); no state copy when neither is made. A model directory that holds no usable
    model is an ArtifactError, as for every command."""
    if not settings.snapshot_drivers_top and not settings.snapshot_distributions:
        return None, None, None
    artifact, states = Artifact.load(settings.model_dir or None), StateCopy()
    drivers = distributions = None
    if settings.snapshot_drivers_top:
        try:
            drivers = TopDrivers(artifact, settings.snapshot_drivers_top, states)
        except ArtifactError as exc:
            log.warning("snapshots carry no drivers: %s", exc)
    if settings.snapshot_distributions:
        try:
            distributions = Distributions(artifact, states)
        except ArtifactError as exc:
            log.warning("snapshots carry no distributions: %s", exc)
    return (states if drivers or distributions else None), drivers, distributions


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
        log.info("stopped after %d snapshots; %d unusable score messages skipped", sink.snapshots, sink.bad)

    asyncio.run(main())
    return 0


def bench_score() -> ScoreRecord:
    """The score the benchmarks' customers start from (`replace` gives each its own)."""
    return ScoreRecord(
        schema_version=SCORE_SCHEMA_VERSION,
        customer_id="",
        clv=0.0,
        clv_low=0.0,
        clv_high=0.0,
        clv_sd=0.0,
        p_purchase=0.4,
        recency_days=30.0,
        frequency=3,
        monetary=40.0,
        tenure_days=400.0,
        total_spend=120.0,
        segment="regular",
        cluster="",
        country="",
        horizon_months=6,
        model_version="gru-bench",
        as_of=IsoTime("2011-12-09T12:50:00+00:00"),
        scored_at=IsoTime("2026-12-02T12:00:00+00:00"),
        event_offset=Offset(-1),
    )


def bench(customers: int, workdir: Path, settings: Settings, batch: int = 10_000) -> dict[str, Any]:
    """The sink's own fold and publish for `customers` customers, without the broker: score
    messages handed over in consumer-sized batches (parsed, merged into DuckDB), a snapshot,
    then a tenth of the customers rescored and a second snapshot. Peak RSS is the process's."""

    from dataclasses import replace

    from aiokafka.structs import ConsumerRecord

    from features.scores import encode_score
    from features.segments import SEGMENTS

    settings = settings.model_copy(
        update={
            "snapshot_path": str(workdir / "clv.duckdb"),
            "snapshot_drivers_top": 0,
            "snapshot_distributions": False,
        }
    )
    for old in Path(workdir).glob("*clv.duckdb*"):
        old.unlink()
    sink = Sink(settings)
    sink.store.open()
    rss_before = _peak_rss_mb()
    template = bench_score()
    offsets = [0] * settings.partitions

    def fold(ids: range, clv_scale: float) -> float:
        """Seconds the sink spent on the messages (not making them)."""
        spent = 0.0
        for start in range(0, len(ids), batch):
            records = []
            for i in ids[start : start + batch]:
                cid = f"c{i:08d}"
                value = encode_score(
                    replace(
                        template,
                        customer_id=cid,
                        clv=(i * 7919 % 10_007) * clv_scale,
                        segment=SEGMENTS[i % len(SEGMENTS)],
                    )
                )
                p = i % settings.partitions
                records.append(
                    ConsumerRecord(
                        settings.scores_topic, p, offsets[p], 0, 0, cid.encode(), value, None, len(cid), len(value), ()
                    )
                )
                offsets[p] += 1
            started = time.perf_counter()
            sink.fold(records)
            spent += time.perf_counter() - started
        return spent

    try:
        first_fold = fold(range(customers), 0.01)
        started = time.perf_counter()
        sink.publish()
        first = time.perf_counter() - started
        again_fold = fold(range(0, customers, 10), 0.02)
        started = time.perf_counter()
        rows = sink.publish()
        second = time.perf_counter() - started
    finally:
        sink.store.close()
    return {
        "customers": customers,
        "rows": rows,
        "fold_messages_per_s": round((customers + len(range(0, customers, 10))) / (first_fold + again_fold)),
        "first_snapshot_seconds": round(first, 2),
        "snapshot_seconds": round(second, 2),
        "snapshot_mb": round(Path(settings.snapshot_path).stat().st_size / 2**20, 1),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "duckdb_memory_limit_mb": settings.snapshot_memory_mb,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
