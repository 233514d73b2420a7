"""The faust worker: validate, fold into per-customer state, rescore in micro-batches, publish.

Exactness: every customer state lives in a store backed by a changelog co-partitioned with
`transactions` (stream.state_writes, stream.stores) and remembers the highest offset (and keys of
the window's event ids) it has applied, so a redelivered event changes nothing. Events are
acknowledged only after the scores of the customers they touched have been handed to the
producer (while their partition catches up: after the partition's record saying its scores are
older than its clock, see Time), and faust flushes the producer before it commits offsets: a
crash before that point redelivers the events, which mark their customers dirty again (even when
already applied), so no score is lost either. A flush that fails is retried, never dropped, and bounded in time
(stream.flush_policy).

Time: the worker's clock is the newest event time it has seen on any of its partitions; each
partition also keeps its own newest event. Scores are as of the worker's clock, so a partition
that receives nothing still ages: when the worker's clock enters a new month every customer of
every partition it owns is rescored, in batches, between events. What is too late (older than
the window) follows the partition's own clock: a partition that lags the others (taken over with
a backlog) applies its backlog instead of refusing it. Catching up (a restart, a takeover with a
backlog), a partition's rescoring waits until it has processed what it received, and the
customers of the events meanwhile are left to it: each is published once, as of the clock caught
up to, not once per micro-batch and month crossed.

Routing: an event keyed by its customer but on another partition than murmur2 maps the key to
(a publisher with another partitioner) is re-published to the customer's partition and applied
there, never folded into a second copy of the customer on the wrong one.

Taking over a partition: its store is brought up to the changelog (stream.recovery: the whole
partition into an empty store, only the tail into a rocksdb directory of its own), then the
partition's own changelog record gives the clock and the month every customer has a score for;
when that month is earlier than the clock (a month-turn rescoring the previous owner did not
finish), every customer of the partition is rescored. Nothing is read from `clv-scores`.
Customers scored by another model version are left alone: a new model reaches them lazily with
their next event, or all at once with `clv rescore-all` (a command per partition on the control
topic).
"""

from __future__ import annotations

import asyncio
import gc
import json
import itertools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import faust
from faust.exceptions import NotReady
from faust.types import TP as TopicPartition

from export_onnx.artifact import Artifact
from features.aggregate import Applied, Folder, contribution, month_of, month_start
from features.contract import Invalid, Reason, TransactionEvent, validate
from features.scores import ScoreRecord, as_dict, encode_score
from stream.auth import guard, is_loopback, require_token
from stream.flush_policy import FlushFailures
from stream.metrics import Metrics
from stream.scoring import assemble, prepare, score_separately, score_states
from stream.publisher import BatchPublisher, Record, home_partition
from stream.recovery import recover
from stream.settings import Settings
from stream.state_writes import PartitionStates, States
from stream.stores import open_store

log = logging.getLogger("clv.worker")
PROBE_PATHS = frozenset({"/health", "/ready"})  # open to orchestrators' probes on any address
RESCAN_DEFER_S = 60.0  # longest a rescan waits for its partition to catch up
INLINE_SCORING_LIMIT = 128  # customers; below it the model runs on the event loop (~25 us each)


def _credentials(settings: Settings) -> Any:
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=settings.kafka_client_options().get("ssl_context"),
        )
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(settings.kafka_client_options()["ssl_context"])
    return None


@dataclass
class Rescan:
    """A rescoring of every customer of a partition (month turn, takeover, rescore-all), walked
    from the store in chunks so intake goes on meanwhile and no list of customers is held. The
    walk starts with the first chunk, so it meets every customer the partition has by then."""

    month: int | None  # every customer is scored as of this month or later once it is done
    remaining: int  # an estimate, for the backlog gauge
    queued: float = field(default_factory=time.monotonic)
    customers: Iterator[str] | None = None  # the walk, once started


class Rescorer:
    """Dirty customers per partition, flushed at `batch_size` customers or `batch_wait_ms`."""

    def __init__(self, app: faust.App, settings: Settings, artifact: Artifact,
                 states: States, metrics: Metrics) -> None:
        self.app, self.settings, self.artifact, self.states = app, settings, artifact, states
        self.publisher = BatchPublisher(settings)
        self.metrics = metrics
        self.folders: dict[int, Folder] = {}
        self.clock_ts: dict[int, int] = {}
        self.group_ts = 0  # newest event time on any partition this worker has owned
        # partition -> customer -> when an event first made it dirty (None: a rescan did)
        self.dirty: dict[int, dict[str, float | None]] = {}
        self.backlog: dict[int, Rescan] = {}  # month-turn / takeover / rescore-all rescoring
        self.pending_acks: list[Any] = []
        self.position: dict[int, int] = {}  # next offset to process, per partition
        self.started: dict[int, int] = {}  # first offset received since assignment (committed)
        self.failures = FlushFailures(settings.flush_failure_timeout_s)
        self.oldest_dirty: float | None = None
        self.taken: set[int] = set()  # partitions whose takeover has run
        self.taking: dict[int, asyncio.Future[None]] = {}
        self.flushing: asyncio.Future[None] | None = None
        self.lock = asyncio.Lock()
        self.stream: Any = None
        self.stopping = False  # set at shutdown: nothing is acknowledged after the final flush

    # -- partitions -----------------------------------------------------------------------
    async def take_over(self, partition: int) -> None:
        """Once per assignment, before any event of the partition is applied: recover its
        states, set its clock, queue a rescoring when the partition's scores are older than it.
        Returns quietly when the partition is revoked meanwhile."""
        if partition in self.taken:
            return
        task = self.taking.get(partition)
        if task is None:
            task = self.taking[partition] = asyncio.ensure_future(self._take_over(partition))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we were cancelled, not the takeover
        finally:
            if task.done():
                self.taking.pop(partition, None)

    async def _take_over(self, partition: int) -> None:
        got = await recover(self.states.store, self.settings, self.states.topic, partition)
        self.metrics.recovered_records.inc(got.records)
        self.metrics.recovery_seconds.inc(got.seconds)
        states = self.states.open(partition)
        meta = states.meta
        customers = self.states.store.count(partition)
        if meta is None:  # a changelog written before partition records: read every state
            newest = max((s.newest_ts or 0 for s in map(states.__getitem__, states.customers())),
                         default=0)
            scored_month, model = None, ""
        else:
            newest, scored_month, model = meta.clock_ts, meta.scored_month, meta.model
        if newest > self.group_ts:  # the partitions already owned age to it
            self._age(newest)
        self.clock_ts[partition] = newest
        # The window (what is too late) follows the partition's own events: the worker's clock
        # may be ahead of events still waiting on this partition.
        clock = month_of(datetime.fromtimestamp(newest, timezone.utc)) if newest else None
        self.folders[partition] = Folder(self.artifact.window, states, clock)
        month = month_of(self._as_of(partition)) if newest or self.group_ts else None
        stale = month is not None and customers > 0 and (scored_month or 0) < month
        if stale:
            self._rescan(partition, month)
        self.taken.add(partition)
        log.info("partition %d taken over: %d customers, %d changelog records from offset %d in "
                 "%.2fs (%.0f/s), clock %s; %s%s", partition, customers, got.records, got.start,
                 got.seconds, got.per_second, _month_text(clock),
                 f"rescoring all, their scores being as of {_month_text(scored_month)}, before "
                 f"{_month_text(month)}" if stale else "scores current",
                 f"; its customers carry another model version ({model}; rescored on their next "
                 f"event or by `clv rescore-all`)" if model and model != self.artifact.version
                 else "")

    def _rescan(self, partition: int, month: int | None) -> int:
        """Queue every customer of the partition for rescoring (replacing a rescan under way)."""
        n = self.states.store.count(partition)
        self.backlog[partition] = Rescan(month, n)
        return n

    def rescore_all(self, partition: int) -> int:
        """Queue every customer of the partition (a model rollout)."""
        if partition not in self.folders:
            return 0
        return self._rescan(partition, month_of(self._as_of(partition)))

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions: their unacked events go to the new owner, which rescores them.
        Their processing position goes too: assigned again later, a partition is read from its
        committed offset, and a position from before would show its lag as nil."""
        for p in partitions:
            task = self.taking.pop(p, None)
            if task is not None:
                task.cancel()
            for d in (self.folders, self.clock_ts, self.dirty, self.backlog, self.position,
                      self.started):
                d.pop(p, None)
            self.states.forget(p)
            self.taken.discard(p)
        self.pending_acks = [e for e in self.pending_acks if e.message.partition not in partitions]

    def _as_of(self, partition: int) -> datetime:
        """The clock a partition's scores are as of: its own newest event, or the worker's when
        that is later (a quiet partition ages with the others)."""
        return datetime.fromtimestamp(max(self.clock_ts.get(partition, 0), self.group_ts),
                                      timezone.utc)

    def _age(self, ts: int) -> None:
        """Move the worker's clock to `ts`; when it enters a new month, every customer of every
        partition the worker owns is queued for rescoring, whether its partition saw the event
        or not (scores are as of the worker's clock; see `_as_of`)."""
        before, self.group_ts = self.group_ts, ts
        month = month_of(datetime.fromtimestamp(ts, timezone.utc))
        if not before or month_of(datetime.fromtimestamp(before, timezone.utc)) >= month:
            return
        for partition in self.folders:
            n = self._rescan(partition, month)
            log.info("entered %s: rescoring the %d customers of partition %d",
                     self._as_of(partition).strftime("%Y-%m"), n, partition)

    # -- intake -----------------------------------------------------------------------------
    def apply(self, event: TransactionEvent, partition: int, offset: int) -> str:
        folder = self.folders[partition]
        before = folder.clock
        outcome = folder.add(event.customer_id, contribution(event), partition, offset)
        if outcome == Applied.TOO_LATE:
            return outcome
        ts = int(event.ts.timestamp())
        if ts > self.clock_ts.get(partition, 0):
            self.clock_ts[partition] = ts
            self._record(partition)
        if before is None and partition not in self.backlog:
            # The partition's first event: no customer has an older score. With a rescan waiting
            # for the partition to catch up, that rescan says so once it is done.
            self._record(partition, scored_month=month_of(self._as_of(partition)),
                         model=self.artifact.version)
        if ts > self.group_ts:
            self._age(ts)
        # Applied or not, its customer's score may not be out yet.
        self.mark(partition, event.customer_id)
        return outcome

    def mark(self, partition: int, customer_id: str, event: bool = True) -> None:
        """Queue the customer for the next flush; `event`: an event made it dirty (its wait
        counts in the receive-to-publish histogram), else a rescan. Not queued when its
        partition's rescan is to score it (`_rescan_covers`)."""
        now = time.monotonic()
        if event and self._rescan_covers(partition, now):
            return
        self.dirty.setdefault(partition, {}).setdefault(customer_id, now if event else None)
        if self.oldest_dirty is None:
            self.oldest_dirty = now

    def dirty_count(self) -> int:
        return sum(len(d) for d in self.dirty.values())

    def due(self) -> bool:
        """A flush is due: a full micro-batch, or its oldest customer has waited batch_wait_ms,
        or only acknowledgements wait; after a failure, not before the backoff has passed."""
        if not self.failures.may_retry():
            return False
        if self.dirty_count() >= self.settings.batch_size:
            return True
        if self.oldest_dirty is None:
            return bool(self.pending_acks)
        return (time.monotonic() - self.oldest_dirty) * 1000 >= self.settings.batch_wait_ms

    # -- scoring ----------------------------------------------------------------------------
    async def flush(self) -> None:
        """Score every dirty customer; publish the scores with the changelog records of the
        states behind them and wait for the broker; then acknowledge the events. A failure
        puts all of it back for the next attempt (stream.flush_policy), whichever path called."""
        if self.stopping:
            return
        async with self.lock:
            dirty, self.dirty, self.oldest_dirty = self.dirty, {}, None
            acks, self.pending_acks = self.pending_acks, []
            try:
                records = self.states.take()
                for partition, customers in dirty.items():
                    if partition in self.folders:
                        records += await self._score(partition, customers)
                offsets = await self._send(records, dirty)
            except BaseException as exc:
                self._put_back(dirty, acks)
                if not isinstance(exc, Exception):
                    raise  # cancelled: the caller is stopping
                self.metrics.flush_failures.inc()
                self.failures.failed(exc)
                return
            self.failures.succeeded()
            self.states.written({p: o for (t, p), o in offsets.items() if t == self.states.topic})
            for event in acks:
                await self.stream.ack(event)

    def _put_back(self, dirty: dict[int, dict[str, float | None]], acks: list[Any]) -> None:
        """A flush that failed: its customers are dirty again (keeping when they first were),
        its acknowledgements wait again, its changelog records go out with the next attempt."""
        self.states.restore()
        for partition, customers in dirty.items():
            if partition in self.folders:
                mine = self.dirty.setdefault(partition, {})
                for customer_id, since in customers.items():
                    mine[customer_id] = since if since is not None else mine.get(customer_id)
        self.pending_acks = acks + self.pending_acks
        if self.dirty and self.oldest_dirty is None:
            self.oldest_dirty = time.monotonic()

    def flush_soon(self) -> None:
        """Start a flush unless one is running (the running one is followed by the next tick's);
        after a failure it first waits out the backoff."""
        if not self.lock.locked() and (self.flushing is None or self.flushing.done()):
            self.flushing = asyncio.ensure_future(self._flush_after(self.failures.wait()))

    async def _flush_after(self, seconds: float) -> None:
        if seconds:
            await asyncio.sleep(seconds)
        await self.flush()

    async def hold_intake(self) -> None:
        """Backpressure: with a micro-batch's worth of customers waiting (to be scored, or,
        their partition catching up, only to have their states written), intake waits for the
        flush (and, while flushes fail, for its retries), so neither the changed customers nor
        the unacknowledged events grow without bound while the broker refuses writes."""
        while (max(self.dirty_count(), self.states.changed()) >= self.settings.batch_size
               and not self.stopping):
            self.flush_soon()
            if self.flushing is None or self.flushing.done():
                await asyncio.sleep(self.settings.batch_wait_ms / 1000)  # the lock's holder flushes
            else:
                await asyncio.shield(self.flushing)

    def drain_backlog(self) -> None:
        """One chunk of month-turn/takeover rescoring per call, marked dirty for the next flush,
        so intake keeps going; a rescan done is recorded in the partition's changelog record with
        that flush. Nothing is added while flushes fail or a micro-batch is already waiting. A
        partition with events still to process waits (up to RESCAN_DEFER_S): its clock is about
        to move on (catching up on history, every month would otherwise be rescored), so its
        customers are rescored once, as of the clock it caught up to."""
        if self.failures.failing or self.dirty_count() >= self.settings.batch_size:
            return
        now = time.monotonic()
        for partition, rescan in list(self.backlog.items()):
            if self._waits(partition, rescan, now):
                continue
            if rescan.customers is None:
                rescan.customers = self.states.open(partition).customers()
            chunk = list(itertools.islice(rescan.customers, self.settings.batch_size))
            rescan.remaining = max(rescan.remaining - len(chunk), 1)
            for customer_id in chunk:  # published by the next flush, retried like any other
                self.mark(partition, customer_id, event=False)
            if len(chunk) < self.settings.batch_size and self.backlog.get(partition) is rescan:
                del self.backlog[partition]
                self._record(partition, scored_month=rescan.month, model=self.artifact.version)
            return

    def _waits(self, partition: int, rescan: Rescan, now: float) -> bool:
        """The rescan waits while its partition may have events left to process (not known to
        be caught up), for at most RESCAN_DEFER_S."""
        behind = self._behind(partition)
        return (behind is None or behind > 0) and now - rescan.queued < RESCAN_DEFER_S

    def _rescan_covers(self, partition: int, now: float) -> bool:
        """An event's customer needs no score of its own while its partition catches up: the
        partition's rescan waits for that (`drain_backlog`) and has not started its walk, so it
        scores this customer once, as of the clock caught up to, instead of once per
        micro-batch the customer has events in. A crash before it is done loses nothing: the
        partition's record (in the changelog by the time the event is acknowledged) says its
        scores are older than its own clock, so whoever takes the partition over queues the
        rescan again (`_take_over`)."""
        rescan = self.backlog.get(partition)
        if rescan is None or rescan.customers is not None:
            return False
        meta = self.states.open(partition).meta
        if meta is None or (meta.scored_month or 0) >= month_of(
                datetime.fromtimestamp(meta.clock_ts, timezone.utc)):
            return False
        return self._waits(partition, rescan, now)

    def _behind(self, partition: int) -> int | None:
        """Events of the partition, up to its end as the consumer last heard it, not processed
        yet; None before the consumer has heard. Before the first event since assignment, from
        the group's committed offset (where faust resumed the partition; none: its start)."""
        tp = TopicPartition(self.settings.transactions_topic, partition)
        try:
            high = self.app.consumer.highwater(tp)
        except NotReady:
            return None
        if high is None:
            return None
        done = self.position.get(partition)
        if done is None:
            done = self.app.consumer._committed_offset.get(tp) or 0
        return max(0, high - done)

    def _record(self, partition: int, **changes: Any) -> None:
        """Update the partition's own changelog record (written with the next flush)."""
        states: PartitionStates = self.folders[partition].states  # type: ignore[assignment]
        states.set_meta(clock_ts=self.clock_ts.get(partition, 0), **changes)

    async def _send(self, records: list[Record],
                    dirty: dict[int, dict[str, float]]) -> dict[tuple[str, int], int]:
        started = time.perf_counter()
        offsets = await self.publisher.publish(records)
        now = time.monotonic()
        for customers in dirty.values():
            for since in customers.values():
                if since is not None:
                    self.metrics.freshness.observe(now - since)
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        return offsets

    async def _score(self, partition: int, customers: dict[str, float | None]) -> list[Record]:
        """Score records for the customers, to the partition they live in (so `clv-scores` is
        co-partitioned with `transactions` whatever partitioner the publishers use). A large
        batch runs the model in a thread (onnxruntime releases the GIL), so intake goes on
        meanwhile; a small one (a few ms) runs inline, cheaper than the hand-off."""
        started = time.perf_counter()
        ids = list(customers)
        states = [self.states.open(partition)[c] for c in ids]
        # One clock for the batch: the partition's clock moves on while the model runs in a
        # thread, and a score must carry the as_of its fields were measured at.
        as_of = self._as_of(partition)
        try:
            inputs, fields = prepare(self.artifact, states, as_of)
            if len(ids) >= INLINE_SCORING_LIMIT:
                pred = await asyncio.to_thread(self.artifact.predict, inputs)
            else:
                pred = self.artifact.predict(inputs)
            scores: list[ScoreRecord | Exception] = list(
                assemble(self.artifact, states, fields, pred, as_of))
        except Exception:  # noqa: BLE001  pinned on the customers that cause it, below
            scores = score_separately(self.artifact, states, as_of)
        topic = self.settings.scores_topic
        records: list[Record] = []
        for score, cid in zip(scores, ids):
            if isinstance(score, Exception):
                self.metrics.scoring_errors.inc()
                log.error("customer %s of partition %d not scored as of %s: %s: %s; its state is "
                          "kept, and it is scored again on its next event or month turn", cid,
                          partition, as_of.isoformat(), type(score).__name__, score)
                continue
            records.append((topic, partition, cid.encode(), encode_score(score)))
        self.metrics.rescored.inc(len(records))
        self.metrics.batch_size.observe(len(ids))
        self.metrics.batch_latency.observe(time.perf_counter() - started)
        return records


def _month_text(month: int | None) -> str:
    return "no month" if month is None else month_start(month).strftime("%Y-%m")


def _set_fetch_wait(ms: int) -> None:
    """faust builds its Kafka consumer with a fixed 1.5 s fetch wait; on a broker that holds a
    fetch for its whole wait (the embedded one) that wait lands on every event's latency."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__",
                     AIOKafkaConsumerThread._create_worker_consumer)

    def with_fetch_wait(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = ms  # read when the consumer starts its fetcher
        return consumer

    with_fetch_wait.__wrapped__ = create  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = with_fetch_wait


def _seek_uncommitted_to_start() -> None:
    """faust drops what its consumer fetched while a rebalance held the flow, then seeks every
    partition to its committed offset; a partition with none (its previous owner died or was
    paused before its first commit) stays where the dropped fetches left it, near its end, and
    the events before are never processed. Those partitions go to their earliest offset, as
    `consumer_auto_offset_reset="earliest"` says."""
    from faust.transport.consumer import Consumer

    seek = getattr(Consumer.perform_seek, "__wrapped__", Consumer.perform_seek)

    async def perform_seek(self: Any) -> None:
        await seek(self)
        uncommitted = [tp for tp in self.assignment() if not self._committed_offset.get(tp)]
        if uncommitted:
            for tp, offset in (await self.earliest_offsets(*uncommitted)).items():
                await self.seek(tp, offset)

    perform_seek.__wrapped__ = seek  # type: ignore[attr-defined]
    Consumer.perform_seek = perform_seek


def _web_options(settings: Settings) -> dict[str, Any]:
    """faust's web server also serves its own views (tables, router): off loopback, every path
    but the probes needs the API's bearer token."""
    require_token(settings.web_host, settings.api_token, "web_host")
    if is_loopback(settings.web_host):
        return {}
    return {"middlewares": [guard(settings.api_token, PROBE_PATHS)]}


def build_app(settings: Settings, artifact: Artifact | None = None) -> faust.App:
    """The faust app with its topics, state store, agent, timer and web views."""
    web_options = _web_options(settings)
    artifact = artifact or Artifact.load(settings.model_dir or None)
    _set_fetch_wait(settings.fetch_wait_ms)
    _seek_uncommitted_to_start()
    # Customer states are many long-lived objects: with the default thresholds the collector
    # keeps rescanning them, in pauses that land on event latency. Collect young objects less
    # often and the old generation rarely.
    gc.set_threshold(20_000, 50, 100)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        web_application_options=web_options,
        # Unacknowledged events are redelivered after a restart, so shutdown need not wait.
        stream_wait_empty=False,
    )
    transactions = app.topic(settings.transactions_topic, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw",
                             partitions=settings.partitions)
    app.topic(settings.scores_topic, key_serializer="raw", value_serializer="raw",
              partitions=settings.partitions, compacting=True)
    app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw",
              partitions=settings.partitions)
    control = app.topic(settings.control_topic, key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw", partitions=settings.partitions)
    # The state changelog keeps the name and key encoding of the faust table it replaces, so a
    # changelog written by an earlier worker recovers into the new store.
    changelog = app.topic(settings.changelog_topic, key_serializer="raw",
                          value_serializer="raw", partitions=settings.partitions, compacting=True,
                          replicas=settings.replication_factor, config=settings.topic_configs())
    metrics = Metrics()
    states = States(open_store(settings.store, settings.data_dir, changelog.get_topic_name()),
                    changelog.get_topic_name())
    rescorer = Rescorer(app, settings, artifact, states, metrics)
    app.clv = rescorer  # type: ignore[attr-defined]  # for the web views and tests
    ready = asyncio.Event()
    max_future = timedelta(minutes=settings.max_future_minutes)
    routed = 0  # events routed so far, for the warning's count

    async def dead_letter(raw: bytes, key: bytes | None, reason: str, detail: str,
                          partition: int, offset: int) -> None:
        metrics.dlq.labels(reason=reason).inc()
        headers = [("reason", reason.encode()), ("detail", detail[:500].encode()),
                   ("source_partition", str(partition).encode()),
                   ("source_offset", str(offset).encode()),
                   ("source_topic", settings.transactions_topic.encode())]
        await app.producer.send(settings.dlq_topic, key, raw, None, None, headers)
        log.warning("dead letter %s at %s[%d]@%d: %s", reason, settings.transactions_topic,
                    partition, offset, detail)

    async def route(raw: bytes, msg: Any, home: int) -> None:
        """Re-publish an event to its customer's partition; it is applied when it arrives there.
        Re-published twice (a crash before the commit), it carries the same event_id: once."""
        nonlocal routed
        metrics.routed.inc()
        routed += 1
        headers = [*(msg.headers or ()), ("routed_from_partition", str(msg.partition).encode()),
                   ("routed_from_offset", str(msg.offset).encode())]
        await app.producer.send(settings.transactions_topic, msg.key, raw, home, None, headers)
        if routed == 1 or routed % 10_000 == 0:
            log.warning("%d events so far arrived on another partition than their key's under "
                        "murmur2 and were re-published to it (latest: %s[%d]@%d, key %r, "
                        "partition %d): set the publishers' partitioner to murmur2 (librdkafka: "
                        "partitioner=murmur2_random)", routed,
                        settings.transactions_topic, msg.partition, msg.offset, msg.key[:40], home)

    def checked(raw: bytes, msg: Any) -> TransactionEvent | Invalid:
        """The event, or why it is a dead letter: its payload, then its key."""
        parsed = validate(raw, max_future=max_future)
        if isinstance(parsed, Invalid):
            return parsed
        if msg.key is None:
            return Invalid(Reason.MISSING_KEY, "no message key: events are keyed by customer_id "
                                               f"({parsed.customer_id!r})")
        if msg.key.decode("utf-8", "replace") != parsed.customer_id:
            return Invalid(Reason.KEY_MISMATCH, f"message key {msg.key[:40]!r} is not "
                                                f"customer_id {parsed.customer_id!r}")
        return parsed

    @app.agent(transactions)
    async def process(stream: Any) -> None:
        stream = stream.noack()
        rescorer.stream = stream
        async for event in stream.events():
            if rescorer.stopping:
                continue  # unacknowledged: redelivered to whoever owns the partition next
            ready.set()
            msg = event.message
            if msg.partition not in rescorer.taken:
                await rescorer.take_over(msg.partition)
                if msg.partition not in rescorer.taken:
                    continue  # revoked meanwhile: left unacknowledged for its next owner
            metrics.events_in.inc()
            rescorer.position[msg.partition] = msg.offset + 1
            rescorer.started.setdefault(msg.partition, msg.offset)
            raw = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
            parsed = checked(raw, msg)
            if isinstance(parsed, Invalid):
                await dead_letter(raw, msg.key, parsed.reason, parsed.detail, msg.partition, msg.offset)
                rescorer.pending_acks.append(event)
            elif (home := home_partition(msg.key, settings.partitions)) != msg.partition:
                await route(raw, msg, home)
                rescorer.pending_acks.append(event)
            else:
                outcome = rescorer.apply(parsed, msg.partition, msg.offset)
                if outcome == Applied.TOO_LATE:
                    await dead_letter(raw, msg.key, Reason.TOO_LATE,
                                      "older than the state window of its customer's partition",
                                      msg.partition, msg.offset)
                elif outcome == Applied.APPLIED:
                    metrics.events_applied.inc()
                else:
                    metrics.events_skipped.labels(reason=outcome).inc()
                rescorer.pending_acks.append(event)
            if rescorer.due():
                rescorer.flush_soon()  # in the background: intake goes on while the broker acks
            await rescorer.hold_intake()

    @app.agent(control)
    async def commands(stream: Any) -> None:
        """Operator commands, one message per partition (co-partitioned with transactions, so
        each reaches the worker that owns that partition)."""
        async for event in stream.events():
            msg, partition = event.value, event.message.partition
            try:
                command = json.loads(msg).get("command")
            except (ValueError, AttributeError):
                command = None
            if command == "rescore_all":
                await rescorer.take_over(partition)
                n = rescorer.rescore_all(partition)
                log.info("partition %d: rescore-all requested; %d customers queued for model %s",
                         partition, n, artifact.version)
            else:
                log.warning("ignored control message at %s[%d]@%d: %r", settings.control_topic,
                            partition, event.message.offset, msg[:200])

    @app.timer(interval=max(settings.batch_wait_ms / 1000.0 / 2, 0.005))
    async def tick() -> None:
        if rescorer.due():
            await rescorer.flush()
        rescorer.drain_backlog()

    async def refresh_gauges() -> None:
        """Gauges are read when scraped, not kept current on every tick."""
        metrics.dirty.set(rescorer.dirty_count())
        metrics.backlog.set(sum(r.remaining for r in rescorer.backlog.values()))
        metrics.near_bound.set(len(states.near_bound))
        metrics.largest_record.set(states.largest_record)
        metrics.partitions.set(len(rescorer.folders))
        pending = bool(rescorer.dirty_count() or rescorer.pending_acks)
        metrics.flush_age.set(rescorer.failures.age(pending))
        try:
            assignment = app.consumer.assignment()
        except NotReady:  # scraped before the consumer started
            assignment = set()
        metrics.set_lag({tp.partition: await committed_lag(tp) for tp in assignment
                         if tp.topic == settings.transactions_topic})

    async def committed_lag(tp: TopicPartition) -> int:
        """Messages after the group's committed offset: a restart resumes there, so a commit
        that stops advancing shows as growing lag even while intake goes on. Until this worker
        commits on a partition, its committed offset is where consumption started (faust seeks
        each assigned partition to the group's commit)."""
        committed = app.monitor.tp_committed_offsets.get(tp, rescorer.started.get(tp.partition))
        if committed is None:  # nothing consumed here since assignment: the fetch position
            committed = await app.consumer.position(tp)
        return max(0, (app.consumer.highwater(tp) or 0) - (committed or 0))

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        """One attempt to publish what is pending, not retried here: a failure leaves the revoked
        partitions' events unacknowledged, for their next owner to process again."""
        await rescorer.flush()
        for tp in revoked:  # its next owner commits from now on
            app.monitor.tp_committed_offsets.pop(tp, None)
        rescorer.forget({tp.partition for tp in revoked if tp.topic == settings.transactions_topic})

    @app.on_rebalance_complete.connect
    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        # Sent before faust resumes the partitions: recover and take over every assigned
        # partition now (as faust recovers its tables), not only when its next event arrives,
        # which may be never. Partitions this worker no longer owns release their store.
        await changelog.maybe_declare()
        owned = {tp.partition for tp in app.consumer.assignment()
                 if tp.topic == settings.transactions_topic}
        states.close_unowned(owned)
        started = time.perf_counter()
        for partition in sorted(owned):  # one at a time: recovery's fetch buffers are large
            await rescorer.take_over(partition)
        metrics.takeover_seconds.set(time.perf_counter() - started)
        ready.set()

    @app.task
    async def quiet_client_logs() -> None:
        """The Kafka client logs every produced message at debug level: costly even unprinted."""
        level = max(logging.INFO, logging.getLevelName(settings.log_level.upper()))
        for name in ("aiokafka", "kafka"):
            logging.getLogger(name).setLevel(level)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "model_version": artifact.version})

    @app.page("/ready")
    async def is_ready(web: Any, request: Any) -> Any:
        recovered = app.tables.recovery.completed.is_set() and not app.rebalancing
        failing = rescorer.failures.not_ready_reason()
        if failing:
            return web.json({"ready": False, "reason": failing}, status=503)
        status = 200 if recovered and ready.is_set() else 503
        return web.json({"ready": status == 200}, status=status)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        await refresh_gauges()
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.bytes(body, headers={"Content-Type": content_type})  # with its charset

    @app.page("/customers/{customer_id}")
    async def customer(web: Any, request: Any, customer_id: str) -> Any:
        found = states.find(customer_id)
        if found is None:
            return web.json({"error": f"customer {customer_id} not on this worker"}, status=404)
        partition, state = found
        spend, units, invoices = state.totals()
        score = score_states(artifact, [state], rescorer._as_of(partition))[0]
        return web.json({
            "customer_id": customer_id,
            "aggregates": {
                "months": {str(m): {"spend": a.spend_cents / 100, "units": a.units,
                                    "invoices": a.n_invoices} for m, a in sorted(state.months.items())},
                "lifetime_spend": spend / 100, "lifetime_units": units, "lifetime_invoices": invoices,
                "partition": state.partition, "offset": state.offset,
                "ids_held": state.n_ids, "ids_forgotten": state.ids_forgotten,
            },
            "score": as_dict(score),  # as of the partition's clock: what it publishes next
        })

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, **kwargs: Any) -> None:
        """Consumer flow is stopped, the producer still runs: publish and acknowledge what is
        pending, then acknowledge nothing more (the producer flush that follows is the last one,
        so later events are left for redelivery)."""
        log.info("stopping: publishing %d dirty customers before the final commit (one attempt: "
                 "after a failure their events are redelivered on restart)", rescorer.dirty_count())
        if rescorer.stream is not None:
            await rescorer.flush()
        rescorer.stopping = True
        await rescorer.publisher.close()
        states.store.close_all()  # rocksdb: a restart on this directory replays only the tail

    return app
