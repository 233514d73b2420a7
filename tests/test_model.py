"""Training, ONNX export and batch scoring on a slice of CDNOW (small epochs: behaviour, not
accuracy; accuracy is `clv evaluate`'s job)."""

import csv
import gzip
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from export_onnx.runtime import Artifact
from features.loaders import vendored_cdnow
from models import clusters

CUTOFF = "1997-12-31"


def cdnow_slice(path, customers=1500, until=None):
    """The first `customers` customers of CDNOW, optionally only rows up to a date (YYYYMMDD)."""
    lines = gzip.decompress(vendored_cdnow().read_bytes()).decode().splitlines()
    keep = [lines[0]]
    for line in lines[1:]:
        cid, day = line.split()[:2]
        if int(cid) <= customers and (until is None or day <= until):
            keep.append(line)
    path.write_text("\n".join(keep) + "\n")
    return path


def clv(*args, env=None, pre=""):
    code = f"{pre}import sys; from stream.cli import main; sys.exit(main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    data = cdnow_slice(d / "cdnow.txt")
    res = clv("train", data, "--cutoff", CUTOFF, "--epochs", "2", "--ensemble", "2", "--out", d / "artifact",
              "--tracking-uri", f"file:{d / 'mlruns'}")
    assert res.returncode == 0, res.stderr
    (d / "train.out").write_text(res.stdout)
    return d, data


def test_artifact_metadata_and_parity(trained):
    d, _ = trained
    meta = json.loads((d / "artifact" / "metadata.json").read_text())
    for key in ("version", "window", "horizon_months", "scaler", "seq_features", "static_features",
                "training_data_sha256", "train_config", "parity"):
        assert key in meta
    assert meta["horizon_months"] == 6
    from export_onnx.export import PARITY_TOLERANCE
    assert set(meta["parity"]) == set(PARITY_TOLERANCE)
    for name, tolerance in PARITY_TOLERANCE.items():
        assert meta["parity"][name]["max_rel_diff"] < tolerance


def test_onnx_matches_torch_on_random_and_real_batches(trained):
    import torch

    from export_onnx.export import parity_check
    from features.sequences import Inputs
    from models.networks import GRUModel

    d, _ = trained
    art = Artifact.load(d / "artifact")
    # A torch model with other weights than the artifact's must fail the parity check; a fresh
    # export of it must pass, at any batch size.
    from models.classic import ClassicParams

    model = GRUModel(len(art.meta["seq_features"]), len(art.meta["static_features"]),
                     ClassicParams.from_dict(art.meta["training"]["classic"]), art.horizon_months,
                     hidden=art.meta["hidden"], layers=art.meta["layers"])
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head[-1].weight, std=0.3)  # a network that corrects the classic model
    rng = np.random.default_rng(1)
    classic = np.column_stack([rng.integers(0, 30, 64), rng.uniform(0, 200, 64), rng.uniform(200, 400, 64),
                               rng.lognormal(3, 1, 64)]).astype(np.float32)
    batch = Inputs(rng.normal(size=(64, art.window, len(art.meta["seq_features"]))).astype(np.float32),
                   rng.normal(size=(64, len(art.meta["static_features"]))).astype(np.float32), classic)
    from export_onnx.export import PARITY_TOLERANCE, ParityError
    with pytest.raises(ParityError):
        parity_check(model, art, [batch])  # untrained torch weights != the artifact's

    from export_onnx.export import export
    out = d / "fresh"
    parity = export(model, out, {**art.meta, "version": "fresh"}, [batch])
    assert all(parity[name]["max_rel_diff"] < tol for name, tol in PARITY_TOLERANCE.items())
    for n in (1, 7, 300):  # dynamic batch axis
        clv_o, p_o, *members = Artifact.load(out).raw_predict(batch.take(np.zeros(n, dtype=int)))
        assert clv_o.shape == p_o.shape == (n,) and np.allclose(clv_o, clv_o[0])
        assert all(m.shape == (n, 1) for m in members)  # one member: a lone GRU
    with torch.no_grad():
        s = Artifact.load(out).scaler.transform(batch)
        torch_out = model(torch.from_numpy(s.seq), torch.from_numpy(s.static), torch.from_numpy(s.classic),
                          model.h0(64))
    onnx_out = Artifact.load(out).raw_predict(batch)
    for t, o in zip(torch_out, onnx_out):  # expected spend, p_purchase, the member's distribution
        assert np.allclose(t.numpy(), o, rtol=1e-4, atol=1e-6)
    calibrated = Artifact.load(out).predict(batch)
    shift, factor = (getattr(Artifact.load(out).calibration, k) for k in ("logit_shift", "factor"))
    assert shift != 0
    odds = onnx_out.p_purchase.astype(np.float64) / (1 - onnx_out.p_purchase) * np.exp(shift)
    assert np.allclose(calibrated.p_purchase, odds / (1 + odds), rtol=1e-5)
    # The level moves who buys, then every buyer's spend by one factor.
    assert np.allclose(calibrated.clv / calibrated.p_purchase,
                       factor * onnx_out.clv / onnx_out.p_purchase, rtol=1e-5)


def test_score_runs_without_torch(trained, tmp_path):
    d, data = trained
    out = tmp_path / "scores.csv"
    block = "import sys; sys.modules['torch'] = None; "  # any `import torch` now fails
    res = clv("score", data, "--model", d / "artifact", "--out", out, pre=block)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1500
    assert set(rows[0]) >= {"customer_id", "clv", "p_purchase", "recency_days", "frequency", "monetary"}
    values = np.array([float(r["clv"]) for r in rows])
    assert np.isfinite(values).all() and (values >= 0).all() and values.std() > 0


def test_score_carries_the_interval_and_the_chance_of_reaching_a_threshold(trained, tmp_path):
    """`clv score` writes clv_low <= clv_high (0 low end where no purchase is likelier than 10%)
    and, with --at-least, P(spend >= t) per threshold from the same distribution: 1 at $0,
    at most p_purchase above it, falling with t, and 10% at a customer's own clv_high."""
    d, data = trained
    out = tmp_path / "scores.csv"
    res = clv("score", data, "--model", d / "artifact", "--out", out, "--at-least", "0", "37.5", "100")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[-3:] == ["p_at_least_0", "p_at_least_37.5", "p_at_least_100"]
    col = {name: np.array([float(r[name]) for r in rows]) for name in rows[0] if name not in
           ("customer_id", "segment", "cluster", "country")}
    p, low, high = col["p_purchase"], col["clv_low"], col["clv_high"]
    assert (0 <= low).all() and (low <= high).all() and (low[p < 0.9] == 0).all() and (high > 0).any()
    assert (col["p_at_least_0"] == 1).all()
    assert (col["p_at_least_37.5"] <= p + 1e-6).all() and (col["p_at_least_100"] <= col["p_at_least_37.5"]).all()
    assert (col["clv_sd"] > 0).all()
    art = Artifact.load(d / "artifact")
    dist = art.distribution(art.raw_predict(_cutoff_inputs(art, data)))
    at_high = dist.prob_at_least(np.where(high > 0, high, 1e-9))
    assert np.allclose(at_high[high > 0], 0.1, atol=1e-3)  # float32 in the file


def test_a_model_trained_before_the_interval_still_scores_with_the_interval_not_known(trained, tmp_path):
    """A graph with only `clv` and `p_purchase` (an artifact of the previous release) keeps
    serving them during a rollout, with clv_low, clv_high and clv_sd -1 (the contract's "not
    known"); asking it for P(spend >= t) names the fix."""
    import onnx

    from export_onnx import ArtifactError
    from export_onnx.runtime import LEGACY_OUTPUTS

    d, data = trained
    old = tmp_path / "old"
    shutil.copytree(d / "artifact", old)
    graph = onnx.load(str(old / "model.onnx"))
    for extra in [o for o in graph.graph.output if o.name not in LEGACY_OUTPUTS]:
        graph.graph.output.remove(extra)
    onnx.save(graph, str(old / "model.onnx"))
    art, new = Artifact.load(old), Artifact.load(d / "artifact")
    inputs = _cutoff_inputs(art, data)
    got, want = art.predict(inputs), new.predict(inputs)
    assert not art.has_distribution and new.has_distribution
    assert np.array_equal(got.clv, want.clv) and np.array_equal(got.p_purchase, want.p_purchase)
    assert (got.clv_low == -1).all() and (got.clv_high == -1).all() and (got.clv_sd == -1).all()
    with pytest.raises(ArtifactError, match="retrain"):
        art.prob_at_least(inputs, 100.0)


def _cutoff_inputs(art, data, cutoff=None):
    from datetime import date

    from features.batch import end_of, read_history, snapshots
    from features.sequences import build_inputs

    events = read_history(data).events
    at = end_of(date.fromisoformat(cutoff)) if cutoff else events[-1].ts
    [snap] = snapshots([ev for ev in events if ev.ts <= at], [at], art.window)
    return build_inputs(list(snap.states.values()), snap.month, art.window, art.horizon_months)


def test_interval_is_calibrated_on_held_out_customers(trained, tmp_path):
    """Customers the model never saw (CDNOW's next 2,000), scored at the training cutoff against
    what they spent in the next six months: about 10% spend more than clv_high (fewer where
    P(purchase) < 0.1 makes clv_high 0, so the expectation is the mean of min(p, 10%); about 10%
    among customers whose clv_high is above $0), at most
    ~10% less than clv_low, and the distribution beats a point mass at clv on pinball loss."""
    from datetime import date

    from features.batch import end_of, read_history
    from models.dataset import history_until, rolling_split
    from models.metrics import interval_report

    d, _ = trained
    art = Artifact.load(d / "artifact")
    data = cdnow_slice(tmp_path / "held.txt", customers=3500)
    cut = end_of(date.fromisoformat(CUTOFF))
    events = read_history(data).events
    split = rolling_split(history_until(events, cut), cut, art.horizon_months, art.window,
                          actual_events=[ev for ev in events if ev.ts > cut])
    fresh = np.array([int(c) > 1500 for c in split.scoring.customer_ids])
    inputs, actual = split.scoring.inputs.take(fresh), split.scoring.y[fresh]
    raw = art.raw_predict(inputs)
    pred, dist = art.predict_raw(raw), art.distribution(raw)
    quantiles = {q: dist.quantile(q) for q in (0.1, 0.5, 0.9)}
    got = interval_report(actual, quantiles, pred.p_purchase)
    assert got["expected_above"] == pytest.approx(float(np.minimum(pred.p_purchase, 0.1).mean()))
    assert abs(got["above_high"] - got["expected_above"]) < 0.03, got
    assert 0.06 < got["above_positive_high"] < 0.14, got  # 10% where clv_high is above $0
    assert 0.06 < got["above_high"] < 0.13 and got["below_low"] < 0.13, got
    point = interval_report(actual, dict.fromkeys((0.1, 0.5, 0.9), pred.clv))
    assert got["pinball"] < point["pinball"], (got, point)


def test_training_never_reads_after_the_cutoff(trained, tmp_path):
    """Training on the whole file and on the file cut at the cutoff gives the same model."""
    d, _ = trained
    truncated = cdnow_slice(tmp_path / "cut.txt", until=CUTOFF.replace("-", ""))
    res = clv("train", truncated, "--cutoff", CUTOFF, "--epochs", "2", "--ensemble", "2", "--out", tmp_path / "a2",
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store's kind
    assert res.returncode == 0, res.stderr
    m1 = json.loads((d / "artifact" / "metadata.json").read_text())
    m2 = json.loads((tmp_path / "a2" / "metadata.json").read_text())
    assert m1["training_data_sha256"] == m2["training_data_sha256"]
    assert (d / "artifact" / "model.onnx").read_bytes() == (tmp_path / "a2" / "model.onnx").read_bytes()


def test_rolling_split_refuses_future_rows():
    from datetime import date

    from features.batch import end_of, read_history
    from models.dataset import rolling_split

    events = read_history(vendored_cdnow()).events
    with pytest.raises(ValueError, match="past the cutoff"):
        rolling_split(events, end_of(date(1997, 12, 31)), 6, 13)


def test_aggregated_features_keep_the_largest_customers_near_the_crowd():
    """The FFNN extrapolates linearly past what it was trained on: counts and money enter on a
    log scale, so no customer of CDNOW sits dozens of standard deviations out (the raw purchase
    count put the largest at 67, and some seeds valued them at three times what they spent)."""
    from datetime import date

    from features.batch import end_of, read_history
    from models.dataset import history_until, rfm_features, rolling_split

    cut = end_of(date(1997, 12, 31))
    split = rolling_split(history_until(read_history(vendored_cdnow()).events, cut), cut, 6, 13)
    x = rfm_features(split.labelled)
    z = np.abs(x - x.mean(0)) / x.std(0)
    assert z.max() < 12, z.max(0).round(1)


def test_train_bad_arguments_exit_2(tmp_path):
    data = cdnow_slice(tmp_path / "c.txt", customers=50)
    res = clv("train", data, "--cutoff", "1997-02-01", "--out", tmp_path / "x")
    assert res.returncode == 2 and "months of transactions" in res.stderr
    res = clv("train", data, "--cutoff", "31/12/1997", "--out", tmp_path / "x")
    assert res.returncode == 2 and "not a date" in res.stderr
    res = clv("score", data, "--model", tmp_path, "--out", tmp_path / "s.csv")
    assert res.returncode == 2 and "not a model directory" in res.stderr


def _head_inputs(n=3):
    import torch

    from models import ziln

    params = torch.tensor([0.25, 30.0, 0.6, 2.0, 9.0, 3.4, 8.0, 0.5], dtype=torch.float64)
    classic = torch.tensor([[1, 0, 40], [4, 200, 300], [12, 330, 360]], dtype=torch.float64)
    classic = torch.cat([classic, torch.tensor([[20.0], [55.0], [140.0]], dtype=torch.float64)], 1)[:n]
    return ziln.classic_base(classic, params), classic, params


def test_head_closed_forms_match_the_retention_process():
    """p_purchase and expected spend over H months equal an enumeration of the process the head
    describes: alive now with P(alive), then in each month alive with survival s (once gone,
    gone) and buying, while alive, a Poisson number of times."""
    import itertools
    import math

    import torch

    from models import ziln

    base, _, _ = _head_inputs()
    out = torch.tensor([[0.3, -0.4, 0.5, 0.2, 0.1], [-1.0, 1.5, -2.0, -0.5, 0.0],
                        [2.5, -2.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    alive = torch.sigmoid(base.logit_alive + 3 * torch.tanh(out[:, 0] / 3))
    d_rate = 3 * torch.tanh(out[:, 1] / 3)
    rate = base.rate * torch.exp(torch.where(d_rate < 0, d_rate * base.doubt, d_rate))
    s = torch.exp(-base.hazard * torch.exp(3 * torch.tanh(out[:, 2] / 3)))
    spend = 3 * torch.tanh(out[:, 3] / 3)
    order = base.order_value * torch.exp(torch.where(spend > 0, spend * base.evidence, spend))
    buy = 1 - torch.exp(-rate)
    for h in (1, 2, 6):
        d = ziln.over_horizon(out, base, torch.full((3,), float(h), dtype=torch.float64), 6)
        p_none = torch.zeros(3, dtype=torch.float64)
        months_alive = torch.zeros(3, dtype=torch.float64)
        for stay in range(h + 1):  # months alive before leaving (h: alive throughout)
            p_stay = s**stay * ((1 - s) if stay < h else 1)
            months_alive += p_stay * stay
            for buys in itertools.product((0, 1), repeat=stay):
                if not any(buys):
                    p_none += p_stay * (1 - buy) ** stay
                    break
        assert torch.allclose(d.p, alive * (1 - p_none), rtol=1e-9), h
        assert torch.allclose(torch.exp(d.log_expected), alive * months_alive * rate * order, rtol=1e-9), h
        # A discount weighs month k by delta^k: with s = 1 that is delta + ... + delta^h.
        delta = ziln.monthly_discount(0.1)
        flat = ziln.over_horizon(out, base._replace(hazard=torch.zeros(3, dtype=torch.float64)),
                                 torch.full((3,), float(h), dtype=torch.float64), 6, delta)
        undiscounted = ziln.over_horizon(out, base._replace(hazard=torch.zeros(3, dtype=torch.float64)),
                                         torch.full((3,), float(h), dtype=torch.float64), 6)
        weight = sum(delta**k for k in range(1, h + 1)) / h
        assert torch.allclose(torch.exp(flat.log_expected - undiscounted.log_expected),
                              torch.full((3,), weight, dtype=torch.float64), rtol=1e-9)
        assert math.isclose(delta**12, 1 / 1.1, rel_tol=1e-12)


def test_uncorrected_head_is_the_classic_model():
    """With every correction at zero the head is BG/NBD's P(alive) and posterior purchase rate
    and the Gamma-Gamma conditional mean of spend per purchase (Fader, Hardie & Lee 2005) over
    the orders behind it: the repeat orders and the first at its weight (here half an order;
    at 0 a one-time buyer's is the population mean p gamma / (q - 1), as in the textbook)."""
    import torch

    from models import ziln

    base, classic, params = _head_inputs()
    r, alpha, a, b, p, q, gamma, first = params.tolist()
    for row, logit, rate, order in zip(classic.tolist(), base.logit_alive, base.rate, base.order_value):
        n, t_x, age, m = row
        x = n - 1
        p_alive = 1.0 if x == 0 else 1 / (1 + a / (b + x - 1) * ((alpha + age) / (alpha + t_x)) ** (r + x))
        assert abs(float(torch.sigmoid(logit)) - p_alive) < 1e-5 or (x == 0 and float(torch.sigmoid(logit)) > 0.9999)
        assert abs(float(rate) - (r + x) / (alpha + age) * 365.25 / 12) < 1e-9
        w = x + first
        assert abs(float(order) - p * (gamma + w * m) / (p * w + q - 1)) < 1e-9
    assert base.evidence.tolist() == [0.5 / 1.5, 3.5 / 4.5, 11.5 / 12.5]
    assert base.doubt.tolist() == [1.0, 1 / 4, 1 / 12]
    textbook = ziln.classic_base(classic, torch.cat([params[:7], torch.zeros(1, dtype=torch.float64)]))
    assert abs(float(textbook.order_value[0]) - p * gamma / (q - 1)) < 1e-9  # one purchase: the population's
    assert float(textbook.evidence[0]) == 0.0


def test_spend_is_raised_only_as_far_as_repeat_orders_back_it():
    """The network may lower any customer's spend per purchase, but raise it only by w / (w + 1)
    of the bound (w the orders behind the mean order): a one-time buyer's large basket is not
    valued as a habit, however much the network would raise it."""
    import torch

    from models import ziln

    base, _, _ = _head_inputs()
    h = torch.full((3,), 6.0, dtype=torch.float64)

    def spend(d):
        out = torch.zeros(3, ziln.RAW_OUTPUTS, dtype=torch.float64)
        out[:, 3] = d
        return torch.exp(ziln.over_horizon(out, base, h, 6).log_expected)

    neutral = spend(0.0)
    up, down = spend(50.0) / neutral, spend(-50.0) / neutral
    bound = math.exp(ziln.MAX_CORRECTION)
    assert torch.allclose(up, torch.tensor([bound ** (1 / 3), bound ** (3.5 / 4.5), bound ** (11.5 / 12.5)],
                                           dtype=torch.float64))
    assert torch.allclose(down, torch.full((3,), 1 / bound, dtype=torch.float64))


def test_rate_is_lowered_only_as_far_as_repeat_purchases_leave_room():
    """The network may raise any customer's purchase rate to the bound, but lower it only by
    1 / (x + 1) of the bound (x the repeat purchases): a one-time buyer's rate as far as the
    bound, a customer with eleven repeat purchases' by a twelfth of it."""
    import torch

    from models import ziln

    base, _, _ = _head_inputs()
    h = torch.full((3,), 6.0, dtype=torch.float64)

    def expected(d):
        out = torch.zeros(3, ziln.RAW_OUTPUTS, dtype=torch.float64)
        out[:, 1] = d
        return ziln.over_horizon(out, base, h, 6)

    neutral, up, down = expected(0.0), expected(50.0), expected(-50.0)
    bound = math.exp(ziln.MAX_CORRECTION)
    # Expected spend is proportional to the rate; P(purchase) moves with it, less than in proportion.
    assert torch.allclose(torch.exp(up.log_expected - neutral.log_expected), torch.full((3,), bound, dtype=torch.float64))
    assert torch.allclose(torch.exp(down.log_expected - neutral.log_expected),
                          torch.tensor([1 / bound, bound ** (-1 / 4), bound ** (-1 / 12)], dtype=torch.float64))
    assert bool((down.p < neutral.p).all() and (up.p > neutral.p).all())


def test_model_keeps_the_scale_of_a_customers_own_spending(trained):
    """A customer who orders ten times the amount, with the same dates, is worth about ten times
    as much: no common ceiling for the largest spenders (wholesale tails)."""
    from datetime import datetime, timezone

    from features.aggregate import Folder, contribution, month_of
    from features.contract import Line, TransactionEvent
    from features.sequences import build_inputs

    d, _ = trained
    art = Artifact.load(d / "artifact")
    values = []
    for unit_price in (10.0, 100.0, 1_000.0, 10_000.0, 100_000.0):
        folder = Folder(art.window)
        for k in range(8):
            ts = datetime(1997, 2 + k, 10, tzinfo=timezone.utc)
            ev = TransactionEvent(f"e{k}", "c1", f"i{k}", ts, (Line("x", 1, unit_price),))
            folder.add("c1", contribution(ev))
        as_of = month_of(datetime(1997, 12, 31, tzinfo=timezone.utc))
        inputs = build_inputs([folder.states["c1"]], as_of, art.window, art.horizon_months)
        values.append(float(art.predict(inputs).clv[0]))
    ratios = np.array(values[1:]) / np.array(values[:-1])
    assert (ratios > 7).all() and (ratios < 13).all(), values


def test_level_sets_the_count_of_buyers_then_their_spend():
    """The level: one shift of the log-odds makes the expected number of buyers the target (a
    customer sure to buy stays sure, a doubtful one moves most), then one factor on each buyer's
    spend makes the total the target; ranking by p is kept; earlier artifacts' one factor still
    reads."""
    from features.calibration import Calibration

    clv = np.array([1000.0, 50.0, 2.0, 0.5] + [20.0] * 200, dtype=np.float32)
    p = np.array([0.999, 0.5, 0.05, 0.01] + [0.2] * 200, dtype=np.float32)
    buyers, total = 0.8 * float(p.sum()), 1.1 * float(clv.sum())
    cal = Calibration.to_cohort(clv, p, total, buyers)
    level, p_level = cal.apply(clv, p)
    assert cal.logit_shift < 0 and cal.factor > 1
    assert abs(p_level.sum() / buyers - 1) < 1e-5 and abs(level.sum() / total - 1) < 1e-5
    moved = p_level / p
    assert moved[0] > 0.999 and moved[0] > moved[1] > moved[2] > moved[3]
    assert np.argsort(p_level, kind="stable").tolist() == np.argsort(p, kind="stable").tolist()
    assert np.allclose(level / p_level, cal.factor * clv / p, rtol=1e-5)  # one factor on spend
    assert Calibration.from_dict({"factor": 2.0}).apply(clv, p)[0].tolist() == (clv * 2).tolist()
    for bad in (0.0, float(len(p)), float("nan")):
        with pytest.raises(ValueError):
            Calibration.to_cohort(clv, p, total, bad)
    with pytest.raises(ValueError):  # a count no shift reaches (p is kept inside (1e-9, 1 - 1e-9))
        Calibration.to_cohort(clv, np.ones_like(p), total, 0.001)
    with pytest.raises(ValueError):
        Calibration.to_cohort(clv, np.where(np.arange(len(p)) == 1, np.nan, p), total, buyers)
    with pytest.raises(ValueError):
        Calibration.to_cohort(clv, p, 0.0, buyers)


def test_cohort_level_is_the_classic_models(trained):
    """The level: the cohort's expected number of buyers and expected total at the cutoff, as
    the exported graph computes them, are the textbook BG/NBD + Gamma-Gamma ones the level was
    fitted to."""
    from datetime import date

    from features.batch import end_of, read_history, snapshots
    from features.sequences import build_inputs
    from models.dataset import history_until

    d, data = trained
    art = Artifact.load(d / "artifact")
    cut = end_of(date.fromisoformat(CUTOFF))
    [snap] = snapshots(history_until(read_history(data).events, cut), [cut], art.window)
    inputs = build_inputs(list(snap.states.values()), snap.month, art.window, art.horizon_months)
    pred = art.predict(inputs)
    total, buyers = (float(a.astype(np.float64).sum()) for a in (pred.clv, pred.p_purchase))
    classic_total, classic_buyers = (art.meta["training"][k] for k in ("classic_total", "classic_buyers"))
    assert classic_total > 0 and abs(total / classic_total - 1) < 1e-4
    assert 0 < classic_buyers < len(pred.p_purchase) and abs(buyers / classic_buyers - 1) < 1e-4


def test_evaluate_reports_every_model_per_seed_with_mean_and_sd(tmp_path):
    data = cdnow_slice(tmp_path / "cdnow.txt", customers=800)
    out = tmp_path / "eval.json"
    res = clv("evaluate", data, "--cutoff", CUTOFF, "--epochs", "1", "--ensemble", "1",
              "--seeds", "1", "2", "--json", out, "--plots", tmp_path / "plots",
              "--tracking-uri", f"file:{tmp_path / 'mlruns'}")
    assert res.returncode == 0, res.stderr
    assert "mean +- sd over seeds 1, 2" in res.stdout
    doc = json.loads(out.read_text())
    models = {"gru", "ffnn", "gbt", "rf", "naive", "bgnbd_gg"}
    assert set(doc["seeds"]) == {"1", "2"} and doc["customers"] == 800
    for run in doc["seeds"].values():  # each seed in the shape of a one-seed run
        assert run["customers"] == 800 and set(run["models"]) == models
        for m in run["models"].values():
            assert {"mae", "rmse", "spearman", "norm_gini", "top10_share", "total_bias", "auc"} <= set(m)
            assert len(m["deciles"]) == 10
            predicted = [d["predicted"] for d in m["deciles"]]
            assert predicted == sorted(predicted)  # deciles of the prediction, lowest first
    # Every seeded model has the classic model's total; the unseeded ones do not vary.
    for name in ("gru", "ffnn", "gbt", "rf"):
        for run in doc["seeds"].values():
            assert abs(run["models"][name]["total_bias"] - run["models"]["bgnbd_gg"]["total_bias"]) < 1e-4
    assert doc["summary"]["bgnbd_gg"]["rmse"]["sd"] == 0 and set(doc["summary"]) == models
    assert (tmp_path / "plots" / "deciles.png").is_file() and (tmp_path / "plots" / "gains.png").is_file()
    # The run is in the tracking store: every model's metrics per seed (the step), their mean and sd.
    client, run = _tracked(f"file:{tmp_path / 'mlruns'}", "evaluate")
    steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "gru.rmse")}
    assert steps == {1: doc["seeds"]["1"]["models"]["gru"]["rmse"], 2: doc["seeds"]["2"]["models"]["gru"]["rmse"]}
    assert run.data.metrics["bgnbd_gg.rmse.sd"] == 0 and run.data.params["seeds"] == "[1, 2]"
    assert len(run.data.params["training_data_sha256"]) == 64
    files = {f.path for f in client.list_artifacts(run.info.run_id)} | \
        {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"evaluation.json", "plots/deciles.png", "plots/gains.png"} <= files


def _tracked(uri, command):
    """The tracking store's client and its one run of `command`."""
    import os

    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store, named by the test
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clv").experiment_id],
                              filter_string=f"tags.command = '{command}'")
    assert len(runs) == 1
    return client, runs[0]


def test_a_training_run_is_recorded_and_its_artifact_names_it(trained):
    """`clv train` records its run where --tracking-uri says: parameters, the data's fingerprint,
    each ensemble member's held-out loss, the export's parity, and the artifact itself; the
    artifact's metadata names the run."""
    d, _ = trained
    meta = Artifact.load(d / "artifact").meta
    client, run = _tracked(f"file:{d / 'mlruns'}", "train")
    assert meta["run"] == {"tracking_uri": f"file:{d / 'mlruns'}", "experiment": "clv", "run_id": run.info.run_id}
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["cutoff"], params["epochs"], params["ensemble"]) == (CUTOFF, "2", "2")
    assert params["training_data_sha256"] == meta["training_data_sha256"] and params["model_version"] == meta["version"]
    assert run.data.metrics["member1.valid_loss"] == meta["training"]["members"][1]["valid_loss"]
    assert run.data.metrics["parity.clv.max_rel_diff"] == meta["parity"]["clv"]["max_rel_diff"]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.onnx", "model/metadata.json"}


def test_failed_parity_leaves_the_previous_artifact(trained, tmp_path, monkeypatch):
    """`clv train` writes nothing a worker would load unless onnxruntime agrees with torch."""
    import shutil

    import torch

    from export_onnx import export as export_module
    from models.classic import ClassicParams
    from models.networks import GRUModel

    d, _ = trained
    art = Artifact.load(d / "artifact")
    target = tmp_path / "model"
    shutil.copytree(d / "artifact", target)
    before = (target / "model.onnx").read_bytes()
    model = GRUModel(len(art.meta["seq_features"]), len(art.meta["static_features"]),
                     ClassicParams.from_dict(art.meta["training"]["classic"]), art.horizon_months,
                     hidden=art.meta["hidden"], layers=art.meta["layers"])
    rng = np.random.default_rng(2)
    from features.sequences import Inputs
    batch = Inputs(rng.normal(size=(8, art.window, len(art.meta["seq_features"]))).astype(np.float32),
                   rng.normal(size=(8, len(art.meta["static_features"]))).astype(np.float32),
                   np.tile(np.array([[3, 50, 300, 40]], dtype=np.float32), (8, 1)))
    torch.nn.init.normal_(model.head[-1].weight, std=0.3)

    def disagreeing(model, artifact, batches):  # the check fails after the graph is written
        raise export_module.ParityError("injected disagreement")

    monkeypatch.setattr(export_module, "parity_check", disagreeing)
    with pytest.raises(export_module.ParityError):
        export_module.export(model, target, {**art.meta, "version": "broken"}, [batch])
    assert (target / "model.onnx").read_bytes() == before
    assert Artifact.load(target).version == art.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind


def test_artifact_directory_is_readable_by_other_users(trained):
    d, _ = trained
    assert (d / "artifact").stat().st_mode & 0o755 == 0o755


def test_train_fits_clusters_by_three_methods_and_prints_their_scores(trained, tmp_path):
    """The artifact carries the chosen clustering with every method's silhouette,
    Calinski-Harabasz and Davies-Bouldin, `clv train` prints them, and `--clusters-only` refits
    the same clusters on the same data without touching the network, the version naming the
    clusters (other data, or another cutoff, is refused)."""
    d, data = trained
    meta = json.loads((d / "artifact" / "metadata.json").read_text())
    c = meta["clustering"]
    assert set(c["methods"]) == {"kmeans", "gmm", "ward"} and c["method"] in c["methods"]
    for m, r in c["methods"].items():
        assert 3 <= r["k"] <= 8 and -1 <= r["silhouette"] <= 1 and r["calinski_harabasz"] > 0
        assert r["davies_bouldin"] > 0 and r["silhouette"] <= c["methods"][c["method"]]["silhouette"]
    assert len(c["centroids"]) == c["k"] == len(set(c["names"])) >= 3
    assert abs(sum(p["share"] for p in c["profiles"].values()) - 1) < 1e-9
    assert meta["first_event"].startswith("1997-01") and meta["cutoff"].startswith(CUTOFF)
    out = (d / "train.out").read_text()
    for m, r in c["methods"].items():
        assert f"{m:<8}{r['k']:>3}{r['silhouette']:>12.3f}" in out
    copy = tmp_path / "artifact"
    shutil.copytree(d / "artifact", copy)
    # A model trained before clusters (and the training window) were in its metadata gets both;
    # the version names the refitted clusters, replacing an earlier refit's digest.
    without = {k: v for k, v in meta.items() if k not in ("clustering", "first_event")}
    (copy / "metadata.json").write_text(json.dumps(without, indent=2))
    versions = []
    for seed, same in (("42", True), ("7", False), ("42", True)):
        res = clv("train", data, "--cutoff", CUTOFF, "--out", copy, "--clusters-only", "--seed", seed)
        assert res.returncode == 0, res.stderr
        again = json.loads((copy / "metadata.json").read_text())
        assert (again["clustering"] == meta["clustering"]) == same
        version = f"{meta['version']}-k{clusters.digest(again['clustering'])}"
        assert again == {**meta, "clustering": again["clustering"], "version": version}
        assert version in res.stdout
        versions.append(version)
    assert versions[0] == versions[2] != versions[1]  # other clusters, another version
    assert (copy / "model.onnx").read_bytes() == (d / "artifact" / "model.onnx").read_bytes()
    other = cdnow_slice(tmp_path / "other.txt", customers=1400)  # same cutoff, other transactions
    for file, cutoff in ((other, CUTOFF), (data, "1997-11-30")):
        res = clv("train", file, "--cutoff", cutoff, "--out", copy, "--clusters-only")
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
        assert "is not the data model" in res.stderr, res.stderr
    assert json.loads((copy / "metadata.json").read_text()) == again  # refused: left as it was


def test_train_describes_its_training_population_and_population_only_adds_it_unchanged(trained, tmp_path):
    """`clv train` records the cohort at the cutoff (size, dates, per input its deciles and the
    cohort's share in each bin, each segment's share); `--population-only` recomputes exactly that
    for a model without it, from the data its fingerprint names, leaving network and version."""
    from features.population import STATISTICS
    from features.segments import SEGMENTS

    d, data = trained
    meta = json.loads((d / "artifact" / "metadata.json").read_text())
    pop = meta["population"]
    assert pop["cutoff"] == meta["cutoff"] and pop["first_event"] == meta["first_event"]
    assert set(pop["statistics"]) == set(STATISTICS)
    for stat in pop["statistics"].values():
        assert len(stat["shares"]) == len(stat["edges"]) + 1 and sum(stat["shares"]) == pytest.approx(1)
        assert stat["edges"] == sorted(set(stat["edges"]))
    assert set(meta["segment_shares"]) == set(SEGMENTS)
    assert sum(meta["segment_shares"].values()) == pytest.approx(1)
    copy = tmp_path / "artifact"
    shutil.copytree(d / "artifact", copy)
    without = {k: v for k, v in meta.items() if k not in ("population", "segment_shares")}
    (copy / "metadata.json").write_text(json.dumps(without, indent=2))
    res = clv("train", data, "--cutoff", CUTOFF, "--out", copy, "--population-only")
    assert res.returncode == 0, res.stderr
    again = json.loads((copy / "metadata.json").read_text())
    assert again["population"] == pop
    # ONNX's scores, not torch's: a customer on a threshold may fall the other way (1e-6 relative)
    assert again["segment_shares"] == pytest.approx(meta["segment_shares"], abs=2 / pop["customers"])
    assert again["version"] == meta["version"] and f"model {meta['version']}" in res.stdout
    assert (copy / "model.onnx").read_bytes() == (d / "artifact" / "model.onnx").read_bytes()
    other = cdnow_slice(tmp_path / "other.txt", customers=1400)
    res = clv("train", other, "--cutoff", CUTOFF, "--out", copy, "--population-only")
    assert res.returncode == 2 and "is not the data model" in res.stderr, res.stderr
