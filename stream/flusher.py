"""Micro-batches to the broker: score the core's dirty customers, publish their scores with the
changelog records of the states behind them, wait for the broker, then acknowledge the events.

One flush runs at a time, whichever path starts it (intake when a batch is due, the timer, a
rebalance, shutdown). A flush that fails puts all of it back into the core and the states, for the
next attempt after the backoff (`stream.flush_policy`); meanwhile intake waits (`hold_intake`)
instead of racing ahead. faust flushes its producer before it commits the acknowledged offsets,
and the scores and records of a flush are acknowledged by the broker before its events are: a
crash anywhere redelivers the events, which the offset watermark in each state makes harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

from export_onnx.runtime import Artifact
from features.scores import ScoreRecord, encode_score
from stream.core import Core
from stream.drift import DriftWatch
from stream.flush_policy import FlushFailures
from stream.intake import Outbox
from stream.metrics import Metrics
from stream.publisher import BatchPublisher, Record
from export_onnx.scoring import assemble, prepare, score_separately
from state.live.base.partition import States

log = logging.getLogger("clv.worker")
INLINE_SCORING_LIMIT = 128  # customers; below it the model runs on the event loop (~60 us each)
HOLD_POLL_S = 0.005  # how often held intake looks whether a flush has taken the batch


class Flusher:
    def __init__(
        self,
        core: Core,
        states: States,
        artifact: Artifact,
        publisher: BatchPublisher,
        metrics: Metrics,
        outbox: Outbox,
        *,
        scores_topic: str,
        batch_size: int,
        flush_failure_timeout_s: float,
    ) -> None:
        self.core, self.states, self.artifact, self.outbox = core, states, artifact, outbox
        self.publisher, self.metrics, self.scores_topic = publisher, metrics, scores_topic
        self.batch_size = batch_size
        self.drift = DriftWatch(artifact, metrics)
        self.failures = FlushFailures(flush_failure_timeout_s)
        self.lock = asyncio.Lock()
        self.flushing: asyncio.Future[None] | None = None
        self.stream: Any = None  # the agent's stream, which acknowledges its events
        self.stopping = False  # set at shutdown: nothing is acknowledged after the final flush

    def due(self) -> bool:
        """The core's micro-batch is due, and after a failure the backoff has passed."""
        return self.failures.may_retry() and self.core.due()

    def drain_backlog(self) -> None:
        """A chunk of rescan into the core's dirty set, unless flushes are failing or one is
        running: a chunk is a full micro-batch, which holds intake (`hold_intake`) until a
        flush takes it, so added while a flush runs it would stop intake for all of that
        flush; added after, it is taken at once and intake goes on while it is scored."""
        if not self.failures.failing and not self.lock.locked():
            self.core.drain_backlog()

    async def flush(self) -> None:
        """Score every dirty customer; publish the scores with the changelog records of the
        states behind them and wait for the broker; then acknowledge the events. A failure
        puts all of it back for the next attempt, whichever path called."""
        if self.stopping:
            return
        async with self.lock:
            batch = self.core.take()
            try:
                records = self.states.take()
                records += await self._score(
                    {p: customers for p, customers in batch.dirty.items() if self.core.owns(p)}
                )
                offsets = await self._send(records, batch.dirty)
                await self.outbox.settle()  # the dead letters and routed events behind the acks
            except BaseException as exc:
                self.states.restore()
                self.core.put_back(batch)
                if not isinstance(exc, Exception):
                    raise  # cancelled: the caller is stopping
                self.metrics.flush_failures.inc()
                self.failures.failed(exc)
                return
            self.failures.succeeded()
            self.states.written({p: o for (t, p), o in offsets.items() if t == self.states.topic})
            for _partition, event in batch.acks:
                await self.stream.ack(event)

    def flush_soon(self) -> None:
        """Start a flush unless one is running (the running one is followed by the next tick's);
        after a failure it first waits out the backoff."""
        if not self.lock.locked() and (self.flushing is None or self.flushing.done()):
            self.flushing = asyncio.ensure_future(self._flush_after(self.failures.wait()))

    async def _flush_after(self, seconds: float) -> None:
        if seconds:
            await asyncio.sleep(seconds)
        await self.flush()

    def holding(self) -> bool:
        """A micro-batch's worth of customers waits: intake is to wait for a flush."""
        return max(self.core.dirty_count(), self.states.changed()) >= self.batch_size and not self.stopping

    async def hold_intake(self) -> None:
        """Backpressure: with a micro-batch's worth of customers waiting (to be scored, or,
        their partition catching up, only to have their states written), intake waits until a
        flush takes them (and, while flushes fail, for its retries), so neither the changed
        customers nor the unacknowledged events grow without bound while the broker refuses
        writes. It waits for the taking, not for the flush to end: intake goes on while the
        batch is scored and published (a month turn's rescoring is a micro-batch after another;
        waiting for each to end, intake would get only the moments between them)."""
        while self.holding():
            self.flush_soon()
            await asyncio.sleep(HOLD_POLL_S)  # a flush starting now takes the batch at once

    async def close(self) -> None:
        """At shutdown, after the final flush: acknowledge nothing more."""
        self.stopping = True
        await self.publisher.close()

    async def _send(
        self, records: list[Record], dirty: dict[int, dict[str, float | None]]
    ) -> dict[tuple[str, int], int]:
        started = time.perf_counter()
        offsets = await self.publisher.publish(records)
        now = time.monotonic()
        for customers in dirty.values():
            for since in customers.values():
                if since is not None:
                    self.metrics.freshness.observe(now - since)
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        return offsets

    async def _score(self, dirty: dict[int, dict[str, float | None]]) -> list[Record]:
        """Score records for the dirty customers of every partition, each to the partition it
        lives in (so `clv-scores` is co-partitioned with `transactions` whatever partitioner the
        publishers use). The partitions share one model call when their scores are as of the
        same clock (the worker's, unless a partition's own is ahead): per customer, a call of
        a few customers costs up to twice one of a hundred."""
        groups: dict[datetime, list[tuple[int, list[str]]]] = {}
        for partition, customers in dirty.items():
            if customers:
                # One clock per partition for the batch: the partition's clock moves on while
                # the model runs in a thread, and a score must carry the as_of its fields were
                # measured at.
                groups.setdefault(self.core.as_of(partition), []).append((partition, list(customers)))
        records: list[Record] = []
        for as_of, members in groups.items():
            records += await self._score_as_of(as_of, members)
        return records

    async def _score_as_of(self, as_of: datetime, members: list[tuple[int, list[str]]]) -> list[Record]:
        """One model call for the customers of `members` (partition, customer ids). A large
        batch runs the model in a thread (onnxruntime releases the GIL), so intake goes on
        meanwhile; a small one (a few ms) runs inline, cheaper than the hand-off. A batch that
        fails is scored customer by customer, so the failure is pinned on who causes it."""
        started = time.perf_counter()
        where: list[tuple[int, str]] = []
        states = []
        for partition, ids in members:
            partition_states = self.states.open(partition)
            where += [(partition, cid) for cid in ids]
            states += [partition_states[cid] for cid in ids]
        try:
            inputs, fields = prepare(self.artifact, states, as_of)
            if len(states) >= INLINE_SCORING_LIMIT:
                pred = await asyncio.to_thread(self.artifact.predict, inputs)
            else:
                pred = self.artifact.predict(inputs)
            scores: list[ScoreRecord | Exception] = list(assemble(self.artifact, states, fields, pred, as_of))
            self.drift.observe(inputs)
        except Exception:  # noqa: BLE001  pinned on the customers that cause it, below
            scores = score_separately(self.artifact, states, as_of)
        topic = self.scores_topic
        scored: list[tuple[int, str, ScoreRecord]] = []
        for score, (partition, cid) in zip(scores, where):
            if isinstance(score, Exception):
                self.metrics.scoring_errors.inc()
                log.error(
                    "customer %s of partition %d not scored as of %s: %s: %s; its state is "
                    "kept, and it is scored again on its next event or month turn",
                    cid,
                    partition,
                    as_of.isoformat(),
                    type(score).__name__,
                    score,
                )
                continue
            scored.append((partition, cid, score))
        # Encoding reads only the (immutable) score records: in a thread for a large batch, so
        # intake goes on meanwhile (a month turn's rescoring is one large batch after another).
        encode = lambda: [(topic, p, cid.encode(), encode_score(score)) for p, cid, score in scored]  # noqa: E731
        records: list[Record] = await asyncio.to_thread(encode) if len(scored) >= INLINE_SCORING_LIMIT else encode()
        self.metrics.rescored.inc(len(records))
        self.metrics.batch_size.observe(len(states))
        self.metrics.batch_latency.observe(time.perf_counter() - started)
        return records
