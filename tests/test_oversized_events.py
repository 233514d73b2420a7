"""Events the worker cannot publish as they are: a dead letter over the producer's size limit, a
valid event too large to route to its customer's partition. Each is still accounted for (a
truncated dead letter with its reason, source and key; the original stays in `transactions`)
and acknowledged, so the group's commit passes it. And what publishers' habits lead to: a key
with spaces around the id, the same event_id sent again with another amount.

The embedded broker takes records of 12 MB and more (no `message.max.bytes` of its own), so the
limit met here is the worker producer's `max_request_size` (faust's default, 1,000,000 bytes)."""

from __future__ import annotations

import asyncio
import json
import time

from aiokafka import AIOKafkaProducer

from harness import last_scores, read_topic, start_worker, wait_idle
from stream.intake import PREFIX_BYTES
from stream.processes import wait_for
from stream.settings import Settings

GOOD = {"schema_version": 1, "event_id": "g1", "customer_id": "c1", "invoice_no": "1",
        "ts": "2011-01-05T10:00:00+00:00", "lines": [{"stock_code": "A", "quantity": 2, "unit_price": 5.0}]}


def event(**changes) -> dict:
    return {**GOOD, **changes}


def lines(n: int, code_chars: int = 20) -> list[dict]:
    return [{"stock_code": f"S{i:0{code_chars}d}", "quantity": 1, "unit_price": 1.25} for i in range(n)]


def publish(env: dict, bootstrap: str, messages: list[tuple[bytes | None, bytes, int | None]]
            ) -> list[tuple[int, int]]:
    """Publish in order, waiting for each; returns (partition, offset) of each."""
    async def run() -> list[tuple[int, int]]:
        from stream.replay import all_topics, ensure_topics

        settings = Settings.from_env(env)
        await ensure_topics(settings, all_topics(settings))
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 << 20)
        await producer.start()
        try:
            where = []
            for key, value, partition in messages:
                meta = await producer.send_and_wait(env["CLV_TRANSACTIONS_TOPIC"], value, key=key,
                                                    partition=partition)
                where.append((meta.partition, meta.offset))
            return where
        finally:
            await producer.stop()

    return asyncio.run(run())


def lag(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("clv_consumer_lag"))


def test_events_too_large_to_publish_are_dead_lettered_truncated_and_commits_pass_them(
        clv_env, kafka_bootstrap, tmp_path):
    """1.2 MB and 3.7 MB invoices (20,000 and 60,000 lines: absurd) and a valid 1.8 MB invoice
    published to another partition than its customer's, among ordinary events: each is applied
    or on the DLQ with its reason; the commit passes them within seconds; /ready stays 200; a
    restart redelivers nothing."""
    big = [json.dumps(event(event_id="big1", invoice_no="b1", lines=lines(20_000, 6))).encode(),
           json.dumps(event(event_id="big2", invoice_no="b2", lines=lines(60_000, 6))).encode()]
    unroutable = json.dumps(event(customer_id="c3", event_id="big3", invoice_no="b3",
                                  lines=lines(10_000, 150))).encode()
    applied_big = json.dumps(event(event_id="big4", invoice_no="b4", lines=lines(10_000, 150))).encode()
    assert 1_150_000 < len(big[0]) < 1_300_000 and 3_600_000 < len(big[1]) < 3_800_000
    assert len(unroutable) > 1_000_000 and len(applied_big) > 1_000_000
    # c1 lives on partition 3 and c3 on 1 under murmur2 (of 4).
    messages = [
        (b"c1", json.dumps(GOOD).encode(), None),
        (b"c1", big[0], None),
        (b"c1", big[1], None),
        (b"c3", unroutable, 3),
        (b"c1", applied_big, None),
        *[(b"c1", json.dumps(event(event_id=f"o{i}", invoice_no=f"o{i}",
                                   ts=f"2011-01-{10 + i:02d}T10:00:00+00:00")).encode(), None)
          for i in range(5)],
        (b"c3", json.dumps(event(customer_id="c3", event_id="g3", invoice_no="3")).encode(), None),
    ]
    worker = start_worker(clv_env, tmp_path, state="w")
    ready: list[int] = []
    try:
        worker.wait_ready()
        where = publish(clv_env, kafka_bootstrap, messages)
        published = time.monotonic()

        def committed_past_everything() -> bool:
            ready.append(worker.get("/ready")[0])
            m = worker.metrics()
            return m.get("clv_events_in_total", 0) >= len(messages) and lag(m) == 0

        wait_for("the group's commit past every event", committed_past_everything, 30)
        caught_up = time.monotonic() - published
        m = worker.metrics()
    finally:
        worker.stop()
    assert caught_up < 10, caught_up
    assert set(ready) == {200}, ready
    log = worker.log.read_text(errors="replace")
    assert "Restarting dead" not in log and "Traceback" not in log
    dlq = {int(dict(r.headers)["source_offset"]): r for r in read_topic(kafka_bootstrap, clv_env["CLV_DLQ_TOPIC"])}
    originals = {(r.partition, r.offset): r.value
                 for r in read_topic(kafka_bootstrap, clv_env["CLV_TRANSACTIONS_TOPIC"])}
    expected = {1: ("absurd_value", big[0]), 2: ("absurd_value", big[1]), 3: ("too_large_to_route", unroutable)}
    assert {where[i][1]: reason for i, (reason, _) in expected.items()} == \
        {o: dict(r.headers)["reason"].decode() for o, r in dlq.items()}
    for i, (_reason, value) in expected.items():
        partition, offset = where[i]
        letter = dlq[offset]
        h = {k: v.decode() for k, v in letter.headers}
        assert (h["source_partition"], h["source_offset"], h["truncated"]) == (str(partition), str(offset), "true")
        assert int(h["original_bytes"]) == len(value) and letter.value == value[:PREFIX_BYTES]
        assert letter.key == messages[i][0]
        assert originals[(partition, offset)] == value  # the whole event, where the header says
    assert m['clv_dlq_total{reason="absurd_value"}'] == 2
    assert m['clv_dlq_truncated_total{reason="absurd_value"}'] == 2
    assert m['clv_dlq_total{reason="too_large_to_route"}'] == 1
    assert m['clv_dlq_truncated_total{reason="too_large_to_route"}'] == 1
    assert m["clv_events_applied_total"] == len(messages) - 3
    scores = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert scores["c1"]["frequency"] == 7 and set(scores) == {"c1", "c3"}  # g1, big4, o0-o4
    # Restarted on the same state: nothing after the committed offsets comes again.
    again = start_worker(clv_env, tmp_path, "again", state="w")
    try:
        again.wait_ready()
        publish(clv_env, kafka_bootstrap, [(b"c1", json.dumps(event(
            event_id="late", invoice_no="late", ts="2011-01-20T10:00:00+00:00")).encode(), None)])
        wait_idle([again], 1, timeout=60)
        after = again.metrics()
    finally:
        again.stop()
    assert after["clv_events_in_total"] == 1 and after["clv_events_applied_total"] == 1
    assert len(read_topic(kafka_bootstrap, clv_env["CLV_DLQ_TOPIC"])) == 3


def test_a_key_with_spaces_and_a_conflicting_duplicate_say_what_happened(clv_env, kafka_bootstrap, tmp_path):
    """A key with spaces around the customer id is the customer without them (as the payload's
    id is read): applied there, counted, and a warning names it. The same event_id again with
    another amount is not applied (the first counts): counted as a duplicate, and a log line
    names the event_id, customer, partition and offset."""
    first = event(event_id="e1", invoice_no="1")
    conflicting = event(event_id="e1", invoice_no="1", lines=[{"stock_code": "A", "quantity": 9, "unit_price": 50.0}])
    spaced = event(customer_id=" c1 ", event_id="e2", invoice_no="2", ts="2011-01-06T10:00:00+00:00")
    worker = start_worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        where = publish(clv_env, kafka_bootstrap, [(b"c1", json.dumps(first).encode(), None),
                                                   (b"c1", json.dumps(conflicting).encode(), None),
                                                   (b" c1 ", json.dumps(spaced).encode(), None)])
        routed = where[2][0] != where[0][0]
        wait_idle([worker], 3 + routed, timeout=60)
        m = worker.metrics()
        page = json.loads(worker.get("/customers/c1")[1])
    finally:
        worker.stop()
    assert m['clv_events_skipped_total{reason="duplicate"}'] == 1
    assert m["clv_events_key_trimmed_total"] == 1 and m["clv_events_applied_total"] == 2
    assert m.get("clv_dlq_total", 0) == 0 and not read_topic(kafka_bootstrap, clv_env["CLV_DLQ_TOPIC"])
    assert page["aggregates"]["lifetime_spend"] == 20.0  # e1 as first sent, and e2
    assert page["aggregates"]["lifetime_invoices"] == 2
    log = worker.log.read_text(errors="replace")
    assert (f"event_id 'e1' of customer 'c1' at {clv_env['CLV_TRANSACTIONS_TOPIC']}[{where[1][0]}]"
            f"@{where[1][1]} not applied") in log
    assert "keyed with spaces around their customer id" in log and "applied to customer 'c1'" in log
