"""`clv demo`: the whole product on one machine, with nothing to install by hand.

Picks the model: the one given (default: the shipped one) when it was trained on the file, else
one trained on the file first (unless `--no-train`), and says which in one line. Starts the
embedded broker, a worker, the snapshot sink and the analyst API as child processes, replays the
file (default: CDNOW) at a visible pace, waits until every score is in the snapshot, and prints the top
customers and the segment table. Interactive runs also start the dashboard (when the dashboard
extra is installed) and keep serving until Ctrl-C; `--exit` stops right after the results. Every
child is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from export_onnx import ArtifactError
from export_onnx.runtime import Artifact
from features.batch import fingerprint, read_history
from features import population
from features.contract import TransactionEvent
from features.loaders import vendored_cdnow
from features.segments import described_rules
from state.snapshot import dashboard
from state.snapshot.queries import (
    SEGMENT_COLUMNS,
    TIER_COLUMNS,
    TOP_COLUMNS,
    QueryError,
    Snapshot,
    render_segments,
    render_table,
    render_totals,
)
from stream.broker import free_port
from stream.kafka_io import end_offsets
from stream.processes import Broker, Supervisor, Worker, clv, http_get, stop_on_signals
from stream.replay import publish
from stream.settings import Settings


DEMO_SESSION_TIMEOUT_S = 10  # the worker's, unless CLV_SESSION_TIMEOUT_S says otherwise


class DemoError(RuntimeError):
    """The demo cannot go on (a child that died or never became ready is a ChildError)."""


@dataclass
class DemoOptions:
    data: str | None  # default: vendored CDNOW
    customers: int | None  # only the first N customers (a short run)
    rate: float | None
    model: str | None
    train: bool | None  # True: train on the file; False: never; None: unless the model was trained on it
    workdir: Path
    exit_after: bool
    epochs: int = 40  # of the model trained on the file


def trained_on(meta: dict[str, Any], events: list[TransactionEvent]) -> bool:
    """The model's training data is this file up to its cutoff (its fingerprint)."""
    cutoff = datetime.fromisoformat(meta["cutoff"])
    return fingerprint([e for e in events if e.ts <= cutoff]) == meta.get("training_data_sha256")


def _trained_on_file(path: Path, events: list[TransactionEvent]) -> Artifact | None:
    """The model in `path` when there is one and it was trained on these events."""
    try:
        artifact = Artifact.load(path)
    except ArtifactError:  # no model there (or a broken one): train anew
        return None
    return artifact if trained_on(artifact.meta, events) else None


def choose_model(opts: DemoOptions, given: Artifact, data: str, events: list[TransactionEvent]) -> str | None:
    """The model directory the demo runs (None: the shipped one, `given`), trained on the file
    first when the model given was not trained on it, and the one line that says which and why."""
    name = opts.model or "the shipped model"
    if opts.train is not True and trained_on(given.meta, events):
        print(f"model: {given.version} ({name}), trained on {data} up to {given.meta['cutoff'][:10]}", flush=True)
        return opts.model
    window = f"{given.meta.get('first_event', '?')[:10]} to {given.meta['cutoff'][:10]}"
    if opts.train is False:
        print(
            f"model: {given.version} ({name}), trained on other data ({window}) than {data}; "
            "--no-train keeps it: its scores here are extrapolations where the drift check says "
            "so",
            flush=True,
        )
        return opts.model
    out = opts.workdir / "model"
    earlier = _trained_on_file(out, events)
    if earlier is not None and opts.train is None:
        print(
            f"model: {earlier.version} ({out}), trained on {data} by an earlier demo run; "
            f"{given.version} ({name}) was trained on other data ({window})",
            flush=True,
        )
        return str(out)
    if importlib.util.find_spec("torch") is None:
        print(
            f"model: {given.version} ({name}), trained on other data ({window}) than {data}: "
            "not trained on the file, torch is not installed (pip install -e '.[train]'); its "
            "scores here are extrapolations where the drift check says so",
            flush=True,
        )
        return opts.model
    cutoff = events[-1].ts.date().isoformat()
    why = "--train" if opts.train else f"{given.version} ({name}) was trained on other data ({window})"
    print(
        f"model: training one on {data} up to {cutoff} into {out} ({why}; --no-train keeps it; "
        "a few minutes on CPU)...",
        flush=True,
    )
    res = subprocess.run(
        clv(
            "train", data, "--cutoff", cutoff, "--horizon-months", "6", "--epochs", str(opts.epochs), "--out", str(out)
        ),
        stderr=subprocess.PIPE,
        text=True,
    )  # its progress log: only its reason
    if res.returncode != 0:
        reason = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"training a model on {data} failed: {reason}")
    return str(out)


def run(opts: DemoOptions) -> int:
    stop_on_signals()  # Ctrl-C and SIGTERM both end in the clean shutdown below

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # results, not client chatter
    data = opts.data or str(vendored_cdnow())
    opts.workdir.mkdir(parents=True, exist_ok=True)
    given = Artifact.load(opts.model)  # a broken model directory is one line before anything starts
    history = read_history(data)
    events = history.events
    model = choose_model(opts, given, data, events)
    meta = (given if model == opts.model else Artifact.load(model)).meta
    if opts.customers:
        keep = sorted({e.customer_id for e in events})[: opts.customers]
        wanted = set(keep)
        events = [e for e in events if e.customer_id in wanted]
    port, api_port = free_port(), free_port()
    snapshot = opts.workdir / "clv.duckdb"
    for stale in opts.workdir.glob("clv.duckdb*"):
        stale.unlink()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "CLV_DATA_DIR": str(opts.workdir / "worker"),
        "CLV_SNAPSHOT_PATH": str(snapshot),
        "CLV_SNAPSHOT_INTERVAL_S": "2",
        "CLV_API_PORT": str(api_port),
        "PYTHONUNBUFFERED": "1",
    }
    if model:
        env["CLV_MODEL_DIR"] = model
    # The embedded broker holds a consumer group join for half the session timeout: 15 s of the
    # worker's start at the default 30 s. One worker has no partitions to hand over quickly.
    env.setdefault("CLV_SESSION_TIMEOUT_S", str(DEMO_SESSION_TIMEOUT_S))
    settings = Settings.from_env(env)
    children = Supervisor(opts.workdir)
    try:
        children.add(Broker(opts.workdir / "broker.log", port))
        print(f"broker (embedded Tansu) on 127.0.0.1:{port}", flush=True)
        asyncio.run(_create_topics(settings))
        worker = children.add(Worker(env, opts.workdir / "worker.log"))
        children.start("snapshot", clv("snapshot"), env)
        children.start("api", clv("api"), env)
        board = None if opts.exit_after else _start_dashboard(children, snapshot, model, env)
        children.wait_for("worker ready", lambda: worker.get("/ready")[0] == 200, 120)
        children.wait_for("API up", lambda: http_get(f"http://127.0.0.1:{api_port}/health")[0] == 200, 60)
        print(
            f"worker on {worker.url('')} (/metrics, /customers/ID); replaying "
            f"{len(events):,} invoices of {len({e.customer_id for e in events}):,} customers",
            flush=True,
        )
        summary = asyncio.run(publish(settings, events, len(events), opts.rate, progress=True))
        print(summary.render(), flush=True)
        print("waiting for the worker to score everyone and the snapshot to catch up...", flush=True)
        children.wait_for("worker idle", worker.idle, 600)
        children.wait_for("snapshot caught up", lambda: _snapshot_complete(settings, snapshot), 120)
        _report(Snapshot(snapshot), snapshot, api_port, meta, serving=not opts.exit_after)
        if not opts.exit_after:
            if board:
                children.wait_for("dashboard up", lambda: dashboard.healthy(board), 60)
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


def _start_dashboard(children: Supervisor, snapshot: Path, model: str | None, env: dict[str, str]) -> str | None:
    """The dashboard as one more child, on a free loopback port; its URL, or None (with a word
    on how to get it) when the dashboard extra is not installed."""
    try:
        dashboard.require("streamlit")
    except dashboard.DashboardError as exc:
        print(f"no dashboard: {exc}", flush=True)
        return None
    port = free_port()
    children.start("dashboard", dashboard.command(snapshot, "127.0.0.1", port, model), env)
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


def with_training_shares(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Cluster rows with each cluster's share of the snapshot and of the model's training cohort
    (where the clusters were fitted: the cohort on which their sizes hold)."""
    profiles = (meta.get("clustering") or {}).get("profiles", {})
    total = sum(r["customers"] for r in rows) or 1
    return [
        {
            **r,
            "share_of_customers": r["customers"] / total,
            "share_of_training_cohort": profiles.get(r["cluster"], {}).get("share"),
        }
        for r in rows
    ]


def snapshot_drift(snap: Snapshot, meta: dict[str, Any]) -> str | None:
    """The drift check (features.population) on the snapshot's customers by what their scores
    carry, against the training cohort of the model that scored them, as the dashboard's banner
    makes it: the warning sentence, or None (no shift, or a model that records no cohort)."""
    summary = meta.get("population")
    if summary is None:
        return None
    with snap.reading() as cur:
        scores = cur.execute("SELECT frequency, total_spend FROM customer_scores").fetchnumpy()
    return population.check(summary, population.from_scores(scores["frequency"], scores["total_spend"])).sentence()


def _report(snap: Snapshot, path: Path, api_port: int, meta: dict[str, Any], serving: bool) -> None:
    summary = snap.summary()
    installed = Path(sys.executable).parent / "clv"  # the commands as this install names them
    command = str(installed) if installed.exists() else "clv"
    print(
        f"\n{summary['customers']:,} customers scored by {', '.join(summary['model_versions'])}, "
        f"as of {summary['newest_event_time']}"
    )
    if warning := snapshot_drift(snap, meta):  # the model was kept on customers unlike its cohort
        print(f"warning: {warning}")
    top = snap.top(10)
    horizon = f"{top[0]['horizon_months']}-month " if top else ""
    print(f"\nTop 10 customers by expected {horizon}CLV (expected spend)")
    print(render_table(top, TOP_COLUMNS))
    print("\nSegments")
    print(
        render_segments(
            snap.segments(),
            SEGMENT_COLUMNS,
            described_rules(meta),
        )
    )
    print("\nValue tiers (terciles of this snapshot's expected CLV: a third of its customers each)")
    print(render_totals(snap.tiers(), TIER_COLUMNS))
    print("\nBehavioral clusters (share_of_training_cohort: where the model fitted them)")
    print(
        render_table(
            with_training_shares(snap.clusters(), meta),
            [
                "cluster",
                "customers",
                "share_of_customers",
                "share_of_training_cohort",
                "total_clv",
                "share_of_value",
                "mean_recency_days",
                "mean_frequency",
                "main_segment",
            ],
        )
    )
    print(
        f"""
DuckDB snapshot: {path}  (replaced atomically every few seconds; open it read-only)
  {command} query top --n 20 --snapshot {path}
  {command} query segments --snapshot {path}
  {command} query clusters --snapshot {path}
  {command} query sql "SELECT segment, count(*) FROM customer_scores GROUP BY 1" --snapshot {path}
  {command} export --out top.csv --segment vip --snapshot {path}
  duckdb -readonly {path} "SELECT * FROM segment_summary"   (with the DuckDB CLI)
API: http://127.0.0.1:{api_port}  (/top?n=10, /segments, /clusters, /customers/ID, /summary, /export.csv,
  POST /score, /openapi.json)"""
        + (
            ""
            if serving
            else "\n(--exit: the API stops with the demo; `clv api --snapshot PATH` serves the file, "
            "`clv dashboard --snapshot PATH` shows it)"
        ),
        flush=True,
    )
