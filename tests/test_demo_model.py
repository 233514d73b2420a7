"""`clv demo` on a file its model was not trained on: it trains one on the file and says so in one
line, and the vip share it prints is the share its playbook states (the training cohort's, the
same customers); the dashboard shows the same share, and the drift banner when the model shown
was trained on other customers (the shipped CDNOW model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from export_onnx.runtime import shipped_model_dir
from features.synthetic import generate, write
from harness import CLV


@pytest.fixture(scope="module")
def retail_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retail-demo")
    data = write(generate(500, 3000, seed=7)[0], tmp / "retail.csv")
    workdir = tmp / "demo"
    res = subprocess.run([*CLV, "demo", str(data), "--exit", "--epochs", "1", "--rate", "5000",
                          "--workdir", str(workdir)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ""})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return data, workdir, res.stdout


def vip_shares(out: str) -> tuple[float, float]:
    """(vip's share of the customers in the segment table, the share its playbook states)."""
    table = out.split("\nSegments")[1].split("Playbooks")[0]
    row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["vip"])
    header = next(line.split() for line in table.splitlines() if line.split()[:1] == ["segment"])
    here = float(row[header.index("share_of_customers")].rstrip("%"))
    who = out.split("\n  vip\n")[1].splitlines()[0]
    stated = float(re.search(r"; ([0-9.]+)% of the training cohort at", who).group(1))
    return here, stated


def test_demo_trains_on_a_file_its_model_was_not_trained_on_and_prints_vip_at_its_stated_share(retail_demo):
    data, workdir, out = retail_demo
    said = [line for line in out.splitlines() if line.startswith("model: ")]
    assert len(said) == 1 and f"training one on {data}" in said[0], out[:2000]
    assert "was trained on other data (1997-01-01 to 1998-06-30)" in said[0]
    assert (workdir / "model" / "metadata.json").exists()
    here, stated = vip_shares(out)
    assert abs(here - stated) <= 1.0, (here, stated)
    assert "expected CLV >= $" in out.split("\n  vip\n")[1].splitlines()[0]


def test_demo_terminal_warns_in_one_line_when_its_model_was_trained_on_other_customers(retail_demo, capsys):
    """The results the demo prints say what the dashboard's banner says: nothing for the model
    trained on the file, the drift check's one line for CDNOW's model on these customers."""
    from export_onnx.runtime import Artifact
    from state.snapshot.queries import Snapshot
    from stream.demo import _report

    _, workdir, out = retail_demo
    assert not [line for line in out.splitlines() if line.startswith("warning:")]
    path = workdir / "clv.duckdb"
    _report(Snapshot(path), path, 0, Artifact.load().meta, serving=True)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "order value PSI" in warnings[0], warnings
    assert "unlike the 23,570 the model was trained on" in warnings[0]


def test_demo_uses_a_model_trained_on_the_file_and_keeps_another_when_told(retail_demo, capsys):
    """In-process, the choice alone: the model the first run trained is used as it is (its
    fingerprint is the file's); CDNOW's model is kept with --no-train, and the line says its
    scores are extrapolations; the shipped model on CDNOW itself needs no training."""
    from export_onnx.runtime import Artifact
    from features.batch import read_history
    from features.loaders import vendored_cdnow
    from stream.demo import DemoOptions, choose_model

    data, workdir, _ = retail_demo
    events = read_history(data).events
    for train, want in ((None, str(workdir / "model")), (False, None)):
        opts = DemoOptions(str(data), None, None, None, train, workdir, True)
        assert choose_model(opts, Artifact.load(), str(data), events) == want
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2 and all(line.startswith("model: ") for line in said), said
    assert "by an earlier demo run" in said[0]
    assert "--no-train keeps it: its scores here are extrapolations" in said[1]
    cdnow = str(vendored_cdnow())
    opts = DemoOptions(cdnow, None, None, None, None, workdir, True)
    assert choose_model(opts, Artifact.load(), cdnow, read_history(cdnow).events) is None
    assert "trained on" in capsys.readouterr().out


def test_dashboard_shows_the_same_vip_share_and_the_drift_banner_only_for_the_other_model(retail_demo, tmp_path):
    pytest.importorskip("streamlit")
    pytest.importorskip("playwright")
    from state.snapshot import dashboard
    from stream.broker import free_port
    from stream.processes import Child, clv
    from test_dashboard import show, table

    _, workdir, out = retail_demo
    here, _ = vip_shares(out)
    for model, drift in ((workdir / "model", False), (None, True)):
        port = free_port()
        proc = Child(clv("dashboard", "--snapshot", str(workdir / "clv.duckdb"), "--port", str(port),
                         *(["--model", str(model)] if model else [])), None, tmp_path / f"dash-{port}.log")
        try:
            url = f"http://127.0.0.1:{port}"
            dashboard.wait_healthy(url, proc.proc)
            with dashboard.browser() as page:
                dashboard.open_ready(page, url)
                banner = page.locator('[class*="st-key-drift-"]')
                assert (banner.count() > 0) == drift
                if drift:
                    assert "order value PSI" in banner.first.inner_text()
                show(page, "Segments and playbooks")
                segments = {r["segment"]: r for r in table(page, "share_of_customers")}
                assert segments["vip"]["share_of_customers"] == f"{here:.1f}%"
                books = {r["segment"]: r for r in table(page, "what to measure")}
                stated = float(re.search(r"; ([0-9.]+)% of the training cohort", books["vip"]["who"]).group(1))
                if not drift:
                    assert abs(stated - here) <= 1.0, (stated, here)
                else:
                    # the shipped model's cohort (CDNOW), as its artifact records it
                    shipped = json.loads((shipped_model_dir() / "metadata.json").read_text())
                    assert stated == round(100 * shipped["segment_shares"]["vip"], 1)
                show(page, "Model")
                assert (page.locator('[class*="st-key-drift-"]').count() > 0) == drift
        finally:
            assert proc.stop() == 0, proc.output()[-3000:]
