"""Helpers shared by the tests that run the product's processes against the real broker."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import time
import urllib.request
from datetime import datetime
from email.message import Message
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from export_onnx.runtime import shipped_model_dir
from features.aggregate import CustomerState
from features.batch import read_history, snapshots
from features.loaders import vendored_cdnow
from features.scores import CUSTOMER_FIELDS, FIELD_TYPES, ScoreRecord, as_dict, iso_time, parse_score, precedence
from stream.broker import free_port
from stream.processes import Child, Worker, clv

CLV = clv()


def start_worker(env: dict, tmp: Path, name: str = "w1", state: str | None = None,
                 batch_wait_ms: int = 20) -> Worker:
    """`clv worker` logging to TMP/NAME.log, on a state directory of its own (TMP/STATE-state,
    STATE defaulting to NAME: a restart passes the same)."""
    return Worker({**env, "CLV_DATA_DIR": str(tmp / f"{state or name}-state")}, tmp / f"{name}.log",
                  "--batch-wait-ms", str(batch_wait_ms))


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
    """Every record of `topic`: each partition read from its start to its high watermark as of
    the first fetch answer (the embedded broker's ListOffsets can stop short, see
    stream.kafka_io), so a finished topic is read without waiting for silence."""
    async def run() -> list:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                    fetch_max_wait_ms=50)
        await consumer.start()
        out: list = []
        try:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not tps:
                return out
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends: dict[TopicPartition, int] = {}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200, max_records=10000)).values():
                    out.extend(records)
                ends.update((tp, consumer.highwater(tp)) for tp in tps
                            if tp not in ends and consumer.highwater(tp) is not None)
                if len(ends) == len(tps) and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                    return out
            raise AssertionError(f"{topic} not read to its end within 120 s: {ends}")
        finally:
            await consumer.stop()

    return asyncio.run(run())


def last_scores(bootstrap: str, topic: str) -> dict[str, dict]:
    """The newest message per customer by the contract's `precedence` (of equal ones the later
    published), as subscribers are told to read the topic; each checked against the contract."""
    latest: dict[str, ScoreRecord] = {}
    # One key always lands in one partition, so offset order is publish order.
    for rec in sorted(read_topic(bootstrap, topic), key=lambda r: (r.partition, r.offset)):
        score = parse_score(rec.value)
        assert isinstance(score, ScoreRecord), (score, rec.value)
        assert json.loads(rec.value) == as_dict(score)  # published as the contract writes it
        held = latest.get(rec.key.decode())
        if held is None or precedence(score) >= precedence(held):
            latest[rec.key.decode()] = score
    return {cid: as_dict(score) for cid, score in latest.items()}


def snapshot_rows(path: Path) -> dict[str, dict]:
    """A published snapshot's customers as the sink holds them (`state.snapshot.tables.row`), by name,
    times written as the contract writes them."""
    import duckdb

    from state.snapshot.tables import COLUMNS

    con = duckdb.connect(str(path), read_only=True)
    try:
        cur = con.execute(f"SELECT {', '.join(COLUMNS)}, source_partition, source_offset FROM customer_scores")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()
    for r in rows:
        r["as_of"], r["scored_at"] = iso_time(r["as_of"]), iso_time(r["scored_at"])
    return {r["customer_id"]: r for r in rows}


def batch_scores(tmp: Path, data: Path) -> dict[str, dict]:
    out = tmp / "batch.csv"
    res = subprocess.run([*CLV, "score", str(data), "--model", str(shipped_model_dir()), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = csv.DictReader(out.open())
    assert tuple(rows.fieldnames) == CUSTOMER_FIELDS
    return {r["customer_id"]: r for r in rows}


def replay(env: dict, data: Path, rate: float | None = None) -> subprocess.Popen:
    args = [*CLV, "replay", str(data), "--quiet"] + (["--rate", str(rate)] if rate else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Measured from the exact time of the score's as_of, not only its month.
CLOCK_FIELDS = ("recency_days", "tenure_days", "segment", "cluster")


def assert_exact(live: dict[str, dict], batch: dict[str, dict]) -> list[str]:
    """Every customer field of each newest live score equals `clv score`'s: numbers within 1e-5
    relative (onnxruntime's sums differ with the batch a customer is scored in), text exactly.
    `clv score` measures from the file's newest event; a customer last scored on an earlier
    clock (no event of its own and no month turn since) is compared on all but CLOCK_FIELDS,
    and that clock is in the newest one's month (a month turn rescores every customer).
    Returns the customers compared on every field."""
    assert set(live) == set(batch)
    newest = max(a["as_of"] for a in live.values())
    stale = {cid: a["as_of"] for cid, a in live.items() if a["as_of"][:7] != newest[:7]}
    assert not stale, (f"{len(stale)} customers last scored before {newest[:7]}",
                       dict(list(stale.items())[:5]))
    numbers = [f for f in CUSTOMER_FIELDS if FIELD_TYPES[f] in (int, float)]
    worst = {f: 0.0 for f in numbers}
    whole = []
    for cid, b in batch.items():
        a = live[cid]
        assert a["frequency"] == int(b["frequency"]), cid
        assert abs(a["total_spend"] - float(b["total_spend"])) < 1e-9, cid
        same_clock = a["as_of"] == newest
        if same_clock:
            whole.append(cid)
        for f in CUSTOMER_FIELDS:
            if f in CLOCK_FIELDS and not same_clock:
                continue
            if f in worst:
                want = float(b[f])
                worst[f] = max(worst[f], abs(a[f] - want) / max(abs(want), 1e-9))
            else:
                assert a[f] == b[f], (cid, f, a, b)
    assert max(worst.values()) < 1e-5, worst
    return whole


def topic_layout(bootstrap: str, topic: str) -> tuple[dict[str, str], list[int]]:
    """A topic's configs as the broker describes them, and the replica count of each partition."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def run() -> tuple[dict[str, str], list[int]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            configs = {e[0]: e[1] for e in described.resources[0][4]}
            (meta,) = await admin.describe_topics([topic])
            return configs, [len(p["replicas"]) for p in meta["partitions"]]
        finally:
            await admin.close()

    return asyncio.run(run())


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from stream.kafka_io import end_offsets as ends
    from stream.settings import Settings

    return asyncio.run(ends(Settings.from_env({}, bootstrap_servers=bootstrap), topic))


def snapshot_offsets(path: Path) -> dict[int, int]:
    import duckdb

    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return {}
    try:
        return {int(k): int(v) for k, v in con.execute("SELECT offsets FROM snapshot_meta").fetchone()[0].items()}
    finally:
        con.close()


def wait_snapshot_caught_up(path: Path, bootstrap: str, topic: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    want = {p: o for p, o in end_offsets(bootstrap, topic).items() if o > 0}
    while time.monotonic() < deadline:
        have = snapshot_offsets(path)
        if all(have.get(p, 0) >= o for p, o in want.items()):
            return
        time.sleep(0.3)
    raise AssertionError(f"snapshot never caught up with {topic}: {want} vs {snapshot_offsets(path)}")


class Api:
    """`clv api` on a free loopback port; `token` is its CLV_API_TOKEN, sent by `get` unless told
    otherwise, and `settings` more CLV_* variables."""

    def __init__(self, env: dict, tmp: Path, token: str = "", **settings: str) -> None:
        self.port = free_port()
        self.token = token
        self.proc = Child(clv("api", "--port", str(self.port)), {**env, "CLV_API_TOKEN": token, **settings},
                          tmp / f"api-{self.port}.log")
        self.proc.wait_for("API up", lambda: self.get("/health")[0] == 200, 30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, path: str, authorization: str | None = None, data: bytes | None = None,
             content_type: str | None = None, timeout: float = 30) -> tuple[int, Message, bytes]:
        """(status, headers, body); `authorization` is the whole header (default: the token's)."""
        if authorization is None and self.token:
            authorization = f"Bearer {self.token}"
        headers = {"Authorization": authorization} if authorization else {}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()  # header names are case-insensitive
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()
        except OSError:
            return 0, {}, b""

    def post(self, path: str, body: bytes, content_type: str = "text/csv") -> tuple[int, Message, bytes]:
        """A POST with the token, given a minute or two: scoring an upload reads a whole file."""
        return self.call(path, data=body, content_type=content_type, timeout=120)

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        token = self.token if token is None else token
        status, _, body = self.call(path, f"Bearer {token}" if token else "")
        return status, body


def cdnow_sample(window: int, n: int) -> tuple[list[CustomerState], datetime]:
    """`n` CDNOW customers' states as of the file's newest event, spread over the file."""
    events = read_history(vendored_cdnow()).events
    at = events[-1].ts
    states = list(next(snapshots(events, [at], window)).states.values())
    return states[:: len(states) // n][:n], at
