"""The dashboard in a real browser: `clv dashboard` over the snapshot of `clv demo --exit
--customers 3000`, opened in headless Chromium (Debian's) through Playwright. What the page shows
is checked against the snapshot read with DuckDB: every tab drawn, the KPI numbers, the written
insights, value by country, the segment table, movement between segments against the two
snapshots, the top-N table under a segment filter, the CSV download against `clv export` for
the same filter, a customer lookup, the model card, a new snapshot replacing the shown one, and
no page errors throughout."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import zlib
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("playwright")

from export_onnx.runtime import shipped_model_dir  # noqa: E402
from features.distribution import SpendDistribution  # noqa: E402
from features.scores import FIELDS, ScoreRecord, iso_time  # noqa: E402
from features.segments import SEGMENTS  # noqa: E402
from harness import CLV, Api  # noqa: E402
from state.snapshot import dashboard  # noqa: E402
from state.snapshot import tables as snapshot  # noqa: E402
from stream.broker import free_port  # noqa: E402
from stream.processes import Child, clv  # noqa: E402


def model_with_evaluation(out: Path) -> Path:
    """The shipped model with a holdout evaluation beside it, written by `clv evaluate`'s own
    writers (its JSON and its gains and decile plots) from a small made-up holdout."""
    from models.evaluate import Run, SeedRun, write_json, write_plots
    from models.metrics import report

    shutil.copytree(shipped_model_dir(), out)
    rng = np.random.default_rng(0)
    actual = rng.gamma(0.3, 50.0, 500) * (rng.random(500) < 0.4)
    preds = {"gru": actual * rng.lognormal(0, 0.5, 500) + 1, "naive": actual.mean() + rng.normal(0, 1, 500)}
    spread = {q: preds["gru"] * f for q, f in ((0.1, 0.0), (0.5, 0.8), (0.9, 2.0))}  # its 80% interval
    metrics = {"gru": report(actual, preds["gru"], np.full(500, 0.4), spread), "naive": report(actual, preds["naive"], None)}
    run = Run(500, actual, [SeedRun(42, metrics, preds)])
    write_json(run, out / "evaluation.json")
    write_plots(run, out)
    return out


COUNTRIES = ("United Kingdom", "United Kingdom", "United Kingdom", "Germany", "France", "EIRE", "")


def rescored(previous: Path, path: Path) -> None:
    """The sink's next snapshot after `previous`: every customer scored again with a country
    (CDNOW names none; an Online Retail file does), a seventh of them in the next segment."""
    con = duckdb.connect(str(previous), read_only=True)
    try:
        cur = con.execute(f"SELECT {', '.join(f for f in FIELDS if f != 'schema_version')} FROM customer_scores")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
        drivers = con.execute(f"SELECT {', '.join(c for c, _ in snapshot.DRIVER_COLUMNS)} "
                              "FROM customer_drivers").fetchall()  # the scores stay: so do their drivers
    finally:
        con.close()
    shutil.copy(previous, path)
    sink = snapshot.Snapshots(path, "clv-scores")
    try:
        sink.open()
        for i, row in enumerate(rows):
            row = {k: iso_time(v) if isinstance(v, datetime) else v for k, v in row.items()}
            code = zlib.crc32(row["customer_id"].encode())
            segment = SEGMENTS[(SEGMENTS.index(row["segment"]) + 1) % len(SEGMENTS)] if code % 7 == 0 \
                else row["segment"]
            score = ScoreRecord(schema_version=6, **row)
            score = replace(score, country=COUNTRIES[code % len(COUNTRIES)], segment=segment)
            sink.put(score.customer_id, snapshot.row(score, 0, i))
        assert sink.publish(drivers) == len(rows)
    finally:
        sink.close()


@pytest.fixture(scope="module")
def served(demo_3000, tmp_path_factory):
    """The demo's snapshot followed by one with countries and segment changes (the refresh test
    replaces it later), served by `clv dashboard`, with the shipped model and an evaluation
    beside it for the model card."""
    tmp = tmp_path_factory.mktemp("dashboard")
    path = tmp / "clv.duckdb"
    rescored(demo_3000.snapshot, path)
    port = free_port()
    model = model_with_evaluation(tmp / "model")
    proc = Child(clv("dashboard", "--snapshot", str(path), "--port", str(port), "--model", str(model)),
                 None, tmp / "dashboard.log")
    url = f"http://127.0.0.1:{port}"
    try:
        dashboard.wait_healthy(url, proc.proc)
        yield path, url, demo_3000.snapshot
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def page(served):
    """One Chromium page on the dashboard for the module; every uncaught page error is kept."""
    _, url, _ = served
    with dashboard.browser() as page:
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        dashboard.open_ready(page, url)
        yield page
    assert page.errors == []


def query(path: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def show(page, tab: str) -> None:
    """Open a tab of the page and wait until its charts have drawn."""
    page.get_by_role("tab", name=tab).click()
    dashboard.settle(page)
    page.wait_for_function(dashboard.DRAWN, timeout=30_000)


def look_up(page, customer_id: str) -> None:
    """Type an id into the Customers tab's lookup and let the page rerun."""
    box = page.get_by_label("Customer id")
    box.fill(customer_id)
    box.press("Enter")
    dashboard.settle(page)


def chart(page, title: str) -> list[dict[str, str]]:
    """The marks of the chart titled `title` (drawn as SVG): each mark's fields, as the chart
    labels them."""
    found = page.locator('[data-testid="stVegaLiteChart"]').filter(has_text=title).first
    labels = [p.get_attribute("aria-label") for p in found.locator("svg .mark-rect path").all()]
    return [dict(part.split(": ", 1) for part in label.split("; ")) for label in labels]


def test_every_tab_draws(page):
    """Each tab shows what it is for, with no page error."""
    for tab, has in (("Segments and playbooks", "what to measure"), ("Customers", "p_purchase"),
                     ("Clusters", "main_segment"), ("Model", "fact"), ("Overview", "value_tier")):
        show(page, tab)
        assert table(page, has), tab
        assert page.errors == [], tab


def metrics(page) -> dict[str, str]:
    cards = page.locator('[data-testid="stMetric"]')
    return {cards.nth(i).locator('[data-testid="stMetricLabel"]').inner_text().strip():
            cards.nth(i).locator('[data-testid="stMetricValue"]').inner_text().strip()
            for i in range(cards.count())}


def table(page, has: str) -> list[dict[str, str]]:
    """The rows of the first table with a column named `has`, as text."""
    found = page.locator('[data-testid="stTable"]').filter(
        has=page.locator("th", has_text=re.compile(f"^{re.escape(has)}$"))).first
    found.wait_for(timeout=30_000)  # a widget's rerun may still be drawing it
    head = [th.inner_text().strip() for th in found.locator("thead th").all()]
    return [dict(zip(head, (td.inner_text().strip() for td in tr.locator("th, td").all())))
            for tr in found.locator("tbody tr").all()]


def test_kpis_and_segment_table_are_the_snapshots(page, served):
    path, _, _ = served
    show(page, "Overview")
    n, total, mean, versions, at, newest = query(path, """
        SELECT count(*), sum(clv), avg(clv), (SELECT model_versions FROM snapshot_meta),
               (SELECT strftime(snapshot_at AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M:%S UTC') FROM snapshot_meta),
               (SELECT strftime(newest_event_time AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M:%S UTC') FROM snapshot_meta)
        FROM customer_scores""")[0]
    top = query(path, f"SELECT sum(clv) FROM (SELECT clv FROM customer_scores ORDER BY clv DESC "
                      f"LIMIT {math.ceil(n / 10)})")[0][0]
    shown = metrics(page)
    assert n == 3000 and shown["Customers"] == "3,000"
    assert shown["Expected value, next 6 months"] == f"${total:,.0f}"
    assert shown["Mean CLV"] == f"${mean:,.2f}"
    assert shown["Top 10% share"] == f"{top / total:.1%}"
    assert shown["Snapshot time"] == at and shown["Newest event time"] == newest
    assert shown["Model version"] == ", ".join(versions)
    clusters = query(path, "SELECT count(DISTINCT cluster), count(*) FILTER (WHERE cluster = '') "
                           "FROM customer_scores")[0]
    assert shown["Clusters"] == str(clusters[0]) and clusters[0] >= 3 and clusters[1] == 0
    show(page, "Segments and playbooks")
    segments = {r["segment"]: int(r["customers"]) for r in table(page, "mean_p_purchase")}
    assert segments == dict(query(path, "SELECT segment, customers FROM segment_summary"))
    assert "vip" in segments
    books = {r["segment"]: r for r in table(page, "what to measure")}
    assert set(books) == set(segments) and books["vip"]["what to do"].startswith("protect")



def test_country_charts_are_the_snapshots(page, served):
    path, _, _ = served
    show(page, "Overview")
    want = query(path, "SELECT CASE country WHEN '' THEN '(unknown)' ELSE country END, count(*), "
                       "sum(clv), sum(total_spend) FROM customer_scores GROUP BY country "
                       "ORDER BY sum(clv) DESC, country")
    assert len(want) == len(set(COUNTRIES)) and want[0][0] == "United Kingdom"
    for title, field, at in (("Expected value by country", "total_clv", 2),
                             ("Revenue so far by country", "total_spend", 3)):
        got = [(m["country"], int(m["customers"]), float(m[field])) for m in chart(page, title)]
        assert got == [(row[0], row[1], pytest.approx(row[at])) for row in want], title


def test_insights_are_the_snapshots(page, served):
    """Each sentence's number against SQL of its own over the snapshot."""
    path, _, previous = served
    show(page, "Overview")
    said = page.locator(".st-key-insights li").all_inner_texts()
    n, total, buyers = query(path, "SELECT count(*), sum(clv), sum(p_purchase) FROM customer_scores")[0]
    segment, customers, share = query(path, f"""
        SELECT segment, count(*), sum(clv) / {total} FROM customer_scores GROUP BY segment
        ORDER BY sum(clv) / {total} - count(*) / {n} DESC, segment LIMIT 1""")[0]
    top = query(path, f"SELECT sum(clv) FROM (SELECT clv FROM customer_scores ORDER BY clv DESC "
                      f"LIMIT {math.ceil(n / 10)})")[0][0]
    at_risk, at_risk_value = query(path, "SELECT count(*), sum(clv) FROM customer_scores "
                                         "WHERE segment = 'at_risk_loyal'")[0]
    country, country_value = query(path, "SELECT country, sum(clv) FROM customer_scores WHERE country <> '' "
                                         "GROUP BY 1 ORDER BY 2 DESC LIMIT 1")[0]
    changed = query(path, f"""ATTACH '{previous}' AS before (READ_ONLY);
        SELECT count(*) FROM customer_scores JOIN before.customer_scores b USING (customer_id)
        WHERE b.segment <> customer_scores.segment""")[0][0]
    assert said[0].startswith(f"The {segment} segment, {customers / n:.1%} of customers ({customers:,}), "
                              f"holds {share:.1%}")
    assert said[1].startswith(f"The top 10% of customers ({math.ceil(n / 10):,}) hold {top / total:.1%}")
    assert said[2].startswith(f"{buyers:,.0f} customers ({buyers / n:.1%}) are expected to buy")
    assert said[3].startswith(f"{at_risk:,} loyal customers") and f"${at_risk_value:,.0f}" in said[3]
    assert said[4].startswith(f"{country} holds {country_value / total:.1%} of the expected value")
    assert said[5].startswith(f"{changed:,} customers changed segment") and changed > 100
    assert len(said) == 6


def test_segment_movement_is_sql_over_the_two_snapshots(page, served):
    path, _, previous = served
    show(page, "Segments and playbooks")
    grid = table(page, "from \\ to")
    got = {(r["from \\ to"], to): int(v) for r in grid for to, v in r.items() if to != "from \\ to" and int(v)}
    want = query(path, f"""ATTACH '{previous}' AS before (READ_ONLY);
        SELECT coalesce(b.segment, '(new)'), coalesce(c.segment, '(gone)'), count(*)
        FROM before.customer_scores b FULL JOIN customer_scores c USING (customer_id) GROUP BY ALL""")
    assert got == {(a, b): k for a, b, k in want}
    assert any(a != b for a, b, _ in want)


def test_segment_filter_changes_the_top_list_and_the_download_is_clv_export(page, served, tmp_path):
    path, _, _ = served
    show(page, "Customers")
    before = [r["customer_id"] for r in table(page, "p_purchase")]
    assert before == [c for (c,) in query(path, "SELECT customer_id FROM customer_scores "
                                                "ORDER BY clv DESC, customer_id LIMIT 20")]
    segment = page.locator('.st-key-filters [data-testid="stMultiSelect"]').filter(has_text="Segment")
    segment.locator("input").click()
    page.keyboard.type("dormant")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    dashboard.settle(page)
    frequency = page.locator('.st-key-filters [data-testid="stNumberInput"]').filter(
        has_text="Minimum frequency").locator("input")
    frequency.fill("2")
    frequency.press("Enter")
    dashboard.settle(page)
    rows = table(page, "p_purchase")
    want = [c for (c,) in query(path, "SELECT customer_id FROM customer_scores WHERE segment = 'dormant' "
                                      "AND frequency >= 2 ORDER BY clv DESC, customer_id LIMIT 20")]
    assert [r["customer_id"] for r in rows] == want != before
    assert all(r["segment"] == "dormant" and int(r["frequency"]) >= 2 for r in rows)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    got = Path(download.value.path()).read_bytes()
    res = subprocess.run([*CLV, "export", "--snapshot", str(path), "--segment", "dormant",
                          "--min-frequency", "2", "--out", str(tmp_path / "x.csv")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert got == (tmp_path / "x.csv").read_bytes() and got.count(b"\n") > len(want)


def test_customer_lookup_shows_the_customers_row(page, served):
    path, _, _ = served
    show(page, "Customers")
    cid, clv, segment, cluster = query(path, "SELECT customer_id, clv, segment, cluster FROM customer_scores "
                                             "ORDER BY clv DESC LIMIT 1")[0]
    look_up(page, cid)
    fields = {r["field"]: r["value"] for r in table(page, "field")}
    assert fields["customer_id"] == cid and float(fields["clv"]) == pytest.approx(clv)
    assert (fields["segment"], fields["cluster"]) == (segment, cluster)
    # Why: a waterfall from the model's average customer through each driver to the score.
    drivers = query(path, f"SELECT driver, contribution, reference_clv FROM customer_drivers "
                          f"WHERE customer_id = '{cid}' ORDER BY position")
    bars = {m["step"]: m["dollars"] for m in chart(page, "Why this score")}
    assert list(bars) == ["average customer", *(d for d, _, _ in drivers), "expected CLV"]
    assert bars["average customer"] == f"${drivers[0][2]:,.2f}" and bars["expected CLV"] == f"${clv:,.2f}"
    assert all(bars[d] == f"{c:+,.2f}" for d, c, _ in drivers)
    assert drivers[0][2] + sum(c for _, c, _ in drivers) == pytest.approx(clv, rel=1e-3)


def distribution_of(path: Path, cid: str) -> SpendDistribution:
    """The customer's predictive distribution as the snapshot holds it."""
    p, w, m, sd = query(path, f"SELECT p, weights, mu, sigma FROM customer_distribution WHERE customer_id = '{cid}'")[0]
    return SpendDistribution(np.array([p]), np.array([w]), np.array([m]), np.array([sd]))


def number(page, label: str, value: float) -> None:
    """Type a value into the number input labelled `label` and let the page rerun."""
    box = page.locator('[data-testid="stNumberInput"]').filter(has_text=label).locator("input")
    box.fill(f"{value:g}")
    box.press("Enter")
    dashboard.settle(page)


def test_customer_lookup_shows_the_interval_and_the_chance_beside_the_waterfall(page, served):
    """The lookup shows the customer's clv with its 80% interval and P(spend >= T) for the amount
    the analyst types, from the snapshot's distribution, beside the drivers' waterfall."""
    path, _, _ = served
    show(page, "Customers")
    cid, clv, low, high = query(path, "SELECT customer_id, clv, clv_low, clv_high FROM customer_scores "
                                      "ORDER BY clv DESC LIMIT 1")[0]
    look_up(page, cid)
    number(page, "Chance of spending at least", 1500)
    page.get_by_text("P(spends at least $1,500)").wait_for(timeout=30_000)  # the rerun has drawn it
    cards = {k: v for k, v in metrics(page).items() if k.startswith(("Expected CLV (", "80% interval", "P(spends"))}
    p = float(distribution_of(path, cid).prob_at_least(1500)[0])
    assert cards == {"Expected CLV (6 months)": f"${clv:,.2f}", "80% interval": f"${low:,.2f} – ${high:,.2f}",
                     "P(spends at least $1,500)": f"{p:.1%}"}
    assert 0 < p < 1
    side = page.locator(".st-key-how-sure").locator("xpath=ancestor::*[@data-testid='stHorizontalBlock'][1]")
    assert side.locator('[data-testid="stVegaLiteChart"]').filter(has_text="Why this score").count() == 1
    assert len(chart(page, "Why this score")) > 2  # the reference, the drivers, the score


def test_the_chance_filter_narrows_the_list_to_the_customers_the_api_selects(page, served, tmp_path):
    """"Spends at least $250 with probability >= 0.4" narrows the list, its column and its download to
    the customers the API's /top and /export.csv select with at_least=250&min_probability=0.4."""
    path, url, _ = served
    page.goto(url)  # a new session: the filters other tests set are gone
    dashboard.settle(page)
    show(page, "Customers")
    number(page, "with probability at least", 0.4)
    number(page, "Spends at least", 250)
    rows = table(page, "p_at_least_250")  # drawn once both are set: the column comes with the amount
    api = Api({**os.environ, "CLV_SNAPSHOT_PATH": str(path)}, tmp_path)
    try:
        status, body = api.get("/top?n=20&at_least=250&min_probability=0.4")
        assert status == 200
        want = json.loads(body)
        assert [r["customer_id"] for r in rows] == [r["customer_id"] for r in want] != []
        assert [r["p_at_least_250"] for r in rows] == [f"{r['p_at_least']:,.2f}" for r in want]
        assert all(r["p_at_least"] >= 0.4 for r in want)
        assert len(want) == 20 and want != json.loads(api.get("/top?n=20")[1])  # it narrowed the list
        with page.expect_download() as download:
            page.get_by_role("button", name="Download CSV").click()
        status, body = api.get("/export.csv?at_least=250&min_probability=0.4")
        assert status == 200 and Path(download.value.path()).read_bytes() == body
    finally:
        assert api.proc.stop() == 0, api.proc.output()[-3000:]


def test_segment_and_tier_tables_state_the_range_of_each_total(page, served):
    """Each segment's and tier's total with its stated 80% range, from the snapshot's summaries,
    and the sentence that says the range treats customers as independent, wherever the page
    shows a total (the Overview's value tiers too)."""
    path, _, _ = served
    show(page, "Segments and playbooks")
    ranged = page.locator('[data-testid="stTable"]').filter(
        has=page.locator("th", has_text=re.compile("^80% range of the total$")))
    assert ranged.count() == 3  # the Overview's value tiers, then the Segments tab's two tables
    for i, (view, key) in ((0, ("tier_summary", "value_tier")), (1, ("segment_summary", "segment")),
                           (2, ("tier_summary", "value_tier"))):
        head = [th.inner_text().strip() for th in ranged.nth(i).locator("thead th").all()]
        rows = [dict(zip(head, (td.inner_text().strip() for td in tr.locator("th, td").all())))
                for tr in ranged.nth(i).locator("tbody tr").all()]
        want = {k: f"${lo:,.0f} – ${hi:,.0f}"
                for k, lo, hi in query(path, f"SELECT {key}, total_clv_low, total_clv_high FROM {view}")}
        assert {r[key]: r["80% range of the total"] for r in rows} == want
        assert head.index("80% range of the total") == head.index("total_clv") + 1  # beside the total
    assert page.get_by_text("treats customers as independent").count() == 3


def test_model_card_shows_the_artifact_and_its_evaluation(page, served):
    """Version, training window and the clustering scores from the artifact's metadata, and the
    evaluation kept beside it: its metrics per model and its plots."""
    show(page, "Model")
    meta = json.loads((shipped_model_dir() / "metadata.json").read_text())
    facts = {r["fact"]: r["value"] for r in table(page, "fact")}
    run = {r["setting"]: r["value"] for r in table(page, "setting")}
    assert run["training data (sha256)"] == meta["training_data_sha256"]
    assert run["seed"] == str(meta["train_config"]["seed"])
    assert facts["version"] == meta["version"]
    assert facts["training window"] == f"{meta['first_event'][:10]} to {meta['cutoff'][:10]}"
    methods = {r["method"]: r for r in table(page, "davies_bouldin")}
    assert set(methods) == {"kmeans", "gmm", "ward"}
    assert methods[meta["clustering"]["method"]]["chosen"] == "yes"
    assert all(int(r["k"]) == meta["clustering"]["methods"][m]["k"] for m, r in methods.items())
    models = {r["model"]: r for r in table(page, "norm_gini")}
    assert set(models) == {"gru", "naive"} and models["naive"]["auc"] == "n/a"
    # the interval's fit beside the point metrics: P(purchase) 0.4 expects 10% above, nobody spends below $0
    assert (models["gru"]["expected_above"], models["gru"]["below_low"]) == ("0.100", "0.000")
    assert 0 < float(models["gru"]["above_positive_high"]) < 1 and models["naive"]["above_high"] == "n/a"
    assert page.get_by_text("above_positive_high: the share above among customers whose clv_high").count() == 1
    images = page.locator('[data-testid="stImage"] img')
    assert images.count() == 2 and all(images.nth(i).evaluate("i => i.naturalWidth") > 100 for i in range(2))


def test_a_new_snapshot_shows_without_reloading(page, served, tmp_path):
    """The sink publishes a snapshot without 500 of the customers: the page follows within
    seconds, and again when the original comes back."""
    path, _, _ = served
    show(page, "Overview")
    original = tmp_path / "original.duckdb"
    shutil.copy(path, original)
    gone = [c for (c,) in query(path, "SELECT customer_id FROM customer_scores ORDER BY customer_id LIMIT 500")]
    sink = snapshot.Snapshots(path, "clv-scores")
    try:
        sink.open()
        for cid in gone:
            sink.put(cid, None)  # tombstones, as a deleted customer reaches the sink
        assert sink.publish() == 2500
    finally:
        sink.close()
    wait_for_customers(page, "2,500")
    shutil.copy(original, tmp_path / "back.duckdb")
    os.replace(tmp_path / "back.duckdb", path)  # swapped in whole, as the sink does
    wait_for_customers(page, "3,000")


def wait_for_customers(page, shown: str) -> None:
    deadline = time.monotonic() + 30
    while metrics(page).get("Customers") != shown:
        assert time.monotonic() < deadline, metrics(page)
        page.wait_for_timeout(250)


def test_screenshot_command_writes_the_whole_page(served, tmp_path):
    path, _, _ = served
    out = tmp_path / "dashboard.png"
    res = subprocess.run([*CLV, "dashboard", "--snapshot", str(path), "--screenshot", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    png = out.read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width == 1400 and height > 1200  # the Overview, whole
    res = subprocess.run([*CLV, "dashboard", "--port", "0x50"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("clv: error:") and len(res.stderr.splitlines()) == 1
