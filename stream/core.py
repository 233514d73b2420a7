"""The worker's per-partition core: what an event, a month turn or a rescan does to the customers
of the partitions a worker owns, and when a micro-batch is due. No Kafka, no faust, no event loop:
the app (`stream.app`) feeds it what arrives, the flusher (`stream.flusher`) takes its
micro-batches to the broker, the takeover (`stream.takeover`) hands it recovered partitions, and
tests drive it directly (tests/test_core.py). Its states live in a `state.live.base.partition.States`
over any store (`memory://` in the tests).

Exactness: every customer state remembers the highest offset (and keys of the window's event ids)
it has applied, so a redelivered event changes nothing; its customer is marked dirty all the same
(its score may not be out yet). The events are acknowledged only after the micro-batch that holds
their customers is published: the core keeps each event's acknowledgement with the dirty set and
hands both out together (`take`), and takes both back when the flush fails (`put_back`).

Time: the worker's clock is the newest event time it has seen on any of its partitions; each
partition also keeps its own newest event. Scores are as of the worker's clock, so a partition
that receives nothing still ages: when the worker's clock enters a new month every customer of
every partition it owns is rescored (a `Rescan`), in chunks, between events. What is too late
(older than the window) follows the partition's own clock: a partition that lags the others (taken
over with a backlog) applies its backlog instead of refusing it. Catching up (a restart, a takeover
with a backlog), a partition's rescan waits until it has processed what it received, and the
customers of the events meanwhile are left to it: each is published once, as of the clock caught
up to, not once per micro-batch and month crossed.

Taking over a partition (once its store holds the changelog): the partition's own changelog
record gives the clock and the month every customer has a score for; when that month is earlier
than the clock (a month-turn rescoring the previous owner did not finish), every customer of the
partition is rescored. Customers scored by another model version are left alone: a new model
reaches them lazily with their next event, or all at once with `rescore_all` (`clv rescore-all`).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from features.aggregate import Applied, Folder, contribution, month_of, month_start
from features.contract import TransactionEvent
from state.live.base.partition import PartitionStates, States

log = logging.getLogger("clv.worker")
RESCAN_DEFER_S = 60.0  # longest a rescan waits for its partition to catch up


@dataclass
class Rescan:
    """A rescoring of every customer of a partition (month turn, takeover, rescore-all), walked
    from the store in chunks so intake goes on meanwhile and no list of customers is held. The
    walk starts with the first chunk, so it meets every customer the partition has by then."""

    month: int | None  # every customer is scored as of this month or later once it is done
    remaining: int  # an estimate, for the backlog gauge
    queued: float  # monotonic time it was queued
    catch_up: bool  # queued for a partition catching up: it covers the events' customers
    customers: Iterator[str] | None = None  # the walk, once started


@dataclass
class Partition:
    """One owned partition: its fold, its clock, its dirty customers (customer -> when an event
    first made it dirty; None: a rescan did), its rescan under way, how far it has been read."""

    folder: Folder
    states: PartitionStates
    clock_ts: int  # newest event time of the partition
    dirty: dict[str, float | None] = field(default_factory=dict)
    rescan: Rescan | None = None
    position: int | None = None  # next offset to process
    known_end: int = 0  # the partition's end offset as last asked (ends only grow)
    started: int | None = None  # first offset received since assignment


@dataclass
class Batch:
    """A micro-batch taken for a flush: the dirty customers per partition (see `Partition.dirty`)
    and the (partition, acknowledgement) pairs to release once they are published."""

    dirty: dict[int, dict[str, float | None]]
    acks: list[tuple[int, Any]]


@dataclass(frozen=True)
class TakenOver:
    """What a takeover found, for its log line."""

    customers: int
    clock: int | None  # the partition's own month
    scored_month: int | None  # every customer has a score as of this month or later
    month: int | None  # the month its scores are due as of (the worker's clock included)
    stale: bool  # scored_month is before month: every customer is queued for rescoring
    model: str  # the model the partition's last full rescoring used


class Core:
    """The partitions a worker owns: fold, dirty set, micro-batch policy, month turns, rescans.

    `end_offset(partition)`: the partition's end as the consumer last heard it (None: not yet);
    `resumed_at(partition)`: the group's committed offset it was resumed from (None: none).
    Both only tell whether a partition is caught up. `clock`: monotonic seconds."""

    def __init__(
        self,
        states: States,
        window: int,
        model: str,
        batch_size: int,
        batch_wait_ms: int,
        end_offset: Callable[[int], int | None] = lambda partition: None,
        resumed_at: Callable[[int], int | None] = lambda partition: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states, self.window, self.model = states, window, model
        self.batch_size, self.batch_wait_ms = batch_size, batch_wait_ms
        self.end_offset, self.resumed_at, self.clock = end_offset, resumed_at, clock
        self.partitions: dict[int, Partition] = {}
        self.group_ts = 0  # newest event time on any partition this worker has owned
        self._month_end = 0.0  # when the month of group_ts ends (epoch seconds)
        self.acks: list[tuple[int, Any]] = []  # (partition, acknowledgement) waiting on a flush
        self.waiting_since: float | None = None  # the oldest customer or acknowledgement waiting

    # -- partitions -----------------------------------------------------------------------
    def owns(self, partition: int) -> bool:
        return partition in self.partitions

    def take_over(self, partition: int) -> TakenOver:
        """A partition whose store holds its changelog: set its clock, and queue a rescoring of
        all its customers when their scores are older than it."""
        states = self.states.open(partition)
        meta = states.meta
        customers = states.count()
        if meta is None:  # a changelog written before partition records: read every state
            newest = max((s.newest_ts or 0 for s in map(states.__getitem__, states.customers())), default=0)
            scored_month, model = None, ""
        else:
            newest, scored_month, model = meta.clock_ts, meta.scored_month, meta.model
        if newest > self.group_ts:  # the partitions already owned age to it
            self._age(newest)
        # The window (what is too late) follows the partition's own events: the worker's clock
        # may be ahead of events still waiting on this partition.
        clock = month_of(_utc(newest)) if newest else None
        self.partitions[partition] = Partition(Folder(self.window, states, clock), states, newest)
        month = month_of(self.as_of(partition)) if newest or self.group_ts else None
        stale = month is not None and customers > 0 and (scored_month or 0) < month
        if stale:
            self._rescan(partition, month, catch_up=True)
        return TakenOver(customers, clock, scored_month, month, stale, model)

    def rescore_all(self, partition: int) -> int:
        """Queue every customer of the partition (a model rollout); returns how many."""
        if partition not in self.partitions:
            return 0
        return self._rescan(partition, month_of(self.as_of(partition)))

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions: their unacknowledged events go to the new owner, which rescores
        them. Their read position goes too: assigned again later, a partition is read from its
        committed offset, and a position from before would show its lag as nil."""
        for p in partitions:
            self.partitions.pop(p, None)
            self.states.forget(p)
        self.acks = [(p, ack) for p, ack in self.acks if p not in partitions]

    def as_of(self, partition: int) -> datetime:
        """The clock a partition's scores are as of: its own newest event, or the worker's when
        that is later (a quiet partition ages with the others)."""
        part = self.partitions.get(partition)
        return _utc(max(part.clock_ts if part else 0, self.group_ts))

    def _rescan(self, partition: int, month: int | None, catch_up: bool = False) -> int:
        """Queue every customer of the partition for rescoring (replacing a rescan under way;
        one still waiting for its partition to catch up goes on waiting for it)."""
        part = self.partitions[partition]
        n = part.states.count()
        waiting = part.rescan is not None and part.rescan.catch_up and part.rescan.customers is None
        part.rescan = Rescan(month, n, self.clock(), catch_up or waiting)
        return n

    def _age(self, ts: int) -> None:
        """Move the worker's clock to `ts`; when it enters a new month, every customer of every
        partition the worker owns is queued for rescoring, whether its partition saw the event
        or not (scores are as of the worker's clock; see `as_of`)."""
        before, self.group_ts = self.group_ts, ts
        if before and ts < self._month_end:  # the same month (the clock only moves forward)
            return
        month = month_of(_utc(ts))
        self._month_end = month_start(month + 1).timestamp()
        if not before or month_of(_utc(before)) >= month:
            return
        for partition in self.partitions:
            n = self._rescan(partition, month)
            log.info(
                "entered %s: rescoring the %d customers of partition %d",
                self.as_of(partition).strftime("%Y-%m"),
                n,
                partition,
            )

    # -- intake -----------------------------------------------------------------------------
    def received(self, partition: int, offset: int) -> None:
        """A message of an owned partition is being processed."""
        part = self.partitions[partition]
        part.position = offset + 1
        if part.started is None:
            part.started = offset
            self._catch_up(partition)

    def _catch_up(self, partition: int) -> None:
        """The partition's first event since it was taken over. When the events still to
        process on it outnumber its customers (and a micro-batch), scoring them as they come
        would score the same customers again and again as of clocks about to move on (a first
        deployment on a topic with history, a restart after a long stop): a rescan is queued
        instead, which waits for the partition to catch up and covers its events' customers
        meanwhile (`_rescan_covers`), so each customer is scored once, as of where it caught
        up, at no more scores than its customers. The partition's record says its scores are
        not current until the rescan is done, so an owner after a crash queues it again."""
        part = self.partitions[partition]
        if part.rescan is not None:
            return
        behind = self.behind(partition)
        customers = part.states.count()
        if behind is None or behind < max(self.batch_size, customers):
            return
        self._rescan(partition, None, catch_up=True)
        self._record(partition, scored_month=None)
        log.info(
            "partition %d: %d events to catch up on over %d customers: each customer it "
            "touches is scored once it has caught up",
            partition,
            behind,
            customers,
        )

    def acknowledge_after_flush(self, partition: int, ack: Any) -> None:
        """A message is done with (applied, skipped, dead-lettered or routed): its
        acknowledgement goes out with the next flush that succeeds, after the scores of the
        customers marked before it."""
        self.acks.append((partition, ack))
        if self.waiting_since is None:
            self.waiting_since = self.clock()

    def apply(self, event: TransactionEvent, partition: int, offset: int) -> str:
        """Fold the event into its customer's state; returns the `Applied` code. Anything but
        too late marks the customer dirty."""
        part = self.partitions[partition]
        before = part.folder.clock
        outcome = part.folder.add(event.customer_id, contribution(event), partition, offset)
        if outcome == Applied.TOO_LATE:
            return outcome
        ts = int(event.ts.timestamp())
        if ts > part.clock_ts:
            part.clock_ts = ts
            self._record(partition)
        if before is None and part.rescan is None:
            # The partition's first event: no customer has an older score. With a rescan waiting
            # for the partition to catch up, that rescan says so once it is done.
            self._record(partition, scored_month=month_of(self.as_of(partition)), model=self.model)
        if ts > self.group_ts:
            self._age(ts)
        # Applied or not, its customer's score may not be out yet.
        self.mark(partition, event.customer_id)
        return outcome

    def mark(self, partition: int, customer_id: str, event: bool = True) -> None:
        """Queue the customer for the next flush; `event`: an event made it dirty (its wait
        counts in the receive-to-publish histogram), else a rescan. Not queued when its
        partition's rescan is to score it (`_rescan_covers`)."""
        now = self.clock()
        if event and self._rescan_covers(partition, now):
            return
        self.partitions[partition].dirty.setdefault(customer_id, now if event else None)
        if self.waiting_since is None:
            self.waiting_since = now

    def first_received(self, partition: int) -> int | None:
        """The first offset of the partition processed since it was taken over (None: none
        yet): where the group's committed offset stood until this worker commits there."""
        part = self.partitions.get(partition)
        return part.started if part is not None else None

    def dirty_count(self) -> int:
        return sum(len(p.dirty) for p in self.partitions.values())

    def backlog(self) -> int:
        """Customers still to rescore, estimated, over every rescan queued or under way."""
        return sum(
            p.rescan.remaining
            if p.rescan.customers is not None
            else max(p.rescan.remaining, p.states.count(), 1)  # its customers may grow
            for p in self.partitions.values()
            if p.rescan
        )

    def due(self) -> bool:
        """A flush is due: a full micro-batch, or the oldest customer or acknowledgement waiting
        has waited batch_wait_ms. Acknowledgements alone wait like customers: while a partition's
        rescan covers its events' customers (catching up), an immediate flush per event would
        publish the changed states a few events at a time, one broker round trip each, for
        offsets that faust commits only every few seconds anyway."""
        if self.waiting_since is None:  # nothing marked or acknowledged since the last take
            return False
        if (self.clock() - self.waiting_since) * 1000 >= self.batch_wait_ms:
            return True
        return self.dirty_count() >= self.batch_size

    # -- micro-batches ----------------------------------------------------------------------
    def take(self) -> Batch:
        """The dirty customers and the acknowledgements waiting on them, for a flush."""
        dirty = {p: part.dirty for p, part in self.partitions.items() if part.dirty}
        for part in self.partitions.values():
            part.dirty = {}
        batch, self.acks, self.waiting_since = Batch(dirty, self.acks), [], None
        return batch

    def put_back(self, batch: Batch) -> None:
        """A flush that failed: its customers are dirty again (keeping when they first were;
        those of partitions revoked meanwhile are left to their new owner), its acknowledgements
        wait again, before any added since."""
        for partition, customers in batch.dirty.items():
            part = self.partitions.get(partition)
            if part is not None:
                for customer_id, since in customers.items():
                    part.dirty[customer_id] = since if since is not None else part.dirty.get(customer_id)
        self.acks = batch.acks + self.acks
        if (self.dirty_count() or self.acks) and self.waiting_since is None:
            self.waiting_since = self.clock()

    def drain_backlog(self) -> None:
        """One chunk of rescan per call, marked dirty for the next flush, so intake keeps going;
        a rescan done is recorded in the partition's changelog record with that flush. Nothing
        is added while a micro-batch is already waiting. A partition with events still to
        process waits (up to RESCAN_DEFER_S): its clock is about to move on (catching up on
        history, every month would otherwise be rescored), so its customers are rescored once,
        as of the clock it caught up to."""
        if self.dirty_count() >= self.batch_size:
            return
        now = self.clock()
        for partition, part in list(self.partitions.items()):
            rescan = part.rescan
            if rescan is None or self._waits(partition, rescan, now):
                continue
            if rescan.customers is None:
                rescan.customers = part.states.customers()
                if rescan.month is None:  # queued before the partition had a clock
                    rescan.month = month_of(self.as_of(partition))
            chunk = list(itertools.islice(rescan.customers, self.batch_size))
            rescan.remaining = max(rescan.remaining - len(chunk), 1)
            for customer_id in chunk:  # published by the next flush, retried like any other
                self.mark(partition, customer_id, event=False)
            if len(chunk) < self.batch_size and part.rescan is rescan:
                part.rescan = None
                self._record(partition, scored_month=rescan.month, model=self.model)
            return

    def behind(self, partition: int) -> int | None:
        """Events of the partition, up to its end as the consumer last heard it, not processed
        yet; None before the consumer has heard. Before the first event since assignment, from
        the committed offset the partition was resumed from (none: its start)."""
        high = self.end_offset(partition)
        if high is None:
            return None
        part = self.partitions.get(partition)
        done = part.position if part is not None else None
        if part is not None:
            part.known_end = high
        if done is None:
            done = self.resumed_at(partition) or 0
        return max(0, high - done)

    def _waits(self, partition: int, rescan: Rescan, now: float) -> bool:
        """The rescan waits while its partition may have events left to process (not known to
        be caught up), for at most RESCAN_DEFER_S."""
        if now - rescan.queued >= RESCAN_DEFER_S:
            return False
        # A month turn's rescan on a live partition waits only while a micro-batch or more of
        # events is still to process (history streaming in), not for the few a live partition
        # always has in flight: waiting for those, it would start late and go slowly.
        slack = 0 if rescan.catch_up else self.batch_size
        part = self.partitions.get(partition)
        if part is not None and part.position is not None and part.known_end - part.position > slack:
            return True  # short of the end as last heard: behind, without asking again
        behind = self.behind(partition)
        return behind is None or behind > slack

    def _rescan_covers(self, partition: int, now: float) -> bool:
        """An event's customer needs no score of its own while its partition catches up: the
        partition's rescan waits for that (`drain_backlog`) and has not started its walk, so it
        scores this customer once, as of the clock caught up to, instead of once per
        micro-batch the customer has events in. A crash before it is done loses nothing: the
        partition's record (in the changelog by the time the event is acknowledged) says its
        scores are older than its own clock, so whoever takes the partition over queues the
        rescan again (`take_over`)."""
        part = self.partitions[partition]
        rescan = part.rescan
        if rescan is None or rescan.customers is not None or not rescan.catch_up:
            return False  # a month turn's on a live partition: its events are scored as they come
        meta = part.states.meta
        if meta is None or (meta.scored_month or 0) >= month_of(_utc(meta.clock_ts)):
            return False
        return self._waits(partition, rescan, now)

    def _record(self, partition: int, **changes: Any) -> None:
        """Update the partition's own changelog record (written with the next flush)."""
        part = self.partitions[partition]
        part.states.set_meta(clock_ts=part.clock_ts, **changes)


def month_text(month: int | None) -> str:
    return "no month" if month is None else month_start(month).strftime("%Y-%m")


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)
