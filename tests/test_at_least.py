"""P(spend >= T) for analysts: the predictive distribution the snapshot sink keeps per customer
(`stream.distributions`), what the snapshot's readers compute from it (`state.snapshot.queries`)
and the API's `at_least` and `min_probability`, against `clv score --at-least` and DuckDB."""

from __future__ import annotations

from collections import namedtuple
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from export_onnx.runtime import Artifact
from export_onnx.scoring import prepare, score_states
from features.aggregate import month_of
from features.batch import read_history, snapshots
from features.distribution import SpendDistribution
from features.loaders import vendored_cdnow
from state.live.base.partition import encode_key
from state.live.record import encode_state
from state.snapshot import tables as snapshot
from stream.distributions import Distributions
from stream.state_copy import StateCopy

Record = namedtuple("Record", "key value offset")


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return Artifact.load()


@pytest.fixture(scope="module")
def cdnow(artifact: Artifact):
    """300 CDNOW customers as of the file's newest event, spread over the file."""
    events = read_history(vendored_cdnow()).events
    at = events[-1].ts
    states = list(next(snapshots(events, [at], artifact.window)).states.values())
    return states[:: len(states) // 300][:300], at


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
