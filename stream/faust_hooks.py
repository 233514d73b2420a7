"""Everything the worker reaches for inside faust-streaming (0.15) beyond its public API, in one
place, each with why no public hook does it. Upgrading faust means checking this module only.

- The consumer's fetch wait: faust builds its aiokafka consumer with `fetch_max_wait_ms=1500`
  fixed (`AIOKafkaConsumerThread._create_worker_consumer`); no setting reaches it. On a broker
  that holds a fetch for its whole wait (the embedded one) that wait lands on every event's
  latency, so `set_fetch_wait` wraps the factory and sets the built consumer's wait (an aiokafka
  private, in `stream.aiokafka_hooks`).
- Partitions without a committed offset after a rebalance: faust drops what its consumer fetched
  while a rebalance held the flow, then seeks every partition to its committed offset
  (`Consumer.perform_seek`); a partition with none stays where the dropped fetches left it, near
  its end, and `consumer_auto_offset_reset` is never consulted. No hook runs between that seek and
  the flow resuming, so `seek_uncommitted_to_start` wraps `perform_seek`.
- Offsets: the group's committed offset a partition was resumed from is known only to the
  consumer (`Consumer._committed_offset`, filled by that seek); the offsets the worker itself
  committed since are kept by the monitor (`Monitor.tp_committed_offsets`, no accessor, cleared
  on each rebalance). Both are read here, for the catch-up test of `stream.core` and the lag
  gauge; asking the broker instead would cost a round trip per partition on every scrape.
"""

from __future__ import annotations

from typing import Any, Iterable

from faust.types import TP

from stream import aiokafka_hooks


def set_fetch_wait(ms: int) -> None:
    """Consumers faust builds from now on wait at most `ms` for a fetch (idempotent)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(
        AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__", AIOKafkaConsumerThread._create_worker_consumer
    )

    def with_fetch_wait(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        aiokafka_hooks.set_fetch_max_wait(consumer, ms)
        return consumer

    with_fetch_wait.__wrapped__ = create  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = with_fetch_wait  # type: ignore[method-assign]


def seek_uncommitted_to_start() -> None:
    """After faust's seek to the committed offsets, partitions with none go to their earliest
    offset, as `consumer_auto_offset_reset="earliest"` says (idempotent). Without it, a partition
    whose previous owner died or was paused before its first commit is read from near its end,
    and the events before are never processed."""
    from faust.transport.consumer import Consumer

    seek = getattr(Consumer.perform_seek, "__wrapped__", Consumer.perform_seek)

    async def perform_seek(self: Any) -> None:
        await seek(self)
        uncommitted = [tp for tp in self.assignment() if not self._committed_offset.get(tp)]
        if uncommitted:
            for tp, offset in (await self.earliest_offsets(*uncommitted)).items():
                await self.seek(tp, offset)

    perform_seek.__wrapped__ = seek  # type: ignore[attr-defined]
    Consumer.perform_seek = perform_seek  # type: ignore[method-assign]


def resumed_at(app: Any, tp: TP) -> int | None:
    """The group's committed offset the partition was resumed from (None: it had none)."""
    return app.consumer._committed_offset.get(tp)


def committed_since(app: Any, tp: TP) -> int | None:
    """The offset this worker last committed on the partition since the last rebalance."""
    return app.monitor.tp_committed_offsets.get(tp)


def forget_committed(app: Any, tps: Iterable[TP]) -> None:
    """Revoked partitions: their next owner commits from now on."""
    for tp in tps:
        app.monitor.tp_committed_offsets.pop(tp, None)
