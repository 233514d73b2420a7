"""The analyst API under bad input: strict bearer tokens, SQL stopped at its deadline while the
cheap endpoints keep answering, a per-client rate limit, an audit line per request, a streamed
export, SIGTERM, uploaded files scored as `clv score` scores them (and refused with its reasons),
and the OpenAPI description fuzzed against the running API. Real snapshot files
(written as the sink writes them, no broker), `clv api` processes, HTTP over loopback."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, ignored_auth, negative_data_rejection,
                                 not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

from features.loaders import vendored_cdnow
from features.scores import CUSTOMER_FIELDS, FIELD_TYPES, parse_score
from features.segments import SEGMENTS
from harness import CLV, Api
from score_messages import GOOD
from state.snapshot import tables as snapshot
from state.snapshot.api import openapi
from state.snapshot.queries import Selection, Snapshot

TOKEN = "s3cret-token"
CUSTOMERS = 5_000
TIMEOUT_S = 2.0
SLOW = "/sql?q=" + urllib.parse.quote("SELECT sum(hash(range)) FROM range(100000000000)")
AUDIT_FIELDS = {"time", "client", "method", "path", "status", "rows", "duration_ms"}


def write_snapshot(path: Path, customers: int) -> Path:
    """A snapshot as the sink writes it, of `customers` customers in every segment, a third of
    them of unknown country."""
    base = parse_score(json.dumps(GOOD))
    store = snapshot.Snapshots(path, "clv-scores")
    try:
        store.open()
        for i in range(customers):
            score = replace(base, customer_id=f"c{i:06d}", clv=(i * 7919 % 1000) / 4,
                            segment=SEGMENTS[i % len(SEGMENTS)],
                            country=("United Kingdom", "France", "")[i % 3])
            store.put(score.customer_id, snapshot.row(score, 0, i))
        store.offsets = {0: customers}
        assert store.publish() == customers
    finally:
        store.close()
    return path


@pytest.fixture(scope="module")
def snapshot_path(tmp_path_factory) -> Path:
    return write_snapshot(tmp_path_factory.mktemp("api") / "clv.duckdb", CUSTOMERS)


def api_env(snapshot_path: Path) -> dict[str, str]:
    return {**os.environ, "CLV_SNAPSHOT_PATH": str(snapshot_path),
            "CLV_API_SQL_TIMEOUT_S": str(TIMEOUT_S), "CLV_API_RATE_LIMIT_PER_MIN": "0"}


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def api(snapshot_path, audit_path, tmp_path_factory):
    """One API for the tests that need no settings of their own: a token, SQL stopped after
    TIMEOUT_S, no rate limit, the audit log in a file."""
    server = Api(api_env(snapshot_path), tmp_path_factory.mktemp("api-log"), token=TOKEN,
                 CLV_API_AUDIT_LOG=str(audit_path))
    yield server
    assert server.proc.stop() == 0, server.proc.output()


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """(start, seconds, fn's result), by the monotonic clock."""
    start = time.monotonic()
    out = fn(*args)
    return start, time.monotonic() - start, out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(api: Api, seconds: float) -> float:
    before = cpu_seconds(api.proc.proc.pid)
    time.sleep(seconds)
    return cpu_seconds(api.proc.proc.pid) - before


@pytest.mark.parametrize("authorization, status", [
    (TOKEN, 401),  # a bare token
    (f"Bearer {TOKEN}", 200),
    (f"bearer {TOKEN}", 200),  # the scheme is case-insensitive (RFC 7235)
    (f"BEARER   {TOKEN}", 200),
    (f"Basic {TOKEN}", 401),
    ("Bearer wrong", 401),
    ("Bearer", 401),
    ("", 401),  # no header at all
])
def test_token_only_as_a_bearer_credential(api, authorization, status):
    got, headers, body = api.call("/top?n=1", authorization)
    assert got == status, body
    if status == 401:
        assert headers["WWW-Authenticate"] == "Bearer" and "Bearer <token>" in json.loads(body)["error"]
    assert api.call("/health", "")[0] == 200  # probes need no token


def test_a_parameter_the_path_does_not_take_is_refused(api):
    status, _, body = api.call("/top?segmnet=vip")  # not silently every segment
    assert status == 400 and json.loads(body)["error"] == (
        "unknown parameter segmnet; /top takes at_least, cluster, country, min_clv, min_frequency, "
        "min_probability, n, segment")
    assert api.call("/top?min_clv=nan")[0] == 400 and api.call("/top?min_frequency=-1")[0] == 400
    assert api.call("/segments?n=1")[0] == 400 and api.call("/health?verbose=1", "")[0] == 400
    assert api.call("/sql?q=SELECT%201", data=b"SELECT 1")[0] == 400  # a POST's SQL is its body


def test_a_snapshot_without_distributions_says_the_probability_is_not_known(api):
    """A snapshot written without a model holds no distribution: with at_least, every customer's
    p_at_least is null (an empty CSV field), and min_probability keeps nobody."""
    status, body = api.get("/customers/c000001?at_least=100")
    answer = json.loads(body)
    assert status == 200 and answer["at_least"] == 100 and answer["p_at_least"] is None
    status, body = api.get("/top?n=5&at_least=100")
    assert status == 200 and [r["p_at_least"] for r in json.loads(body)] == [None] * 5
    status, body = api.get("/top?at_least=100&min_probability=0")
    assert status == 200 and json.loads(body) == []
    status, body = api.get("/export.csv?segment=vip&at_least=100")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert status == 200 and rows and all(r["p_at_least_100"] == "" for r in rows)


def test_slow_sql_is_stopped_while_cheap_endpoints_answer(api):
    """Four endless queries at once: two run (api_sql_concurrency) and are stopped at the
    deadline with 408, two are refused at once with 503; /health, /top and /summary answer
    within a second meanwhile. Afterwards the process is idle: the queries were stopped, not
    abandoned on their threads."""
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(timed, api.call, SLOW) for _ in range(4)]
        time.sleep(0.3)
        cheap = [timed(api.call, path) for _ in range(3) for path in ("/health", "/top?n=50", "/summary")]
        ended = [f.result() for f in slow]
    statuses = sorted(status for *_, (status, _, _) in ended)
    assert statuses == [408, 408, 503, 503], [body for *_, (_, _, body) in ended]
    assert all(seconds < TIMEOUT_S + 1.5 for _, seconds, _ in ended)
    stopped_at = max(start + seconds for start, seconds, _ in ended)
    assert all(status == 200 for *_, (status, _, _) in cheap)
    assert max(seconds for _, seconds, _ in cheap) < 1.0, [seconds for _, seconds, _ in cheap]
    assert max(start + seconds for start, seconds, _ in cheap) < stopped_at  # while they ran
    for _, _, (status, headers, body) in ended:
        error = json.loads(body)["error"]
        assert ("api_sql_timeout_s" in error) if status == 408 else (
            "api_sql_concurrency" in error and headers["Retry-After"] == "1")
    assert cpu_over(api, 1.0) < 0.3
    assert api.call("/sql?q=SELECT%2042")[0] == 200  # the threads are free again


def test_a_client_that_leaves_stops_its_query(api, audit_path):
    with socket.create_connection(("127.0.0.1", api.port)) as conn:
        conn.sendall(f"GET {SLOW} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        time.sleep(0.5)
    time.sleep(0.3)
    assert cpu_over(api, 1.0) < 0.3
    last = json.loads(audit_path.read_text().splitlines()[-1])
    assert (last["path"], last["status"]) == ("/sql", 499) and last["duration_ms"] < 1000 * TIMEOUT_S


def test_long_sql_answers_are_cut_at_the_row_cap(snapshot_path, tmp_path):
    api = Api(api_env(snapshot_path), tmp_path, CLV_API_SQL_MAX_ROWS="100")
    try:
        status, _, body = api.call("/sql?q=" + urllib.parse.quote("SELECT * FROM range(1000000000000)"))
        answer = json.loads(body)
        assert status == 200 and len(answer["rows"]) == 100 and answer["truncated"] is True
        status, _, body = api.call("/sql", data=b"SELECT customer_id FROM customer_scores LIMIT 100")
        assert status == 200 and json.loads(body)["truncated"] is False
        assert api.call("/sql?q=%20")[0] == 400 and api.call("/sql", data=b"")[0] == 400
        status, _, body = api.call("/sql", data=b"--outlier-quantity")  # only a comment
        assert status == 400 and "no statement" in json.loads(body)["error"]
    finally:
        assert api.proc.stop() == 0


def test_sigterm_stops_the_api_while_queries_run(snapshot_path, tmp_path):
    api = Api({**api_env(snapshot_path), "CLV_API_SQL_TIMEOUT_S": "600"}, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(api.call, SLOW) for _ in range(2)]
        time.sleep(0.5)
        _, seconds, code = timed(api.proc.stop, signal.SIGTERM)
        answers = [f.result() for f in slow]
    assert code == 0 and seconds < 3.0, api.proc.output()
    assert [status for status, _, _ in answers] == [503, 503]
    assert all("stopped" in json.loads(body)["error"] for _, _, body in answers)


def test_the_eleventh_request_in_a_minute_over_a_limit_of_10_gets_429(snapshot_path, tmp_path):
    api = Api({**api_env(snapshot_path), "CLV_API_RATE_LIMIT_PER_MIN": "10"}, tmp_path, token=TOKEN)
    try:
        answers = [api.call("/top?n=1") for _ in range(11)]
        assert [status for status, _, _ in answers] == [200] * 10 + [429]
        _, headers, body = answers[-1]
        assert 1 <= int(headers["Retry-After"]) <= 60 and "api_rate_limit_per_min" in json.loads(body)["error"]
        assert api.call("/summary")[0] == 429  # the client, not the path, is limited
        assert api.call("/health")[0] == 200  # probes are not
        guesses = [api.call("/top?n=1", "Bearer guess")[0] for _ in range(11)]
        assert guesses == [401] * 10 + [429]  # without the token, the address is the client
    finally:
        assert api.proc.stop() == 0


def test_every_request_is_in_the_audit_log(api, audit_path, snapshot_path):
    vip = sum(1 for i in range(CUSTOMERS) if SEGMENTS[i % len(SEGMENTS)] == "vip")
    mine, address = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:8], "127.0.0.1"
    calls = [  # path, authorization (None: the token), then what the log must say
        ("/top?n=5", None, "GET", "/top", 200, 5, mine),
        ("/customers/c000001", None, "GET", "/customers/c000001", 200, 1, mine),
        ("/customers/nobody", None, "GET", "/customers/nobody", 404, 0, mine),
        ("/top?n=0", None, "GET", "/top", 400, 0, mine),
        ("/top", "Bearer wrong", "GET", "/top", 401, 0, address),
        ("/sql?q=" + urllib.parse.quote("SELECT 1 UNION ALL SELECT 2"), None, "GET", "/sql", 200, 2, mine),
        ("/export.csv?segment=vip", None, "GET", "/export.csv", 200, vip, mine),
        ("/health", "", "GET", "/health", 200, 0, address),
    ]
    seen = len(audit_path.read_text().splitlines())
    for path, authorization, *_ in calls:
        api.call(path, authorization)
    api.call("/sql", data=b"SELECT 7")
    deadline = time.monotonic() + 5
    while len(lines := audit_path.read_text().splitlines()[seen:]) < len(calls) + 1:
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    entries = [json.loads(line) for line in lines]
    assert all(set(e) == AUDIT_FIELDS for e in entries)
    # A streamed answer's line is written when its last chunk has gone: order aside.
    assert sorted((e["method"], e["path"], e["status"], e["rows"], e["client"]) for e in entries) == sorted(
        [call[2:] for call in calls] + [("POST", "/sql", 200, 1, mine)])
    assert all(e["duration_ms"] >= 0 and e["time"].endswith("+00:00") for e in entries)
    assert TOKEN not in audit_path.read_text()


def test_export_streams_the_rows_of_the_export_query(tmp_path):
    """Over 51,200 rows (25 DuckDB vectors, one chunk): the export is read and sent in chunks."""
    snap = Snapshot(write_snapshot(tmp_path / "big.duckdb", 60_000))
    assert [rows for _, rows in snap.csv_chunks()] == [51_200, 8_800]
    api = Api(api_env(snap.path), tmp_path)
    try:
        for query, sel in (("", Selection()), ("?segment=vip", Selection(("vip",))),
                           ("?segment=high", Selection(("high",))),
                           ("?segment=regular&cluster=recent_frequent&min_frequency=34&min_clv=100",
                            Selection(("regular",), ("recent_frequent",), 34, 100.0)),
                           ("?cluster=nobody", Selection((), ("nobody",))),
                           ("?country=France&segment=vip", Selection(("vip",), countries=("France",)))):
            status, headers, body = api.call("/export.csv" + query)
            assert status == 200 and headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
            assert body.decode() == snap.frame(sel).to_csv(index=False), query
        assert snap.frame(Selection(("regular",), ("recent_frequent",), 34, 100.0)).shape[0] > 1000
        france = snap.frame(Selection(countries=("France",)))
        assert len(france) == 20_000 and set(france["country"]) == {"France"}
        status, _, body = api.call("/export.csv?segment=nobody")
        assert status == 400 and "unknown segment" in json.loads(body)["error"]
    finally:
        assert api.proc.stop() == 0


SCHEMA = schemathesis.openapi.from_dict(openapi())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection,
          ignored_auth]


@SCHEMA.parametrize()
@settings(max_examples=50, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_the_api_answers_as_its_openapi_description_says(case, api):
    """Generated from the API's own description: no 500, and only the statuses, content types,
    headers and bodies it describes, for valid and invalid input, with and without the token."""
    case.call_and_validate(base_url=api.url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A form with one file part, as a browser or `curl -F file=@NAME` sends it."""
    boundary = "clv-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_score_upload_answers_what_clv_score_writes(api, cdnow_batch):
    """The vendored CDNOW file, uploaded as a form and as a raw body, is scored like `clv score`
    scores it: every customer field equal (numbers within 1e-5), with the cleaning report."""
    data = vendored_cdnow().read_bytes()
    status, headers, body = api.post("/score?out=csv", *multipart("CDNOW_master.txt.gz", data))
    assert status == 200 and headers["Content-Type"].startswith("text/csv"), body[:300]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert json.loads(headers["X-Cleaning-Report"])["rows_kept"] == 69_659
    status, _, body = api.post("/score", data, "application/octet-stream")
    answer = json.loads(body)
    assert status == 200 and answer["customers"] == len(rows) == len(cdnow_batch) == 23_570
    assert answer["cleaning"]["format"] == "cdnow" and answer["model_version"] == headers["X-Model-Version"]
    assert answer["drift_warning"] is None and "X-Drift-Warning" not in headers  # its training data
    for got in (rows, answer["scores"]):
        for row in got:
            want = cdnow_batch[row["customer_id"]]
            assert list(row) == list(CUSTOMER_FIELDS)
            for f in CUSTOMER_FIELDS:
                if FIELD_TYPES[f] is str:
                    assert str(row[f]) == want[f], (f, row, want)
                else:
                    assert abs(float(row[f]) - float(want[f])) <= 1e-5 * max(1.0, abs(float(want[f]))), (f, row)


def test_score_upload_of_another_business_says_it_is_unlike_the_models_training_cohort(api, tmp_path):
    """A retailer's file scored by the CDNOW model: scored, with the line `clv score` warns with."""
    from features.synthetic import generate, write

    data = write(generate(1500, 9000, seed=7)[0], tmp_path / "retail.csv").read_bytes()
    status, _, body = api.post("/score", *multipart("retail.csv", data))
    answer = json.loads(body)
    assert status == 200 and answer["customers"] > 0, body[:300]
    assert "order value PSI" in answer["drift_warning"] and "\n" not in answer["drift_warning"]
    status, headers, _ = api.post("/score?out=csv", *multipart("retail.csv", data))
    assert status == 200 and headers["X-Drift-Warning"] == answer["drift_warning"]


@pytest.mark.parametrize("name, data", [("empty.csv", b""), ("blank.csv", b" \n\n"),
                                        ("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50)])
def test_a_file_clv_score_refuses_is_answered_400_with_its_reason(api, tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    cli = subprocess.run([*CLV, "score", name, "--out", "x.csv"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith("clv: error: ")
    status, _, body = api.post("/score", *multipart(name, data))
    assert status == 400 and "clv: error: " + json.loads(body)["error"] + "\n" == cli.stderr


def test_an_upload_over_the_limit_is_answered_413(snapshot_path, tmp_path):
    api = Api(api_env(snapshot_path), tmp_path, CLV_API_SCORE_MAX_BYTES="100000")
    try:
        data = gzip.decompress(vendored_cdnow().read_bytes())[:200_000]
        for body, kind in ((data, "text/csv"), multipart("big.txt", data)):
            status, _, answer = api.post("/score", body, kind)
            assert status == 413 and "api_score_max_bytes" in json.loads(answer)["error"]
        status, _, answer = api.post("/score?out=csv", data[:90_000].rsplit(b"\n", 1)[0])
        assert status == 200 and answer.startswith(b"customer_id,clv,")  # under it: scored
    finally:
        assert api.proc.stop() == 0


def test_docs_page_draws_every_path_in_chromium(api):
    """`/docs` needs no token and no network beyond the API: Swagger UI, served by the API
    itself, draws every path of the description and its models."""
    pytest.importorskip("playwright")
    from state.snapshot import dashboard

    with dashboard.browser() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        failed: list[str] = []
        page.on("requestfailed", lambda req: failed.append(req.url))
        page.goto(f"{api.url}/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        shown = set(page.locator(".opblock-summary-path").all_inner_texts())
        assert {p.replace("\u200b", "") for p in shown} == set(openapi()["paths"])
        models = page.locator("section.models").inner_text()  # the answers' schemas
        assert all(name in models for name in openapi()["components"]["schemas"])
        assert "CLV snapshot API" in page.locator(".info .title").inner_text()
        assert errors == [] and failed == []
