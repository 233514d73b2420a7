"""Shared fixtures: a real Kafka-protocol broker for the whole session.

KAFKA_BOOTSTRAP_SERVERS when set; else testcontainers' Kafka when a Docker engine answers; else
the embedded Tansu broker on a free loopback port.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest


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
    from stream.broker import free_port, start

    port = free_port()
    proc = start(port, tmp_path_factory.mktemp("broker") / "tansu.log")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def topic_names():
    """Fresh topic and group names per test, so tests sharing the broker never see each other."""
    tag = uuid.uuid4().hex[:8]
    return {
        "CLV_TRANSACTIONS_TOPIC": f"tx-{tag}",
        "CLV_SCORES_TOPIC": f"scores-{tag}",
        "CLV_DLQ_TOPIC": f"dlq-{tag}",
        "CLV_APP_ID": f"clv-{tag}",
    }


@pytest.fixture
def clv_env(kafka_bootstrap, topic_names, tmp_path):
    env = {**os.environ, **topic_names, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "CLV_DATA_DIR": str(tmp_path / "worker"), "PYTHONUNBUFFERED": "1",
           "CLV_SESSION_TIMEOUT_S": "6"}
    return env


