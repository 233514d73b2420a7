"""What the worker does when a micro-batch flush fails, whichever path started it.

A flush publishes the scores of the dirty customers and the changelog records of their states,
then acknowledges the events behind them. When it fails (a broker timeout, a record the broker
refuses, a scoring error) nothing of it is dropped: the worker puts its customers, records and
acknowledgements back and retries with exponential backoff. Meanwhile the group's committed
offset cannot pass the unacknowledged events, so the worker is not ready and says why; intake
waits (stream.flusher.Flusher.hold_intake) instead of racing ahead. Failing longer than
`flush_failure_timeout_s` ends the process with EXIT_CODE: a supervisor restarts it and the
events since the committed offset are redelivered, so nothing is lost.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("clv.worker")
BACKOFF_FIRST_S = 0.5  # the first retry; each failure in a row doubles the wait
BACKOFF_MAX_S = 10.0  # longest wait between attempts
EXIT_CODE = os.EX_TEMPFAIL  # 75: a temporary failure; restarting is the remedy


class FlushFailures:
    """Failures in a row: when to try again, what /ready says, when to give up."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.since: float | None = None  # monotonic time of the first failure in a row
        self.attempts = 0
        self.retry_at = 0.0
        self.reason = ""
        self.succeeded_at = time.monotonic()

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        """Count a failure and schedule the next attempt; past the timeout, exit."""
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        self.attempts += 1
        self.reason = _describe(exc)
        wait = min(BACKOFF_FIRST_S * 2 ** min(self.attempts - 1, 10), BACKOFF_MAX_S)
        self.retry_at = now + wait
        if now - self.since > self.timeout_s:
            self.give_up(now - self.since)
        log.warning(
            "flush failed (%d in a row for %.1fs): %s; its customers, state records and "
            "acknowledgements are kept and retried in %.1fs; the worker exits after %.0fs "
            "of failures (flush_failure_timeout_s)",
            self.attempts,
            now - self.since,
            self.reason,
            wait,
            self.timeout_s,
        )

    def succeeded(self) -> None:
        if self.since is not None:
            log.info("flush succeeded after %d failures in %.1fs", self.attempts, time.monotonic() - self.since)
        self.since, self.attempts, self.retry_at, self.reason = None, 0, 0.0, ""
        self.succeeded_at = time.monotonic()

    def may_retry(self) -> bool:
        return time.monotonic() >= self.retry_at

    def wait(self) -> float:
        """Seconds until the next attempt is due."""
        return max(0.0, self.retry_at - time.monotonic())

    def not_ready_reason(self) -> str:
        """What /ready answers while flushes fail ("" when they do not)."""
        if self.since is None:
            return ""
        return (
            f"flushes failing for {time.monotonic() - self.since:.0f}s ({self.attempts} "
            f"attempts): {self.reason}; exiting after {self.timeout_s:.0f}s"
        )

    def age(self, pending: bool) -> float:
        """Seconds since a flush last succeeded; 0 while nothing waits to be published."""
        now = time.monotonic()
        if not pending and self.since is None:
            self.succeeded_at = now
        return now - self.succeeded_at

    def give_up(self, failing_s: float) -> None:
        """Exit at once, without a clean stop: that would first flush and commit through the
        broker that keeps failing, and could hang on it. Nothing is lost: the events since the
        committed offset are redelivered, and the store never holds a state ahead of the
        changelog (the same as after kill -9)."""
        exit_for_restart(
            f"flushes have failed for {failing_s:.0f}s ({self.attempts} attempts, last: "
            f"{self.reason}), longer than flush_failure_timeout_s={self.timeout_s:.0f}s: exiting "
            f"with code {EXIT_CODE} so the supervisor restarts the worker; events since the last "
            "committed offset are redelivered. Check the broker (reachable? topics writable? "
            "records under its max.message.bytes?)"
        )


def exit_for_restart(message: str) -> None:
    """Log `message` as critical and exit with EXIT_CODE at once (see `FlushFailures.give_up`)."""
    log.critical("%s", message)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def _describe(exc: BaseException) -> str:
    """The exception's type and message, the type once (Kafka errors repeat it)."""
    name, text = type(exc).__name__, str(exc)
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class CommitWatch:
    """Partitions whose committed offset stays put while the events after it are processed: an
    event that was never acknowledged holds back every commit behind it, so a restart would
    redeliver all of them. Whatever the cause, /ready says so instead of answering 200."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.seen: dict[int, tuple[int, float]] = {}  # partition -> (committed offset, since)
        self.stalled: dict[int, str] = {}  # partition -> why it is stalled

    def observe(self, partition: int, committed: int | None, position: int | None, now: float | None = None) -> None:
        """The partition's committed offset and the next offset it will process, as of `now`."""
        now = time.monotonic() if now is None else now
        if committed is None or position is None or position <= committed:
            self.seen.pop(partition, None)  # nothing processed past the commit: nothing held
            self.stalled.pop(partition, None)
            return
        held, since = self.seen.get(partition, (committed, now))
        if held != committed:
            held, since = committed, now
        self.seen[partition] = (held, since)
        if now - since < self.stall_s:
            self.stalled.pop(partition, None)
        elif partition not in self.stalled:
            self.stalled[partition] = (
                f"partition {partition}: committed offset {committed} has not moved for "
                f"{now - since:.0f}s while {position - committed} events after it were processed"
            )
            log.error(
                "%s; a restart would process them again (an event not acknowledged: see "
                "the log for an error about offset %d)",
                self.stalled[partition],
                committed,
            )

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.seen.pop(partition, None)
            self.stalled.pop(partition, None)

    def not_ready_reason(self) -> str:
        return "; ".join(self.stalled[p] for p in sorted(self.stalled))
