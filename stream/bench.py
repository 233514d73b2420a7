"""`clv bench`: throughput, freshness, scoring and state figures, measured against the limits of
the machine and the framework in the same run. Medians of repeated runs where it is cheap."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from features.contract import Line, TransactionEvent, stable_event_id
from features.sequences import Inputs
from stream.bootstrap import write
from stream.kafka_io import started_consumer
from stream.metrics import idle
from stream.processes import Broker, Child, Worker, clv, python_module
from stream.publisher import Record
from stream.replay import all_topics, ensure_topics, publish
from stream.settings import Settings

WORKER_STOP_S = 60  # a worker's clean stop (flush, commit, leave the group) before SIGKILL


class BenchError(RuntimeError):
    """A measurement could not finish; the message says which process and where its log is."""


@dataclass
class Rate:
    path: str
    messages: int
    lines: int
    seconds: float
    produced: int | None = None  # messages on the path's output topic, where it has one counted

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if v is not None},
            "messages_per_s": round(self.per_second, 1),
            "lines_per_s": round(self.lines / self.seconds, 1) if self.seconds else 0.0,
        }


def synthetic_events(
    invoices: int, customers: int, seed: int = 7, start_at: datetime | None = None, span_days: float = 75.0
) -> list[TransactionEvent]:
    """Invoices in time order over `customers` customers (1-6 lines each), every customer at
    least once when there are enough invoices; the span crosses month ends, so the worker also
    does its month-turn rescoring."""
    rng = np.random.default_rng(seed)
    start_at = start_at or datetime(2011, 1, 10, tzinfo=timezone.utc)
    offsets = np.sort(rng.uniform(0, span_days * 86400, invoices))
    who = rng.integers(0, customers, invoices)
    first = min(invoices, customers)
    who[rng.permutation(invoices)[:first]] = rng.permutation(customers)[:first]
    n_lines = rng.integers(1, 7, invoices)
    events = []
    for i in range(invoices):
        cid = f"b{who[i]:07d}"
        lines = tuple(
            Line(f"S{rng.integers(0, 500)}", int(rng.integers(1, 12)), float(round(rng.uniform(0.5, 20.0), 2)))
            for _ in range(n_lines[i])
        )
        inv = f"I{i:08d}"
        events.append(
            TransactionEvent(
                stable_event_id(cid, inv), cid, inv, start_at + timedelta(seconds=float(offsets[i])), lines
            )
        )
    return events


@contextmanager
def broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    """The given Kafka, or the embedded broker on a free port for the duration."""
    if bootstrap:
        yield bootstrap
        return
    embedded = Broker(workdir / "broker.log")
    try:
        yield embedded.bootstrap
    finally:
        embedded.stop(timeout=15)


def fresh_settings(bootstrap: str, partitions: int) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings.from_env(
        {},
        bootstrap_servers=bootstrap,
        partitions=partitions,
        transactions_topic=f"bench-tx-{tag}",
        scores_topic=f"bench-scores-{tag}",
        dlq_topic=f"bench-dlq-{tag}",
        control_topic=f"bench-control-{tag}",
        app_id=f"bench-{tag}",
    )


def worker_env(
    settings: Settings, workdir: Path, session_timeout_s: float | None = None, **extra: str
) -> dict[str, str]:
    """The environment of a `clv worker` on `settings`' topics; its consumer group session
    timeout `session_timeout_s` when given (else CLV_SESSION_TIMEOUT_S's or the default)."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CLV_PARTITIONS": str(settings.partitions),
        "CLV_APP_ID": settings.app_id,
        "CLV_TRANSACTIONS_TOPIC": settings.transactions_topic,
        "CLV_SCORES_TOPIC": settings.scores_topic,
        "CLV_DLQ_TOPIC": settings.dlq_topic,
        "CLV_CONTROL_TOPIC": settings.control_topic,
        "CLV_LOG_LEVEL": "warning",
        "CLV_DATA_DIR": str(workdir / f"state-{settings.app_id}"),
        "PYTHONUNBUFFERED": "1",
    }
    if session_timeout_s:
        env["CLV_SESSION_TIMEOUT_S"] = str(session_timeout_s)
    env.update(extra)
    return env


# -- throughput ---------------------------------------------------------------------------
async def raw_consume(settings: Settings, n: int, lines: int) -> Rate:
    """aiokafka alone, json.loads of every value: the ceiling of broker + client."""
    from aiokafka import TopicPartition

    consumer = await started_consumer(settings, max_poll_records=5000)
    try:
        tps = [
            TopicPartition(settings.transactions_topic, p)
            for p in consumer.partitions_for_topic(settings.transactions_topic)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first = 0, time.perf_counter()  # restarted at the first record
        while seen < n:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=5000)).values():
                if not seen:
                    first = time.perf_counter()
                for rec in records:
                    json.loads(rec.value)
                seen += len(records)
        return Rate("raw aiokafka", seen, lines, time.perf_counter() - first)
    finally:
        await consumer.stop()


def own_process(
    module: str, kind: str, settings: Settings, n: int, workdir: Path, session_timeout_s: float | None
) -> dict[str, Any]:
    """Run a path as its own process, `python -m MODULE BOOTSTRAP TOPIC N APP_ID OUT PARTITIONS
    [SESSION_TIMEOUT_S]` on a consumer group of its own, like the worker: all pay the same process
    and group costs. The figures it wrote."""
    out = workdir / f"{kind}-{uuid.uuid4().hex[:6]}.json"
    child = Child(
        python_module(
            module,
            settings.bootstrap_servers,
            settings.transactions_topic,
            str(n),
            f"{settings.app_id}-{out.stem}",
            str(out),
            str(settings.partitions),
            *([str(session_timeout_s)] if session_timeout_s else []),
        ),
        None,
        workdir / f"{kind}.log",
        cwd=workdir,
    )
    try:
        code = child.wait(1800)
    finally:
        child.stop()
    if not out.exists():
        raise BenchError(f"{kind} failed ({code}); see {child.log}")
    return json.loads(out.read_text())


def bare_faust(settings: Settings, n: int, lines: int, workdir: Path, session_timeout_s: float | None) -> Rate:
    got = own_process("stream.bench_agent", "bare-agent", settings, n, workdir, session_timeout_s)
    return Rate("bare faust agent", got["messages"], lines, got["seconds"])


def peer_available() -> bool:
    """The peer needs Quix Streams (the `bench` extra); the rest of the bench does not."""
    import importlib.util

    return importlib.util.find_spec("quixstreams") is not None


def quix_peer(settings: Settings, n: int, lines: int, workdir: Path, session_timeout_s: float | None) -> Rate:
    """The same fold in Quix Streams (`stream.bench_peer`), from its first event to its last
    output acknowledged; then its output topic is counted, so the rate is of work done."""
    from stream.kafka_io import end_offsets

    got = own_process("stream.bench_peer", "quix-peer", settings, n, workdir, session_timeout_s)
    produced = sum(asyncio.run(end_offsets(settings, got["output_topic"])).values())
    if produced != got["messages"]:
        raise BenchError(
            f"the Quix Streams peer produced {produced:,} messages for "
            f"{got['messages']:,} events; see {workdir / 'quix-peer.log'}"
        )
    return Rate("quix streams peer", got["messages"], lines, got["seconds"], produced)


def full_worker(
    settings: Settings, n: int, lines: int, workdir: Path, run: int, session_timeout_s: float | None
) -> Rate:
    """`clv worker` on the preloaded topic: from its first event to every score published."""
    app = f"{settings.app_id}-full{run}"
    env = worker_env(
        settings,
        workdir,
        session_timeout_s,
        CLV_APP_ID=app,
        CLV_SCORES_TOPIC=f"{settings.scores_topic}-{run}",
        CLV_DATA_DIR=str(workdir / f"state-{app}"),
    )
    worker = Worker(env, workdir / f"worker-{run}.log")
    try:
        first: float | None = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            m = worker.metrics()
            seen = m.get("clv_events_in_total", 0)
            if first is None and seen > 0:
                first = time.perf_counter()
            if seen >= n and idle(m):
                return Rate("full worker", n, lines, time.perf_counter() - (first or time.perf_counter()))
            # Each scrape costs the worker an HTTP request on its event loop: 20 a second took
            # ~4% of its time. 4 a second costs little and adds at most 0.25 s to a ~30 s run.
            time.sleep(0.25 if first is not None else 0.02)
        raise BenchError(f"worker did not finish; see {worker.log}")
    finally:
        worker.stop(timeout=WORKER_STOP_S)


# Kafka's default, set explicitly: the embedded broker describes only the configs a topic was
# created with, and Quix Streams derives its changelog topics' retention from their source's.
KAFKA_DEFAULT_RETENTION_MS = str(7 * 24 * 3600 * 1000)
PEER_MISSING = "not run: Quix Streams is not installed (pip install -e '.[bench]')"


def throughput(
    invoices: int,
    customers: int,
    partitions: int,
    repeats: int,
    bootstrap: str | None,
    workdir: Path,
    peer: bool = True,
    session_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Every path over the same preloaded events, interleaved, so drift on a shared machine
    hits all of them; `peer` adds the Quix Streams path when it is installed. The processes'
    consumer group session timeout is `session_timeout_s`, else each framework's default (it
    is spent before the first event, outside the figures)."""
    events = synthetic_events(invoices, customers)
    lines = sum(len(e.lines) for e in events)
    paths: dict[str, Callable[[Settings, int], Rate]] = {
        "raw": lambda s, r: asyncio.run(raw_consume(s, invoices, lines)),
        "bare": lambda s, r: bare_faust(s, invoices, lines, workdir, session_timeout_s),
        "full": lambda s, r: full_worker(s, invoices, lines, workdir, r, session_timeout_s),
    }
    if peer and peer_available():
        paths["peer"] = lambda s, r: quix_peer(s, invoices, lines, workdir, session_timeout_s)
    with broker(bootstrap, workdir) as servers:
        settings = fresh_settings(servers, partitions)
        asyncio.run(
            ensure_topics(settings, {settings.transactions_topic: {"retention.ms": KAFKA_DEFAULT_RETENTION_MS}})
        )
        asyncio.run(publish(settings, events, len(events), progress=False))
        runs: dict[str, list[Rate]] = {k: [] for k in paths}
        for r in range(repeats):
            for k, run in paths.items():
                runs[k].append(run(settings, r))
    med = {k: statistics.median(x.per_second for x in v) for k, v in runs.items()}
    return {
        "invoices": invoices,
        "customers": customers,
        "partitions": partitions,
        "lines": lines,
        "repeats": repeats,
        "session_timeout_s": session_timeout_s,
        "runs": {k: [x.as_dict() for x in v] for k, v in runs.items()},
        "median_messages_per_s": {k: round(v, 1) for k, v in med.items()},
        "median_lines_per_s": {k: round(v * lines / invoices, 1) for k, v in med.items()},
        "full_over_bare": round(med["full"] / med["bare"], 3),
        "full_over_raw": round(med["full"] / med["raw"], 3),
        **({"full_over_peer": round(med["full"] / med["peer"], 3)} if "peer" in med else {}),
        **({"peer_missing": PEER_MISSING} if peer and "peer" not in paths else {}),
    }


# -- latency ------------------------------------------------------------------------------
async def _steady(settings: Settings, rate: float, seconds: float, tag: str, linger_ms: int) -> list[float]:
    """Publish at `rate` with event time = now, one new customer per event; latency = when its
    score is readable on the scores topic minus the event time (so the publisher's linger
    counts)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        settings.scores_topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=10,
    )  # the reader adds ~nothing to the figure
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=linger_ms)
    await consumer.start()
    await producer.start()
    sent: dict[str, float] = {}
    latencies: list[float] = []
    total = int(rate * seconds)

    async def read() -> None:
        while len(latencies) < total:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    t = sent.pop(rec.key.decode(), None)
                    if t is not None:
                        latencies.append(now - t)

    try:
        await asyncio.sleep(1.0)  # the consumer holds its position before we publish
        reader = asyncio.create_task(read())
        started = time.monotonic()
        for i in range(total):
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
            cid = f"{tag}{i:08d}"
            now = datetime.now(timezone.utc)
            ev = TransactionEvent(stable_event_id(cid, "1"), cid, "1", now, (Line("S1", 1, 9.99),))
            sent[cid] = now.timestamp()
            await producer.send(settings.transactions_topic, ev.to_json(), key=cid.encode())
        try:
            await asyncio.wait_for(reader, timeout=60)
        except asyncio.TimeoutError:
            reader.cancel()
    finally:
        await producer.stop()
        await consumer.stop()
    return latencies


def _percentiles(values: list[float], sent: int) -> dict[str, Any]:
    ms = np.array(values) * 1000
    return {
        "events": sent,
        "scored": len(values),
        **({f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} if len(ms) else {}),
        "max_ms": round(float(ms.max()), 1) if len(ms) else None,
    }


def _means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The worker's own view over one run: mean micro-batch size, scoring and publish times,
    and receive-to-publish time, from its histogram sums and counts."""
    out = {}
    for name, key in (
        ("batch_customers", "clv_rescore_batch_customers"),
        ("score_ms", "clv_rescore_batch_seconds"),
        ("publish_ms", "clv_publish_seconds"),
        ("receive_to_publish_ms", "clv_event_to_publish_seconds"),
    ):
        n = after.get(f"{key}_count", 0) - before.get(f"{key}_count", 0)
        total = after.get(f"{key}_sum", 0) - before.get(f"{key}_sum", 0)
        scale = 1 if name == "batch_customers" else 1000
        out[name] = round(total / n * scale, 1) if n else None
    return out


def latency(
    rates: list[float],
    max_rate: float | None,
    seconds: float,
    linger_ms: int,
    bootstrap: str | None,
    workdir: Path,
    session_timeout_s: float | None = None,
) -> dict[str, Any]:
    with broker(bootstrap, workdir) as servers:
        settings = fresh_settings(servers, 4)
        asyncio.run(ensure_topics(settings, all_topics(settings)))
        worker = Worker(worker_env(settings, workdir, session_timeout_s), workdir / "latency-worker.log")
        try:
            worker.wait_ready(300, interval=0.05)
            asyncio.run(_steady(settings, 50, 2, "warm", linger_ms))  # first batch, JIT-free but cold caches
            out = {}
            for rate in rates:
                before = worker.metrics()
                values = asyncio.run(_steady(settings, rate, seconds, f"r{int(rate)}-", linger_ms))
                out[str(rate)] = {
                    **_percentiles(values, int(rate * seconds)),
                    "worker": _means(before, worker.metrics()),
                }
        finally:
            worker.stop(timeout=WORKER_STOP_S)
    return {
        "max_rate": max_rate,
        "seconds_per_rate": seconds,
        "publisher_linger_ms": linger_ms,
        "session_timeout_s": session_timeout_s,
        "rates": out,
    }


# -- scoring ------------------------------------------------------------------------------
def scoring(
    batch_sizes: list[int],
    seconds: float,
    model: str | None,
    torch_twin: Callable[[dict[str, Any]], Callable[[Inputs], None]] | None,
) -> dict[str, Any]:
    """onnxruntime customers/s by batch size on real CDNOW inputs; torch on the same inputs with
    the same architecture when the command line hands over `torch_twin` (the train extra's
    `models.networks.random_twin`: serving code never imports torch); customers/s whose drivers
    `export_onnx.explain` computes, in its chunks."""
    from export_onnx.explain import CHUNK_CUSTOMERS, Explainer
    from export_onnx.runtime import Artifact
    from features.batch import read_history, snapshots
    from features.loaders import vendored_cdnow
    from features.sequences import build_inputs

    artifact = Artifact.load(model)
    events = read_history(str(vendored_cdnow())).events
    snap = next(snapshots(events, [events[-1].ts], artifact.window))
    states = list(snap.states.values())
    inputs = build_inputs(states, snap.month, artifact.window, artifact.horizon_months)
    torch_model = torch_twin(artifact.meta) if torch_twin is not None else None

    def rate(fn: Any, size: int) -> float:
        runs = []
        for r in range(3):
            done, started = 0, time.perf_counter()
            i = r * 97
            while time.perf_counter() - started < seconds:
                idx = np.arange(i, i + size) % len(states)
                fn(inputs.take(idx), idx)
                done += size
                i += size
            runs.append(done / (time.perf_counter() - started))
        return statistics.median(runs)

    def ort_fn(batch: Any, idx: Any) -> None:
        artifact.predict(batch)

    def torch_fn(batch: Any, idx: Any) -> None:  # the same preprocessing as the ONNX path
        if torch_model is not None:
            torch_model(artifact.scaler.transform(batch))

    rows = []
    for size in batch_sizes:
        row = {"batch": size, "onnxruntime_per_s": round(rate(ort_fn, size), 1)}
        if torch_model is not None:
            row["torch_per_s"] = round(rate(torch_fn, size), 1)
        rows.append(row)
    one = next((r["onnxruntime_per_s"] for r in rows if r["batch"] == 1), None)
    best = max(rows, key=lambda r: r["onnxruntime_per_s"])
    explainer = Explainer(artifact)  # the drivers of a score: 2^G model rows per customer
    drivers = {
        "rows_per_customer": len(explainer.coalitions),
        "customers_per_s": round(rate(lambda batch, idx: explainer.explain(batch), CHUNK_CUSTOMERS), 1),
    }
    return {
        "model": artifact.version,
        "threads": 1,
        "rows": rows,
        "drivers": drivers,
        "worker_batch_size": Settings().batch_size,
        "batched_over_single": round(best["onnxruntime_per_s"] / one, 2) if one else None,
        "torch": "same architecture, random weights (speed does not depend on them)"
        if torch_model is not None
        else "not installed (pip install -e '.[train]')",
    }


# -- state --------------------------------------------------------------------------------
STATE_HISTORY = ("2009-12-01", "2011-12-09")  # two years of the synthetic generator's shop
STATE_CUTOFF = datetime(2011, 12, 4, tzinfo=timezone.utc)  # history before, live traffic after
# The embedded broker holds a JoinGroup for half the session timeout, which would be most of
# every start at the default 30 s: the figures here are about state.
STATE_SESSION_TIMEOUT_S = 10.0


def state_history(
    customers: int, window: int, settings: Settings, seed: int = 11
) -> tuple[list[Record], list[TransactionEvent]]:
    """Two years of invoices of the first `customers` customers to buy (features.synthetic),
    folded with the stream's own fold up to STATE_CUTOFF into the changelog a worker would leave
    (`stream.bootstrap.state_records`: one record per customer on the partition its key maps to,
    and each partition's own record); and the invoices after the cutoff (same month: no month
    turn), to publish live."""
    from features.aggregate import Folder, contribution, month_of
    from features.synthetic import invoice_events
    from stream.bootstrap import state_records
    from state.live.base.partition import PartitionMeta

    folder = Folder(window)
    live: list[TransactionEvent] = []
    kept: set[str] = set()
    for ev in invoice_events(customers * 8 // 5, customers * 8, seed, *STATE_HISTORY):
        if ev.customer_id not in kept:
            if len(kept) >= customers:
                continue
            kept.add(ev.customer_id)
        if ev.ts > STATE_CUTOFF:
            live.append(ev)
        else:
            folder.add(ev.customer_id, contribution(ev))
    states = folder.states.values()  # type: ignore[attr-defined]
    clock = max(s.newest_ts or 0 for s in states)
    month = month_of(datetime.fromtimestamp(clock, timezone.utc))
    records, metas = state_records(states, settings, PartitionMeta(clock, month, ""))
    return records + metas, live


def _state_worker(env: dict[str, str], log: Path) -> tuple[Worker, float, dict[str, float]]:
    """A worker, the seconds until it was ready (polled every 50 ms: recovery is the figure),
    and its metrics then."""
    worker = Worker(env, log)
    try:
        ready = worker.wait_ready(timeout=1800, interval=0.05)
        return worker, ready, worker.metrics()
    except BaseException:
        worker.stop(timeout=WORKER_STOP_S)
        raise


def state(
    customers: int, stores: list[str], bootstrap: str | None, workdir: Path, session_timeout_s: float | None = None
) -> dict[str, Any]:
    """Per store: resident memory per 100k customers held (recovered from a changelog of
    realistic histories, then live traffic), recovery into a new process with an empty state
    directory, and a restart on its own directory after a clean stop; the workers' consumer
    group session timeout is `session_timeout_s` (default STATE_SESSION_TIMEOUT_S)."""
    from export_onnx.runtime import Artifact

    session_timeout_s = session_timeout_s or STATE_SESSION_TIMEOUT_S

    partitions = 4
    records, live = state_history(
        customers, Artifact.load(None).window, Settings(partitions=partitions, app_id="bench")
    )
    n_records = len(records)
    out: dict[str, Any] = {
        "customers": customers,
        "changelog_records": n_records,
        "history": f"{STATE_HISTORY[0]}..{STATE_CUTOFF.date()}",
        "live_events": len(live),
        "session_timeout_s": session_timeout_s,
        "stores": {},
    }
    with broker(bootstrap, workdir) as servers:
        for store in stores:
            name = store.split(":")[0]
            # The same worker holding nothing, on topics of its own, fed the same live invoices
            # (so the model's and the clients' own memory is in both figures).
            empty = fresh_settings(servers, partitions)
            asyncio.run(ensure_topics(empty, all_topics(empty)))
            worker, _, _ = _state_worker(
                _state_env(empty, workdir, store, session_timeout_s, "-empty"), workdir / f"state-{name}-empty.log"
            )
            try:
                base = _feed(worker, empty, live)
            finally:
                worker.stop(timeout=WORKER_STOP_S)
            settings = fresh_settings(servers, partitions)
            changelog = settings.changelog_topic
            asyncio.run(ensure_topics(settings, {**all_topics(settings), changelog: {"cleanup.policy": "compact"}}))
            asyncio.run(write(settings, [(changelog, p, k, v) for _t, p, k, v in records]))
            env = _state_env(settings, workdir, store, session_timeout_s)
            worker, recovery, m = _state_worker(env, workdir / f"state-{name}-recover.log")
            try:
                recovered = m.get("clv_state_recovered_records_total", 0)
                took = m.get("clv_state_takeover_seconds", 0)
                held = _feed(worker, settings, live)
            finally:
                worker.stop(timeout=WORKER_STOP_S)
            # A clean stop, then the same directory again (memory:// has nothing to reopen), twice:
            # the embedded broker numbers a group's first generation 0, for which the client does
            # not send LeaveGroup, so the first restart also waits out the old member's session
            # (Kafka starts at 1: every clean stop leaves the group). The second is the figure.
            restarts = []
            for k in (1, 2):
                again, restart, m2 = _state_worker(env, workdir / f"state-{name}-restart{k}.log")
                again.stop(timeout=WORKER_STOP_S)
                restarts.append(restart)
            out["stores"][store] = {
                "rss_base_mb": round(base, 1),
                "rss_held_mb": round(held, 1),
                "mb_per_100k_customers": round((held - base) * 100_000 / customers, 1),
                "recovery_seconds": round(recovery, 2),
                "recovered_records": int(recovered),
                "recovery_records_per_s": round(recovered / took) if took else None,
                "records_per_s_to_ready": round(recovered / recovery) if recovery else None,
                "restart_seconds": round(restart, 2),
                "first_restart_seconds": round(restarts[0], 2),
                "restart_records": int(m2.get("clv_state_recovered_records_total", 0)),
                "restart_takeover_seconds": round(m2.get("clv_state_takeover_seconds", 0), 2),
            }
    return out


def _state_env(
    settings: Settings, workdir: Path, store: str, session_timeout_s: float, tag: str = ""
) -> dict[str, str]:
    return worker_env(
        settings,
        workdir,
        session_timeout_s,
        CLV_STORE=store,
        CLV_DATA_DIR=str(workdir / f"state-{settings.app_id}{tag}"),
    )


def _feed(worker: Worker, settings: Settings, live: list[TransactionEvent]) -> float:
    """Publish the live invoices, wait until the worker has scored them; its RSS then, in MB."""
    asyncio.run(publish(settings, live, len(live), progress=False))
    deadline = time.monotonic() + 1800
    while not (worker.metrics().get("clv_events_in_total", 0) >= len(live) and idle(worker.metrics())):
        if time.monotonic() > deadline:
            raise BenchError(f"worker did not finish; see {worker.log}")
        time.sleep(0.2)
    time.sleep(1)
    return worker.rss_mb()


# -- bootstrap ----------------------------------------------------------------------------
def bootstrap_file(lines: int, workdir: Path, seed: int = 5) -> Path:
    """A synthetic Online Retail file of exactly `lines` rows (its first, in time order): two
    years, about 100 lines per customer, the defects cleaning counts included."""
    from features.synthetic import generate, write as write_file

    path = workdir / f"history-{lines}.csv"
    if not path.exists():
        frame, _ = generate(max(lines // 100, 10), max(lines // 4, 10), seed)
        write_file(frame.head(lines), path)
    return path


def bootstrap(lines: int, bootstrap_servers: str | None, workdir: Path) -> dict[str, Any]:
    """`clv bootstrap` of a synthetic file, timed from the command's start to its exit (file to
    topics); then every score it wrote, read back from the topic, against `clv score` of the
    same file."""
    import csv

    from features.scores import CUSTOMER_FIELDS, FIELD_TYPES, as_dict, parse_score
    from stream.kafka_io import read_partition

    path = bootstrap_file(lines, workdir)
    with broker(bootstrap_servers, workdir) as servers:
        settings = fresh_settings(servers, 4)
        env = worker_env(settings, workdir)
        started, cpu = time.perf_counter(), _children_cpu()
        done = subprocess.run(clv("bootstrap", str(path), "--quiet"), env=env, capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu
        if done.returncode:
            raise BenchError(f"clv bootstrap failed: {done.stderr.strip()[-2000:]}")

        async def scores() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for p in range(settings.partitions):
                async for records in read_partition(settings, settings.scores_topic, p):
                    for r in records:
                        score = parse_score(r.value)
                        if isinstance(score, str):
                            raise BenchError(f"clv bootstrap wrote an unusable score ({score}) for {r.key!r}")
                        out[r.key.decode()] = as_dict(score)
            return out

        written = asyncio.run(scores())
    batch_csv = workdir / "bootstrap-batch.csv"
    batch_csv.unlink(missing_ok=True)  # a run before in the same directory
    started = time.perf_counter()
    subprocess.run(clv("score", str(path), "--out", str(batch_csv)), check=True, capture_output=True)
    score_seconds = time.perf_counter() - started
    worst = 0.0
    with batch_csv.open() as fh:
        batch = {row["customer_id"]: row for row in csv.DictReader(fh)}
    same = set(batch) == set(written)
    for cid, row in batch.items():
        got = written.get(cid, {})
        for name in CUSTOMER_FIELDS:
            if FIELD_TYPES[name] in (int, float):
                want = float(row[name])
                worst = max(worst, abs(got.get(name, float("inf")) - want) / max(abs(want), 1e-9))
            else:
                same = same and got.get(name) == row[name]
    return {
        "lines": lines,
        "file": str(path),
        "customers": len(written),
        "seconds": round(seconds, 2),
        "lines_per_s": round(lines / seconds, 1),
        "cpu_seconds": round(cpu, 2),
        "summary": done.stdout.strip(),
        "score_seconds": round(score_seconds, 2),
        "max_rel_diff": worst,
        "exact": bool(same and worst <= 1e-5),
    }


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: on a shared machine, what
    a command cost apart from waiting for the cores."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def workdir_for(path: str | None) -> Path:
    if not path:
        return Path(tempfile.mkdtemp(prefix="clv-bench-"))
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


# -- month turn ---------------------------------------------------------------------------
TURN_HISTORY = (datetime(1997, 7, 1, tzinfo=timezone.utc), datetime(1998, 6, 30, tzinfo=timezone.utc))


def month_turn_file(customers: int, workdir: Path, seed: int = 3) -> Path:
    """A CDNOW-layout history of `customers` customers (1-3 purchases each over the year before
    TURN_HISTORY's end, the last on its last day): what `clv bootstrap` loads in bulk."""
    path = workdir / f"month-turn-{customers}.txt"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, customers)
    who = np.repeat(np.arange(1, customers + 1), per)
    first, last = (d.date().toordinal() for d in TURN_HISTORY)
    day = rng.integers(first, last + 1, len(who))
    day[-1] = last  # the history's clock: the end of its month
    dates = np.array([int(datetime.fromordinal(int(d)).strftime("%Y%m%d")) for d in range(first, last + 1)])
    frame = {
        "customer_id": np.char.zfill(who.astype(str), 7),
        "date": dates[day - first],
        "number_of_cds": rng.integers(1, 4, len(who)),
        "dollar_value": np.round(rng.lognormal(3.0, 0.8, len(who)), 2),
    }
    import pandas as pd

    pd.DataFrame(frame).to_csv(path, sep=" ", index=False)
    return path


async def _through_turn(
    settings: Settings, worker: Worker, customers: int, rate: float, warm_seconds: float, max_seconds: float
) -> dict[str, Any]:
    """Ordinary events at `rate`, new customers each: `warm_seconds` of them in the history's
    last month, then from the first second of the next month (the turn) until every one of the
    `customers` bootstrapped customers has a score on the topic. Latency: from publishing an
    event to its customer's score readable; /ready asked every half second."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        settings.scores_topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=8 << 20,
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await consumer.start()
    await producer.start()
    sent: dict[str, float] = {}
    latencies: dict[str, list[float]] = {"before": [], "turn": []}
    rescored: set[str] = set()
    last_rescore = 0.0
    ready: list[int] = []
    phase = "before"

    async def read() -> None:
        nonlocal last_rescore
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    key = rec.key.decode()
                    t = sent.pop(key, None)
                    if t is not None:
                        latencies["before" if key.startswith("before") else "turn"].append(now - t)
                    elif not key.startswith(("before", "turn")):
                        rescored.add(key)
                        last_rescore = now

    async def watch() -> None:
        while True:
            ready.append((await asyncio.to_thread(worker.get, "/ready"))[0])
            await asyncio.sleep(0.5)

    async def paced(tag: str, start: datetime, until: Callable[[], bool]) -> tuple[int, float]:
        """Publish until `until()`; returns the events sent and the wall time of the first."""
        began, i = time.monotonic(), 0
        first = time.time()
        while not until() and time.monotonic() - began < max_seconds:
            ahead = i / rate - (time.monotonic() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)
            cid = f"{tag}{i:08d}"
            ev = TransactionEvent(
                stable_event_id(cid, "1"), cid, "1", start + timedelta(seconds=i * 0.01), (Line("S1", 1, 9.99),)
            )
            sent[cid] = time.time()
            await producer.send(settings.transactions_topic, ev.to_json(), key=cid.encode())
            i += 1
        return i, first

    tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
    try:
        await asyncio.sleep(1.0)  # the consumer holds its position before we publish
        end = TURN_HISTORY[1]
        before_until = time.monotonic() + warm_seconds
        n_before, _ = await paced("before", end.replace(hour=12), lambda: time.monotonic() >= before_until)
        await _drained(sent, 60)
        phase = "turn"
        turn_start = datetime(end.year + end.month // 12, end.month % 12 + 1, 1, tzinfo=timezone.utc)
        n_turn, turned = await paced("turn", turn_start, lambda: len(rescored) >= customers)
        await _drained(sent, 60)
    finally:
        for task in tasks:
            task.cancel()
        await producer.stop()
        await consumer.stop()
    return {
        "phase_reached": phase,
        "rescored_customers": len(rescored),
        "turn_seconds": round(last_rescore - turned, 2) if rescored else None,
        "rescored_per_s": round(len(rescored) / (last_rescore - turned)) if rescored else None,
        "events_before": _percentiles(latencies["before"], n_before),
        "events_during_turn": _percentiles(latencies["turn"], n_turn),
        "ready_answers": {str(s): ready.count(s) for s in sorted(set(ready))},
    }


async def _drained(sent: dict[str, float], seconds: float) -> None:
    """Until every event sent has its score read (or `seconds` passed)."""
    deadline = time.monotonic() + seconds
    while sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def month_turn(
    customers: int,
    rate: float,
    bootstrap_servers: str | None,
    workdir: Path,
    warm_seconds: float = 5.0,
    session_timeout_s: float | None = None,
) -> dict[str, Any]:
    """`customers` customers loaded with `clv bootstrap` into a worker (4 partitions), then the
    worker's clock enters the next month while ordinary events arrive at `rate`: seconds from
    the turn to the last of its rescores published, and the latency of the ordinary events
    meanwhile (and before, for comparison); the flush failures and /ready answers throughout."""
    path = month_turn_file(customers, workdir)
    with broker(bootstrap_servers, workdir) as servers:
        settings = fresh_settings(servers, 4)
        env = worker_env(settings, workdir, session_timeout_s)
        started = time.perf_counter()
        done = subprocess.run(clv("bootstrap", str(path), "--quiet"), env=env, capture_output=True, text=True)
        loaded = time.perf_counter() - started
        if done.returncode:
            raise BenchError(f"clv bootstrap failed: {done.stderr.strip()[-2000:]}")
        worker = Worker(env, workdir / "month-turn-worker.log")
        try:
            ready_s = worker.wait_ready(timeout=1800, interval=0.2)
            before = worker.metrics()
            if before.get("clv_backlog_customers", 0):
                raise BenchError(f"the worker is rescoring before the turn; see {worker.log}")
            out = asyncio.run(_through_turn(settings, worker, customers, rate, warm_seconds, max_seconds=1800))
            after = worker.metrics()
        finally:
            worker.stop(timeout=WORKER_STOP_S)
    return {
        "customers": customers,
        "rate": rate,
        "session_timeout_s": session_timeout_s,
        "bootstrap_seconds": round(loaded, 1),
        "worker_ready_seconds": round(ready_s, 1),
        **out,
        "flush_failures": after.get("clv_flush_failures_total", 0) - before.get("clv_flush_failures_total", 0),
        "worker": _means(before, after),
    }
