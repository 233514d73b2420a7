"""What a newcomer and an operator meet: the demo end to end, and the Compose deployment checked
against the code's own settings and commands (our machines have no Docker engine)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from harness import CLV
from state.snapshot.queries import RANGE_NOTE
from stream.cli import build_parser
from stream.settings import Settings, env_names

ROOT = Path(__file__).resolve().parents[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_using(path: Path) -> list[str]:
    """Processes whose command line or environment mentions `path` (the demo's work dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(path).encode() in blob:
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    return found


def _ports(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]


def test_demo_runs_end_to_end_and_leaves_nothing_behind(demo_3000):
    workdir, out = demo_3000.workdir, demo_3000.output
    top = out.split("Top 10 customers")[1].split("\nSegments")[0].strip().splitlines()[1:]
    assert top[0].split()[:2] == ["customer_id", "clv"] and len(top) == 11
    segments = out.split("\nSegments")[1].split("Value tiers")[0].strip().splitlines()
    assert segments[0].split()[0] == "segment" and len(segments) >= 2
    tiers = out.split("Value tiers")[1].split("Behavioral clusters")[0]
    for table in ("\n".join(segments), tiers):  # each total with its range, and what that assumes
        assert "total_clv_low" in table and "total_clv_high" in table and RANGE_NOTE in table
    assert "DuckDB snapshot:" in out and "API: http://127.0.0.1:" in out
    assert (workdir / "clv.duckdb").exists()
    time.sleep(1)
    assert not [p for p in _ports(out) if _listening(p)]
    assert _processes_using(workdir) == []


def _as_a_background_job() -> None:
    """Start SIGINT ignored, as a shell starts the background jobs of a script."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_demo_ctrl_c_stops_everything(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.Popen([*CLV, "demo", "--customers", "100", "--rate", "3000", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ""},
                            preexec_fn=_as_a_background_job)
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
            break
    assert any("Ctrl-C stops everything" in line for line in lines), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    out = "".join(lines) + rest
    assert re.search(r"Dashboard: http://127\.0\.0\.1:\d+", out), out[-3000:]  # started with the rest
    assert not [p for p in _ports(out) if _listening(p)]
    assert _processes_using(workdir) == []


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_services_and_images(compose):
    services = compose["services"]
    assert {"kafka", "topics", "worker", "snapshot", "api", "replay"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in _env(kafka)["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in name for name in services)
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["replay"]["profiles"] == ["replay"]
    for name in ("kafka", "worker", "snapshot", "api"):
        assert "healthcheck" in services[name], name
    assert any(v.endswith(":/data") for v in services["snapshot"]["volumes"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in dockerfile and "[train]" not in dockerfile and "torch" in dockerfile


def test_compose_commands_and_environment_match_the_code(compose):
    parser = build_parser()
    known_env = {env for name in Settings.model_fields for env in env_names(name)}
    for name in ("worker", "snapshot", "api", "replay"):
        service = compose["services"][name]
        args = parser.parse_args(service["command"])  # a real `clv` command line
        assert args.command == service["command"][0]
        env = _env(service)
        assert set(env) <= known_env, set(env) - known_env
        settings = Settings.from_env(env)  # every value is one the settings accept
        assert settings.bootstrap_servers == "kafka:9092"
    worker_env = _env(compose["services"]["worker"])
    settings = Settings.from_env(worker_env)
    script = compose["services"]["topics"]["command"][0]
    topics_env = _env(compose["services"]["topics"])
    assert topics_env == _env({"environment": compose["x-clv-env"]})  # the settings' values
    created = {}
    replication = None  # the flags of the script's `r=` line
    for line in script.splitlines():
        line = line.strip().replace("$$", "$")
        if line.startswith("r="):  # replication, as the worker and `clv replay` create topics
            replication = shlex.split(shlex.split(line[2:])[0].replace("$CLV_REPLICATION_FACTOR",
                                      str(settings.replication_factor)).replace(
                                      "$CLV_MIN_INSYNC_REPLICAS", str(settings.min_insync_replicas)))
        if "--create" in line:
            words = shlex.split(line)
            assert "$r" in words, line
            topic = words[words.index("--topic") + 1]
            created[topic] = (int(words[words.index("--partitions") + 1]),
                              words[words.index("--config") + 1] if "--config" in words else "")
    assert replication == ["--replication-factor", str(settings.replication_factor), "--config",
                           f"min.insync.replicas={settings.min_insync_replicas}"]
    assert created[settings.transactions_topic] == (settings.partitions, "")
    assert created[settings.scores_topic] == (settings.partitions, "cleanup.policy=compact")
    assert created[settings.dlq_topic][0] == settings.partitions
    assert created[settings.control_topic][0] == settings.partitions
    assert created[f"{settings.app_id}-customer-state-changelog"] == (settings.partitions, "cleanup.policy=compact")
    assert compose["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(settings.web_port) == 6066 and "6066" in str(compose["services"]["worker"]["healthcheck"])
    snap = Settings.from_env(_env(compose["services"]["snapshot"]))
    api = compose["services"]["api"]
    assert snap.snapshot_path == "/data/clv.duckdb" == _env(api)["CLV_SNAPSHOT_PATH"]
    assert "CLV_API_TOKEN" in _env(api)  # not loopback: the API refuses to start without a token
    replay = compose["services"]["replay"]["command"]
    assert Path(replay[1]).name == "CDNOW_master.txt.gz" and (ROOT / "features/data/CDNOW_master.txt.gz").exists()


def test_the_configuration_table_of_the_docs_matches_the_settings():
    readme = (ROOT / "docs/operations.md").read_text()
    for name, env, default, doc in Settings.describe():
        assert f"| `{name}` | `{env}` | `{default}` | {doc} |" in readme, name


def test_the_worker_is_built_from_the_settings_it_is_given(tmp_path):
    """`clv worker` resolves its settings (defaults, environment, flags) and builds the app from
    them: nothing is read from the environment at import."""
    from stream.app import create_app

    settings = Settings.from_env({"CLV_APP_ID": "from-env", "KAFKA_BOOTSTRAP_SERVERS": "k9:9092"},
                                 bootstrap_servers="k1:9092,k2:9092", web_port=6099, data_dir=str(tmp_path))
    app = create_app(settings)
    assert (app.conf.id, app.conf.web_port, str(app.conf.datadir)) == ("from-env", 6099, str(tmp_path))
    assert [str(url) for url in app.conf.broker] == ["kafka://k1:9092", "kafka://k2:9092"]
