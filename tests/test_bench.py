"""The bench commands at tiny sizes: they run end to end and report sane figures. No timing
assertions: figures are for docs/benchmarks.md, measured on a quiet machine."""

from __future__ import annotations

import json
import subprocess

import pytest

from harness import CLV


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    res = subprocess.run([*CLV, "bench", *args, "--json", str(out), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_throughput_small(tmp_path, kafka_bootstrap):
    r = bench(tmp_path, "throughput", "--invoices", "400", "--customers", "100", "--repeats", "1",
              "--session-timeout", "6", "--bootstrap", kafka_bootstrap)  # the suite's: joins wait half
    assert r["session_timeout_s"] == 6
    for path in ("raw", "bare", "peer", "full"):  # the dev install has the bench extra
        assert r["median_messages_per_s"][path] > 0
        assert r["runs"][path][0]["messages"] == 400
    assert r["runs"]["peer"][0]["produced"] == 400  # one output per event, every one on its topic
    assert r["full_over_bare"] > 0 and r["full_over_peer"] > 0 and r["lines"] >= 400


def test_bench_throughput_without_the_peer_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Without the bench extra the Quix Streams row is one line saying why; the rest prints."""
    from stream import bench as bench_module
    from stream.cli import main

    rate = {"raw": 9000.0, "bare": 3000.0, "full": 1500.0}
    monkeypatch.setattr(bench_module, "throughput", lambda *a, **k: {
        "lines": 1400, "median_messages_per_s": rate, "median_lines_per_s": rate,
        "full_over_bare": 0.5, "full_over_raw": 0.167, "peer_missing": bench_module.PEER_MISSING})
    assert main(["bench", "throughput", "--invoices", "400", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "Quix" in line] == [
        f"  {'Quix Streams peer (same fold)':<32}{bench_module.PEER_MISSING}"]
    assert any("full worker path" in line for line in out) and "full/peer" not in out[-1]


def test_bench_latency_small(tmp_path, kafka_bootstrap):
    r = bench(tmp_path, "latency", "--rate", "40", "--seconds", "2", "--max-rate", "80",
              "--session-timeout", "6", "--bootstrap", kafka_bootstrap)
    assert r["session_timeout_s"] == 6
    got = r["rates"]["40.0"]
    assert got["scored"] == got["events"] == 80
    assert 0 < got["p50_ms"] <= got["p99_ms"] <= got["max_ms"]


@pytest.mark.parametrize("what, takes", [("scoring", False), ("sink", False), ("api", False),
                                         ("throughput", True), ("month-turn", True)])
def test_only_the_benchmarks_that_use_kafka_take_a_bootstrap(what, takes):
    """A flag the benchmark would ignore is refused (`clv: error: ...`), not silently taken."""
    from stream.cli import UsageError, build_parser

    argv = ["bench", what, "--bootstrap", "127.0.0.1:9092"]
    if takes:
        assert build_parser().parse_args(argv).bootstrap == "127.0.0.1:9092"
    else:
        with pytest.raises(UsageError, match="unrecognized arguments: --bootstrap"):
            build_parser().parse_args(argv)


def test_bench_scoring_small(tmp_path):
    r = bench(tmp_path, "scoring", "--batch-sizes", "1", "64", "--seconds", "0.05")
    assert [row["batch"] for row in r["rows"]] == [1, 64]
    assert all(row["onnxruntime_per_s"] > 0 for row in r["rows"])
    assert "torch_per_s" in r["rows"][0]  # the dev install has torch
    assert r["drivers"]["rows_per_customer"] == 32 and r["drivers"]["customers_per_s"] > 0  # five groups


def test_bench_state_small(tmp_path, kafka_bootstrap):
    r = bench(tmp_path, "state", "--customers", "300", "--stores", "memory://", "rocksdb://",
              "--session-timeout", "6", "--bootstrap", kafka_bootstrap)  # the suite's: joins wait half
    assert r["session_timeout_s"] == 6
    mem = r["stores"]["memory://"]
    assert mem["recovery_seconds"] > 0 and mem["rss_held_mb"] > 0
    assert mem["recovered_records"] == r["changelog_records"] > 300  # customers and partition records
    assert mem["restart_records"] >= r["changelog_records"]  # memory: everything again
    assert r["stores"]["rocksdb://"]["restart_records"] == 0  # a clean stop leaves no tail


def test_bench_sink_small(tmp_path):
    r = bench(tmp_path, "sink", "--customers", "2000")
    assert r["rows"] == 2000 and r["fold_messages_per_s"] > 0 and r["snapshot_seconds"] > 0
    assert r["peak_rss_mb"] >= r["rss_before_mb"] > 0
    assert not any((tmp_path / "work").glob(".clv.duckdb.*"))  # working and temporary files gone


def test_bench_bad_argument_is_one_line(tmp_path):
    res = subprocess.run([*CLV, "bench", "throughput", "--invoices", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("clv: error:") and len(res.stderr.splitlines()) == 1


def test_bench_bootstrap_small(tmp_path, kafka_bootstrap):
    r = bench(tmp_path, "bootstrap", "--lines", "3000", "--bootstrap", kafka_bootstrap)
    assert r["exact"] is True and r["max_rel_diff"] <= 1e-5
    assert r["customers"] > 10 and r["lines_per_s"] > 0 and "3,000 lines read" in r["summary"]


def test_bench_api_small(tmp_path):
    """Every mix answers from the API alone with no 5xx and no connection error."""
    r = bench(tmp_path, "api", "--customers", "500", "--clients", "4", "--seconds", "0.5")
    assert set(r["mixes"]) == {"lookups", "top50", "segments", "exports", "lookups_during_exports"}
    for mix, m in r["mixes"].items():
        assert m["requests"] > 0 and m["requests_per_s"] > 0, mix
        assert 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"], mix
        assert m["errors_5xx"] == m["connection_errors"] == m["errors_other"] == 0, mix
    assert r["mixes"]["lookups_during_exports"]["exports"] > 0


def test_bench_month_turn_small(tmp_path, kafka_bootstrap):
    """Every bootstrapped customer is rescored and published after the turn; the ordinary events
    meanwhile are all scored; no flush fails and /ready answers 200 throughout."""
    r = bench(tmp_path, "month-turn", "--customers", "2000", "--rate", "50",
              "--session-timeout", "6", "--bootstrap", kafka_bootstrap)
    assert r["rescored_customers"] == 2000 and r["turn_seconds"] > 0
    turn = r["events_during_turn"]
    assert turn["events"] > 0 and turn["scored"] == turn["events"]
    assert r["events_before"]["scored"] == r["events_before"]["events"] > 0
    assert r["flush_failures"] == 0 and set(r["ready_answers"]) == {"200"}
