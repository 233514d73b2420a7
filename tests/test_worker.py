"""The worker against a real broker: exact scores end to end, after kill -9, with poison input,
and across a rebalance. Workers run as separate processes, as in production."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from export_onnx.runtime import shipped_model_dir
from features.loaders import vendored_cdnow
from features.scores import SCORE_SCHEMA_VERSION
from state.live.record import decode_state
from harness import (CLV, assert_exact, batch_scores, end_offsets, last_scores, read_topic, replay, snapshot_rows,
                     start_worker, topic_layout, wait_idle, wait_snapshot_caught_up)
from stream.processes import Child, clv, wait_for
from state.live.recovery import recover
from stream.kafka_io import KafkaChangelog
from stream.settings import Settings
from state.live.memory.store import MemoryStore


@pytest.fixture(scope="module")
def cdnow_slice(tmp_path_factory) -> Path:
    """The first 3,000 CDNOW customers: every month of the 18, at a test's pace."""
    import gzip

    path = tmp_path_factory.mktemp("data") / "cdnow3000.txt"
    lines = gzip.decompress(vendored_cdnow().read_bytes()).decode().splitlines()
    path.write_text("\n".join([lines[0]] + [l for l in lines[1:] if int(l.split()[0]) <= 3000]) + "\n")
    return path


@pytest.fixture(scope="module")
def slice_batch(cdnow_slice, tmp_path_factory) -> dict[str, dict]:
    """`clv score` of the slice: where every test replaying it must end."""
    return batch_scores(tmp_path_factory.mktemp("slice-batch"), cdnow_slice)


def test_end_to_end_cdnow_matches_batch(cdnow_live, cdnow_batch, kafka_bootstrap):
    """The session's full CDNOW replay (conftest.cdnow_live)."""
    live = last_scores(kafka_bootstrap, cdnow_live.env["CLV_SCORES_TOPIC"])
    assert len(live) == 23_570
    # Every customer is exact and scored in the file's last month; those scored on the newest
    # clock are exact on every field. How many those are depends on when each partition's June
    # rescan started: a month turn's rescan on a live partition does not wait for the last few
    # events of the replay (stream.core._waits).
    whole = assert_exact(live, cdnow_batch)
    assert whole
    status, body = cdnow_live.customer_page
    page = json.loads(body)
    assert status == 200 and page["score"]["customer_id"] == "00001"
    drivers = page["drivers"]  # they add up to the score the worker serves
    assert sorted(d["group"] for d in drivers["drivers"]) == ["frequency", "order_value", "recency", "tenure", "trend"]
    assert (drivers["reference_clv"] + sum(d["contribution"] for d in drivers["drivers"])
            == pytest.approx(page["score"]["clv"], rel=1e-3, abs=1e-5))
    sample = next(iter(live.values()))
    assert sample["schema_version"] == SCORE_SCHEMA_VERSION and sample["as_of"].startswith("1998-06")
    # assert_exact compared the interval too: every customer publishes one, clv_low <= clv_high.
    assert all(0 <= s["clv_low"] <= s["clv_high"] for s in live.values())
    assert sum(s["clv_high"] > 0 for s in live.values()) > 1_000


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_kill_9_mid_replay_loses_and_doubles_nothing(clv_env, kafka_bootstrap, tmp_path, cdnow_slice, slice_batch,
                                                    store):
    """Killed mid-replay and restarted on its state: scores end exact, the changelog holds every
    invoice once, and catching up on the events published meanwhile republishes nobody: the
    restarted worker publishes at most twice as many score messages as customers it publishes
    for. Measured (several runs): this slice 3,003-3,739 messages for 3,000 customers (1.00-1.25
    each); full CDNOW killed after about 16,000 of 69,659 events, 23,580-24,733 for 23,570
    (1.00-1.05, at most 2-7 for one customer). Before a catching-up partition's events were
    left to its rescoring: 10,277-10,392 (3.4-3.5) and 76,617 (3.25, up to 100)."""
    clv_env = {**clv_env, "CLV_STORE": store}
    worker = start_worker(clv_env, tmp_path, "first", state="w")
    worker.wait_ready()
    n_events = sum(1 for _ in cdnow_slice.open()) - 1
    rep = replay(clv_env, cdnow_slice, rate=1500)
    # Mid-stream by the worker's own count, not by the clock: on a loaded machine the replay
    # can take longer than a fixed wait to start publishing.
    worker.wait_for("events arriving", lambda: worker.metrics().get("clv_events_in_total", 0) > 0, timeout=120)
    time.sleep(2)
    before = worker.metrics().get("clv_events_in_total", 0)
    worker.kill()
    assert 0 < before < n_events  # killed mid-stream
    assert rep.wait(120) == 0, rep.stderr.read()
    published = end_offsets(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    again = start_worker(clv_env, tmp_path, "second", state="w")  # same state directory, as a restart
    try:
        again.wait_ready()
        # rocksdb replays only what its directory lacks: at most the one flush in flight (a
        # micro-batch of 1,024 customers and the partitions' own records); memory everything.
        recovered = again.metrics()["clv_state_recovered_records_total"]
        assert recovered <= 1024 + 4 if store == "rocksdb://" else recovered > 1024 + 4
        wait_idle([again], 1, timeout=300)
    finally:
        again.stop()
    republished = Counter(r.key for r in read_topic(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
                          if r.offset >= published.get(r.partition, 0))
    assert sum(republished.values()) <= 2 * len(republished), (
        sum(republished.values()), len(republished), republished.most_common(3))
    live = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    batch = slice_batch
    assert_exact(live, batch)
    # The changelog alone (what any other worker would recover) holds every invoice exactly once.
    states = {}
    for rec in sorted(read_topic(kafka_bootstrap, f"{clv_env['CLV_APP_ID']}-customer-state-changelog"),
                      key=lambda r: (r.partition, r.offset)):
        if rec.key.startswith(b'"'):  # customers; the partition's own record is b"\x00meta"
            states[json.loads(rec.key)] = decode_state(rec.value)
    assert set(states) == set(batch)
    for cid, b in batch.items():
        spend, _units, invoices = states[cid].totals()
        assert invoices == int(b["frequency"]) and abs(spend / 100 - float(b["total_spend"])) < 1e-9, cid


def test_poison_events_go_to_the_dlq_with_reasons(clv_env, kafka_bootstrap, tmp_path):
    """Every kind of bad event reaches the DLQ with its reason (an unkeyed one, one stamped a
    week ahead of the wall clock among them); an event on another partition than its key's is
    routed there; a partition that receives nothing after January still ages into February."""
    week_ahead = (datetime.now(timezone.utc) + timedelta(days=7)).isoformat()
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
        (None, json.dumps({**good, "customer_id": "c4", "event_id": "p7"}).encode(), "missing_key"),
        (b"c1", json.dumps({**good, "event_id": "p8", "invoice_no": "8", "ts": week_ahead}).encode(), "from_future"),
    ]
    # c1 lives on partition 3 and c3 on 1 under murmur2 (of 4); c5 (3) is published to 0.
    valid = [(b"c1", json.dumps(good).encode(), None),
             (b"c1", json.dumps({**good, "event_id": "g2", "invoice_no": "2", "ts": "2011-02-07T10:00:00+00:00"}).encode(), None),
             (b"c3", json.dumps({**good, "customer_id": "c3", "event_id": "g3", "invoice_no": "3"}).encode(), None),
             (b"c5", json.dumps({**good, "customer_id": "c5", "event_id": "g5", "invoice_no": "5"}).encode(), 0)]

    async def produce() -> None:
        from stream.replay import all_topics, ensure_topics

        await ensure_topics(Settings.from_env(clv_env), all_topics(Settings.from_env(clv_env)))
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            mixed = [valid[0], *[(k, v, None) for k, v, _ in poison[:4]], valid[2], valid[3],
                     *[(k, v, None) for k, v, _ in poison[4:]], valid[1]]
            for key, value, partition in mixed:
                await producer.send_and_wait(clv_env["CLV_TRANSACTIONS_TOPIC"], value, key=key,
                                             partition=partition)
        finally:
            await producer.stop()

    worker = start_worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        asyncio.run(produce())
        wait_idle([worker], len(valid) + len(poison) + 1, timeout=120)  # + c5 once routed
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
    assert m["clv_events_routed_total"] == 1
    # faust's own sensor reports on the same /metrics: the offsets it committed, its rebalance.
    assert {k for k in m if k.startswith("faust_topic_partition_offset_commited{")}
    assert m["faust_rebalance_done_latency_count"] >= 1 and "faust_total_rebalances" in m
    scores = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert set(scores) == {"c1", "c3", "c5"}
    moved = [r for r in read_topic(kafka_bootstrap, clv_env["CLV_TRANSACTIONS_TOPIC"]) if r.key == b"c5"]
    assert sorted(r.partition for r in moved) == [0, 3]  # as published, then where it belongs
    assert {r.partition for r in read_topic(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"]) if r.key == b"c5"} == {3}
    # What was accepted, scored by `clv score`: the same on every field, c3 and c5 included,
    # although their partitions saw nothing after January (the worker's clock aged them).
    accepted = tmp_path / "accepted.csv"
    accepted.write_text("InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
                        + "".join(f"{e['invoice_no']},A,x,2,{e['ts'][:19].replace('T', ' ')},5.0,{e['customer_id']},{e.get('country', '')}\n"
                                  for e in (json.loads(v) for _, v, _ in valid)))
    assert len(assert_exact(scores, batch_scores(tmp_path, accepted))) == 3
    assert scores["c3"]["as_of"] == "2011-02-07T10:00:00+00:00"
    # Every topic the worker created carries the replication settings (1 and 1 by default).
    for topic in ("CLV_TRANSACTIONS_TOPIC", "CLV_SCORES_TOPIC", "CLV_DLQ_TOPIC"):
        configs, replicas = topic_layout(kafka_bootstrap, clv_env[topic])
        assert configs["min.insync.replicas"] == "1" and replicas == [1] * 4, topic
    configs, _ = topic_layout(kafka_bootstrap, f"{clv_env['CLV_APP_ID']}-customer-state-changelog")
    assert configs["min.insync.replicas"] == "1" and configs["cleanup.policy"] == "compact"


def test_backfill_then_live_events_from_librdkafka_default_partitioner(clv_env, kafka_bootstrap, tmp_path, cdnow_slice):
    """History backfilled with `clv replay` (murmur2, as the Java client and aiokafka), then the
    rest published live with confluent-kafka at its defaults (librdkafka's CRC32-based
    partitioner puts most customers on another partition): the worker routes those events to
    their customers' partitions and ends exactly where `clv score` of the whole file is."""
    import zlib

    from aiokafka.partitioner import murmur2
    from confluent_kafka import Producer

    from features.batch import read_history

    lines = cdnow_slice.read_text().splitlines()
    lines = [lines[0]] + [l for l in lines[1:] if int(l.split()[0]) <= 1000]  # 1,000 customers
    whole, history = tmp_path / "cdnow1000.txt", tmp_path / "history.txt"
    whole.write_text("\n".join(lines) + "\n")
    history.write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split()[1] < "19980101"]) + "\n")
    live = [e for e in read_history(str(whole)).events if e.ts.year >= 1998]
    home = lambda key: (murmur2(key) & 0x7FFFFFFF) % 4  # noqa: E731
    assert sum(home(e.customer_id.encode()) != zlib.crc32(e.customer_id.encode()) % 4 for e in live) > len(live) / 2

    worker = start_worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        rep = replay(clv_env, history)
        assert rep.wait(120) == 0, rep.stderr.read()
        n_history = len(history.read_text().splitlines()) - 1
        wait_idle([worker], n_history, timeout=300)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})  # librdkafka's defaults
        for e in live:
            producer.produce(clv_env["CLV_TRANSACTIONS_TOPIC"], e.to_json(), key=e.customer_id.encode())
            producer.poll(0)
        assert producer.flush(60) == 0
        deadline = time.monotonic() + 300
        while True:  # every event once, and the routed ones again on their own partition
            m = worker.metrics()
            if m.get("clv_events_in_total", 0) >= n_history + len(live) + m.get("clv_events_routed_total", 0):
                break
            assert time.monotonic() < deadline and worker.proc.poll() is None, m
            time.sleep(0.5)
        wait_idle([worker], 1, timeout=300)
        m = worker.metrics()
    finally:
        worker.stop()
    assert m["clv_events_routed_total"] > len(live) / 2 and not m.get("clv_scoring_errors_total")
    assert read_topic(kafka_bootstrap, clv_env["CLV_DLQ_TOPIC"]) == []
    published = read_topic(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert all(r.partition == home(r.key) for r in published)  # no second copy anywhere
    assert_exact(last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"]), batch_scores(tmp_path, whole))


def test_two_workers_share_partitions_and_survive_one_stopping(clv_env, kafka_bootstrap, tmp_path, cdnow_slice,
                                                               slice_batch):
    a, b = start_worker(clv_env, tmp_path, "a"), start_worker(clv_env, tmp_path, "b")
    try:
        a.wait_ready()
        b.wait_ready()
        rep = replay(clv_env, cdnow_slice, rate=2000)
        wait_for("events reaching both workers", lambda: a.metrics().get("clv_events_in_total", 0) > 0
                 and b.metrics().get("clv_events_in_total", 0) > 0, 60)
        ma, mb = a.metrics(), b.metrics()
        parts_a = {k for k in ma if k.startswith("clv_consumer_lag")}
        parts_b = {k for k in mb if k.startswith("clv_consumer_lag")}
        assert parts_a and parts_b and not parts_a & parts_b
        b.stop()
        assert rep.wait(120) == 0, rep.stderr.read()
        wait_for("partitions of the stopped worker moved",  # the group moves b's to a
                 lambda: a.metrics().get("clv_partitions_owned") == 4, 120)
        wait_idle([a], 1, timeout=300)
    finally:
        a.stop()
        b.stop()
    live = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert_exact(live, slice_batch)
    # The partitions taken over lag the survivor's clock; their backlog is applied, not too late.
    assert read_topic(kafka_bootstrap, clv_env["CLV_DLQ_TOPIC"]) == []


def test_a_worker_killed_before_its_first_commit_loses_no_events(clv_env, kafka_bootstrap, tmp_path, cdnow_slice,
                                                                 slice_batch):
    """b dies holding its first micro-batch, before any offset of its partitions is committed:
    a takes them over from their start (not from where its consumer had fetched to during the
    rebalance) and ends exactly where `clv score` of the file is."""
    a = start_worker(clv_env, tmp_path, "a")
    b = start_worker(clv_env, tmp_path, "b", batch_wait_ms=3000)  # publishes (and commits) late
    try:
        a.wait_ready()
        b.wait_ready()
        rep = replay(clv_env, cdnow_slice, rate=1500)
        # Killed at its first events: well within its 3 s micro-batch, nothing of them committed.
        wait_for("events reaching b", lambda: b.metrics().get("clv_events_in_total", 0) > 0, 60, interval=0.05)
        b.kill()
        assert rep.wait(120) == 0, rep.stderr.read()
        wait_for("partitions of the killed worker moved",
                 lambda: a.metrics().get("clv_partitions_owned") == 4, 60)
        wait_idle([a], 1, timeout=300)
    finally:
        a.stop()
        b.stop()
    assert_exact(last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"]), slice_batch)


def test_a_worker_paused_past_its_session_timeout_cannot_roll_state_back(clv_env, kafka_bootstrap, tmp_path, cdnow_slice,
                                                                          slice_batch):
    """Two workers; b is SIGSTOPped while events flow, a takes over all partitions, then b is
    resumed and publishes the micro-batch and states it held (it holds several seconds' worth)
    before it learns it lost them; the group rebalances and b recovers states again. Its late
    writes are older by position: the scores subscribers (and the snapshot) keep, and the states
    any worker recovers, end exactly where `clv score` of the whole file is."""
    a = start_worker(clv_env, tmp_path, "a")
    b = start_worker(clv_env, tmp_path, "b", batch_wait_ms=3000)  # always holds unpublished scores
    owned = lambda w: w.metrics().get("clv_partitions_owned", 0)  # noqa: E731
    try:
        a.wait_ready()
        b.wait_ready()
        rep = replay(clv_env, cdnow_slice, rate=400)  # about 22 s of events
        time.sleep(4)
        assert owned(a) and owned(b) and b.metrics().get("clv_events_in_total", 0) > 0
        b.send_signal(signal.SIGSTOP)
        # past b's session timeout (6 s in tests)
        wait_for("a took over b's partitions", lambda: owned(a) == 4, 60)
        time.sleep(2)  # a writes newer states and scores of b's customers
        b.send_signal(signal.SIGCONT)
        wait_for("b got partitions back", lambda: owned(b) and owned(a) + owned(b) == 4, 60)
        assert rep.wait(120) == 0, rep.stderr.read()
        wait_idle([a, b], 1, timeout=300)
    finally:
        a.stop()
        b.stop()
    assert "holds records this worker has not read" in b.log.read_text(errors="replace")  # b wrote late
    batch = slice_batch
    assert_exact(last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"]), batch)
    sink = Child(clv("snapshot"), clv_env, tmp_path / "sink.log")
    try:
        wait_snapshot_caught_up(Path(clv_env["CLV_SNAPSHOT_PATH"]), kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    finally:
        assert sink.stop() == 0
    assert_exact(snapshot_rows(Path(clv_env["CLV_SNAPSHOT_PATH"])), batch)
    # What a worker taking any partition over now would recover holds every invoice once.
    settings = Settings.from_env(clv_env)
    store, states = MemoryStore(), {}
    for partition in range(settings.partitions):
        asyncio.run(recover(store, KafkaChangelog(settings, settings.changelog_topic), partition))
        states.update((json.loads(k), decode_state(store.get(partition, k)))
                      for k in store.customer_keys(partition))
    assert set(states) == set(batch)
    for cid, want in batch.items():
        spend, _units, invoices = states[cid].totals()
        assert invoices == int(want["frequency"]) and abs(spend / 100 - float(want["total_spend"])) < 1e-9, cid


def test_new_model_rolls_out_lazily_then_on_rescore_all(clv_env, kafka_bootstrap, tmp_path, cdnow_slice, slice_batch):
    from features.batch import read_history

    model_b = tmp_path / "model-b"
    shutil.copytree(shipped_model_dir(), model_b)
    meta = json.loads((model_b / "metadata.json").read_text())
    old, new = meta["version"], meta["version"] + "-next"
    (model_b / "metadata.json").write_text(json.dumps({**meta, "version": new}))
    scores = clv_env["CLV_SCORES_TOPIC"]

    first = start_worker(clv_env, tmp_path, "old-model")
    try:
        first.wait_ready()
        assert replay(clv_env, cdnow_slice).wait(120) == 0
        wait_idle([first], 1, timeout=300)
    finally:
        first.stop()
    published = sum(end_offsets(kafka_bootstrap, scores).values())

    second = start_worker({**clv_env, "CLV_MODEL_DIR": str(model_b)}, tmp_path, "new-model")
    try:
        second.wait_ready()
        wait_idle([second], 0, timeout=120)
        time.sleep(2)
        assert sum(end_offsets(kafka_bootstrap, scores).values()) == published  # lazy: nothing yet
        assert "carry another model version" in second.log.read_text(errors="replace")

        # The customer's last invoice again (same event id: no state change) touches them.
        last = [e for e in read_history(str(cdnow_slice)).events if e.customer_id == "00007"][-1]

        async def touch() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(clv_env["CLV_TRANSACTIONS_TOPIC"], last.to_json(), key=b"00007")
            finally:
                await producer.stop()

        asyncio.run(touch())
        wait_idle([second], 1, timeout=60)
        live = last_scores(kafka_bootstrap, scores)
        assert live["00007"]["model_version"] == new
        assert {v["model_version"] for c, v in live.items() if c != "00007"} == {old}

        res = subprocess.run([*CLV, "rescore-all"], env=clv_env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 120
        while {v["model_version"] for v in last_scores(kafka_bootstrap, scores).values()} != {new}:
            assert time.monotonic() < deadline, "rescore-all never reached every customer"
            time.sleep(1)
    finally:
        second.stop()
    assert_exact(last_scores(kafka_bootstrap, scores), slice_batch)


def test_a_worker_configured_for_another_partition_count_refuses_to_start(clv_env):
    """Customers' partitions (state, scores, routing) follow the topic's partition count: a
    worker told another count stops at once, saying which to set."""
    from stream.replay import all_topics, ensure_topics

    two = Settings.from_env(clv_env, partitions=2)
    asyncio.run(ensure_topics(two, all_topics(two)))
    res = subprocess.run([*CLV, "worker"], env={**clv_env, "CLV_PARTITIONS": "4"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "has 2 partitions" in res.stderr and "CLV_PARTITIONS=2" in res.stderr


def test_worker_endpoints_off_loopback_need_the_api_token(clv_env, tmp_path):
    """Bound to another address than loopback, the worker starts only with a token, and all
    but the probes (faust's own table views included) need it."""
    res = subprocess.run([*CLV, "worker"], env={**clv_env, "CLV_WEB_HOST": "0.0.0.0", "CLV_API_TOKEN": ""},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "CLV_API_TOKEN" in res.stderr, res.stderr
    worker = start_worker({**clv_env, "CLV_WEB_HOST": "0.0.0.0", "CLV_API_TOKEN": "s3cret"}, tmp_path)
    try:
        worker.wait_ready()  # /ready is open to probes
        assert worker.get("/health")[0] == 200
        for path in ("/metrics", "/customers/00001", "/table/customer-state/"):
            assert worker.get(path)[0] == 401, path
            assert worker.get(path, token="wrong")[0] == 401, path
        assert worker.get("/metrics", token="s3cret")[0] == 200
        assert worker.get("/customers/00001", token="s3cret")[0] == 404  # not on this worker
    finally:
        worker.stop()


def test_one_customer_that_cannot_be_scored_does_not_fail_the_others():
    """A batch the model cannot take (here one state holds a month after the clock's) is scored
    customer by customer: the others get exactly their batch scores, the culprit its error."""
    from export_onnx.runtime import Artifact
    from features.aggregate import Folder, contribution
    from features.contract import Line, TransactionEvent
    from export_onnx.scoring import score_separately, score_states

    artifact = Artifact.load(None)
    folder = Folder(artifact.window)
    for i, (cid, day) in enumerate((("a", 3), ("b", 9), ("late", 20))):
        ts = datetime(2011, 3 if cid == "late" else 1, day, tzinfo=timezone.utc)
        folder.add(cid, contribution(TransactionEvent(f"e{i}", cid, str(i), ts, (Line("A", 2, 5.0),))))
    as_of = datetime(2011, 1, 31, tzinfo=timezone.utc)  # before "late"'s March purchase
    states = [folder.states[c] for c in ("a", "late", "b")]
    with pytest.raises(ValueError, match="after the as-of month"):
        score_states(artifact, states, as_of)
    a, late, b = score_separately(artifact, states, as_of)
    assert isinstance(late, ValueError) and "late" in str(late)
    for got, want in zip((a, b), score_states(artifact, [states[0], states[2]], as_of)):
        assert got.customer_id == want.customer_id and got.frequency == want.frequency == 1
        assert got.clv == pytest.approx(want.clv, rel=1e-5) and got.as_of == want.as_of
        for name in ("clv_low", "clv_high", "clv_sd"):  # the interval, scored alone or in a batch
            assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-5, abs=1e-9), name


def test_faust_sensor_series_are_brought_up_to_date_when_scraped():
    """The worker's faust sensor keeps plain counts per message and sets its `faust_*` series
    from them when /metrics is rendered: the values a scraper reads are faust's own; after a
    rebalance, the series of topics and partitions count again from there, as faust's do."""
    from faust.types import TP

    from stream.metrics import Metrics

    class Stream:
        shortlabel = "Stream: Topic: tx"

        def __init__(self) -> None:
            self.task_owner = self

        def __hash__(self) -> int:
            return id(self)

    class Message:
        time_in = None

    def read(metrics: Metrics) -> dict[str, float]:
        body, _ = metrics.render(None)
        return {name: float(value) for name, _, value in (line.rpartition(" ") for line in
                body.decode().splitlines() if line.startswith("faust_"))}

    metrics = Metrics()
    monitor, stream, tp = metrics.faust_monitor(), Stream(), TP("tx", 2)
    for offset in range(5):
        monitor.track_tp_end_offset(tp, 10)
        message = Message()
        monitor.on_message_in(tp, offset, message)
        state = monitor.on_stream_event_in(tp, offset, stream, None)
        if offset < 4:  # one event still in the agent
            monitor.on_stream_event_out(tp, offset, stream, None, state)
            monitor.on_message_out(tp, offset, message)
    m = read(metrics)
    assert m["faust_messages_received_total"] == m["faust_total_events_total"] == 5
    assert m['faust_messages_received_per_topic_total{topic="tx"}'] == 5
    assert m['faust_messages_received_per_topics_partition{partition="2",topic="tx"}'] == 4
    assert m['faust_total_events_per_stream_total{stream="stream.topic_tx.events"}'] == 5
    assert m["faust_active_messages"] == m["faust_total_active_events"] == 1
    assert m['faust_topic_partition_end_offset{partition="2",topic="tx"}'] == 10
    assert read(metrics)["faust_messages_received_total"] == 5  # scraped again: unchanged
    monitor._clear_partition_related_metrics()  # what a rebalance does
    monitor.on_message_in(tp, 5, Message())
    m = read(metrics)
    assert m["faust_messages_received_total"] == 6
    assert m['faust_messages_received_per_topic_total{topic="tx"}'] == 1
    assert m['faust_messages_received_per_topics_partition{partition="2",topic="tx"}'] == 5
