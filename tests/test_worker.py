"""The worker against a real broker: exact scores end to end, after kill -9, with poison input,
and across a rebalance. Workers run as separate processes, as in production."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from export_onnx.artifact import shipped_model_dir
from features.loaders import vendored_cdnow
from stream.broker import free_port

CLV = [sys.executable, "-m", "stream.cli"]




class Worker:
    def __init__(self, env: dict, tmp: Path, name: str = "w1") -> None:
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [*CLV, "worker", "--web-port", str(self.port), "--batch-wait-ms", "20"],
            env={**env, "CLV_DATA_DIR": str(tmp / f"{name}-state")},  # one state dir per worker
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            if self.get("/ready")[0] == 200:
                return
            time.sleep(0.3)
        raise AssertionError("worker never became ready\n" + self.log.read_text(errors="replace")[-3000:])

    def idle(self) -> bool:
        m = self.metrics()
        lag = sum(v for k, v in m.items() if k.startswith("clv_consumer_lag"))
        return bool(m) and lag == 0 and m.get("clv_dirty_customers") == 0 and m.get("clv_backlog_customers") == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
        except ProcessLookupError:
            pass  # already gone
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_idle(workers: list[Worker], events: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    stable = 0
    while time.monotonic() < deadline:
        seen = sum(w.metrics().get("clv_events_in_total", 0) for w in workers)
        if seen >= events and all(w.idle() for w in workers):
            stable += 1
            if stable >= 3:
                return
        else:
            stable = 0
        time.sleep(0.5)
    raise AssertionError(f"workers not idle after {timeout}s: {[w.metrics() for w in workers]}")


def read_topic(bootstrap: str, topic: str) -> list:
    async def run() -> list:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=None)
        await consumer.start()
        out = []
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=2000, max_records=10000)
                if not batch:
                    break
                for records in batch.values():
                    out.extend(records)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def last_scores(bootstrap: str, topic: str) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    # One key always lands in one partition, so offset order is publish order.
    for rec in sorted(read_topic(bootstrap, topic), key=lambda r: (r.partition, r.offset)):
        latest[rec.key.decode()] = json.loads(rec.value)
    return latest


def batch_scores(tmp: Path, data: Path) -> dict[str, dict]:
    out = tmp / "batch.csv"
    res = subprocess.run([*CLV, "score", str(data), "--model", str(shipped_model_dir()), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return {r["customer_id"]: r for r in csv.DictReader(out.open())}


def replay(env: dict, data: Path, rate: float | None = None) -> subprocess.Popen:
    args = [*CLV, "replay", str(data), "--quiet"] + (["--rate", str(rate)] if rate else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_exact(live: dict[str, dict], batch: dict[str, dict]) -> None:
    assert set(live) == set(batch)
    worst = 0.0
    for cid, b in batch.items():
        a = live[cid]
        assert a["frequency"] == int(b["frequency"]), cid
        assert abs(a["total_spend"] - float(b["total_spend"])) < 1e-9, cid
        rel = abs(a["clv"] - float(b["clv"])) / max(abs(float(b["clv"])), 1e-9)
        worst = max(worst, rel)
    assert worst < 1e-5, worst


@pytest.fixture(scope="module")
def cdnow_slice(tmp_path_factory) -> Path:
    """The first 3,000 CDNOW customers: every month of the 18, at a test's pace."""
    import gzip

    path = tmp_path_factory.mktemp("data") / "cdnow3000.txt"
    lines = gzip.decompress(vendored_cdnow().read_bytes()).decode().splitlines()
    path.write_text("\n".join([lines[0]] + [l for l in lines[1:] if int(l.split()[0]) <= 3000]) + "\n")
    return path


def test_end_to_end_cdnow_matches_batch(clv_env, kafka_bootstrap, tmp_path):
    data = vendored_cdnow()
    worker = Worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        rep = replay(clv_env, data)
        assert rep.wait(300) == 0, rep.stderr.read()
        wait_idle([worker], 69_659, timeout=600)
        status, body = worker.get("/customers/00001")
        assert status == 200 and json.loads(body)["score"]["customer_id"] == "00001"
    finally:
        worker.stop()
    live = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert len(live) == 23_570
    assert_exact(live, batch_scores(tmp_path, data))
    sample = next(iter(live.values()))
    for field in ("customer_id", "clv", "p_purchase", "segment", "horizon_months", "model_version",
                  "as_of", "scored_at", "recency_days", "frequency", "monetary"):
        assert field in sample
    assert sample["as_of"].startswith("1998-06")


def test_kill_9_mid_replay_loses_and_doubles_nothing(clv_env, kafka_bootstrap, tmp_path, cdnow_slice):
    worker = Worker(clv_env, tmp_path, "first")
    worker.wait_ready()
    n_events = sum(1 for _ in cdnow_slice.open()) - 1
    rep = replay(clv_env, cdnow_slice, rate=1500)
    time.sleep(4)
    before = worker.metrics().get("clv_events_in_total", 0)
    worker.stop(signal.SIGKILL)
    assert 0 < before < n_events  # killed mid-stream
    assert rep.wait(120) == 0, rep.stderr.read()
    again = Worker(clv_env, tmp_path, "second")
    try:
        again.wait_ready()
        wait_idle([again], 1, timeout=300)
    finally:
        again.stop()
    live = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert_exact(live, batch_scores(tmp_path, cdnow_slice))


def test_poison_events_go_to_the_dlq_with_reasons(clv_env, kafka_bootstrap, tmp_path):
    good = {"schema_version": 1, "event_id": "g1", "customer_id": "c1", "invoice_no": "1",
            "ts": "2011-01-05T10:00:00+00:00", "lines": [{"stock_code": "A", "quantity": 2, "unit_price": 5.0}]}
    poison = [
        (b"c2", b"{oops", "malformed_json"),
        (b"c2", json.dumps({**good, "customer_id": "c2", "event_id": "p1", "lines": None}).encode(), "missing_field"),
        (b"c2", json.dumps({**good, "customer_id": "c2", "event_id": "p2", "lines": "x"}).encode(), "wrong_type"),
        (b"c2", json.dumps({**good, "customer_id": "c2", "event_id": "p3", "ts": "2011-01-05T10:00:00"}).encode(), "naive_timestamp"),
        (b"c2", b'{"schema_version":1,"event_id":"p4","customer_id":"c2","invoice_no":"9","ts":"2011-01-05T10:00:00Z",'
                b'"lines":[{"stock_code":"A","quantity":1,"unit_price":NaN}]}', "non_finite"),
        (b"c2", json.dumps({**good, "customer_id": "c2", "event_id": "p5", "schema_version": 7}).encode(), "unknown_schema_version"),
        (b"zz", json.dumps({**good, "event_id": "p6"}).encode(), "key_mismatch"),
    ]
    valid = [(b"c1", json.dumps(good).encode()),
             (b"c1", json.dumps({**good, "event_id": "g2", "invoice_no": "2", "ts": "2011-02-07T10:00:00+00:00"}).encode()),
             (b"c3", json.dumps({**good, "customer_id": "c3", "event_id": "g3", "invoice_no": "3"}).encode())]

    async def produce() -> None:
        from stream.replay import all_topics, ensure_topics
        from stream.settings import Settings

        await ensure_topics(Settings.from_env(clv_env), all_topics(Settings.from_env(clv_env)))
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            mixed = [valid[0], *[(k, v) for k, v, _ in poison[:4]], valid[1], *[(k, v) for k, v, _ in poison[4:]], valid[2]]
            for key, value in mixed:
                await producer.send_and_wait(clv_env["CLV_TRANSACTIONS_TOPIC"], value, key=key)
        finally:
            await producer.stop()

    worker = Worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        asyncio.run(produce())
        wait_idle([worker], len(valid) + len(poison), timeout=120)
        pid_before = worker.proc.pid
        assert worker.proc.poll() is None and worker.proc.pid == pid_before
        m = worker.metrics()
    finally:
        worker.stop()
    assert "Restarting dead" not in worker.log.read_text(errors="replace")
    dlq = read_topic(kafka_bootstrap, clv_env["CLV_DLQ_TOPIC"])
    got = sorted((dict(r.headers)["reason"].decode(), r.value) for r in dlq)
    assert sorted((reason, value) for _, value, reason in poison) == got
    for r in dlq:
        h = dict(r.headers)
        assert {"source_partition", "source_offset", "detail"} <= set(h)
    for _, _, reason in poison:
        assert m[f'clv_dlq_total{{reason="{reason}"}}'] >= 1
    scores = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert set(scores) == {"c1", "c3"}
    assert scores["c1"]["frequency"] == 2 and scores["c1"]["total_spend"] == 20.0
    assert scores["c3"]["frequency"] == 1


@pytest.mark.xfail(strict=False, reason=(
    "known bug under investigation: after the eager rebalance that follows one worker stopping, "
    "the surviving worker can miss one invoice of a customer on a partition it kept"))
def test_two_workers_share_partitions_and_survive_one_stopping(clv_env, kafka_bootstrap, tmp_path, cdnow_slice):
    a, b = Worker(clv_env, tmp_path, "a"), Worker(clv_env, tmp_path, "b")
    try:
        a.wait_ready()
        b.wait_ready()
        rep = replay(clv_env, cdnow_slice, rate=2000)
        time.sleep(4)
        ma, mb = a.metrics(), b.metrics()
        assert ma.get("clv_events_in_total", 0) > 0 and mb.get("clv_events_in_total", 0) > 0
        parts_a = {k for k in ma if k.startswith("clv_consumer_lag")}
        parts_b = {k for k in mb if k.startswith("clv_consumer_lag")}
        assert parts_a and parts_b and not parts_a & parts_b
        b.stop()
        assert rep.wait(120) == 0, rep.stderr.read()
        deadline = time.monotonic() + 120  # the group moves b's partitions to a
        while a.metrics().get("clv_partitions_owned") != 4:
            assert time.monotonic() < deadline, "partitions of the stopped worker never moved"
            time.sleep(0.5)
        wait_idle([a], 1, timeout=300)
    finally:
        a.stop()
        b.stop()
    live = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert_exact(live, batch_scores(tmp_path, cdnow_slice))
