"""A score's drivers: exact Shapley values of named input groups against the model's average
customer, with the shipped model on CDNOW: they add up to the published clv, each moves the way
its inputs do, and `clv score --explain` prints them."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from collections import namedtuple
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from export_onnx import ArtifactError
from export_onnx.explain import GROUPS, Explainer
from export_onnx.runtime import Artifact, shipped_model_dir
from export_onnx.scoring import score_file, score_states
from features.loaders import vendored_cdnow
from features.sequences import CLASSIC_FEATURES, SEQ_FEATURES, STATIC_FEATURES, Inputs
from features.synthetic import generate, write
from harness import CLV, Api, cdnow_sample
from state.live.base.partition import encode_key
from state.live.record import encode_state
from stream.drivers import TopDrivers
from stream.state_copy import StateCopy
from state.snapshot.queries import Snapshot
from stream.cli import main
from stream.processes import Child, clv


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return Artifact.load()


@pytest.fixture(scope="module")
def explainer(artifact: Artifact) -> Explainer:
    return Explainer(artifact)


@pytest.fixture(scope="module")
def cdnow(artifact: Artifact):
    """600 CDNOW customers as of the file's newest event, spread over the file."""
    return cdnow_sample(artifact.window, 600)


def test_every_model_input_is_in_exactly_one_group():
    for kind, names in (("seq", SEQ_FEATURES), ("static", STATIC_FEATURES), ("classic", CLASSIC_FEATURES)):
        assert sorted(f for g in GROUPS for f in getattr(g, kind)) == sorted(names), kind


def test_drivers_add_up_to_the_published_score(artifact, explainer, cdnow):
    states, at = cdnow
    drivers = explainer.drivers(states, at)
    scores = score_states(artifact, states, at)
    assert [g.name for g in explainer.groups] == ["recency", "frequency", "order_value", "trend", "tenure"]
    for d, s in zip(drivers, scores):
        assert d.customer_id == s.customer_id
        assert abs(d.clv - s.clv) <= 1e-3 * max(s.clv, 0.01)
        assert abs(d.reference + sum(d.contributions.values()) - s.clv) <= 1e-3 * max(s.clv, 0.01)
    assert len({d.reference for d in drivers}) == 1  # one stated reference for every customer
    spread = np.array([list(d.contributions.values()) for d in drivers]).std(axis=0)
    assert (spread > 0.1).all()  # every group moves some scores by dimes or more


def _with(inputs: Inputs, **changes: float) -> Inputs:
    """`inputs` with the named static and classic inputs set for every customer."""
    static, classic = inputs.static.copy(), inputs.classic.copy()
    for name, value in changes.items():
        if name in STATIC_FEATURES:
            static[:, STATIC_FEATURES.index(name)] = value
        else:
            classic[:, CLASSIC_FEATURES.index(name)] = value
    return replace(inputs, static=static, classic=classic)


def _contribution(explainer: Explainer, inputs: Inputs, group: str) -> np.ndarray:
    _clv, _ref, contrib = explainer.explain(inputs)
    return contrib[:, [g.name for g in explainer.groups].index(group)]


def _repeat_buyers(artifact: Artifact, cdnow) -> Inputs:
    """Inputs of customers with three or more invoices: each test changes one group of them."""
    states, at = cdnow
    from features.aggregate import month_of
    from features.sequences import build_inputs

    inputs = build_inputs(states, month_of(at), artifact.window, artifact.horizon_months)
    invoices = np.expm1(inputs.static[:, STATIC_FEATURES.index("log_invoices_total")])
    chosen = np.flatnonzero(invoices >= 3)[:40]
    assert len(chosen) >= 20
    return inputs.take(chosen)


def test_recency_frequency_and_order_value_move_with_their_inputs(artifact, explainer, cdnow):
    """All else equal, a customer who bought last month gets a larger recency contribution than
    one who last bought a year ago; of two who bought last month, one with twelve purchases a
    larger frequency contribution than one with two, and one whose orders are $150 a larger
    order-value contribution than $15. (Frequency is compared among recent buyers: after a year
    of silence many past purchases make a customer more likely gone, as in BG/NBD.)"""
    base = _repeat_buyers(artifact, cdnow)
    age = base.classic[:, CLASSIC_FEATURES.index("age_days")]
    recent = _with(base, log_recency_months=np.log1p(0), purchase_span_days=0)
    recent.classic[:, CLASSIC_FEATURES.index("purchase_span_days")] = age - 15
    lapsed = _with(base, log_recency_months=np.log1p(12), purchase_span_days=0)
    lapsed.classic[:, CLASSIC_FEATURES.index("purchase_span_days")] = age - 380
    assert (_contribution(explainer, recent, "recency") > _contribution(explainer, lapsed, "recency")).all()

    base = recent
    often = _with(base, log_invoices_total=np.log1p(12), log_active_months=np.log1p(10), purchase_days=12)
    rarely = _with(base, log_invoices_total=np.log1p(2), log_active_months=np.log1p(2), purchase_days=2)
    assert (_contribution(explainer, often, "frequency") > _contribution(explainer, rarely, "frequency")).all()

    invoices = np.expm1(base.static[:, STATIC_FEATURES.index("log_invoices_total")])
    big, small = (_with(base, log_order_value=np.log1p(v), spend_per_purchase_day=v) for v in (150.0, 15.0))
    big.static[:, STATIC_FEATURES.index("log_spend_total")] = np.log1p(150.0 * invoices)
    small.static[:, STATIC_FEATURES.index("log_spend_total")] = np.log1p(15.0 * invoices)
    assert (_contribution(explainer, big, "order_value") > _contribution(explainer, small, "order_value")).all()


def test_a_model_without_a_reference_customer_is_refused(tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(shipped_model_dir(), model)
    meta = json.loads((model / "metadata.json").read_text())
    del meta["reference"]
    (model / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="no reference customer"):
        Explainer(Artifact.load(model))


def test_clv_score_explain_prints_drivers_that_add_up_to_the_score(tmp_path: Path):
    out = tmp_path / "scores.csv"
    res = subprocess.run(clv("score", str(vendored_cdnow()), "--out", str(out), "--explain", "00499",
                             "--explain", "00002"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    scores = {r["customer_id"]: float(r["clv"]) for r in csv.DictReader(out.open())}
    blocks = re.split(r"^(?=customer )", res.stdout, flags=re.M)[1:]
    assert len(blocks) == 2
    for cid, block in zip(("00499", "00002"), blocks):
        assert block.startswith(f"customer {cid}: expected spend ${scores[cid]:,.2f}")
        amounts = {m[1]: float(m[2].replace(",", "")) for m in
                   re.finditer(r"^  (\S+(?: clv)?)\s+([-+]?[\d,]+\.\d\d)", block, flags=re.M)}
        assert set(amounts) == {"reference", "recency", "frequency", "order_value", "trend", "tenure", "= clv"}
        parts = amounts.pop("reference") + sum(v for k, v in amounts.items() if k != "= clv")
        assert amounts["= clv"] == pytest.approx(scores[cid], abs=0.006)
        assert parts == pytest.approx(scores[cid], abs=0.04)  # six amounts rounded to cents



def test_clv_score_explain_names_a_customer_the_file_lacks(tmp_path: Path, capsys):
    data = tmp_path / "cdnow.txt"
    data.write_text("customer_id date number_of_cds dollar_value\n00001 19970101 1 11.77\n00002 19970112 1 12.00\n00002 19970312 2 77.00\n")
    assert main(["score", str(data), "--explain", "00002", "--explain", "nobody"]) == 2
    assert capsys.readouterr().err == f"clv: error: --explain: no customer 'nobody' in {data}\n"


def test_the_snapshot_carries_the_drivers_of_its_top_customers(clv_env, kafka_bootstrap, tmp_path: Path):
    """A bootstrapped history (state changelog and scores) through the sink: its top customers'
    drivers in the snapshot are those `clv score --explain` prints, add up to their clv, and the
    API's /customers/{id} answers them; below the top, drivers are null."""
    frame, _ = generate(300, 3000, seed=4)
    data = write(frame, tmp_path / "history.csv")
    env = {**clv_env, "CLV_SNAPSHOT_DRIVERS_TOP": "5", "CLV_SNAPSHOT_INTERVAL_S": "0.5"}
    done = subprocess.run([*CLV, "bootstrap", str(data), "--quiet"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    artifact = Artifact.load()
    scored = score_file(artifact, data)
    ranked = sorted(range(len(scored.scores)), key=lambda i: (-scored.scores[i].clv, scored.scores[i].customer_id))
    top = [scored.scores[i].customer_id for i in ranked[:5]]
    want = {d.customer_id: d for d in Explainer(artifact).drivers([scored.states[i] for i in ranked[:5]], scored.as_of)}
    snap = Snapshot(env["CLV_SNAPSHOT_PATH"])
    sink = Child(clv("snapshot"), env, tmp_path / "sink.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {cid: snap.customer(cid) for cid in top} if Path(snap.path).exists() else {}
            if rows and all(r is not None and r["drivers"] is not None for r in rows.values()):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"no drivers for {top} in the snapshot:\n{sink.output()[-3000:]}")
        api = Api(env, tmp_path)
        try:
            for cid in top:
                status, body = api.get(f"/customers/{cid}")
                answer = json.loads(body)
                assert status == 200 and answer == {**rows[cid], "drivers": answer["drivers"]}
                drivers = answer["drivers"]
                assert drivers == rows[cid]["drivers"]
                assert drivers["reference_clv"] == pytest.approx(want[cid].reference, rel=1e-6)
                assert {d["group"]: d["contribution"] for d in drivers["drivers"]} == pytest.approx(
                    want[cid].contributions, rel=1e-5, abs=1e-6)
                assert drivers["reference_clv"] + sum(d["contribution"] for d in drivers["drivers"]) == (
                    pytest.approx(answer["clv"], rel=1e-3))
            below = scored.scores[ranked[5]].customer_id
            status, body = api.get(f"/customers/{below}")
            assert status == 200 and json.loads(body)["drivers"] is None
        finally:
            api.proc.stop()
    finally:
        assert sink.stop() == 0, sink.output()[-3000:]


def test_the_sink_writes_drivers_only_where_state_and_score_agree(artifact, cdnow):
    """A top customer whose state has events its score does not include yet, or whose score is
    not what its state gives, gets no drivers in this snapshot (and the sink does not stop); the
    others get theirs; once changelog records arrive, the sink knows to publish again."""
    states, at = cdnow
    chosen = sorted(states, key=lambda s: -max(s.months, default=0))[:4]  # recent buyers
    scores = score_states(artifact, chosen, at)
    copy = StateCopy()
    drivers = TopDrivers(artifact, 4, copy)
    record = namedtuple("record", "key value offset")
    copy.fold(0, [record(encode_key(s.customer_id), encode_state(s), i) for i, s in enumerate(chosen)])
    top = [{"customer_id": s.customer_id, "clv": s.clv, "as_of": at, "event_offset": -1,
            "model_version": s.model_version, "source_partition": 0} for s in scores]
    top[1]["as_of"] = at - timedelta(days=62)  # a score older than the state's newest month
    top[2]["clv"] *= 1.1  # a score the state does not give
    top[3]["model_version"] = "another-model"  # during a rollout
    rows = drivers.rows(top)
    assert {r[0] for r in rows} == {scores[0].customer_id}
    assert rows[0][4] + sum(r[3] for r in rows) == pytest.approx(scores[0].clv, rel=1e-3)
    assert not drivers.waiting()  # nothing read since
    copy.fold(0, [record(encode_key(chosen[2].customer_id), encode_state(chosen[2]), 10)])
    assert drivers.waiting()
    assert drivers.rows(top) == rows and not drivers.waiting()  # the first is not computed again
