"""The worker's per-partition core without Kafka: a memory store, a clock the test moves, and the
partitions' end offsets the test says. A flush here is what the flusher does once the broker has
acknowledged it: the states' records go to the store and the acknowledgements are released."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from features.aggregate import Applied, month_of
from features.contract import Line, TransactionEvent
from stream.core import RESCAN_DEFER_S, Batch, Core
from state.live.base.partition import States
from state.live.memory.store import MemoryStore

WINDOW = 13


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(customer: str, day: str, event_id: str | None = None, quantity: int = 2) -> TransactionEvent:
    ts = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    return TransactionEvent(event_id or f"{customer}@{day}", customer, f"{customer}@{day}", ts,
                            (Line("A", quantity, 5.0),))


class Worker:
    """A core over a memory store, fed as the app feeds it."""

    def __init__(self, partitions: tuple[int, ...] = (0,), batch_size: int = 4,
                 batch_wait_ms: int = 20, store: MemoryStore | None = None,
                 ends: dict[int, int] | None = None) -> None:
        self.store = store or MemoryStore()
        self.states = States(self.store, "changelog")
        self.clock = Clock()
        self.ends = {p: 0 for p in partitions} if ends is None else ends  # caught up
        self.core = Core(self.states, WINDOW, "model-1", batch_size, batch_wait_ms,
                         end_offset=self.ends.get, clock=self.clock)
        self.taken = {}
        for p in partitions:
            self.store.open(p)  # recovery opens the partition's store
            self.taken[p] = self.core.take_over(p)

    def feed(self, partition: int, offset: int, ev: TransactionEvent, caught_up: bool = True) -> str:
        self.core.received(partition, offset)
        outcome = self.core.apply(ev, partition, offset)
        self.core.acknowledge_after_flush(partition, (partition, offset))
        if caught_up:
            self.ends[partition] = max(self.ends.get(partition, 0), offset + 1)
        return outcome

    def flush(self) -> Batch:
        batch = self.core.take()
        records = Counter(p for _topic, p, _key, _value in self.states.take())
        self.states.written({p: self.store.offset(p) + n for p, n in records.items()})
        return batch

    def totals(self, partition: int, customer: str) -> tuple[int, int, int]:
        return self.states.open(partition)[customer].totals()

    def meta(self, partition: int) -> Any:
        return self.states.open(partition).meta


def month(day: str) -> int:
    return month_of(datetime.fromisoformat(day).replace(tzinfo=timezone.utc))


def test_the_core_imports_no_kafka_client_no_event_loop_and_no_training_code():
    code = ("import sys, stream.core; "
            "print(sorted(m for m in ('faust', 'aiokafka', 'asyncio', 'torch', 'models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_worker_imports_no_training_code_and_nothing_downstream():
    """The worker's app, built from the default settings, needs neither models/ nor torch, nor
    the analysts' side of the state (the snapshot, its API and dashboard)."""
    code = ("import sys, stream.app, stream.settings; stream.app.create_app(stream.settings.Settings()); "
            "print(sorted({'.'.join(m.split('.')[:2]) for m in sys.modules} "
            "& {'models', 'torch', 'state.snapshot', 'sklearn', 'onnx', 'streamlit'}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}  # the defaults
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip() == "[]"


def test_a_redelivered_event_changes_nothing_but_its_customer_is_scored_again():
    w = Worker()
    first = event("c1", "2011-01-05")
    assert w.feed(0, 10, first) == Applied.APPLIED
    w.flush()
    before = w.totals(0, "c1")
    assert w.feed(0, 10, first) == Applied.REDELIVERED  # the same offset again
    assert w.feed(0, 11, first) == Applied.DUPLICATE  # re-published: the same event id
    assert w.totals(0, "c1") == before == (1000, 2, 1)
    batch = w.flush()
    assert list(batch.dirty[0]) == ["c1"]  # its score may not be out yet: published again
    assert batch.acks == [(0, (0, 10)), (0, (0, 11))]
    assert w.store.count(0) == 1


def test_an_event_older_than_the_window_is_too_late_and_touches_nothing():
    w = Worker()
    w.feed(0, 0, event("c1", "2012-03-01"))
    w.flush()
    assert w.feed(0, 1, event("c2", "2010-12-31")) == Applied.TOO_LATE
    assert w.feed(0, 2, event("c1", "2011-01-02", "old")) == Applied.TOO_LATE
    assert w.core.dirty_count() == 0 and w.states.changed() == 0
    assert w.states.open(0).get("c2") is None and w.totals(0, "c1") == (1000, 2, 1)
    assert w.core.as_of(0) == datetime(2012, 3, 1, tzinfo=timezone.utc)
    assert [ack for _, ack in w.core.take().acks] == [(0, 1), (0, 2)]  # acknowledged all the same


def test_a_flush_is_due_at_a_full_batch_or_after_the_wait_acknowledgements_alone_included():
    w = Worker(batch_size=3, batch_wait_ms=20)
    core = w.core
    assert not core.due()
    core.acknowledge_after_flush(0, "dead letter")
    assert not core.due()  # nothing to score: the acknowledgement waits like a customer
    w.clock.now += 0.021
    assert core.due()
    w.flush()
    assert not core.due()
    core.mark(0, "a")
    assert not core.due()
    w.clock.now += 0.019
    assert not core.due()
    w.clock.now += 0.002
    assert core.due()  # the oldest customer waited batch_wait_ms
    w.flush()
    for c in "abc":
        core.mark(0, c)
    assert core.due() and core.dirty_count() == 3  # a full batch, at once
    core.mark(0, "a")
    assert core.dirty_count() == 3  # a customer is in a batch once


def test_a_month_turn_rescores_every_customer_of_every_partition_once():
    w = Worker(partitions=(0, 1), batch_size=2)
    for offset, c in enumerate(("a", "b", "c")):
        w.feed(0, offset, event(c, f"2011-01-0{offset + 1}"))
    w.feed(1, 0, event("q", "2011-01-10"))
    w.flush()
    assert w.core.backlog() == 0 and w.meta(1).scored_month == month("2011-01-10")

    w.feed(0, 3, event("a", "2011-02-03"))  # the worker's clock enters February
    assert w.core.backlog() == 4  # every customer of both partitions, not only the event's
    assert w.core.as_of(1) == datetime(2011, 2, 3, tzinfo=timezone.utc)  # the quiet one ages too
    marked: Counter[tuple[int, str]] = Counter()
    for _ in range(10):
        w.core.drain_backlog()
        marked.update((p, c) for p, customers in w.flush().dirty.items() for c in customers)
    # a's event and the rescan's first chunk share a micro-batch: a is published once too
    assert marked == {(0, "a"): 1, (0, "b"): 1, (0, "c"): 1, (1, "q"): 1}
    assert w.core.backlog() == 0
    for p in (0, 1):  # each partition's record says every customer is scored as of February
        assert w.meta(p).scored_month == month("2011-02-01") and w.meta(p).model == "model-1"
    assert w.meta(1).clock_ts == int(datetime(2011, 1, 10, tzinfo=timezone.utc).timestamp())


def test_a_failed_flush_is_put_back_whole_before_anything_newer():
    w = Worker(partitions=(0, 1))
    w.feed(0, 0, event("a", "2011-01-01"))
    first_marked = w.clock.now
    w.feed(1, 0, event("q", "2011-01-01"))
    batch = w.core.take()
    w.clock.now += 1
    w.feed(0, 1, event("a", "2011-01-02"))  # while the flush runs
    w.feed(0, 2, event("b", "2011-01-02"))
    w.core.forget({1})  # revoked meanwhile
    w.core.put_back(batch)
    again = w.core.take()
    assert again.dirty == {0: {"a": first_marked, "b": first_marked + 1}}  # the first wait kept
    assert [ack for _, ack in again.acks] == [(0, 0), (1, 0), (0, 1), (0, 2)]


def test_a_revoked_partition_leaves_nothing_behind():
    w = Worker(partitions=(0, 1))
    w.feed(0, 0, event("a", "2011-01-01"))
    w.feed(1, 0, event("q", "2011-01-01"))
    w.core.forget({1})
    assert not w.core.owns(1) and 1 not in w.states.partitions
    batch = w.core.take()
    assert set(batch.dirty) == {0} and batch.acks == [(0, (0, 0))]
    assert w.core.rescore_all(1) == 0 and w.core.first_received(1) is None


def test_a_takeover_rescores_all_only_when_the_scores_are_older_than_the_clock():
    store = MemoryStore()
    w = Worker(store=store, batch_size=10)
    w.feed(0, 0, event("a", "2011-01-05"))
    w.feed(0, 1, event("b", "2011-01-06"))
    w.flush()
    w.feed(0, 2, event("a", "2011-02-01"))  # a month turn this worker does not finish
    w.flush()
    assert (w.meta(0).scored_month, w.core.backlog()) == (month("2011-01-01"), 2)

    taken = Worker(store=store, batch_size=10).taken[0]  # another worker, the same changelog
    assert taken.stale and (taken.customers, taken.scored_month, taken.month) == (
        2, month("2011-01-01"), month("2011-02-01"))
    w.core.drain_backlog()
    w.flush()
    assert not Worker(store=store).taken[0].stale  # once done, the next owner rescores nobody


def test_a_partition_catching_up_scores_each_customer_once_as_of_where_it_caught_up():
    store = MemoryStore()
    w = Worker(store=store)
    w.feed(0, 0, event("a", "2011-01-05"))
    w.flush()
    w.feed(0, 1, event("a", "2011-03-01"))  # the month turn's rescan is left unfinished
    w.flush()
    late = Worker(store=store, ends={0: 10})  # 8 events still to process on the partition
    assert late.taken[0].stale
    for offset, day in zip(range(2, 9), ("03-02", "04-01", "04-02", "05-01", "05-02", "06-01", "06-02")):
        late.feed(0, offset, event("b" if offset % 2 else "a", f"2011-{day}"), caught_up=False)
        late.core.drain_backlog()
    assert late.core.dirty_count() == 0  # the rescan covers them, its walk not started
    assert late.states.changed() == 2  # their states still go out, with the partition's record
    late.flush()
    late.feed(0, 9, event("c", "2011-06-03"), caught_up=False)  # the partition's last event
    late.core.drain_backlog()
    batch = late.flush()
    assert sorted(batch.dirty[0]) == ["a", "b", "c"]  # once each, as of June
    assert late.core.as_of(0).month == 6 and late.meta(0).scored_month == month("2011-06-01")


def test_a_rescan_waits_for_a_partition_catching_up_only_so_long():
    store = MemoryStore()
    w = Worker(store=store)
    w.feed(0, 0, event("a", "2011-01-05"))
    w.flush()
    w.feed(0, 1, event("a", "2011-02-05"))
    w.flush()
    stuck = Worker(store=store, ends={0: 1000})  # far behind, and not moving
    stuck.core.drain_backlog()
    assert stuck.core.dirty_count() == 0
    stuck.clock.now += RESCAN_DEFER_S
    stuck.core.drain_backlog()
    assert stuck.core.dirty_count() == 1 and stuck.core.backlog() == 0


def test_rescore_all_queues_every_customer_for_the_current_model():
    w = Worker(batch_size=2)
    for offset, c in enumerate("abcde"):
        w.feed(0, offset, event(c, "2011-01-05"))
    w.flush()
    assert w.core.rescore_all(0) == 5
    rescored: list[str] = []
    for _ in range(4):
        w.core.drain_backlog()
        rescored += w.flush().dirty.get(0, {})
    assert sorted(rescored) == list("abcde") and w.core.backlog() == 0


def test_a_partition_taken_over_with_more_events_to_process_than_customers_scores_them_once_caught_up():
    """A first deployment on a topic with history (or a restart after a long stop): the
    partition's events are folded and their states written as they come, but their customers
    are scored once, when the partition has caught up, as of its clock then; until that is
    done its record says its scores are not current, so an owner after a crash rescores it."""
    store = MemoryStore()
    w = Worker(store=store, batch_size=4, ends={0: 12})  # 12 events waiting, no customers yet
    days = ("01-05", "01-20", "02-03", "02-10", "02-11", "03-01", "03-02", "03-03", "03-04",
            "03-05", "03-06")
    for offset, day in enumerate(days):
        w.feed(0, offset, event("abc"[offset % 3], f"2011-{day}"), caught_up=False)
        w.core.drain_backlog()
        if offset % 4 == 3:
            assert not w.flush().dirty  # nobody scored yet; states and the record go out
    assert w.core.dirty_count() == 0 and w.core.backlog() >= 1
    assert w.meta(0).scored_month is None
    assert Worker(store=store).taken[0].stale  # a crash now: the next owner rescores all
    w.feed(0, 11, event("d", "2011-03-07"), caught_up=False)  # the last event: caught up
    w.core.drain_backlog()
    batch = w.flush()
    assert sorted(batch.dirty[0]) == ["a", "b", "c", "d"]  # each, as of March
    while w.core.backlog():  # the walk's end (the states changed last may come again)
        w.core.drain_backlog()
        w.flush()
    assert w.meta(0).scored_month == month("2011-03-01") and w.core.backlog() == 0
    assert not Worker(store=store).taken[0].stale


def test_a_partition_with_fewer_events_to_process_than_customers_scores_them_as_they_come():
    store = MemoryStore()
    w = Worker(store=store, batch_size=4)
    for offset, c in enumerate("abcdef"):
        w.feed(0, offset, event(c, "2011-01-05"))
    w.flush()
    late = Worker(store=store, batch_size=4, ends={0: 10})  # 4 events to catch up on, 6 customers
    late.feed(0, 6, event("a", "2011-01-06"), caught_up=False)
    assert late.core.dirty_count() == 1 and late.core.backlog() == 0
    assert late.meta(0).scored_month == month("2011-01-01")


def test_a_month_turn_on_a_live_partition_scores_its_events_as_they_come_and_starts_at_once():
    """The worker's clock enters a new month while events keep arriving, a few of them always
    in flight: the rescan of every customer starts with the next chunk (it does not wait for
    the partition to be exactly at its end), and the customers of the events meanwhile are
    scored with the next micro-batch, not left to the rescan's walk (which may reach them
    only after the rest of the partitions)."""
    w = Worker(partitions=(0, 1), batch_size=4)
    for offset, c in enumerate("abcdefgh"):
        w.feed(offset % 2, offset, event(c, "2011-01-05"))
    w.flush()
    w.feed(0, 8, event("a", "2011-02-01"))  # the turn
    w.ends[1] = 12  # partition 1: three events in flight (fewer than a micro-batch)
    w.feed(1, 9, event("q", "2011-02-01"), caught_up=False)
    assert w.core.dirty_count() == 2  # a and q, marked as they came
    assert w.core.backlog() == 8  # every customer of both partitions queued
    w.core.drain_backlog()
    batch = w.flush()
    assert set(batch.dirty[0]) | set(batch.dirty.get(1, {})) >= {"a", "q"}
    assert sum(len(d) for d in batch.dirty.values()) >= 4  # the rescan's first chunk came too
    while w.core.backlog():
        w.core.drain_backlog()
        w.flush()
    assert w.meta(0).scored_month == w.meta(1).scored_month == month("2011-02-01")
