"""Training, ONNX export and batch scoring on a slice of CDNOW (small epochs: behaviour, not
accuracy; accuracy is `clv evaluate`'s job)."""

import csv
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from export_onnx.artifact import Artifact
from features.loaders import vendored_cdnow

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
    res = clv("train", data, "--cutoff", CUTOFF, "--epochs", "2", "--ensemble", "2", "--out", d / "artifact")
    assert res.returncode == 0, res.stderr
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
    model = GRUModel(len(art.meta["seq_features"]), len(art.meta["static_features"]),
                     horizon=art.horizon_months, hidden=art.meta["hidden"], layers=art.meta["layers"])
    rng = np.random.default_rng(1)
    batch = Inputs(rng.normal(size=(64, art.window, len(art.meta["seq_features"]))).astype(np.float32),
                   rng.normal(size=(64, len(art.meta["static_features"]))).astype(np.float32))
    from export_onnx.export import PARITY_TOLERANCE, ParityError
    with pytest.raises(ParityError):
        parity_check(model, art, [batch])  # untrained torch weights != the artifact's

    from export_onnx.export import export
    out = d / "fresh"
    parity = export(model, out, {**art.meta, "version": "fresh"}, [batch])
    assert all(parity[name]["max_rel_diff"] < tol for name, tol in PARITY_TOLERANCE.items())
    for n in (1, 7, 300):  # dynamic batch axis
        clv_o, p_o = Artifact.load(out).raw_predict(Inputs(batch.seq[:1].repeat(n, 0), batch.static[:1].repeat(n, 0)))
        assert clv_o.shape == p_o.shape == (n,) and np.allclose(clv_o, clv_o[0])
    with torch.no_grad():
        s = Artifact.load(out).scaler.transform(batch)
        torch_out = model(torch.from_numpy(s.seq), torch.from_numpy(s.static), model.h0(64))
    onnx_out = Artifact.load(out).raw_predict(batch)
    for t, o in zip(torch_out, onnx_out):  # expected spend, p_purchase
        assert np.allclose(t.numpy(), o, rtol=1e-4, atol=1e-6)
    calibrated = Artifact.load(out).predict(batch)
    factor = Artifact.load(out).calibration.factor
    assert np.allclose(calibrated.clv, onnx_out.clv * factor)
    assert np.array_equal(calibrated.p_purchase, onnx_out.p_purchase)


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


def test_training_never_reads_after_the_cutoff(trained, tmp_path):
    """Training on the whole file and on the file cut at the cutoff gives the same model."""
    d, _ = trained
    truncated = cdnow_slice(tmp_path / "cut.txt", until=CUTOFF.replace("-", ""))
    res = clv("train", truncated, "--cutoff", CUTOFF, "--epochs", "2", "--ensemble", "2", "--out", tmp_path / "a2")
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


def test_train_bad_arguments_exit_2(tmp_path):
    data = cdnow_slice(tmp_path / "c.txt", customers=50)
    res = clv("train", data, "--cutoff", "1997-02-01", "--out", tmp_path / "x")
    assert res.returncode == 2 and "months of transactions" in res.stderr
    res = clv("train", data, "--cutoff", "31/12/1997", "--out", tmp_path / "x")
    assert res.returncode == 2 and "not a date" in res.stderr
    res = clv("score", data, "--model", tmp_path, "--out", tmp_path / "s.csv")
    assert res.returncode == 2 and "not a model directory" in res.stderr


def test_head_closed_forms_match_the_retention_process():
    """p_purchase and expected spend over H months equal an enumeration of the process the head
    describes: alive each month with survival s (once gone, gone), buying while alive with l."""
    import itertools

    import torch

    from models import ziln

    out = torch.tensor([[0.3, -0.4, 3.0, 0.2], [-1.0, 1.5, 2.0, -0.5], [2.5, -2.0, 4.0, 1.0]],
                       dtype=torch.float64)
    s = torch.sigmoid(out[:, 0] + 2.0)
    lam = torch.sigmoid(out[:, 1] - 2.0)
    sigma = 0.05 + 2.95 * torch.sigmoid(out[:, 3])
    month_spend = torch.exp(out[:, 2] + 0.5 * sigma**2)
    for h in (1, 2, 6):
        p, log_mean, _ = ziln.over_horizon(out, torch.full((3,), float(h), dtype=torch.float64))
        p_none = torch.zeros(3, dtype=torch.float64)
        buying_months = torch.zeros(3, dtype=torch.float64)
        for alive in range(h + 1):  # months alive before leaving (h: alive throughout)
            p_alive = s**alive * ((1 - s) if alive < h else 1)
            for buys in itertools.product((0, 1), repeat=alive):
                p_path = p_alive * torch.prod(torch.stack([lam if b else 1 - lam for b in buys]), 0) \
                    if buys else p_alive
                buying_months += p_path * sum(buys)
                if not any(buys):
                    p_none += p_path
        assert torch.allclose(p, 1 - p_none, rtol=1e-9), h
        assert torch.allclose(torch.exp(log_mean), buying_months * month_spend, rtol=1e-9), h
        expected, p_pred = ziln.predict(out, torch.full((3,), float(h), dtype=torch.float64))
        assert torch.allclose(expected, buying_months * month_spend, rtol=1e-9) and torch.equal(p_pred, p)
