"""`clv bootstrap`: its bulk fold leaves the stream fold's records; a worker starts from what it
wrote, and a replay of the whole history afterwards counts nothing twice; bad input or no broker
writes nothing. Real files, the real broker, the real worker."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pandas as pd

from features.aggregate import MAX_IDS, Folder, contribution
from features.batch import read_history, read_lines
from features.bulk import fold_lines
from features.events import events_from_lines
from state.live.record import encode_state
from features.synthetic import generate, write
from stream.publisher import home_partition
from harness import CLV, assert_exact, batch_scores, end_offsets, last_scores, replay, start_worker, wait_idle


def _heavy_customer(start: pd.Timestamp) -> pd.DataFrame:
    """2,100 purchases in ten months and their 60 returns: past the state's key bound."""
    n = 2100
    ts = start + pd.to_timedelta(pd.Series(range(n)) * 200, unit="min")
    frame = pd.DataFrame({"customer_id": "HEAVY", "invoice_no": [f"H{k}" for k in range(n)],
                          "ts": ts, "stock_code": "A", "quantity": 2, "unit_price": 1.25,
                          "country": None})
    returns = frame.iloc[::35].assign(invoice_no=lambda f: "C" + f["invoice_no"], quantity=-1,
                                      ts=lambda f: f["ts"] + timedelta(days=3))
    return pd.concat([frame, returns], ignore_index=True)


def test_bulk_fold_leaves_the_stream_folds_records(tmp_path):
    """Per partition, in event-time order, as the worker folds: the same bytes per customer."""
    lines, _ = read_lines(write(generate(400, 6000, seed=9)[0], tmp_path / "h.csv"))
    lines = pd.concat([lines, _heavy_customer(lines["ts"].min())], ignore_index=True)
    # Online Retail files carry a country per line: some invoices with one, some without.
    code = pd.factorize(lines["invoice_no"])[0] % 4
    lines["country"] = pd.Series(["United Kingdom", "France", None, "EIRE"], dtype=object)[code].to_numpy()
    folders = [Folder(13) for _ in range(4)]
    for ev in events_from_lines(lines):
        folders[home_partition(ev.customer_id.encode(), 4)].add(ev.customer_id, contribution(ev))
    stream = {cid: s for f in folders for cid, s in f.states.items()}

    bulk = fold_lines(lines, 13)
    assert {s.customer_id for s in bulk.states} == set(stream) and len(bulk.states) == len(stream)
    assert min(len(s.months) for s in bulk.states) >= 1 and max(s.past_invoices for s in bulk.states) > 0
    assert stream["HEAVY"].ids_forgotten > 0 and stream["HEAVY"].n_ids == MAX_IDS
    assert {s.country for s in bulk.states} >= {"United Kingdom", "France", "EIRE"}
    for s in bulk.states:
        assert encode_state(s) == encode_state(stream[s.customer_id]), s.customer_id


def _split(tmp_path):
    """A two-year history and its first fourteen months (cut between two timestamps, so no
    invoice is split). Enough customers that every partition buys in the last month: a
    partition's clock is its own newest event, and `assert_exact` compares clv as of one month."""
    frame, _ = generate(300, 3000, seed=4)
    stamps = pd.to_datetime(frame["InvoiceDate"], format="%m/%d/%Y %H:%M")
    part = frame[stamps < pd.Timestamp("2011-02-01")]
    return write(frame, tmp_path / "whole.csv"), write(part, tmp_path / "part.csv")


def _bootstrap(env: dict, path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLV, "bootstrap", str(path), "--quiet", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_bootstrap_part_then_replay_the_whole_history(clv_env, kafka_bootstrap, tmp_path):
    whole, part = _split(tmp_path)
    done = _bootstrap(clv_env, part)
    assert done.returncode == 0, done.stderr
    changelog = f"{clv_env['CLV_APP_ID']}-customer-state-changelog"
    written = end_offsets(kafka_bootstrap, changelog)
    part_scores = last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"])
    (tmp_path / "part").mkdir()
    assert_exact(part_scores, batch_scores(tmp_path / "part", part))  # as of the part's end

    again = _bootstrap(clv_env, part)  # a second bootstrap would overwrite: refused
    assert again.returncode == 2 and again.stderr.startswith("clv: error: topic ")
    assert end_offsets(kafka_bootstrap, changelog) == written

    events_part = len(read_history(part).events)
    events_whole = len(read_history(whole).events)
    worker = start_worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        m = worker.metrics()
        assert m["clv_state_recovered_records_total"] == len(part_scores) + 4  # and 4 partition records
        assert m.get("clv_rescored_customers_total", 0) == 0  # the bootstrap's scores are current
        for cid in list(part_scores)[:5]:  # served from the recovered states, as published
            status, body = worker.get(f"/customers/{cid}")
            page = json.loads(body)
            served, drivers = page["score"], page["drivers"]
            assert status == 200 and served["as_of"] == part_scores[cid]["as_of"]
            want = part_scores[cid]["clv"]
            assert abs(served["clv"] - want) <= 1e-5 * max(abs(want), 1e-9)
            explained = drivers["reference_clv"] + sum(d["contribution"] for d in drivers["drivers"])
            assert abs(explained - want) <= 1e-3 * max(abs(want), 0.01)  # the drivers add up to it
        rep = replay(clv_env, whole)
        assert rep.wait(120) == 0, rep.stderr.read()
        wait_idle([worker], events_whole, timeout=120)
        m = worker.metrics()
    finally:
        worker.stop()
    assert m["clv_events_applied_total"] == events_whole - events_part  # the rest, nothing again
    skipped = (m.get('clv_events_skipped_total{reason="duplicate"}', 0)
               + m.get('clv_dlq_total{reason="too_late"}', 0))
    assert skipped == events_part
    assert_exact(last_scores(kafka_bootstrap, clv_env["CLV_SCORES_TOPIC"]), batch_scores(tmp_path, whole))


def _nothing_written(bootstrap: str, env: dict) -> bool:
    topics = (env["CLV_SCORES_TOPIC"], env["CLV_TRANSACTIONS_TOPIC"],
              f"{env['CLV_APP_ID']}-customer-state-changelog")
    return all(end_offsets(bootstrap, t) == {} for t in topics)  # not even created


def _one_line_error(done: subprocess.CompletedProcess, says: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("clv: error:") and len(done.stderr.splitlines()) == 1, done.stderr
    assert says in done.stderr


def test_bad_file_writes_nothing(clv_env, kafka_bootstrap, tmp_path):
    (tmp_path / "bad.csv").write_text("when,who\n1,2\n")
    _one_line_error(_bootstrap(clv_env, tmp_path / "bad.csv"), "unrecognised columns")
    frame, _ = generate(20, 100, seed=1)
    frame["CustomerID"] = ""  # every row dropped by cleaning
    _one_line_error(_bootstrap(clv_env, write(frame, tmp_path / "anonymous.csv")),
                    "no transactions left after cleaning")
    assert _nothing_written(kafka_bootstrap, clv_env)


def test_unreachable_broker_writes_nothing(clv_env, kafka_bootstrap, tmp_path):
    from stream.broker import free_port

    _, part = _split(tmp_path)
    done = _bootstrap(clv_env, part, "--bootstrap", f"127.0.0.1:{free_port()}")
    _one_line_error(done, "cannot use the broker")
    assert _nothing_written(kafka_bootstrap, clv_env)


def test_bootstrap_judges_its_customers_against_the_models_training_cohort_as_clv_score_does(tmp_path):
    """A retailer's history bootstrapped with the CDNOW model: its scores are written all the
    same, with the drift warning `clv score` prints for the same file (in-process, no broker)."""
    from export_onnx.runtime import Artifact
    from export_onnx.scoring import score_file
    from stream.bootstrap import build
    from stream.settings import Settings

    path = write(generate(1200, 7000, seed=7)[0], tmp_path / "retail.csv")
    lines, _ = read_lines(path)
    artifact = Artifact.load()
    records, _, customers, _, verdict = build(lines, artifact, Settings.from_env({}))
    scored = score_file(artifact, path)
    assert customers == len(scored.scores) >= 200 and len(records) > 2 * customers
    assert verdict == scored.drift and "order value PSI" in verdict.sentence()
