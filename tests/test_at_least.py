"""P(spend >= T) for analysts: the predictive distribution the snapshot sink keeps per customer
(`stream.distributions`), what the snapshot's readers compute from it (`state.snapshot.queries`)
and the API's `at_least` and `min_probability`, against `clv score --at-least` and DuckDB."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from collections import namedtuple
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from export_onnx.runtime import Artifact
from export_onnx.scoring import prepare, score_states
from features.aggregate import month_of
from features.distribution import SpendDistribution
from features.loaders import vendored_cdnow
from harness import CLV, Api, cdnow_sample
from state.live.base.partition import encode_key
from state.live.record import encode_state
from state.snapshot import tables as snapshot
from state.snapshot.queries import Selection, Snapshot
from stream.distributions import Distributions
from stream.state_copy import StateCopy

Record = namedtuple("Record", "key value offset")


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return Artifact.load()


@pytest.fixture(scope="module")
def cdnow(artifact: Artifact):
    """300 CDNOW customers as of the file's newest event, spread over the file."""
    return cdnow_sample(artifact.window, 300)


def stored(path: Path) -> dict[str, SpendDistribution]:
    """Each customer's distribution as the snapshot holds it."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT customer_id, p, weights, mu, sigma FROM customer_distribution").fetchall()
    finally:
        con.close()
    return {c: SpendDistribution(np.array([p]), np.array([w]), np.array([m]), np.array([s])) for c, p, w, m, s in rows}


def test_the_snapshot_keeps_distributions_only_where_state_and_score_agree(artifact, cdnow, tmp_path: Path):
    """A customer whose state has events its score does not include yet, or whose score is not what
    its state gives, gets no distribution in this snapshot; the others get the one `clv score
    --at-least` computes with (the same P(spend >= T)); a later snapshot, and a restarted sink,
    keep them while the score stays, and compute the missing one once its state is in step."""
    states, at = cdnow
    scores = score_states(artifact, states, at)
    copy = StateCopy()
    dists = Distributions(artifact, copy)
    copy.fold(0, [Record(encode_key(s.customer_id), encode_state(s), i) for i, s in enumerate(states[1:], 1)])
    sink = snapshot.Snapshots(tmp_path / "clv.duckdb", "clv-scores")
    sink.open()
    older = at - timedelta(days=62)
    late = next(i for i, s in enumerate(states) if max(s.months, default=0) > month_of(older))
    for i, s in enumerate(scores):
        row = list(snapshot.row(s, 0, i))
        if i == late:
            row[snapshot.COLUMNS.index("as_of")] = older.isoformat()  # a score older than its state
        if i == 2:
            row[snapshot.COLUMNS.index("clv")] *= 1.1  # a score its state does not give
        sink.put(s.customer_id, tuple(row))
    try:
        dists.start()
        for changed in sink.undistributed(artifact.version, batch=128):
            sink.keep_distributions(dists.rows(changed))
        sink.publish()
        kept = stored(sink.path)
        missing = {scores[0].customer_id, scores[2].customer_id, scores[late].customer_id}
        assert set(kept) == {s.customer_id for s in scores} - missing  # no state for the first
        assert dists.waiting() is False  # nothing read since
        want = {t: artifact.prob_at_least(artifact.raw_predict(prepare(artifact, states, at)[0]), t) for t in (50, 500)}
        for i, s in enumerate(scores):
            if s.customer_id in kept:
                d = kept[s.customer_id]
                assert d.mean()[0] == pytest.approx(s.clv, rel=1e-5)
                for t, p in want.items():
                    assert d.prob_at_least(t)[0] == pytest.approx(float(p[i]), abs=1e-5)
        copy.fold(0, [Record(encode_key(states[0].customer_id), encode_state(states[0]), 400)])
        assert dists.waiting()
        dists.start()
        todo = [r["customer_id"] for batch in sink.undistributed(artifact.version) for r in batch]
        assert sorted(todo) == sorted(missing)  # the kept ones are not computed again
    finally:
        sink.close()
    sink.open()  # a restarted sink starts from the snapshot's distributions
    try:
        dists.start()
        for changed in sink.undistributed(artifact.version):
            sink.keep_distributions(dists.rows(changed))
        sink.publish()
    finally:
        sink.close()
    assert set(stored(sink.path)) == set(kept) | {scores[0].customer_id}


def snapshot_probabilities(path: Path, threshold: float) -> dict[str, tuple[float, float | None]]:
    """Per customer of the snapshot, read with DuckDB: (clv, P(spend >= threshold) computed with
    numpy from its `customer_distribution` row, None where it has none)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT customer_id, s.clv, p, weights, mu, sigma FROM customer_scores s "
            "LEFT JOIN customer_distribution USING (customer_id)"
        ).fetchall()
    finally:
        con.close()
    out: dict[str, tuple[float, float | None]] = {}
    for cid, clv, p, w, m, s in rows:
        dist = SpendDistribution(np.array([p]), np.array([w]), np.array([m]), np.array([s])) if p is not None else None
        out[cid] = (clv, float(dist.prob_at_least(threshold)[0]) if dist else None)
    return out


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict[str, dict[str, str]]:
    """`clv score CDNOW --at-least 100 500` with the shipped model, per customer."""
    out = tmp_path_factory.mktemp("at-least") / "scores.csv"
    res = subprocess.run(
        [*CLV, "score", str(vendored_cdnow()), "--at-least", "100", "500", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return {r["customer_id"]: r for r in csv.DictReader(out.open())}


@pytest.fixture(scope="module")
def api(demo_3000, tmp_path_factory):
    """`clv api` over the demo's snapshot."""
    server = Api({**os.environ, "CLV_SNAPSHOT_PATH": str(demo_3000.snapshot)}, tmp_path_factory.mktemp("api"))
    yield server
    assert server.proc.stop() == 0, server.proc.output()[-3000:]


def test_the_snapshot_gives_the_probabilities_clv_score_at_least_gives(demo_3000, batch):
    """The sink of `clv demo` (the shipped model) kept its customers' distributions: P(spend >= T)
    from the snapshot, as the snapshot's readers compute it, is `clv score --at-least T`'s for the
    same customers, within 1e-5."""
    snap = Snapshot(demo_3000.snapshot)
    try:
        for t in (100, 500):
            frame = snap.frame(Selection(at_least=t))
            column = f"p_at_least_{t}"
            known = frame[frame[column].notna()]
            assert len(frame) == 3000 and len(known) >= 0.99 * len(frame), frame[column].isna().sum()
            for cid, clv, p in known[["customer_id", "clv", column]].itertuples(index=False):
                assert clv == pytest.approx(float(batch[cid]["clv"]), rel=1e-5), cid  # the same score
                assert p == pytest.approx(float(batch[cid][column]), abs=1e-5), cid
            direct = snapshot_probabilities(demo_3000.snapshot, t)
            assert all(p == pytest.approx(direct[c][1], abs=1e-12) for c, p in zip(known["customer_id"], known[column]))
    finally:
        snap.close()


@pytest.mark.parametrize("first", ["summary", "top at_least", "insights"])
def test_any_question_leaves_the_next_one_on_its_thread_answerable(demo_3000, first: str):
    """A question that reads only part of its result (a top list with at_least stops once it has
    n; a one-row read) must not leave the rest pending where the next question on the same
    thread reads: the customer lookup that builds the rows in memory failed on it, a 500 from
    the API for `/customers/0` after `/summary`."""
    with duckdb.connect(str(demo_3000.snapshot), read_only=True) as con:
        best_id, best_clv = con.execute(
            "SELECT customer_id, clv FROM customer_scores ORDER BY clv DESC, customer_id LIMIT 1"
        ).fetchall()[0]
    snap = Snapshot(demo_3000.snapshot)
    try:
        asked = {
            "summary": lambda: snap.summary(),
            "top at_least": lambda: snap.top(5, Selection(at_least=250.0)),
            "insights": lambda: snap.insights(),
        }[first]()
        assert asked
        row = snap.customer(best_id)
        assert row is not None and row["clv"] == best_clv
        assert snap.customer("no such customer") is None
    finally:
        snap.close()


def test_the_api_answers_at_least_and_min_probability_as_the_snapshot_holds_them(demo_3000, api):
    """`/top`, `/export.csv` and `/customers/{id}` with at_least (and min_probability) answer what
    numpy computes from the snapshot's rows read with DuckDB; a bad value is answered 400."""
    t, least = 250.0, 0.4
    want = snapshot_probabilities(demo_3000.snapshot, t)
    best_first = sorted(want, key=lambda c: (-want[c][0], c))
    likely = [c for c in best_first if want[c][1] is not None and want[c][1] >= least]
    assert 0 < len(likely) < len(want)
    status, body = api.get(f"/top?n=40&at_least={t:g}")
    assert status == 200
    rows = json.loads(body)
    assert [r["customer_id"] for r in rows] == best_first[:40]
    assert all(r["p_at_least"] == pytest.approx(want[r["customer_id"]][1], abs=1e-9) for r in rows)
    status, body = api.get(f"/top?n=40&at_least={t:g}&min_probability={least}")
    assert status == 200 and [r["customer_id"] for r in json.loads(body)] == likely[:40]
    status, body = api.get(f"/export.csv?at_least={t:g}&min_probability={least}")
    assert status == 200
    exported = list(csv.DictReader(io.StringIO(body.decode())))
    assert [r["customer_id"] for r in exported] == likely
    assert all(float(r["p_at_least_250"]) == pytest.approx(want[r["customer_id"]][1], rel=1e-9) for r in exported)
    cid = likely[-1]
    status, body = api.get(f"/customers/{cid}?at_least={t:g}")
    answer = json.loads(body)
    assert status == 200 and answer["at_least"] == t
    assert answer["p_at_least"] == pytest.approx(want[cid][1], abs=1e-9)
    status, body = api.get(f"/customers/{cid}")
    assert status == 200 and "p_at_least" not in json.loads(body)
    for bad in ("at_least=-5", "at_least=nan", "min_probability=0.5", "at_least=10&min_probability=1.5"):
        status, body = api.get(f"/top?{bad}")
        assert status == 400 and json.loads(body)["error"], bad


def test_score_upload_with_at_least_adds_the_columns_clv_score_at_least_writes(api, batch):
    """`POST /score?at_least=100&at_least=500`, as CSV and JSON: `clv score --at-least 100 500`'s
    columns and values (within 1e-5)."""
    data = vendored_cdnow().read_bytes()
    status, _, body = api.post("/score?out=csv&at_least=100&at_least=500", data, "application/octet-stream")
    assert status == 200, body[:500]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert list(rows[0]) == list(next(iter(batch.values())))  # the same columns, p_at_least_100 and _500 last
    status, _, body = api.post("/score?at_least=100&at_least=500", data, "application/octet-stream")
    assert status == 200, body[:500]
    scores = json.loads(body)["scores"]
    assert len(rows) == len(scores) == len(batch)
    for got in (rows, scores):
        for row in got:
            for column in ("p_at_least_100", "p_at_least_500"):
                assert float(row[column]) == pytest.approx(float(batch[row["customer_id"]][column]), abs=1e-5)
