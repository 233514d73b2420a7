"""Failed flushes against a real broker: an embedded broker of the test's own is stopped
(SIGSTOP) while the worker still has fetched events to process (the whole file was published
before it started), so every write of theirs times out, then resumed (SIGCONT). Nothing is
mocked: the worker, the broker and `clv replay` are the product's own processes."""

from __future__ import annotations

import gzip
import json
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import fresh_topics, make_env
from features.loaders import vendored_cdnow
from harness import assert_exact, batch_scores, last_scores, replay, start_worker, wait_idle
from stream.processes import Broker, wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """An embedded broker of the test's own, which it may pause and resume."""
    broker = Broker(tmp_path / "broker.log")
    try:
        yield broker
    finally:
        broker.send_signal(signal.SIGCONT)
        broker.stop(timeout=10)


def cdnow_customers(tmp: Path, n: int) -> tuple[Path, int]:
    """The first `n` CDNOW customers as a file, and its number of invoices."""
    lines = gzip.decompress(vendored_cdnow().read_bytes()).decode().splitlines()
    kept = [l for l in lines[1:] if int(l.split()[0]) <= n]
    path = tmp / f"cdnow{n}.txt"
    path.write_text("\n".join([lines[0], *kept]) + "\n")
    return path, len(kept)


def lag(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k.startswith("clv_consumer_lag"))


def test_backoff_doubles_up_to_its_ceiling_and_a_success_ends_the_failure():
    """The retry schedule and what /ready says, without a broker."""
    from stream.flush_policy import BACKOFF_MAX_S, FlushFailures

    failures = FlushFailures(timeout_s=3600)
    waits = []
    for _ in range(8):
        failures.failed(TimeoutError("broker did not answer"))
        waits.append(round(failures.wait(), 1))
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, BACKOFF_MAX_S, BACKOFF_MAX_S, BACKOFF_MAX_S]
    assert not failures.may_retry() and failures.failing
    assert "8 attempts" in failures.not_ready_reason()
    assert "TimeoutError: broker did not answer" in failures.not_ready_reason()
    failures.succeeded()
    assert failures.may_retry() and not failures.failing and failures.not_ready_reason() == ""
    assert failures.age(pending=False) == 0


def test_broker_stopped_under_the_worker_fails_flushes_visibly_then_recovers_exact(broker, tmp_path):
    """While the broker is stopped every flush times out: /ready answers 503 with the reason,
    clv_flush_failures_total rises, the lag against the committed offset shows the events
    waiting, intake holds (dirty customers stay near a micro-batch) and the worker does not
    exit. Resumed, the retries publish what was kept and every score ends as `clv score`'s."""
    bootstrap = broker.bootstrap
    env = {**make_env(bootstrap, fresh_topics(), tmp_path), "CLV_PUBLISH_TIMEOUT_S": "1",
           "CLV_FLUSH_FAILURE_TIMEOUT_S": "120", "CLV_BATCH_SIZE": "64"}
    data, n_events = cdnow_customers(tmp_path, 3000)
    published = replay(env, data)
    assert published.wait(180) == 0, published.stderr.read()
    worker = start_worker(env, tmp_path)
    try:
        worker.wait_ready()
        wait_for("events reaching the worker",
                 lambda: worker.metrics().get("clv_events_in_total", 0) > 500, 60)
        broker.send_signal(signal.SIGSTOP)
        seen: list[tuple[int, str, dict[str, float]]] = []

        def failing() -> bool:
            status, body = worker.get("/ready")
            seen.append((status, body, worker.metrics()))
            return status == 503 and seen[-1][2].get("clv_flush_failures_total", 0) >= 3

        wait_for("flushes failing visibly", failing, 60)
        status, body, during = seen[-1]
        assert "flushes failing" in json.loads(body)["reason"]
        assert during["clv_flush_success_age_seconds"] >= 1
        # Lag counts from the committed offset: the events processed but held unacknowledged
        # too, not only those still to process (all were published before the worker started).
        assert lag(during) > n_events - during["clv_events_in_total"]
        assert max(m.get("clv_dirty_customers", 0) for _, _, m in seen) <= 4 * 64  # intake held
        time.sleep(3)
        assert worker.proc.poll() is None  # within flush_failure_timeout_s: retrying, not exiting
        assert lag(worker.metrics()) >= lag(during)
        broker.send_signal(signal.SIGCONT)
        wait_idle([worker], n_events, timeout=300)
        after = worker.metrics()
        assert worker.get("/ready")[0] == 200
        assert after["clv_flush_failures_total"] >= 3
        assert after["clv_flush_success_age_seconds"] < 5 and lag(after) == 0
    finally:
        broker.send_signal(signal.SIGCONT)
        worker.stop()
    log = worker.log.read_text(errors="replace")
    assert "flush failed" in log and "flush succeeded after" in log
    assert_exact(last_scores(bootstrap, env["CLV_SCORES_TOPIC"]), batch_scores(tmp_path, data))


def test_flushes_failing_past_the_timeout_exit_75_and_a_restart_is_exact(broker, tmp_path):
    """Flushes failing longer than flush_failure_timeout_s end the worker with exit code 75 and
    a log line saying why and what to check; restarted once the broker is back, the worker
    takes the events again from the committed offset and ends exactly as `clv score`."""
    bootstrap = broker.bootstrap
    env = {**make_env(bootstrap, fresh_topics(), tmp_path), "CLV_PUBLISH_TIMEOUT_S": "1",
           "CLV_FLUSH_FAILURE_TIMEOUT_S": "4"}
    data, _ = cdnow_customers(tmp_path, 2000)
    published = replay(env, data)
    assert published.wait(180) == 0, published.stderr.read()
    first = start_worker(env, tmp_path, "first", state="w")
    try:
        first.wait_ready()
        wait_for("events reaching the worker",
                 lambda: first.metrics().get("clv_events_in_total", 0) > 500, 60)
        broker.send_signal(signal.SIGSTOP)
        assert first.proc.wait(60) == 75
    finally:
        broker.send_signal(signal.SIGCONT)
        first.stop()
    log = first.log.read_text(errors="replace")
    assert "longer than flush_failure_timeout_s=4s: exiting with code 75" in log, log[-3000:]
    again = start_worker(env, tmp_path, "again", state="w")
    try:
        again.wait_ready()
        wait_idle([again], 1, timeout=300)
    finally:
        again.stop()
    assert_exact(last_scores(bootstrap, env["CLV_SCORES_TOPIC"]), batch_scores(tmp_path, data))


def test_a_commit_that_stops_moving_behind_processed_events_makes_the_worker_not_ready():
    """The committed offset held while events after it are processed: not ready after
    commit_stall_s, naming the partition; moving again (or nothing past it), ready."""
    from stream.flush_policy import CommitWatch

    watch = CommitWatch(stall_s=10)
    watch.observe(2, committed=100, position=105, now=0.0)
    watch.observe(2, committed=100, position=140, now=9.0)
    assert watch.not_ready_reason() == ""
    watch.observe(2, committed=100, position=180, now=11.0)
    assert watch.not_ready_reason() == ("partition 2: committed offset 100 has not moved for 11s "
                                        "while 80 events after it were processed")
    watch.observe(2, committed=181, position=190, now=12.0)  # commits pass it again
    assert watch.not_ready_reason() == ""
    watch.observe(1, committed=50, position=50, now=0.0)  # idle: nothing held
    watch.observe(1, committed=50, position=50, now=100.0)
    assert watch.not_ready_reason() == ""
    watch.observe(3, committed=7, position=9, now=0.0)
    watch.observe(3, committed=7, position=9, now=30.0)
    watch.forget({3})  # revoked
    assert watch.not_ready_reason() == ""
