"""`clv api`: the analyst HTTP API, served from the DuckDB snapshot (never the live worker), and
`POST /score`, which scores an uploaded transaction file as `clv score` does.

Bearer-token auth is optional on loopback and required on any other bind address. The cheap
questions run on the default thread pool; SQL runs on a few threads of its own, each query
stopped at its deadline, when its client leaves and at shutdown, so heavy queries cannot starve
the rest. Every request is rate-limited per client and written to the audit log.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, TextIO, TypeVar

from aiohttp import web

from export_onnx.runtime import Artifact
from features.loaders import FORMATS, LoadError
from features.scores import CUSTOMER_FIELDS, FIELD_TYPES, MAX_INT, IsoTime, Offset
from features.segments import SEGMENTS
from state.snapshot.queries import (Interrupt, QueryError, QueryStopped, Selection, Snapshot,
                           SnapshotUnavailable)
from state.snapshot.tables import COLUMNS, TIERS
from state.snapshot.upload import DUPLICATES, OUTPUTS, PARAMS, TooLarge, receive, score_options
from state.auth import Handler, accepts, guard, require_token, token_id
from export_onnx.scoring import ScoredFile, score_file, write_csv

log = logging.getLogger("clv.api")
OPEN_PATHS = frozenset({"/health", "/openapi.json"})  # answered without a token
UNLIMITED_PATHS = frozenset({"/health"})  # liveness probes are never rate-limited
SHUTDOWN_GRACE_S = 5.0  # how long answers in progress (exports) may go on after SIGTERM
MAX_TOP = 10_000
T = TypeVar("T")
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class Busy(QueryError):
    """Every SQL thread is taken: answered at once rather than queued behind heavy queries."""


class TimedOut(QueryError):
    """A query ran past its deadline and was stopped."""


# Errors that are not the question's fault; any other QueryError is (400).
STATUS: dict[type[QueryError], int] = {TimedOut: 408, TooLarge: 413, Busy: 503, QueryStopped: 503,
                                       SnapshotUnavailable: 503}


class SqlPool:
    """At most `size` SQL queries at once, each on its own thread and stopped (DuckDB's interrupt)
    at its deadline, when its client leaves, or at shutdown."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size, self.timeout_s = size, timeout_s
        self.threads = ThreadPoolExecutor(size, thread_name_prefix="clv-sql")
        self.running: dict[asyncio.Future[Any], Interrupt] = {}
        self.stopping: set[asyncio.Task[None]] = set()

    async def run(self, query: Callable[[Interrupt], T]) -> T:
        if len(self.running) >= self.size:
            raise Busy(f"{self.size} SQL queries are running already (api_sql_concurrency); retry shortly")
        interrupt = Interrupt()
        job = asyncio.get_running_loop().run_in_executor(self.threads, query, interrupt)
        self.running[job] = interrupt
        job.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(job), self.timeout_s)
        except TimeoutError:
            await asyncio.shield(self._stop(job, interrupt))
            raise TimedOut(f"query stopped after {self.timeout_s:g} s (api_sql_timeout_s): "
                           "narrow it down, or aggregate") from None
        except asyncio.CancelledError:  # the client left
            self._stop(job, interrupt)
            raise

    def _finished(self, job: asyncio.Future[Any]) -> None:
        self.running.pop(job, None)
        if not job.cancelled():
            job.exception()  # retrieved here too: its request may be gone

    def _stop(self, job: asyncio.Future[Any], interrupt: Interrupt) -> asyncio.Task[None]:
        """Interrupts the query until its thread is free, in a task of its own, so a request
        cancelled meanwhile cannot leave it running."""
        stop = asyncio.ensure_future(self._interrupt_until_done(job, interrupt))
        self.stopping.add(stop)
        stop.add_done_callback(self.stopping.discard)
        return stop

    @staticmethod
    async def _interrupt_until_done(job: asyncio.Future[Any], interrupt: Interrupt) -> None:
        """An interrupt reaches only a query already executing, hence the repeats."""
        while not job.done():
            interrupt()
            await asyncio.wait([job], timeout=0.05)

    async def close(self, _app: web.Application | None = None) -> None:
        await asyncio.gather(*(self._stop(job, i) for job, i in list(self.running.items())))
        self.threads.shutdown(wait=False)


class RateLimit:
    """A token bucket per client: `per_min` requests at once, refilled evenly over a minute."""

    MAX_CLIENTS = 10_000  # above this, clients idle for a minute (whose buckets are full) are dropped

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (requests left, at)

    def wait(self, client: str, now: float) -> float:
        """0 when `client` may go ahead (and the request is counted), else seconds until it may."""
        left, at = self.buckets.get(client, (float(self.per_min), now))
        left = min(float(self.per_min), left + (now - at) * self.per_min / 60)
        if client not in self.buckets and len(self.buckets) >= self.MAX_CLIENTS:
            self.buckets = {c: b for c, b in self.buckets.items() if now - b[1] < 60}
        allowed = left >= 1
        self.buckets[client] = (left - 1 if allowed else left, now)
        return 0.0 if allowed else (1 - left) * 60 / self.per_min


class AuditLog:
    """One JSON line per request. The client is its peer address, or a short hash of its token:
    the log never holds a credential."""

    def __init__(self, target: str) -> None:
        if target == "-":
            self.out: TextIO = sys.stderr
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self.out = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the API's life

    def write(self, request: web.Request, status: int, started: float) -> None:
        self.out.write(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "client": request.get("client", request.remote), "method": request.method,
            "path": request.path, "status": status, "rows": request.get("rows", 0),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1)}) + "\n")

    async def close(self, _app: web.Application) -> None:
        if self.out is not sys.stderr:
            self.out.close()


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response({"error": message}, status=status, headers=headers)


def audited(audit: AuditLog) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started, status = time.perf_counter(), 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client left before its answer
            raise
        finally:
            audit.write(request, status, started)

    return middleware


def identified(token: str) -> Middleware:
    """Names the client for the rate limit and the audit log: the token when it is the API's,
    else the peer address (so guesses at the token are limited too)."""
    holder = token_id(token)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        valid = bool(token) and accepts(request.headers.get("Authorization", ""), token)
        request["client"] = holder if valid else request.remote or "unknown"
        return await handler(request)

    return middleware


def limited(limit: RateLimit) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        wait = 0.0 if request.path in UNLIMITED_PATHS else limit.wait(request["client"], time.monotonic())
        if wait:
            return web.json_response(
                {"error": f"more than {limit.per_min} requests a minute (api_rate_limit_per_min)"},
                status=429, headers={"Retry-After": str(math.ceil(wait))})
        return await handler(request)

    return middleware


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON `{"error": ...}`: refused queries and the router's own 404s and 405s."""
    try:
        return await handler(request)
    except QueryError as exc:
        return _error(next((s for kind, s in STATUS.items() if isinstance(exc, kind)), 400), str(exc))
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": exc.reason}, status=exc.status, headers=allow)


def checked_params(spec: dict[str, Any]) -> Middleware:
    """Refuses query parameters the description does not list: a misspelt `segmnet` would
    otherwise answer for every customer."""
    taken = {(method.upper(), path): sorted(p["name"] for p in op["parameters"] if p["in"] == "query")
             for path, ops in spec["paths"].items() for method, op in ops.items()}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        names = taken.get((request.method, resource.canonical if resource else ""))
        if names is not None and (unknown := sorted(set(request.query) - set(names))):
            raise QueryError(f"unknown parameter {', '.join(unknown)}; {request.path} takes "
                             f"{', '.join(names) or 'none'}")
        return await handler(request)

    return middleware


async def _settled(fn: Callable[..., T], *args: Any) -> T:
    """`fn` on the default thread pool, waited for even if the request is cancelled (its client
    left): what runs next may close the connection `fn` is still reading."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait([job])
        raise


def _int_param(request: web.Request, name: str, default: int, high: int, low: int = 1) -> int:
    text = request.query.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise QueryError(f"{name} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise QueryError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _selection(request: web.Request) -> Selection:
    """The customers `/top` and `/export.csv` cover, as `clv export`'s flags select them."""
    q = request.query
    min_clv = q.get("min_clv")
    try:
        low = float(min_clv) if min_clv is not None else None
    except ValueError:
        low = math.nan
    if low is not None and not math.isfinite(low):
        raise QueryError(f"min_clv must be a number, got {min_clv!r}")
    return Selection(segments=(q["segment"],) if "segment" in q else (),
                     clusters=(q["cluster"],) if "cluster" in q else (),
                     min_frequency=_int_param(request, "min_frequency", 0, MAX_INT, low=0),
                     min_clv=low, countries=(q["country"],) if "country" in q else ())


def _rows(request: web.Request, body: Any, rows: int) -> web.Response:
    request["rows"] = rows  # for the audit log
    return web.json_response(body)


class Handlers:
    """The API's answers, each over one snapshot connection of its own; `POST /score` with the
    model, one file at a time (scoring takes the CPU a file needs; the next one waits)."""

    def __init__(self, snap: Snapshot, sql_pool: SqlPool, max_rows: int, artifact: Artifact,
                 score_max_bytes: int) -> None:
        self.snap, self.sql_pool, self.max_rows = snap, sql_pool, max_rows
        self.artifact, self.score_max_bytes = artifact, score_max_bytes
        self.scoring = asyncio.Lock()

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/top", self.top), web.get("/segments", self.segments),
                web.get("/tiers", self.tiers), web.get("/clusters", self.clusters),
                web.get("/customers/{customer_id}", self.customer),
                web.get("/summary", self.summary), web.get("/export.csv", self.export_csv),
                web.get("/sql", self.sql), web.post("/sql", self.sql), web.post("/score", self.score),
                web.get("/health", self.health), web.get("/openapi.json", self.spec)]

    async def top(self, request: web.Request) -> web.Response:
        n = _int_param(request, "n", 20, MAX_TOP)
        rows = await asyncio.to_thread(self.snap.top, n, _selection(request))
        return _rows(request, rows, len(rows))

    async def segments(self, request: web.Request) -> web.Response:
        rows = await asyncio.to_thread(self.snap.segments)
        return _rows(request, rows, len(rows))

    async def tiers(self, request: web.Request) -> web.Response:
        rows = await asyncio.to_thread(self.snap.tiers)
        return _rows(request, rows, len(rows))

    async def clusters(self, request: web.Request) -> web.Response:
        rows = await asyncio.to_thread(self.snap.clusters)
        return _rows(request, rows, len(rows))

    async def customer(self, request: web.Request) -> web.Response:
        cid = request.match_info["customer_id"]
        row = await asyncio.to_thread(self.snap.customer, cid)
        if row is None:
            return _error(404, f"customer {cid!r} is not in the snapshot")
        return _rows(request, row, 1)

    async def summary(self, request: web.Request) -> web.Response:
        return _rows(request, await asyncio.to_thread(self.snap.summary), 1)

    async def export_csv(self, request: web.Request) -> web.StreamResponse:
        """Streamed a chunk at a time; the first chunk is read before the 200 is sent, so an
        unknown segment or a missing snapshot still gets its error status."""
        chunks = self.snap.csv_chunks(_selection(request))
        request["rows"] = 0
        try:
            chunk = await _settled(next, chunks, None)
            resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                               "Content-Disposition": 'attachment; filename="clv.csv"'})
            await resp.prepare(request)
            while chunk is not None:
                text, rows = chunk
                await resp.write(text.encode())
                request["rows"] += rows
                chunk = await _settled(next, chunks, None)
        finally:
            await _settled(chunks.close)
        await resp.write_eof()  # last: a client that has it all may hang up at once
        return resp

    async def sql(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            text = (await request.read()).decode("utf-8", "replace")
        else:
            text = request.query.get("q", "")
        if not text.strip():
            raise QueryError("the SQL text is required: in q, or as the body of a POST")
        answer = await self.sql_pool.run(partial(self.snap.sql, text, self.max_rows))
        return _rows(request, answer._asdict(), len(answer.rows))

    async def score(self, request: web.Request) -> web.Response:
        """Scores an uploaded file as `clv score` would; a file it cannot read is answered 400
        with the reason the CLI prints, naming the file as uploaded."""
        opts, as_of, out = score_options(request.query)
        with tempfile.TemporaryDirectory(prefix="clv-upload-") as tmp:
            path = await receive(request, self.score_max_bytes, Path(tmp))
            try:
                async with self.scoring:
                    scored = await _settled(partial(score_file, self.artifact, path, as_of, **opts))
            except LoadError as exc:
                raise QueryError(str(exc).replace(f"{tmp}/", "")) from None
        request["rows"] = len(scored.scores)
        if out == "csv":
            text = io.StringIO()
            write_csv(scored.scores, text)
            return web.Response(text=text.getvalue(), content_type="text/csv", headers={
                "X-Model-Version": self.artifact.version, "X-As-Of": scored.as_of.isoformat(),
                "X-Cleaning-Report": json.dumps(scored.report.as_dict(), separators=(",", ":")),
                **({"X-Drift-Warning": warning} if (warning := _drift_warning(scored)) else {})})
        return web.json_response(self._scored(scored))

    def _scored(self, scored: ScoredFile) -> dict[str, Any]:
        return {"model_version": self.artifact.version, "horizon_months": self.artifact.horizon_months,
                "as_of": scored.as_of.isoformat(), "customers": len(scored.scores),
                "cleaning": scored.report.as_dict(), "drift_warning": _drift_warning(scored),
                "scores": [{f: getattr(s, f) for f in CUSTOMER_FIELDS} for s in scored.scores]}

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "snapshot": str(self.snap.path),
                                  "snapshot_exists": self.snap.path.exists()})

    async def spec(self, request: web.Request) -> web.Response:
        return web.json_response(openapi())


def _drift_warning(scored: ScoredFile) -> str | None:
    """The line `clv score` warns with when the file's customers are unlike the model's training
    cohort (features.population), or None."""
    return scored.drift.sentence() if scored.drift else None


class ApiSettings(Protocol):
    """The settings the analyst API reads (`stream.settings.Settings` has them all)."""

    api_host: str
    api_port: int
    api_token: str
    api_sql_concurrency: int
    api_sql_timeout_s: float
    api_sql_max_rows: int
    api_audit_log: str
    api_rate_limit_per_min: int
    api_score_max_bytes: int
    snapshot_path: str
    model_dir: str


def build(settings: ApiSettings) -> web.Application:
    require_token(settings.api_host, settings.api_token, "api_host")
    sql_pool = SqlPool(settings.api_sql_concurrency, settings.api_sql_timeout_s)
    audit = AuditLog(settings.api_audit_log)
    middlewares: list[Any] = [audited(audit), identified(settings.api_token)]  # in order
    if settings.api_rate_limit_per_min:
        middlewares.append(limited(RateLimit(settings.api_rate_limit_per_min)))
    if settings.api_token:
        middlewares.append(guard(settings.api_token, OPEN_PATHS))
    middlewares += [answer_errors, checked_params(openapi())]
    app = web.Application(middlewares=middlewares)
    handlers = Handlers(Snapshot(settings.snapshot_path), sql_pool, settings.api_sql_max_rows,
                        Artifact.load(settings.model_dir or None), settings.api_score_max_bytes)
    app.add_routes(handlers.routes())
    app.on_shutdown.append(sql_pool.close)  # before the grace period: running queries end now
    app.on_cleanup.append(audit.close)
    return app


def serve(settings: ApiSettings) -> int:
    app = build(settings)
    log.info("analyst API on http://%s:%d (snapshot %s, model %s, auth %s, SQL: %d at once, %g s, "
             "%d rows; %s requests/min per client; audit log %s)", settings.api_host,
             settings.api_port, settings.snapshot_path, settings.model_dir or "shipped",
             "bearer token" if settings.api_token else "off",
             settings.api_sql_concurrency, settings.api_sql_timeout_s, settings.api_sql_max_rows,
             settings.api_rate_limit_per_min or "unlimited",
             "stderr" if settings.api_audit_log == "-" else settings.api_audit_log)
    web.run_app(app, host=settings.api_host, port=settings.api_port, print=None, access_log=None,
                handle_signals=True, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S)
    return 0


# The OpenAPI description: every path, method, parameter and status the API answers.

_JSON_TYPES: dict[Any, dict[str, str]] = {
    int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
    IsoTime: {"type": "string", "format": "date-time"}, Offset: {"type": "integer"}}
_TEXT = {"type": "string"}
_SQL_EXAMPLE = "SELECT value_tier, count(*) AS customers, sum(clv) AS total_clv FROM customer_scores GROUP BY 1"


def _customer_schema(drivers: bool = False) -> dict[str, Any]:
    """A `customer_scores` row: the score contract's fields, then its tier and source; with
    `drivers`, the drivers of its score (`Snapshot.customer`)."""
    props: dict[str, Any] = {name: _JSON_TYPES[FIELD_TYPES[name]] for name in COLUMNS}
    props.update(value_tier={"type": "string", "enum": list(TIERS)},
                 source_partition={"type": "integer"}, source_offset={"type": "integer"})
    if drivers:
        number = {"type": "number"}
        props["drivers"] = {**_object(
            reference_clv=number, clv=number,
            drivers={"type": "array", "items": _object(group=_TEXT, contribution=number, meaning=_TEXT)}),
            "nullable": True, "description": (
                "why the score is what it is: reference_clv, the score of the model's average "
                "customer (every input the mean of its training cohort's), plus each group's "
                "contribution in dollars (exact Shapley values, largest first) makes clv. The "
                "snapshot carries them for its snapshot_drivers_top customers of the highest clv; "
                "null for the others (the worker's /customers/{id} and `clv score --explain` "
                "explain anyone)")}
    return {"type": "object", "required": list(props), "properties": props}


def _object(**props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(props), "properties": props}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": schema}


def _error_response(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": _ref("schemas", "Error")}}}
    if headers:
        out["headers"] = {name.replace("_", "-"): spec for name, spec in headers.items()}
    return out


_RETRY = _header("seconds to wait before trying again", {"type": "integer", "minimum": 1})
_ERRORS = {
    "400": _error_response("a bad parameter (n, segment), a parameter the path does not take, "
                           "missing or blank SQL, or SQL that DuckDB refuses (writes, file access, "
                           "settings, syntax)"),
    "401": _error_response("a missing or wrong token, or one not sent as `Authorization: Bearer <token>`",
                           WWW_Authenticate=_header("the scheme to use: Bearer", _TEXT)),
    "404": _error_response("no customer with this id in the snapshot"),
    "408": _error_response("the query ran longer than api_sql_timeout_s and was stopped"),
    "413": _error_response("the SQL text is longer than 1 MiB, or the uploaded file larger than "
                           "api_score_max_bytes"),
    "429": _error_response("over api_rate_limit_per_min requests this minute for this client",
                           Retry_After=_RETRY),
    "503": _error_response("no snapshot yet (or it cannot be opened), api_sql_concurrency queries "
                           "running already, or the API is stopping", Retry_After=_RETRY),
}


def _op(summary: str, ok: dict[str, Any], errors: str, params: list[dict[str, Any]] | None = None,
        content: str = "application/json", **extra: Any) -> dict[str, Any]:
    """An operation answering 200, 400 (any path refuses parameters it does not take) and `errors`."""
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {content: {"schema": ok}}}}
    responses.update({code: _ref("responses", code) for code in ["400", *errors.split()]})
    return {"summary": summary, "parameters": params or [], "responses": responses, **extra}


def _selection_params() -> list[dict[str, Any]]:
    """`clv export`'s filters: every one given must hold."""
    return [{"name": "segment", "in": "query", "required": False,
             "schema": {"type": "string", "enum": [*SEGMENTS, *TIERS]},
             "description": "a named segment or a value tier; another value is answered 400"},
            {"name": "cluster", "in": "query", "required": False, "schema": _TEXT,
             "description": "a behavioral cluster (`/clusters` lists them)"},
            {"name": "country", "in": "query", "required": False, "schema": _TEXT,
             "description": "a country, as the transactions name it; a customer whose country "
                            "is unknown (as on CDNOW) has an empty one"},
            {"name": "min_frequency", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT, "default": 0},
             "description": "only customers with at least this many purchases"},
            {"name": "min_clv", "in": "query", "required": False, "schema": {"type": "number"},
             "description": "only customers with at least this expected CLV"}]


def _score_params() -> list[dict[str, Any]]:
    enums = {"format": list(FORMATS), "duplicates": list(DUPLICATES), "out": list(OUTPUTS)}
    kinds = {"outlier_quantity": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
             "as_of": {"type": "string", "format": "date"}}
    return [{"name": name, "in": "query", "required": False, "description": doc,
             "schema": {"type": "string", "enum": enums[name]} if name in enums
             else kinds.get(name, _TEXT)} for name, doc in PARAMS.items()]


def _score_op() -> dict[str, Any]:
    """POST /score: the file as a multipart form's `file`, or as the raw body."""
    score = {name: _JSON_TYPES[FIELD_TYPES[name]] for name in CUSTOMER_FIELDS}
    answer = _object(model_version=_TEXT, horizon_months={"type": "integer"},
                     as_of={"type": "string", "format": "date-time"}, customers={"type": "integer"},
                     cleaning={"type": "object"},
                     drift_warning={"type": "string", "nullable": True, "description": (
                         "the line `clv score` warns with when the file's customers are unlike "
                         "the model's training cohort (PSI per input past 0.25), else null")},
                     scores={"type": "array", "items": _object(**score)})
    op = _op("Score an uploaded transaction file (any layout `clv inspect` knows) as `clv score` "
             "does: every customer's score as of the newest event (or as_of), with the cleaning "
             "report and the drift warning `clv score` prints, if any. JSON, or with out=csv the CSV "
             "`clv score` writes (the report in the X-Cleaning-Report header). A file that cannot be "
             "read is answered 400 with the reason `clv score` prints; one over api_score_max_bytes 413",
             answer, "401 413 429", _score_params(),
             requestBody={"required": True, "content": {
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary"}}}},
                 "text/csv": {"schema": _TEXT},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})
    op["responses"]["200"]["content"]["text/csv"] = {"schema": _TEXT}
    op["responses"]["200"]["headers"] = {
        "X-Model-Version": _header("the model that scored the file (out=csv)", _TEXT),
        "X-As-Of": _header("the time scores are as of (out=csv)", _TEXT),
        "X-Cleaning-Report": _header("the cleaning report as one line of JSON (out=csv)", _TEXT),
        "X-Drift-Warning": _header("present when the file's customers are unlike the model's "
                                   "training cohort: the line `clv score` warns with (out=csv)", _TEXT)}
    return op


def openapi() -> dict[str, Any]:
    rows = {"type": "array", "items": {"type": "object"}}
    read = "401 429 503"
    sql_summary = ("Read-only SQL over the snapshot (writes, file access and settings refused); "
                   "stopped after api_sql_timeout_s, at most api_sql_max_rows rows")
    return {
        "openapi": "3.0.3",
        "info": {"title": "CLV snapshot API", "version": "3",
                 "description": "Customer lifetime value scores, segments and exports from the "
                                "newest DuckDB snapshot. Every error is JSON {\"error\": ...}."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _object(error=_TEXT),
                "Customer": _customer_schema(),
                "CustomerWithDrivers": _customer_schema(drivers=True),
                "SqlAnswer": _object(columns={"type": "array", "items": _TEXT},
                                     rows={"type": "array", "items": {"type": "array", "items": {}}},
                                     truncated={"type": "boolean"}),
            },
            "responses": _ERRORS,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/top": {"get": _op("Customers with the highest expected CLV (expected spend over the horizon)",
                                {"type": "array", "items": _ref("schemas", "Customer")}, read, [
                {"name": "n", "in": "query", "required": False,
                 "schema": {"type": "integer", "default": 20, "minimum": 1, "maximum": MAX_TOP}},
                *_selection_params()])},
            "/segments": {"get": _op("Per segment: customers, total and mean expected CLV, share of "
                                     "the total, and its playbook (who, signals, what to do, what "
                                     "to measure)", rows, read)},
            "/clusters": {"get": _op("Per behavioral cluster (named by its profile): customers, "
                                     "total, mean and share of expected CLV, mean p_purchase, "
                                     "recency, frequency, order value and tenure, and its most "
                                     "common segment", rows, read)},
            "/tiers": {"get": _op("Per value tier (terciles of expected CLV): customers, CLV range, "
                                  "totals and shares", rows, read)},
            "/customers/{customer_id}": {"get": _op(
                "One customer's newest score, RFM fields and, for the top customers, the "
                "drivers of its score", _ref("schemas", "CustomerWithDrivers"), "401 404 429 503",
                [{"name": "customer_id", "in": "path", "required": True, "schema": _TEXT}])},
            "/summary": {"get": _op("Snapshot metadata and totals", {"type": "object"}, read)},
            "/export.csv": {"get": _op("Every customer (or one segment or tier) as CSV, streamed",
                                       _TEXT, read, _selection_params(), content="text/csv")},
            "/sql": {
                "get": _op(sql_summary, _ref("schemas", "SqlAnswer"), "401 408 429 503", [
                    {"name": "q", "in": "query", "required": True, "example": _SQL_EXAMPLE,
                     "schema": {"type": "string", "minLength": 1},
                     "description": "the SQL text; missing or blank is answered 400"}]),
                "post": _op(sql_summary + "; the SQL text is the body (blank is answered 400)",
                            _ref("schemas", "SqlAnswer"), "401 408 413 429 503",
                            requestBody={"required": True, "content": {"text/plain": {
                                "schema": {"type": "string", "minLength": 1}, "example": _SQL_EXAMPLE}}}),
            },
            "/score": {"post": _score_op()},
            "/health": {"get": _op("Liveness: never needs a token, never rate-limited",
                                   _object(status=_TEXT, snapshot=_TEXT, snapshot_exists={"type": "boolean"}),
                                   "", security=[])},
            "/openapi.json": {"get": _op("This description", {"type": "object"}, "429", security=[])},
        },
    }
