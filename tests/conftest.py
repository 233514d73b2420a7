"""Shared fixtures: a real Kafka-protocol broker for the whole session.

KAFKA_BOOTSTRAP_SERVERS when set; else testcontainers' Kafka when a Docker engine answers; else
the embedded Tansu broker on a free loopback port.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# One thread for every library's pool (OpenMP, MKL, OpenBLAS: torch, scikit-learn, numpy), here
# and in every process the tests start. On a machine of few cores shared with other work, spinning
# OpenMP threads made one training epoch take from 0.8 s to two minutes; no test's claim depends
# on threads. Set before any test module imports those libraries.
for _pool in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_pool, "1")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if os.environ.get("CLV_TEST_DOCKER", "1") == "1" and _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from stream.processes import Broker

    broker = Broker(tmp_path_factory.mktemp("broker") / "tansu.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop(timeout=10)


def fresh_topics() -> dict[str, str]:
    """Fresh topic and group names, so tests sharing the broker never see each other."""
    tag = uuid.uuid4().hex[:8]
    return {
        "CLV_TRANSACTIONS_TOPIC": f"tx-{tag}",
        "CLV_SCORES_TOPIC": f"scores-{tag}",
        "CLV_DLQ_TOPIC": f"dlq-{tag}",
        "CLV_APP_ID": f"clv-{tag}",
    }


@pytest.fixture
def topic_names():
    return fresh_topics()


def make_env(bootstrap: str, topics: dict[str, str], tmp: Path) -> dict[str, str]:
    return {**os.environ, **topics, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "CLV_DATA_DIR": str(tmp / "worker"), "CLV_SNAPSHOT_PATH": str(tmp / "clv.duckdb"),
            "PYTHONUNBUFFERED": "1", "CLV_SESSION_TIMEOUT_S": "6",
            "CLV_SNAPSHOT_INTERVAL_S": "1"}  # a sink's next snapshot within a second, not ten


@pytest.fixture
def clv_env(kafka_bootstrap, topic_names, tmp_path):
    return make_env(kafka_bootstrap, topic_names, tmp_path)


@dataclass
class LiveRun:
    env: dict[str, str]
    tmp: Path
    snapshot: Path
    worker_log: str
    customer_page: tuple[int, str]  # the worker's /customers/00001 before it stopped
    reader: dict  # what a process reading the snapshot in a tight loop saw during the replay


@pytest.fixture(scope="session")
def cdnow_live(kafka_bootstrap, tmp_path_factory) -> LiveRun:
    """All of vendored CDNOW replayed once per session through a worker and the snapshot sink,
    while another process reads the snapshot in a tight loop. The worker and sink are stopped
    (SIGTERM) before the tests look at the results."""
    from features.loaders import vendored_cdnow
    from harness import CLV, replay, start_worker, wait_idle, wait_snapshot_caught_up
    from stream.processes import Child, clv

    tmp = tmp_path_factory.mktemp("cdnow-live")
    env = make_env(kafka_bootstrap, fresh_topics(), tmp)
    env["CLV_SNAPSHOT_INTERVAL_S"] = "0.5"
    snapshot = Path(env["CLV_SNAPSHOT_PATH"])
    stop_reader, reader_out = tmp / "stop-reader", tmp / "reader.json"
    worker = start_worker(env, tmp)
    sink = Child(clv("snapshot"), env, tmp / "sink.log")
    reader = subprocess.Popen([CLV[0], str(Path(__file__).parent / "snapshot_reader.py"),
                               str(snapshot), str(stop_reader), str(reader_out)])
    try:
        worker.wait_ready()
        rep = replay(env, vendored_cdnow())
        assert rep.wait(300) == 0, rep.stderr.read()
        wait_idle([worker], 69_659, timeout=600)
        wait_snapshot_caught_up(snapshot, kafka_bootstrap, env["CLV_SCORES_TOPIC"])
        page = worker.get("/customers/00001")
    finally:
        stop_reader.touch()
        reader.wait(60)
        worker.stop()
        assert sink.stop() == 0, sink.output()[-3000:]
    return LiveRun(env, tmp, snapshot, worker.log.read_text(errors="replace"), page,
                   json.loads(reader_out.read_text()))


@pytest.fixture(scope="session")
def cdnow_batch(tmp_path_factory) -> dict[str, dict]:
    """`clv score` of vendored CDNOW with the shipped model: what the stream must agree with."""
    from features.loaders import vendored_cdnow
    from harness import batch_scores

    return batch_scores(tmp_path_factory.mktemp("cdnow-batch"), vendored_cdnow())




@dataclass
class DemoRun:
    workdir: Path
    snapshot: Path
    output: str


@pytest.fixture(scope="session")
def demo_3000(tmp_path_factory) -> DemoRun:
    """`clv demo --exit --customers 3000` once per session, on its own embedded broker: what a
    newcomer runs first, and the snapshot the dashboard tests open."""
    from harness import CLV

    workdir = tmp_path_factory.mktemp("demo") / "demo"
    res = subprocess.run([*CLV, "demo", "--customers", "3000", "--rate", "3000", "--exit",
                          "--workdir", str(workdir)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ""})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return DemoRun(workdir, workdir / "clv.duckdb", res.stdout)
