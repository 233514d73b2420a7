"""`clv demo`: the whole product on one machine, with nothing to install by hand.

Starts the embedded broker, a worker, the snapshot sink and the analyst API as child processes,
replays CDNOW at a visible pace, waits until every score is in the snapshot, and prints the top
customers and the segment table. Interactive runs also start the dashboard (when the dashboard
extra is installed) and keep serving until Ctrl-C; `--exit` stops right after the results. Every
child is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from features.batch import read_history
from features.loaders import vendored_cdnow
from state import dashboard
from state.queries import TOP_COLUMNS, QueryError, Snapshot, render_segments, render_table
from stream.broker import free_port, start
from stream.metrics import idle, scrape
from stream.kafka_io import end_offsets
from stream.replay import publish
from stream.settings import Settings

CLV = [sys.executable, "-m", "stream.cli"]


class DemoError(RuntimeError):
    """A child process died or never became ready: the message says which and where its log is."""


@dataclass
class DemoOptions:
    data: str | None  # default: vendored CDNOW
    customers: int | None  # only the first N customers (a short run)
    rate: float | None
    model: str | None
    train: bool
    workdir: Path
    exit_after: bool


class Children:
    """Child processes, each in its own session with a log file, all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def adopt(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.procs.append((name, proc, log))

    def check(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with {proc.returncode}; see {log}")

    def stop_all(self) -> None:
        for _name, proc, _log in reversed(self.procs):  # API, sink, worker, then the broker
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def _wait(what: str, ok, children: Children, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        children.check()
        if time.monotonic() > deadline:
            raise DemoError(f"{what} not reached after {timeout:.0f}s; logs in {children.workdir}")
        time.sleep(0.3)


def _model_dir(opts: DemoOptions, data: str) -> str | None:
    if not opts.train:
        return opts.model
    out = opts.workdir / "model"
    print(f"training a model on {data} into {out} (a few minutes on CPU)...", flush=True)
    res = subprocess.run([*CLV, "train", data, "--cutoff", "1998-06-30", "--horizon-months", "6",
                          "--out", str(out)])
    if res.returncode != 0:
        raise DemoError("training failed (it needs the train extra: pip install -e '.[train]')")
    return str(out)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both end in the clean shutdown below, even when the demo was started
    by a script: shells start background jobs with SIGINT ignored, and Python keeps that."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def run(opts: DemoOptions) -> int:
    _stop_on_signals()

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # results, not client chatter
    data = opts.data or str(vendored_cdnow())
    opts.workdir.mkdir(parents=True, exist_ok=True)
    model = _model_dir(opts, data)
    history = read_history(data)
    events = history.events
    if opts.customers:
        keep = sorted({e.customer_id for e in events})[:opts.customers]
        wanted = set(keep)
        events = [e for e in events if e.customer_id in wanted]
    port, web_port, api_port = free_port(), free_port(), free_port()
    snapshot = opts.workdir / "clv.duckdb"
    for stale in opts.workdir.glob("clv.duckdb*"):
        stale.unlink()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "CLV_DATA_DIR": str(opts.workdir / "worker"), "CLV_SNAPSHOT_PATH": str(snapshot),
           "CLV_SNAPSHOT_INTERVAL_S": "2", "CLV_WEB_PORT": str(web_port),
           "CLV_API_PORT": str(api_port), "PYTHONUNBUFFERED": "1"}
    if model:
        env["CLV_MODEL_DIR"] = model
    settings = Settings.from_env(env)
    children = Children(opts.workdir)
    try:
        broker_log = opts.workdir / "broker.log"
        children.adopt("broker", start(port, broker_log), broker_log)
        print(f"broker (embedded Tansu) on 127.0.0.1:{port}", flush=True)
        asyncio.run(_create_topics(settings))
        children.spawn("worker", [*CLV, "worker"], env)
        children.spawn("snapshot", [*CLV, "snapshot"], env)
        children.spawn("api", [*CLV, "api"], env)
        board = None if opts.exit_after else _start_dashboard(children, snapshot, model, env)
        _wait("worker ready", lambda: _get(f"http://127.0.0.1:{web_port}/ready")[0] == 200,
              children, 120)
        _wait("API up", lambda: _get(f"http://127.0.0.1:{api_port}/health")[0] == 200, children, 60)
        print(f"worker on http://127.0.0.1:{web_port} (/metrics, /customers/ID); replaying "
              f"{len(events):,} invoices of {len({e.customer_id for e in events}):,} customers", flush=True)
        summary = asyncio.run(publish(settings, events, len(events), opts.rate, progress=True))
        print(summary.render(), flush=True)
        print("waiting for the worker to score everyone and the snapshot to catch up...", flush=True)
        _wait("worker idle", lambda: idle(scrape(web_port)), children, 600)
        _wait("snapshot caught up", lambda: _snapshot_complete(settings, snapshot), children, 120)
        _report(Snapshot(snapshot), snapshot, api_port, serving=not opts.exit_after)
        if not opts.exit_after:
            if board:
                _wait("dashboard up", lambda: dashboard.healthy(board), children, 60)
                print(f"Dashboard: {board}", flush=True)
            print("\nserving; Ctrl-C stops everything", flush=True)
            while True:
                children.check()
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        children.stop_all()


def _start_dashboard(children: Children, snapshot: Path, model: str | None,
                     env: dict[str, str]) -> str | None:
    """The dashboard as one more child, on a free loopback port; its URL, or None (with a word
    on how to get it) when the dashboard extra is not installed."""
    try:
        dashboard.require("streamlit")
    except dashboard.DashboardError as exc:
        print(f"no dashboard: {exc}", flush=True)
        return None
    port = free_port()
    children.spawn("dashboard", dashboard.command(snapshot, "127.0.0.1", port, model), env)
    return f"http://127.0.0.1:{port}"


async def _create_topics(settings: Settings) -> None:
    from stream.replay import all_topics, ensure_topics

    await ensure_topics(settings, all_topics(settings))


def _snapshot_complete(settings: Settings, snapshot: Path) -> bool:
    """The snapshot covers every score published so far."""
    try:
        have = {int(k): v for k, v in Snapshot(snapshot).summary()["offsets"].items()}
    except QueryError:  # no snapshot yet
        return False
    want = asyncio.run(end_offsets(settings, settings.scores_topic))
    return all(have.get(p, 0) >= o for p, o in want.items() if o)


def _report(snap: Snapshot, path: Path, api_port: int, serving: bool) -> None:
    summary = snap.summary()
    installed = Path(sys.executable).parent / "clv"  # the commands as this install names them
    clv = str(installed) if installed.exists() else "clv"
    print(f"\n{summary['customers']:,} customers scored by {', '.join(summary['model_versions'])}, "
          f"as of {summary['newest_event_time']}")
    top = snap.top(10)
    horizon = f"{top[0]['horizon_months']}-month " if top else ""
    print(f"\nTop 10 customers by expected {horizon}CLV (expected spend)")
    print(render_table(top, TOP_COLUMNS))
    print("\nSegments")
    print(render_segments(snap.segments(), ["segment", "customers", "total_clv", "mean_clv",
                                            "share_of_value", "mean_p_purchase"]))
    print("\nValue tiers (terciles of expected CLV)")
    print(render_table(snap.tiers(), ["value_tier", "customers", "min_clv", "max_clv",
                                      "total_clv", "share_of_value"]))
    print("\nBehavioral clusters")
    print(render_table(snap.clusters(), ["cluster", "customers", "total_clv", "share_of_value",
                                         "mean_recency_days", "mean_frequency", "main_segment"]))
    print(f"""
DuckDB snapshot: {path}  (replaced atomically every few seconds; open it read-only)
  {clv} query top --n 20 --snapshot {path}
  {clv} query segments --snapshot {path}
  {clv} query clusters --snapshot {path}
  {clv} query sql "SELECT segment, count(*) FROM customer_scores GROUP BY 1" --snapshot {path}
  {clv} export --out top.csv --segment vip --snapshot {path}
  duckdb -readonly {path} "SELECT * FROM segment_summary"   (with the DuckDB CLI)
API: http://127.0.0.1:{api_port}  (/top?n=10, /segments, /clusters, /customers/ID, /summary, /export.csv,
  POST /score, /openapi.json)"""
          + ("" if serving else "\n(--exit: the API stops with the demo; `clv api --snapshot PATH` serves the file, "
                                "`clv dashboard --snapshot PATH` shows it)"),
          flush=True)

