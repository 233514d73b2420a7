import json
import subprocess
import sys

import pandas as pd
import pytest

from features.cleaning import CleaningPolicy, clean
from features.loaders import load, vendored_cdnow
from features.synthetic import generate, write

CLV = [sys.executable, "-m", "stream.cli"]


def run_clv(*args):
    return subprocess.run([*CLV, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_inspect_vendored_cdnow_counts():
    res = run_clv("inspect", vendored_cdnow(), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["cleaning"]["rows_read"] == 69_659
    assert out["cleaning"]["rows_kept"] == 69_659
    assert out["customers"] == 23_570
    assert out["first_ts"].startswith("1997-01-01") and out["last_ts"].startswith("1998-06-30")
    assert any("255 rows repeat" in n for n in out["cleaning"]["notes"])


@pytest.mark.parametrize("layout, suffix", [
    ("online-retail", ".csv"), ("online-retail-ii", ".csv"), ("online-retail", ".xlsx"),
])
def test_synthetic_file_every_drop_accounted(tmp_path, layout, suffix):
    frame, truth = generate(n_customers=300, n_invoices=1500 if suffix == ".xlsx" else 4000,
                            seed=3, layout=layout)
    path = write(frame, tmp_path / f"retail{suffix}")
    res = run_clv("inspect", path, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    c = out["cleaning"]
    assert c["format"] == layout
    assert c["rows_read"] == truth.rows
    assert c["rows_kept"] + sum(c["dropped"].values()) == c["rows_read"]
    for reason in ("no_customer", "zero_price", "negative_price", "bad_debt_adjustment", "outlier"):
        assert c["dropped"][reason] == getattr(truth, reason), reason
    assert c["duplicate_lines"] == truth.duplicate_lines
    assert c["cancellation_lines"] == truth.cancellation_lines
    assert out["customers"] == truth.customers


def test_clv_generate_writes_the_seeded_file_and_refuses_bad_arguments(tmp_path):
    out = tmp_path / "gen.csv"
    res = run_clv("generate", "--out", out, "--customers", 300, "--invoices", 1500, "--seed", 3,
                  "--start", "2010-12-01", "--end", "2011-12-09", "--layout", "online-retail-ii")
    assert res.returncode == 0, res.stderr
    frame, truth = generate(n_customers=300, n_invoices=1500, seed=3, start="2010-12-01",
                            end="2011-12-09", layout="online-retail-ii")
    assert out.read_bytes() == write(frame, tmp_path / "same.csv").read_bytes()
    assert f"{truth.customers:,} customers" in res.stdout
    for bad in (["--customers", "0"], ["--wholesale-share", "1.5"],
                ["--start", "2011-12-09", "--end", "2010-12-01"], ["--out", tmp_path / "no" / "x.csv"]):
        res = run_clv("generate", "--out", out, *bad)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, (bad, res.stderr)


def test_duplicates_drop_policy_and_outlier_keep(tmp_path):
    frame, truth = generate(n_customers=200, n_invoices=2000, seed=5)
    loaded = load(write(frame, tmp_path / "r.csv"))
    lines, report = clean(loaded, CleaningPolicy.for_format(loaded.format, duplicates="drop",
                                                            outlier_quantity=0))
    assert report.dropped["duplicate"] == truth.duplicate_lines
    assert report.dropped["outlier"] == 0
    assert (lines["quantity"].abs() == 80995).sum() == 2


def test_customer_id_float_and_spaces_normalised(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text(
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A, WHITE ,6,12/1/2010 8:26,2.55,17850.0,United Kingdom\n"
        "536366,71053,LANTERN,6,2010-12-01 08:28:00,3.39, 17850 ,United Kingdom\n"
        "536367,71053,LANTERN,6,not a date,3.39,17850,United Kingdom\n"
    )
    lines, report = clean(load(p))
    assert set(lines["customer_id"]) == {"17850"}
    assert report.dropped["unparseable_date"] == 1
    assert lines["ts"].dt.hour.tolist() == [8, 8]


def test_column_mapping(tmp_path):
    p = tmp_path / "shop.csv"
    pd.DataFrame({"cust": ["a", "b"], "when": ["2024-01-05T10:00:00Z", "2024-02-01T09:00:00+02:00"],
                  "qty": [1, 2], "price": [9.5, 3.0], "order": ["o1", "o2"]}).to_csv(p, index=False)
    res = run_clv("inspect", p, "--map", "customer_id=cust,ts=when,quantity=qty,unit_price=price,invoice_no=order", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["customers"] == 2
    res = run_clv("inspect", p, "--map", "customer_id=cust,ts=when")
    assert res.returncode == 2 and "quantity" in res.stderr


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty"),
    (b"a,b,c\n1,2,3\n", "unrecognised columns"),
    (bytes(range(256)) * 8, "binary"),
    (b"\x1f\x8b\x08\x00broken", "gzip"),
])
def test_bad_files_one_line_exit_2(tmp_path, content, fragment):
    p = tmp_path / "bad.csv"
    p.write_bytes(content)
    res = run_clv("inspect", p)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and fragment in res.stderr and "Traceback" not in res.stderr


def test_bad_cli_arguments_exit_2(tmp_path):
    for args in (["inspect"], ["inspect", tmp_path / "missing.csv"], ["nope"],
                 ["inspect", vendored_cdnow(), "--format", "parquet"],
                 ["inspect", vendored_cdnow(), "--map", "colour=x"]):
        res = run_clv(*args)
        assert res.returncode == 2, args
        assert res.stderr.startswith("clv: error:") and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.parametrize("args, fragment", [
    (["worker", "--data-dir", "{tmp}/missing/state"], "does not exist"),
    (["worker", "--data-dir", "{tmp}/file"], "is not a directory"),
    (["worker", "--bootstrap", "127.0.0.1:1", "--data-dir", "{tmp}"], "cannot create the topics"),
    (["worker", "--data-dir", "/proc/sys/kernel"], "is not writable"),
    (["worker", "--store", "redis://x", "--data-dir", "{tmp}"], "store must be memory:// or rocksdb://"),
    (["score", "{cdnow}", "--out", "{tmp}/missing/scores.csv"], "does not exist"),
    (["export", "--out", "{tmp}"], "is a directory"),
    (["replay", "{cdnow}", "--rate", "-5"], "positive"),
    (["snapshot", "--interval", "nan"], "positive"),
    (["snapshot", "--snapshot", "{tmp}/file/clv.duckdb"], "--snapshot"),
    (["snapshot", "--snapshot", "{tmp}"], "is a directory"),
    (["bench", "state", "--json", "{tmp}/missing/out.json"], "does not exist"),
])
def test_bad_output_paths_and_numbers_exit_2_before_any_work(tmp_path, args, fragment):
    """Checked before a broker, model or file is touched: one line, no traceback."""
    (tmp_path / "file").write_text("")
    res = run_clv(*[a.format(tmp=tmp_path, cdnow=vendored_cdnow()) for a in args])
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("clv: error:") and res.stderr.count("\n") == 1, res.stderr
    assert fragment in res.stderr


def test_loading_a_million_lines_is_quick(tmp_path):
    """Not a timing assertion: proves the vectorised path handles 1M rows in one go."""
    frame, truth = generate(n_customers=20_000, n_invoices=140_000, seed=11)
    path = write(frame, tmp_path / "big.csv")
    lines, report = clean(load(path))
    assert report.rows_read == truth.rows and truth.rows > 1_000_000
