"""Taking over a partition, once per assignment and before any of its events is applied: its
store is brought up to the changelog (`state.live.recovery`: the whole partition into an empty store,
only the tail into a rocksdb directory of its own), then the core reads the partition's own
record for its clock and whether its customers need rescoring (`stream.core.Core.take_over`).
Nothing is read from `clv-scores`.

The rebalance hook takes over every assigned partition, and an event or a control command of a
partition not taken over yet waits for it: callers share one takeover per partition, which a
revoke cancels.
"""

from __future__ import annotations

import asyncio
import logging

from stream.core import Core, month_text
from stream.flush_policy import EXIT_CODE, exit_for_restart
from stream.metrics import Metrics
from state.live.recovery import Changelog, recover
from state.live.base.partition import States

log = logging.getLogger("clv.worker")


class Takeovers:
    def __init__(self, core: Core, states: States, changelog: Changelog, metrics: Metrics) -> None:
        self.core, self.states, self.changelog, self.metrics = core, states, changelog, metrics
        self.running: dict[int, asyncio.Future[None]] = {}

    async def ensure(self, partition: int) -> bool:
        """Take the partition over unless it is already; False when it was revoked meanwhile."""
        if self.core.owns(partition):
            return True
        task = self.running.get(partition)
        if task is None:
            task = self.running[partition] = asyncio.ensure_future(self._take_over(partition))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we were cancelled, not the takeover
        except Exception as exc:  # recovery failed: a restart recovers again
            log.exception("taking partition %d over failed", partition)
            exit_for_restart(
                f"taking partition {partition} over failed ({type(exc).__name__}: "
                f"{exc}): exiting with code {EXIT_CODE} so the supervisor restarts "
                "the worker, which recovers the partition again"
            )
        finally:
            if task.done():
                self.running.pop(partition, None)
        return self.core.owns(partition)

    def cancel(self, partitions: set[int]) -> None:
        """Revoked partitions: a takeover still under way stops."""
        for partition in partitions:
            task = self.running.pop(partition, None)
            if task is not None:
                task.cancel()

    async def _take_over(self, partition: int) -> None:
        got = await recover(self.states.store, self.changelog, partition)
        self.metrics.recovered_records.inc(got.records)
        self.metrics.recovery_seconds.inc(got.seconds)
        taken = self.core.take_over(partition)
        log.info(
            "partition %d taken over: %d customers, %d changelog records from offset %d in "
            "%.2fs (%.0f/s), clock %s; %s%s",
            partition,
            taken.customers,
            got.records,
            got.start,
            got.seconds,
            got.per_second,
            month_text(taken.clock),
            f"rescoring all, their scores being as of {month_text(taken.scored_month)}, "
            f"before {month_text(taken.month)}"
            if taken.stale
            else "scores current",
            f"; its customers carry another model version ({taken.model}; rescored on their "
            f"next event or by `clv rescore-all`)"
            if taken.model and taken.model != self.core.model
            else "",
        )
