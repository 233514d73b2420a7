"""The drift check: the training population in the artifact, PSI per input against it, the one
line a scorer prints when customers are unlike those the model learnt from."""

import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from export_onnx.runtime import Artifact, shipped_model_dir
from features import population
from features.loaders import vendored_cdnow
from features.sequences import CLASSIC_FEATURES, STATIC_FEATURES, Inputs
from features.synthetic import generate, write
from harness import CLV


def _inputs(static: np.ndarray, classic: np.ndarray) -> Inputs:
    return Inputs(np.zeros((len(static), 1, 7), np.float32), static.astype(np.float32),
                  classic.astype(np.float32))


def _cohort(n: int, seed: int, order_scale: float = 1.0) -> Inputs:
    rng = np.random.default_rng(seed)
    static = rng.gamma(2.0, 1.0, (n, len(STATIC_FEATURES)))
    classic = rng.poisson(3.0, (n, len(CLASSIC_FEATURES))).astype(np.float64)  # ties: uneven bins
    static[:, STATIC_FEATURES.index("log_order_value")] += np.log(order_scale)
    return _inputs(static, classic)


def test_psi_is_nil_for_the_training_cohort_itself_and_large_for_a_shifted_one():
    train = _cohort(5000, 1)
    summary = population.summarize(train, "2020-01-01T00:00:00+00:00", "2020-12-31T23:59:59+00:00")
    same = population.check(summary, population.values(train))
    assert max(s.psi for s in same.shifts) < 1e-9 and same.sentence() is None
    resampled = population.check(summary, population.values(_cohort(5000, 2)))
    assert max(s.psi for s in resampled.shifts) < 0.05 and resampled.sentence() is None
    shifted = population.check(summary, population.values(_cohort(5000, 3, order_scale=20.0)))
    assert [s.name for s in shifted.moved] == ["log_order_value"]
    line = shifted.sentence()
    assert "\n" not in line and "order value PSI" in line and "tolerance PSI 0.25" in line
    few = population.check(summary, population.values(_cohort(population.MIN_CUSTOMERS - 1, 3, 20.0)))
    assert few.moved == () and few.sentence() is None  # too few to judge


def test_rolling_window_judges_its_last_customers_as_the_batch_check_does():
    train = _cohort(3000, 1)
    summary = population.summarize(train, "2020-01-01", "2020-12-31")
    window = population.Window(summary, population.PER_ORDER, 1000)
    shifted = _cohort(2500, 4, order_scale=20.0)
    for start in range(0, 2500, 300):  # micro-batches; the window keeps the newest 1,000
        window.add(shifted.take(np.arange(start, min(start + 300, 2500))))
    newest = population.values(shifted.take(np.arange(1500, 2500)), population.PER_ORDER)
    assert window.verdict() == population.check(summary, newest)
    assert window.verdict().moved[0].name == "log_order_value"
    window.add(_cohort(1200, 5))  # one batch larger than the window: its newest 1,000 stay
    assert window.filled == 1000 and window.verdict().sentence() is None


def _score(data, out):
    return subprocess.run([*CLV, "score", str(data), "--model", str(shipped_model_dir()), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)


def test_the_shipped_model_knows_its_cohort_cdnow_passes_and_a_retailer_is_told(tmp_path):
    meta = Artifact.load().meta
    assert meta["population"]["customers"] == 23_570
    assert meta["population"]["cutoff"] == meta["cutoff"]
    res = _score(vendored_cdnow(), tmp_path / "cdnow.csv")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    # What a snapshot reader checks, from the scores' own fields, is the model's inputs exactly.
    scores = pd.read_csv(tmp_path / "cdnow.csv")
    seen = population.check(meta["population"], population.from_scores(scores["frequency"], scores["total_spend"]))
    assert [s.psi for s in seen.shifts] == [0.0] * len(population.FROM_SCORES)
    retail = write(generate(1500, 9000, seed=7)[0], tmp_path / "retail.csv")
    res = _score(retail, tmp_path / "retail-scores.csv")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "order value PSI" in warnings[0], res.stderr
    assert (tmp_path / "retail-scores.csv").stat().st_size > 0  # scored all the same


def _cdnow_customers(path, customers):
    import gzip

    lines = gzip.decompress(vendored_cdnow().read_bytes()).decode().splitlines()
    path.write_text("\n".join([lines[0]] + [l for l in lines[1:] if int(l.split()[0]) <= customers]) + "\n")
    return path


@pytest.mark.parametrize("data, crosses", [("retail", True), ("cdnow", False)])
def test_worker_gauges_drift_per_input_and_says_it_once_when_customers_are_unlike_its_cohort(
        clv_env, tmp_path, data, crosses):
    """A worker running the CDNOW model: a retailer's invoices replayed into it take its order
    value gauge past the tolerance and it says why once; CDNOW's own customers stay under it."""
    from harness import replay, start_worker, wait_idle

    path = (write(generate(600, 3000, seed=7)[0], tmp_path / "retail.csv") if data == "retail"
            else _cdnow_customers(tmp_path / "cdnow.txt", 1000))
    worker = start_worker(clv_env, tmp_path)
    try:
        worker.wait_ready()
        rep = replay(clv_env, path)
        assert rep.wait(120) == 0, rep.stderr.read()
        events = int(rep.stdout.read().split("published ")[1].split()[0].replace(",", ""))
        wait_idle([worker], events)
        gauges = {k: v for k, v in worker.metrics().items() if k.startswith("clv_input_drift_psi")}
    finally:
        worker.stop()
    assert set(gauges) == {f'clv_input_drift_psi{{input="{n}"}}' for n in population.PER_ORDER}
    order_value = gauges['clv_input_drift_psi{input="log_order_value"}']
    said = [line for line in worker.log.read_text().splitlines() if "drift: these" in line]
    if crosses:
        assert order_value > population.TOLERANCE and len(said) == 1, (gauges, said)
        assert "order value PSI" in said[0]
    else:
        assert max(gauges.values()) < population.TOLERANCE and not said, (gauges, said)
