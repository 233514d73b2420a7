"""One customer with 30,000 invoices in a month, against the real broker: its state record stays
under the documented bound, every invoice counts once, and the customers after it are scored."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

from features.aggregate import MAX_IDS
from features.contract import Line, TransactionEvent, stable_event_id
from state.live.record import decode_state, record_bound
from stream.replay import publish
from stream.settings import Settings
from harness import last_scores, read_topic, start_worker, wait_idle

T0 = datetime(2011, 3, 1, tzinfo=timezone.utc)


def test_thirty_thousand_invoices_of_one_customer_stay_bounded(clv_env, kafka_bootstrap, tmp_path):
    busy = [TransactionEvent(stable_event_id("B2B", f"I{k}"), "B2B", f"I{k}",
                             T0 + timedelta(seconds=60 * k), (Line("A", 1, 2.5),))
            for k in range(30_000)]
    after = [TransactionEvent(stable_event_id(f"c{k}", "1"), f"c{k}", "1", T0 + timedelta(days=25),
                              (Line("A", 2, 5.0),)) for k in range(50)]

    worker = start_worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        events = [*busy, busy[-1], *after]  # the newest invoice re-published once
        asyncio.run(publish(Settings.from_env(clv_env), events, len(events), progress=False))
        wait_idle([worker], len(events), timeout=300)
        m = worker.metrics()
    finally:
        worker.stop()
    assert m['clv_events_skipped_total{reason="duplicate"}'] == 1
    assert m["clv_state_near_bound_customers"] == 1
    assert m["clv_state_record_max_bytes"] <= record_bound(13) + len("B2B")
    scores = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    assert scores["B2B"]["frequency"] == 30_000 and scores["B2B"]["total_spend"] == 75_000.0
    assert all(scores[f"c{k}"]["frequency"] == 1 for k in range(50))  # not stalled behind it
    records = [r for r in read_topic(kafka_bootstrap, f"{clv_env['CLV_APP_ID']}-customer-state-changelog")
               if r.key == json.dumps("B2B").encode()]
    assert max(len(r.value) for r in records) <= record_bound(13) + len("B2B")
    newest = decode_state(max(records, key=lambda r: r.offset).value)
    assert newest.totals() == (7_500_000, 30_000, 30_000) and newest.n_ids == MAX_IDS
