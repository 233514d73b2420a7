"""DuckDB snapshots for analysts: consistent under swaps, intact after a kill mid-write, exact
top-N, read-only queries, the HTTP API."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import astuple, replace
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.scores import LEGACY_CLV, ScoreRecord, iso_time, parse_score, precedence
from features.segments import PLAYBOOKS, SEGMENTS
from harness import CLV, Api, end_offsets, read_topic, snapshot_rows, wait_snapshot_caught_up
from score_messages import near_valid
from state.snapshot import tables as snapshot
from state.snapshot.queries import RANGE_NOTE, Snapshot, _dicts
from stream.broker import free_port
from stream.processes import Child, clv as clv_command


def clv(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*CLV, *args], env=env, capture_output=True, text=True, timeout=120)


def test_readers_never_see_a_partial_or_locked_snapshot(cdnow_live):
    seen = cdnow_live.reader
    assert seen["n_errors"] == 0, seen["errors"]
    assert seen["inconsistent"] == []
    assert seen["reads"] > 100 and seen["snapshots_seen"] >= 2, seen  # a swap happened underneath


def test_snapshot_holds_every_customer_with_meta(cdnow_live, kafka_bootstrap):
    con = duckdb.connect(str(cdnow_live.snapshot), read_only=True)
    try:
        rows = con.execute("SELECT count(*), count(DISTINCT customer_id) FROM customer_scores").fetchone()
        meta = con.execute("SELECT customers, newest_event_time, offsets, model_versions, source_topic "
                           "FROM snapshot_meta").fetchone()
        tiers = dict(con.execute("SELECT value_tier, customers FROM tier_summary").fetchall())
        segs = con.execute("SELECT segment, share_of_value, total_clv, who FROM segment_summary").fetchall()
        total = con.execute("SELECT sum(clv) FROM customer_scores").fetchone()[0]
        clusters = con.execute("SELECT count(DISTINCT cluster), count(*) FILTER (WHERE cluster = '') "
                               "FROM customer_scores").fetchone()
        # Each customer's distribution, of the score its row holds (the same clv: its mean).
        distributed = con.execute("SELECT count(*) FROM customer_distribution d JOIN customer_scores s "
                                  "USING (customer_id, model_version, as_of, event_offset, clv)").fetchone()[0]
    finally:
        con.close()
    assert rows == (23_570, 23_570) and meta[0] == 23_570 and distributed == 23_570
    assert clusters[0] >= 3 and clusters[1] == 0  # every customer carries one of the model's clusters
    assert meta[1].year == 1998 and meta[1].month == 6
    ends = _end(kafka_bootstrap, cdnow_live)
    assert set(meta[2]) == set(ends) and all(meta[2][p] >= ends[p] > 0 for p in ends)  # read it all
    assert len(meta[3]) == 1 and meta[3][0].startswith("gru-")
    assert meta[4] == cdnow_live.env["CLV_SCORES_TOPIC"]
    assert set(tiers) == {"low", "medium", "high"} and sum(tiers.values()) == 23_570
    assert {s for s, *_ in segs} <= set(SEGMENTS)
    assert abs(sum(share for _, share, _, _ in segs) - 1) < 1e-9
    assert abs(sum(t for *_, t, _ in segs) / total - 1) < 1e-9  # totals add the expectation
    assert all(who == PLAYBOOKS[s].who for s, _, _, who in segs)


def _end(bootstrap: str, live) -> dict[int, int]:
    return end_offsets(bootstrap, live.env["CLV_SCORES_TOPIC"])


def test_query_top_matches_batch_scores(cdnow_live, cdnow_batch):
    res = clv("query", "top", "--n", "10", "--json", env=cdnow_live.env)
    assert res.returncode == 0, res.stderr
    top = json.loads(res.stdout)
    want = sorted(cdnow_batch.values(), key=lambda r: -float(r["clv"]))[:10]
    assert [r["customer_id"] for r in top] == [r["customer_id"] for r in want]
    for got, exp in zip(top, want):
        assert abs(got["clv"] - float(exp["clv"])) <= 1e-5 * abs(float(exp["clv"]))


def test_query_commands(cdnow_live, tmp_path):
    env = cdnow_live.env
    res = clv("query", "segments", "--json", env=env)
    assert res.returncode == 0, res.stderr
    segs = json.loads(res.stdout)
    assert sum(s["customers"] for s in segs) == 23_570
    assert {"segment", "customers", "total_clv", "mean_clv", "share_of_value", "who", "what_to_do"} <= set(segs[0])
    res = clv("query", "segments", env=env)
    assert res.returncode == 0 and "share_of_value" in res.stdout and "value_tier" in res.stdout
    assert "Playbooks" in res.stdout and PLAYBOOKS["vip"].what_to_do in res.stdout
    # The segment and tier tables each show the range of their totals and say what it assumes.
    assert res.stdout.count("total_clv_low") == 2 and res.stdout.count(RANGE_NOTE) == 2
    vip = json.loads(clv("query", "top", "--n", "5", "--segment", "vip", "--json", env=env).stdout)
    assert vip and all(r["segment"] == "vip" for r in vip)
    one = json.loads(clv("query", "customer", "00001", env=env).stdout)
    assert one["customer_id"] == "00001" and one["value_tier"] in ("low", "medium", "high")
    res = clv("query", "sql", "SELECT segment, count(*) AS n FROM customer_scores GROUP BY 1", "--json",
              env=env)
    assert res.returncode == 0 and sum(r["n"] for r in json.loads(res.stdout)) == 23_570
    res = clv("export", "--out", str(tmp_path / "vip.csv"), "--segment", "vip", env=env)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "vip.csv").read_text().splitlines()) == 1 + sum(
        s["customers"] for s in segs if s["segment"] == "vip")
    res = clv("export", "--out", str(tmp_path / "all.parquet"), env=env)
    assert res.returncode == 0, res.stderr
    assert duckdb.connect().execute(f"SELECT count(*) FROM '{tmp_path / 'all.parquet'}'").fetchone()[0] == 23_570
    for bad in (["query", "top", "--segment", "nobody"], ["query", "customer"],
                ["export", "--out", str(tmp_path / "x.txt")], ["query", "customer", "no-such-id"]):
        res = clv(*bad, env=env)
        assert res.returncode == 2 and res.stderr.startswith("clv: error:") and len(res.stderr.splitlines()) == 1, bad
    res = clv("query", "top", "--snapshot", str(tmp_path / "none.duckdb"), env=env)
    assert res.returncode == 2 and "no snapshot" in res.stderr


INJECTIONS = [
    "DROP TABLE customer_scores",
    "DELETE FROM customer_scores",
    "UPDATE customer_scores SET clv = 0",
    "SELECT 1; DROP TABLE customer_scores",
    "CREATE TABLE evil AS SELECT 1",
    "COPY customer_scores TO '/tmp/clv-stolen.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "ATTACH '/tmp/clv-other.duckdb' AS other",
    "SET enable_external_access = true",
    "INSTALL httpfs",
]


@pytest.mark.parametrize("sql", INJECTIONS)
def test_sql_cannot_write_or_escape(cdnow_live, sql):
    res = clv("query", "sql", sql, env=cdnow_live.env)
    assert res.returncode == 2, res.stdout
    assert res.stderr.startswith("clv: error: query refused") and len(res.stderr.splitlines()) == 1
    assert not Path("/tmp/clv-stolen.csv").exists()


def test_customer_lookup_is_not_injectable(cdnow_live):
    res = clv("query", "customer", "x' OR '1'='1", env=cdnow_live.env)
    assert res.returncode == 2 and "not in the snapshot" in res.stderr


def test_http_api_serves_the_snapshot(cdnow_live, cdnow_batch, tmp_path):
    api = Api(cdnow_live.env, tmp_path)
    try:
        status, body = api.get("/top?n=10")
        assert status == 200
        want = sorted(cdnow_batch.values(), key=lambda r: -float(r["clv"]))[:10]
        assert [r["customer_id"] for r in json.loads(body)] == [r["customer_id"] for r in want]
        status, body = api.get("/segments")
        assert status == 200 and sum(s["customers"] for s in json.loads(body)) == 23_570
        status, body = api.get("/summary")
        assert status == 200 and json.loads(body)["customers"] == 23_570
        status, body = api.get("/clusters")
        clusters = json.loads(body)
        assert status == 200 and sum(c["customers"] for c in clusters) == 23_570 and len(clusters) >= 3
        assert api.get("/customers/00001")[0] == 200
        best = json.loads(api.get(f"/customers/{want[0]['customer_id']}")[1])  # a top customer:
        drivers = best["drivers"]  # the drivers of its score, adding up to it
        assert drivers["reference_clv"] + sum(d["contribution"] for d in drivers["drivers"]) == (
            pytest.approx(best["clv"], rel=1e-3))
        assert api.get("/customers/x'%20OR%20'1'='1")[0] == 404
        status, body = api.get("/export.csv?segment=vip")
        assert status == 200 and body.decode().startswith("customer_id,clv,")
        assert api.get("/export.csv")[1].count(b"\n") == 23_571
        status, body = api.get("/openapi.json")
        assert status == 200 and "/top" in json.loads(body)["paths"]
        assert api.get("/top?n=abc")[0] == 400 and api.get("/top?segment=nobody")[0] == 400
        status, body = api.get("/sql?q=" + urllib.request.quote("SELECT count(*) AS n FROM customer_scores"))
        assert status == 200 and json.loads(body)["rows"] == [[23_570]]
        for sql in INJECTIONS:
            status, body = api.get("/sql?q=" + urllib.request.quote(sql))
            assert status == 400 and "refused" in json.loads(body)["error"], sql
    finally:
        api.proc.stop()
    con = duckdb.connect(str(cdnow_live.snapshot), read_only=True)
    assert con.execute("SELECT count(*) FROM customer_scores").fetchone()[0] == 23_570
    con.close()


def test_http_api_token(cdnow_live, tmp_path):
    api = Api(cdnow_live.env, tmp_path, token="s3cret")
    try:
        assert api.get("/top", token="")[0] == 401
        assert api.get("/top", token="wrong")[0] == 401
        assert api.get("/top")[0] == 200
        assert api.get("/health", token="")[0] == 200
    finally:
        api.proc.stop()
    res = clv("api", "--host", "0.0.0.0", "--port", str(free_port()), env=cdnow_live.env)
    assert res.returncode == 2 and "CLV_API_TOKEN" in res.stderr


def _publish(bootstrap: str, topic: str, messages: list[tuple[str, bytes]]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        try:
            for key, value in messages:
                await producer.send(topic, value, key=key.encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


def _publish_scores(bootstrap: str, topic: str, template: dict, n: int, tag: str) -> None:
    _publish(bootstrap, topic, [
        (cid, json.dumps({**template, "customer_id": cid, "clv": float(i)}).encode())
        for i, cid in ((i, f"{tag}-{i:06d}") for i in range(n))])


TEMPLATE = {"schema_version": 3, "p_purchase": 0.5, "recency_days": 10.0, "frequency": 2,
            "monetary": 20.0, "tenure_days": 100.0, "total_spend": 40.0, "segment": "regular",
            "horizon_months": 6, "model_version": "gru-test", "as_of": "2011-12-01T00:00:00+00:00",
            "scored_at": "2026-11-22T00:00:00+00:00"}


def test_killing_the_sink_mid_write_keeps_the_previous_snapshot(kafka_bootstrap, clv_env, tmp_path):
    """A sink fed new scores continuously is killed with SIGKILL while a snapshot is being
    written (its temporary file exists); the published snapshot must be the previous one."""
    env = {**clv_env, "CLV_SNAPSHOT_INTERVAL_S": "0.2"}
    published = Path(env["CLV_SNAPSHOT_PATH"])
    _publish_scores(kafka_bootstrap, env["CLV_SCORES_TOPIC"], TEMPLATE, 20_000, "base")
    sink = Child(clv_command("snapshot"), env, tmp_path / "sink.log")
    killed_during_write = False
    try:
        wait_snapshot_caught_up(published, kafka_bootstrap, env["CLV_SCORES_TOPIC"])
        for round_ in range(30):
            _publish_scores(kafka_bootstrap, env["CLV_SCORES_TOPIC"], TEMPLATE, 2000, f"k{round_}")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if any(published.parent.glob(".clv.duckdb.tmp-*")):
                    before = hashlib.sha256(published.read_bytes()).hexdigest()
                    sink.stop(signal.SIGKILL)
                    killed_during_write = any(published.parent.glob(".clv.duckdb.tmp-*"))
                    break
                time.sleep(0.001)
            if killed_during_write or sink.proc.poll() is not None:
                break
        assert killed_during_write, "never caught the sink writing"
    finally:
        sink.stop()
    assert hashlib.sha256(published.read_bytes()).hexdigest() == before  # the previous one, untouched
    con = duckdb.connect(str(published), read_only=True)
    rows, meta = con.execute("SELECT (SELECT count(*) FROM customer_scores), customers FROM snapshot_meta").fetchone()
    con.close()
    assert rows == meta >= 20_000
    again = Child(clv_command("snapshot"), env, tmp_path / "sink2.log")
    try:
        wait_snapshot_caught_up(published, kafka_bootstrap, env["CLV_SCORES_TOPIC"])
    finally:
        assert again.stop() == 0
    assert "left by a sink stopped mid-write" in again.output()
    assert not any(published.parent.glob(".clv.duckdb.tmp-*"))
    con = duckdb.connect(str(published), read_only=True)
    assert con.execute("SELECT count(*) FROM customer_scores WHERE customer_id LIKE 'k%'").fetchone()[0] > 0
    con.close()


def test_sink_reads_schema_2_and_3_during_a_rollout(kafka_bootstrap, clv_env, tmp_path):
    """Old workers publish schema 2 while new ones publish 3: the sink keeps both, with the
    expectation as `clv`. What neither contract accepts (a time that is not one, a null or
    numeric id, a string amount) is counted, logged with its partition and offset, and skipped:
    the sink keeps running and a restart does not meet it again."""
    def message(**changes) -> bytes:
        return json.dumps({**TEMPLATE, **changes}).encode()

    unusable = {"v1": "unknown_schema_version", "half": "missing_field:expected_clv",
                "nan": "non_finite", "when": "bad_timestamp:as_of", "null": "wrong_type:customer_id",
                "number": "wrong_type:customer_id", "text": "wrong_type:clv"}

    _publish(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"], [
        ("old", message(customer_id="old", schema_version=2, clv=1.0, **{LEGACY_CLV: 7.5})),
        ("new", message(customer_id="new", clv=9.25)),
        ("moved", message(customer_id="moved", schema_version=2, clv=1.0, **{LEGACY_CLV: 2.0})),
        ("moved", message(customer_id="moved", clv=3.5)),  # rescored by a new worker: newest wins
        ("v1", message(customer_id="v1", schema_version=1)),
        ("half", message(customer_id="half", schema_version=2)),  # schema 2 without its expectation
        ("nan", message(customer_id="nan").replace(b'"p_purchase": 0.5', b'"p_purchase": NaN')),
        ("when", message(customer_id="when", clv=1.0, as_of="not-a-time")),
        ("null", message(customer_id=None, clv=1.0)),
        ("number", message(customer_id=7, clv=1.0)),
        ("text", message(customer_id="text", clv="12.5")),
        ("gone", message(customer_id="gone", clv=1.0)),
    ])
    _publish(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"], [("gone", None)])  # deleted
    sink = Child(clv_command("snapshot"), clv_env, tmp_path / "sink.log")
    try:
        wait_snapshot_caught_up(Path(clv_env["CLV_SNAPSHOT_PATH"]), kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
        assert sink.proc.poll() is None  # still running
    finally:
        assert sink.stop() == 0
    con = duckdb.connect(clv_env["CLV_SNAPSHOT_PATH"], read_only=True)
    try:
        rows = dict(con.execute("SELECT customer_id, clv FROM customer_scores").fetchall())
        total = con.execute("SELECT sum(total_clv) FROM segment_summary").fetchone()[0]
    finally:
        con.close()
    assert rows == {"old": 7.5, "new": 9.25, "moved": 3.5} and total == 7.5 + 9.25 + 3.5
    log = sink.output()
    where = {r.key.decode(): (r.partition, r.offset)  # each message's key names it
             for r in read_topic(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"]) if r.value is not None}
    for cid, reason in unusable.items():
        partition, offset = where[cid]
        assert f"skipped unusable score at {clv_env['CLV_SCORES_TOPIC']}[{partition}]@{offset}: {reason}" in log, cid
    assert f"{len(unusable)} unusable score messages skipped" in log
    again = Child(clv_command("snapshot"), clv_env, tmp_path / "sink2.log")  # resumes after them
    try:
        deadline = time.monotonic() + 60
        while (resumed := re.search(r"resuming from .*: \d+ customers, offsets (\{[^}]*\})",
                                    again.output())) is None:
            assert time.monotonic() < deadline and again.proc.poll() is None, again.output()
            time.sleep(0.2)
    finally:
        code = again.stop()
        assert code == 0, again.output()
    ends = end_offsets(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert ast.literal_eval(resumed.group(1)) == {p: o for p, o in ends.items() if o > 0}


def test_a_sink_upgraded_over_a_schema_2_snapshot_keeps_its_expectations(tmp_path):
    """A schema-2 sink's snapshot holds quantiles in `clv` and the expectation in `expected_clv`;
    the upgraded sink resumes from it with the expectation as `clv`."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE customer_scores AS SELECT 'c1' AS customer_id, 1.0 AS clv, 0.5 AS p_purchase, "
                f"7.5 AS {LEGACY_CLV}, 3.0 AS recency_days, 2 AS frequency, 10.0 AS monetary, "
                f"40.0 AS tenure_days, 20.0 AS total_spend, 'regular' AS segment, 'low' AS value_tier, "
                f"6 AS horizon_months, 'gru-old' AS model_version, "
                f"TIMESTAMPTZ '2011-12-01 00:00:00+00' AS as_of, TIMESTAMPTZ '2026-11-22 00:00:00+00' AS scored_at, "
                f"0 AS source_partition, 41 AS source_offset")
    con.execute("CREATE TABLE snapshot_meta AS SELECT TIMESTAMPTZ '2011-12-01 00:00:00+00' AS newest_event_time, "
                "MAP([0], [42]) AS offsets")
    con.close()
    store = snapshot.Snapshots(path, "scores")
    try:
        assert store.open() == 1 and store.offsets == {0: 42}
        store.publish()
    finally:
        store.close()
    row = snapshot_rows(path)["c1"]
    assert row["clv"] == 7.5 and row["cluster"] == row["country"] == ""  # columns it lacked: unknown
    assert row["event_offset"] == -1 and row["clv_low"] == row["clv_high"] == row["clv_sd"] == -1


def test_segment_and_tier_totals_state_a_range_of_independent_customers(tmp_path):
    """A group's 80% range is its total +- 1.2816 sqrt(sum of sd^2) (a normal approximation of a
    sum of independent customers; the low end floored at 0), which is far narrower than the sum
    of the customers' own intervals; a customer scored before schema 7 (sd -1) adds nothing."""
    base = parse_score(json.dumps({**TEMPLATE, "customer_id": "x", "clv": 1.0}))
    path = tmp_path / "clv.duckdb"
    store = snapshot.Snapshots(path, "scores")
    sds = [30.0, 40.0, 120.0, -1.0]
    try:
        store.open()
        for i, sd in enumerate(sds):
            score = replace(base, customer_id=f"c{i}", clv=50.0, segment=SEGMENTS[0],
                            clv_low=0.0 if sd > 0 else -1.0, clv_high=3 * sd, clv_sd=sd)
            store.put(score.customer_id, snapshot.row(score, 0, i))
        store.publish()
    finally:
        store.close()
    [seg] = Snapshot(path).segments()
    spread = 1.2816 * math.sqrt(30.0**2 + 40.0**2 + 120.0**2)
    assert seg["total_clv"] == 200.0
    assert seg["total_clv_high"] == pytest.approx(200.0 + spread)
    assert seg["total_clv_low"] == pytest.approx(max(200.0 - spread, 0.0))
    assert seg["total_clv_high"] < 3 * (30.0 + 40.0 + 120.0)  # the sum of the customers' highs
    tiers = Snapshot(path).tiers()
    assert sum(t["total_clv"] for t in tiers) == 200.0
    assert all(t["total_clv_low"] <= t["total_clv"] <= t["total_clv_high"] for t in tiers)


def test_the_sink_store_merges_updates_and_deletes_in_bounded_batches(tmp_path):
    """Customers changed since the last merge are all Python holds: updates replace a row merged
    earlier, a tombstone deletes it, and a restart starts from the published snapshot."""
    base = parse_score(json.dumps({**TEMPLATE, "customer_id": "x", "clv": 1.0}))
    path = tmp_path / "clv.duckdb"
    store = snapshot.Snapshots(path, "scores", merge_rows=3)
    try:
        store.open()
        for i in range(10):
            store.put(f"c{i}", snapshot.row(replace(base, customer_id=f"c{i}", clv=float(i)), 0, i))
            assert len(store.pending) < 3
        store.put("c1", snapshot.row(replace(base, customer_id="c1", clv=100.0), 0, 10))
        store.put("c2", None)
        store.put("c9", None)
        store.offsets = {0: 13}
        assert store.publish() == 8
    finally:
        store.close()
    rows = snapshot_rows(path)
    assert {c: r["clv"] for c, r in rows.items()} == {"c0": 0.0, "c1": 100.0, **{f"c{i}": float(i) for i in (3, 4, 5, 6, 7, 8)}}
    assert rows["c1"]["source_offset"] == 10 and not any(tmp_path.glob(".clv.duckdb.sink*"))
    again = snapshot.Snapshots(path, "scores")
    try:
        assert again.open() == 8 and again.offsets == {0: 13}
        again.put("c0", None)
        assert again.publish() == 7
    finally:
        again.close()
    assert "c0" not in snapshot_rows(path)


def test_the_sink_keeps_each_customers_newest_score_by_position_not_arrival(tmp_path):
    """A stale worker publishes after the current one: its scores (an earlier event offset, or
    the same state on an earlier clock) lose wherever they meet the newer one, in the batch held
    in Python, against the working table, and after a restart from the snapshot; equal positions
    go to the later message (the same state rescored by a new model)."""
    base = parse_score(json.dumps({**TEMPLATE, "customer_id": "x", "clv": 1.0}))

    def put(store: snapshot.Snapshots, cid: str, offset: int, day: int, clv: float, at: int) -> None:
        score = replace(base, customer_id=cid, event_offset=offset, clv=clv,
                        as_of=iso_time(datetime(2011, 12, day, tzinfo=timezone.utc)))
        store.put(cid, snapshot.row(score, 0, at))

    path = tmp_path / "clv.duckdb"
    store = snapshot.Snapshots(path, "scores", merge_rows=1000)
    try:
        store.open()
        put(store, "state", 10, 1, 10.0, 0)
        put(store, "state", 5, 9, 5.0, 1)  # stale, later: lost in Python
        put(store, "clock", 7, 9, 9.0, 2)
        put(store, "model", 7, 9, 1.0, 3)
        store.merge()
        put(store, "state", 9, 20, 9.0, 4)  # stale, against the table
        put(store, "clock", 7, 3, 3.0, 5)  # the same state on an earlier clock
        put(store, "model", 7, 9, 2.0, 6)  # the same, rescored: the later wins
        put(store, "new", -1, 1, 4.0, 7)
        store.offsets = {0: 8}
        assert store.publish() == 4
    finally:
        store.close()
    rows = snapshot_rows(path)
    assert {c: (r["clv"], r["event_offset"]) for c, r in rows.items()} == {
        "state": (10.0, 10), "clock": (9.0, 7), "model": (2.0, 7), "new": (4.0, -1)}
    again = snapshot.Snapshots(path, "scores")
    try:
        again.open()
        put(again, "state", 8, 31, 8.0, 8)
        put(again, "new", 0, 1, 0.5, 9)  # its first event: newer than its bootstrapped state
        again.publish()
    finally:
        again.close()
    assert {c: r["clv"] for c, r in snapshot_rows(path).items()} == {"state": 10.0, "clock": 9.0, "model": 2.0,
                                                            "new": 0.5}


@st.composite
def _accepted(draw) -> list[ScoreRecord]:
    parsed = [parse_score(draw(near_valid())) for _ in range(draw(st.integers(1, 12)))]
    return [p for p in parsed if isinstance(p, ScoreRecord)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_accepted())
def test_anything_the_contract_accepts_the_snapshot_holds(tmp_path_factory, scores):
    """The sink writes and reloads every score `parse_score` lets through (a value DuckDB cannot
    hold would stop the sink)."""
    path = tmp_path_factory.mktemp("fuzz") / "clv.duckdb"
    store = snapshot.Snapshots(path, "scores")
    held = {}
    try:
        store.open()
        newest: dict[str, ScoreRecord] = {}
        for i, score in enumerate(scores):
            store.put(score.customer_id, snapshot.row(score, 0, i))
            if score.customer_id in newest and precedence(score) < precedence(newest[score.customer_id]):
                continue  # a stale score: the customer keeps its newer one
            newest[score.customer_id] = score
            held[score.customer_id] = dict(zip([*snapshot.COLUMNS, "source_partition", "source_offset"],
                                               snapshot.row(score, 0, i)))
        store.offsets = {0: len(scores)}
        assert store.publish() == len(held)
    finally:
        store.close()
    assert snapshot_rows(path) == held
    again = snapshot.Snapshots(path, "scores")  # a restarted sink publishes the same rows
    try:
        again.open()
        assert again.offsets == {0: len(scores)} and again.publish() == len(held)
    finally:
        again.close()
    assert snapshot_rows(path) == held


def test_snapshot_summarises_clusters_and_carries_every_playbook(tmp_path):
    """`cluster_summary` adds up to the customers and value of `customer_scores`, and
    `segment_playbook` holds every field of every playbook, as `clv query` shows them; `clv
    export` and `clv query top` select by country."""
    base = parse_score(json.dumps({**TEMPLATE, "customer_id": "x", "clv": 1.0}))
    path = tmp_path / "clv.duckdb"
    store = snapshot.Snapshots(path, "scores")
    try:
        store.open()
        for i in range(9):
            score = replace(base, customer_id=f"c{i}", clv=float(i), cluster=f"k{i % 3}",
                            segment=SEGMENTS[i % 2], country=("France", "", "EIRE")[i % 3])
            store.put(score.customer_id, snapshot.row(score, 0, i))
        store.publish()
    finally:
        store.close()
    env = {**os.environ, "CLV_SNAPSHOT_PATH": str(path)}
    res = clv("query", "clusters", "--json", env=env)
    assert res.returncode == 0, res.stderr
    rows = {r["cluster"]: r for r in json.loads(res.stdout)}
    assert {k: (r["customers"], r["total_clv"]) for k, r in rows.items()} == {
        "k0": (3, 9.0), "k1": (3, 12.0), "k2": (3, 15.0)}
    assert rows["k1"]["main_segment"] == SEGMENTS[1]
    assert abs(sum(r["share_of_value"] for r in rows.values()) - 1) < 1e-12
    con = duckdb.connect(str(path), read_only=True)
    books = {name: rest for name, *rest in con.execute("SELECT * FROM segment_playbook").fetchall()}
    shares = dict(con.execute("SELECT segment, share_of_customers FROM segment_summary").fetchall())
    con.close()
    assert shares == {SEGMENTS[0]: 5 / 9, SEGMENTS[1]: 4 / 9}  # of the snapshot's customers
    assert books == {name: list(astuple(book)) for name, book in PLAYBOOKS.items()}
    text = clv("query", "segments", env=env).stdout
    assert all(part in text for s in SEGMENTS[:2] for part in astuple(PLAYBOOKS[s]))
    out = tmp_path / "eu.csv"
    res = clv("export", "--out", str(out), "--country", "France", "--country", "EIRE", env=env)
    assert res.returncode == 0, res.stderr
    exported = pd.read_csv(out, keep_default_na=False)
    assert sorted(exported["customer_id"]) == [f"c{i}" for i in range(9) if i % 3 != 1]
    assert set(exported["country"]) == {"France", "EIRE"}
    assert Snapshot(path).countries() == ["EIRE", "France"]  # what the dashboard's filter offers
    top = json.loads(clv("query", "top", "--country", "EIRE", "--json", env=env).stdout)
    assert [r["customer_id"] for r in top] == ["c8", "c5", "c2"]


def test_a_reader_stopped_as_soon_as_it_started_stops_cleanly(kafka_bootstrap, clv_env):
    """A sink sent SIGTERM during start-up stops its consumer straight after starting it; that
    must not raise (aiokafka's group-less consumer once raised CancelledError there)."""
    from stream.kafka_io import started_consumer
    from stream.settings import Settings

    async def start_and_stop() -> None:
        consumer = await started_consumer(Settings.from_env(clv_env))
        await consumer.stop()

    asyncio.run(start_and_stop())


def test_each_snapshot_carries_the_segments_of_the_one_it_replaced(tmp_path):
    """The first snapshot has nothing to compare with; the next one holds the segments of the
    file it replaced, so movement and its insight are read from one file and equal SQL over
    the two; a customer gone and one new show as such."""
    base = parse_score(json.dumps({**TEMPLATE, "customer_id": "x", "clv": 1.0}))
    path, before = tmp_path / "clv.duckdb", tmp_path / "before.duckdb"

    def publish(ids: range, shift: int) -> None:
        store = snapshot.Snapshots(path, "scores")
        try:
            store.open()
            for i in ids:
                score = replace(base, customer_id=f"c{i}", clv=float(i),
                                segment=SEGMENTS[(i + shift * (i % 3 == 0)) % len(SEGMENTS)])
                store.put(score.customer_id, snapshot.row(score, 0, i))
            for gone in set(range(12)) - set(ids):
                store.put(f"c{gone}", None)
            store.publish()
        finally:
            store.close()

    publish(range(12), 0)
    snap = Snapshot(path)
    assert snap.moves() == [] and "segment_changes" not in {i["key"] for i in snap.insights()}
    assert snap.summary()["previous_snapshot_at"] is None
    first_at = snap.summary()["snapshot_at"]
    os.link(path, before)  # the file the next publish replaces
    publish(range(1, 13), 1)  # c0 gone, c12 new, c3, c6, c9 moved
    con = duckdb.connect(str(path), read_only=True)
    try:
        con.execute(f"ATTACH '{before}' AS before (READ_ONLY)")
        want = con.execute("SELECT b.segment, c.segment, count(*) FROM before.customer_scores b "
                           "FULL JOIN customer_scores c USING (customer_id) GROUP BY ALL").fetchall()
    finally:
        con.close()
    assert sorted((m["from_segment"] or "", m["to_segment"] or "", m["customers"]) for m in snap.moves()) == \
        sorted((a or "", b or "", k) for a, b, k in want)
    assert snap.summary()["previous_snapshot_at"] == first_at
    said = {i["key"]: i for i in snap.insights()}
    assert said["segment_changes"]["value"] == 3 == sum(k for a, b, k in want if a and b and a != b)
    assert said["segment_changes"]["text"].startswith("3 customers changed segment") and "new since then: 1" in \
        said["segment_changes"]["text"]


def test_customer_lookups_from_memory_equal_sql_and_follow_the_sink_swap(cdnow_live, tmp_path):
    """A lookup reads the customer's row from memory (`CustomerRows`): for every customer of the
    CDNOW snapshot it is the row SQL reads from the file, an unknown id is None, and once the
    sink replaces the file the next lookup reads the new one."""
    path = tmp_path / "clv.duckdb"
    shutil.copy(cdnow_live.snapshot, path)
    snap = Snapshot(path)
    con = duckdb.connect(str(path), read_only=True)
    try:
        want = {r["customer_id"]: r for r in _dicts(con, "SELECT * FROM customer_scores")}
    finally:
        con.close()
    assert snap.customer("00001") is not None  # the first lookup builds the rows in memory
    got = {cid: {k: v for k, v in snap.customer(cid).items() if k != "drivers"} for cid in want}
    assert got == want and len(got) == 23_570
    assert snap.customer("no such customer") is None
    base = parse_score(json.dumps({**TEMPLATE, "customer_id": "00001", "clv": 123.0}))
    store = snapshot.Snapshots(tmp_path / "next.duckdb", "scores")
    try:
        store.open()
        store.put(base.customer_id, snapshot.row(base, 0, 1))
        store.publish()
    finally:
        store.close()
    os.replace(tmp_path / "next.duckdb", path)  # as the sink publishes: a new file over the path
    assert snap.customer("00001")["clv"] == 123.0 and snap.customer("00002") is None
