"""`clv api`: the analyst HTTP API (FastAPI, served by uvicorn), answered from the DuckDB
snapshot (never the live worker), and `POST /score`, which scores an uploaded transaction file
as `clv score` does.

Routes are typed: their parameters are checked by FastAPI (a bad value, or a parameter the path
does not take, is answered 400) and the OpenAPI document at `/openapi.json` is generated from
them and from the answers' models (`state.snapshot.schemas`); `/docs` shows it to people (its
pages are served by the API itself, no CDN). Every error is JSON `{"error": ...}`.

Bearer-token auth is optional on loopback and required on any other bind address; every request
is rate-limited per client and written to the audit log (`state.snapshot.gate`). The cheap
questions run on the thread pool over one open snapshot (`Snapshot.reading`); SQL runs on a few
threads of its own, each query stopped at its deadline, when its client leaves and at shutdown,
so heavy queries cannot starve the rest. Exports stream a chunk at a time on a cursor of their
own, so they hold no other request.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from datetime import date
from functools import partial
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Literal, Protocol, TypeVar, get_origin

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from export_onnx.runtime import Artifact
from export_onnx.scoring import score_file, write_csv
from features.loaders import FORMATS, LoadError
from features.scores import CUSTOMER_FIELDS, MAX_INT
from features.segments import SEGMENTS
from state.auth import require_token
from state.snapshot import schemas
from state.snapshot.gate import INFO, AuditLog, Gate, RateLimit
from state.snapshot.queries import Interrupt, QueryError, QueryStopped, Selection, Snapshot, SnapshotUnavailable
from state.snapshot.tables import TIERS
from state.snapshot.upload import DUPLICATES, OUTPUTS, PARAMS, TooLarge, receive, score_options

log = logging.getLogger("clv.api")
DOCS = "/docs"
STATIC = "/docs-static"  # the documentation page's script and styles
OPEN_PATHS = frozenset({"/health", "/openapi.json", DOCS, f"{DOCS}/oauth2-redirect"})  # no token
UNLIMITED_PATHS = frozenset({"/health"})  # liveness probes are never rate-limited
SHUTDOWN_GRACE_S = 5.0  # how long answers in progress (exports) may go on after SIGTERM
MAX_TOP = 10_000
MAX_SQL_BYTES = 1 << 20
T = TypeVar("T")


class Busy(QueryError):
    """Every SQL thread is taken: answered at once rather than queued behind heavy queries."""


class TimedOut(QueryError):
    """A query ran past its deadline and was stopped."""


class ClientLeft(Exception):
    """The client hung up before its answer: its query was stopped, nothing is sent."""


# Errors that are not the question's fault; any other QueryError is (400).
STATUS: dict[type[QueryError], int] = {
    TimedOut: 408,
    TooLarge: 413,
    Busy: 503,
    QueryStopped: 503,
    SnapshotUnavailable: 503,
}


class SqlPool:
    """At most `size` SQL queries at once, each on its own thread and stopped (DuckDB's interrupt)
    at its deadline, when its client leaves, or at shutdown."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size, self.timeout_s = size, timeout_s
        self.threads = ThreadPoolExecutor(size, thread_name_prefix="clv-sql")
        self.running: dict[asyncio.Future[Any], Interrupt] = {}
        self.stopping: set[asyncio.Task[None]] = set()
        self.closed = False

    async def run(self, query: Callable[[Interrupt], T], request: Request) -> T:
        if self.closed:
            raise QueryStopped("the API is stopping")
        if len(self.running) >= self.size:
            raise Busy(f"{self.size} SQL queries are running already (api_sql_concurrency); retry shortly")
        interrupt = Interrupt()
        job = asyncio.get_running_loop().run_in_executor(self.threads, query, interrupt)
        self.running[job] = interrupt
        job.add_done_callback(self._finished)
        left = asyncio.ensure_future(_disconnected(request))
        try:
            waiting: set[asyncio.Future[Any]] = {job, left}
            done, _ = await asyncio.wait(waiting, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if job in done:
                return job.result()
            await asyncio.shield(self._stop(job, interrupt))
            if left in done:
                raise ClientLeft()
            raise TimedOut(
                f"query stopped after {self.timeout_s:g} s (api_sql_timeout_s): narrow it down, or aggregate"
            )
        finally:
            left.cancel()

    def _finished(self, job: asyncio.Future[Any]) -> None:
        self.running.pop(job, None)
        if not job.cancelled():
            job.exception()  # retrieved here too: its request may be gone

    def _stop(self, job: asyncio.Future[Any], interrupt: Interrupt) -> asyncio.Task[None]:
        """Interrupts the query until its thread is free, in a task of its own."""
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

    async def close(self) -> None:
        """Stop every running query (their requests are answered 503) and the threads."""
        self.closed = True
        await asyncio.gather(*(self._stop(job, i) for job, i in list(self.running.items())))
        self.threads.shutdown(wait=False)


async def _disconnected(request: Request) -> None:
    """Returns when the client has hung up (its request's body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Service:
    """What the routes answer from: the snapshot, the SQL threads, the model for `POST /score`
    (one file at a time: scoring takes the CPU a file needs; the next one waits)."""

    def __init__(
        self, snap: Snapshot, sql_pool: SqlPool, max_rows: int, artifact: Artifact, score_max_bytes: int
    ) -> None:
        self.snap, self.sql_pool, self.max_rows = snap, sql_pool, max_rows
        self.artifact, self.score_max_bytes = artifact, score_max_bytes
        self.scoring = asyncio.Lock()


def _service(request: Request) -> Service:
    return request.app.state.service


def _answer(request: Request, body: Any, rows: int) -> JSONResponse:
    request.scope[INFO]["rows"] = rows  # for the audit log
    return JSONResponse(body)


def _errors(codes: str) -> dict[int | str, dict[str, Any]]:
    """The error answers an operation documents: 400 always (any path refuses parameters it does
    not take), then `codes`."""
    return {int(code): ERRORS[code] for code in ["400", *codes.split()]}


_RETRY = {
    "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer", "minimum": 1}}
}
ERRORS: dict[str, dict[str, Any]] = {
    "400": {
        "model": schemas.Error,
        "description": "a bad parameter (n, segment), a parameter the path "
        "does not take, missing or blank SQL, or SQL that DuckDB refuses (writes, file access, "
        "settings, syntax)",
    },
    "401": {
        "model": schemas.Error,
        "description": "a missing or wrong token, or one not sent as `Authorization: Bearer <token>`",
        "headers": {"WWW-Authenticate": {"description": "the scheme to use: Bearer", "schema": {"type": "string"}}},
    },
    "404": {"model": schemas.Error, "description": "no customer with this id in the snapshot"},
    "408": {"model": schemas.Error, "description": "the query ran longer than api_sql_timeout_s and was stopped"},
    "413": {
        "model": schemas.Error,
        "description": "the SQL text is longer than 1 MiB, or the uploaded file larger than api_score_max_bytes",
    },
    "429": {
        "model": schemas.Error,
        "description": "over api_rate_limit_per_min requests this minute for this client",
        "headers": _RETRY,
    },
    "503": {
        "model": schemas.Error,
        "description": "no snapshot yet (or it cannot be opened), "
        "api_sql_concurrency queries running already, or the API is stopping",
        "headers": _RETRY,
    },
}
READ = "401 429 503"

_TAKEN: dict[int, list[str]] = {}  # per route, the query parameters it takes
_REPEATABLE: dict[int, set[str]] = {}  # per route, those it takes more than once
AT_LEAST = (
    "a dollar amount T: adds each customer's probability of spending at least T over the horizon "
    "(`p_at_least`), from the predictive distribution the snapshot keeps; null where it holds none "
    "(not known)"
)


def known_parameters(request: Request) -> None:
    """A misspelt `segmnet` would otherwise answer for every customer: each path refuses the
    query parameters it does not take, and a parameter given twice (which one would count?)."""
    route = request.scope["route"]
    names = _TAKEN.get(id(route))
    if names is None:
        names = _TAKEN[id(route)] = sorted(_query_parameters(route.dependant))
    if unknown := sorted(set(request.query_params) - set(names)):
        raise QueryError(
            f"unknown parameter {', '.join(unknown)}; {request.url.path} takes {', '.join(names) or 'none'}"
        )
    repeatable = _REPEATABLE.setdefault(id(route), _repeatable(route.dependant))
    if repeated := sorted(
        {
            k
            for k, _ in request.query_params.multi_items()
            if len(request.query_params.getlist(k)) > 1 and k not in repeatable
        }
    ):
        raise QueryError(f"parameter {', '.join(repeated)} given more than once; each takes one value")


def _repeatable(dependant: Any) -> set[str]:
    """The query parameters a route takes as a list (`POST /score`'s `at_least`)."""
    return {p.alias for p in dependant.query_params if get_origin(p.field_info.annotation) is list}.union(
        *(_repeatable(d) for d in dependant.dependencies)
    )


def _query_parameters(dependant: Any) -> set[str]:
    """The query parameters a route's dependencies and handler read, by name."""
    return {p.alias for p in dependant.query_params}.union(*(_query_parameters(d) for d in dependant.dependencies))


router = APIRouter(dependencies=[Depends(known_parameters)])


def selection(
    segment: str | None = Query(
        None,
        json_schema_extra={"enum": [*SEGMENTS, *TIERS]},
        description="a named segment or a value tier; another value is answered 400",
    ),
    cluster: str | None = Query(None, description="a behavioral cluster (`/clusters` lists them)"),
    country: str | None = Query(
        None,
        description="a country, as the transactions name it; "
        "a customer whose country is unknown (as on CDNOW) has an empty one",
    ),
    min_frequency: int = Query(0, ge=0, le=MAX_INT, description="only customers with at least this many purchases"),
    min_clv: float | None = Query(
        None, allow_inf_nan=False, description="only customers with at least this expected CLV"
    ),
    at_least: float | None = Query(
        None, ge=0, allow_inf_nan=False, description=AT_LEAST + "; the CSV export's column is p_at_least_T"
    ),
    min_probability: float | None = Query(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="with at_least: only customers whose probability of spending at least at_least is at least "
        "this (a customer whose probability is not known is left out)",
    ),
) -> Selection:
    """The customers `/top` and `/export.csv` cover, as `clv export`'s flags select them: every
    filter given must hold."""
    return Selection(
        segments=(segment,) if segment is not None else (),
        clusters=(cluster,) if cluster is not None else (),
        min_frequency=min_frequency,
        min_clv=min_clv,
        countries=(country,) if country is not None else (),
        at_least=at_least,
        min_probability=min_probability,
    )


@router.get(
    "/top",
    response_model=list[schemas.RankedCustomer],
    responses=_errors(READ),
    summary="Customers with the highest expected CLV (expected spend over the horizon); with "
    "at_least, each one's probability of spending at least that, and min_probability keeps those likely to",
)
def top(request: Request, n: int = Query(20, ge=1, le=MAX_TOP), sel: Selection = Depends(selection)) -> Any:
    rows = _service(request).snap.top(n, sel)
    return _answer(request, rows, len(rows))


@router.get(
    "/segments",
    response_model=list[schemas.Segment],
    responses=_errors(READ),
    summary="Per segment: customers, total and mean expected CLV, share of the total, and "
    "its playbook (who, signals, what to do, what to measure)",
)
def segments(request: Request) -> Any:
    rows = _service(request).snap.segments()
    return _answer(request, rows, len(rows))


@router.get(
    "/clusters",
    response_model=list[schemas.Cluster],
    responses=_errors(READ),
    summary="Per behavioral cluster (named by its profile): customers, total, mean and "
    "share of expected CLV, mean p_purchase, recency, frequency, order value and "
    "tenure, and its most common segment",
)
def clusters(request: Request) -> Any:
    rows = _service(request).snap.clusters()
    return _answer(request, rows, len(rows))


@router.get(
    "/tiers",
    response_model=list[schemas.Tier],
    responses=_errors(READ),
    summary="Per value tier (terciles of expected CLV): customers, CLV range, totals and shares",
)
def tiers(request: Request) -> Any:
    rows = _service(request).snap.tiers()
    return _answer(request, rows, len(rows))


@router.get(
    "/countries",
    response_model=list[schemas.Country],
    responses=_errors(READ),
    summary="Per country: customers, expected value and its share, revenue so far",
)
def countries(request: Request) -> Any:
    rows = _service(request).snap.by_country()
    return _answer(request, rows, len(rows))


@router.get(
    "/insights",
    response_model=list[schemas.Insight],
    responses=_errors(READ),
    summary="Written insights over the snapshot, each a sentence with its number",
)
def insights(request: Request) -> Any:
    rows = _service(request).snap.insights()
    return _answer(request, rows, len(rows))


@router.get(
    "/customers/{customer_id}",
    response_model=schemas.CustomerWithDrivers,
    responses=_errors("401 404 429 503"),
    summary="One customer's newest score, RFM fields and, for the top customers, the drivers of its score",
)
async def customer(
    request: Request,
    customer_id: str = PathParam(),
    at_least: float | None = Query(None, ge=0, allow_inf_nan=False, description=AT_LEAST),
) -> Any:
    """Answered on the event loop when the snapshot's rows are in memory (no I/O, about 0.1 ms),
    else in a thread: a hop to the thread pool costs more than such a lookup."""
    snap = _service(request).snap
    row = snap.held_customer(customer_id) if at_least is None else False
    if row is False:
        row = await run_in_threadpool(snap.customer, customer_id, at_least)
    if row is None:
        return JSONResponse({"error": f"customer {customer_id!r} is not in the snapshot"}, status_code=404)
    return _answer(request, row, 1)


@router.get("/summary", response_model=schemas.Summary, responses=_errors(READ), summary="Snapshot metadata and totals")
def summary(request: Request) -> Any:
    return _answer(request, _service(request).snap.summary(), 1)


class CsvResponse(Response):
    media_type = "text/csv"


@router.get(
    "/export.csv",
    response_class=CsvResponse,
    responses=_errors(READ),
    summary="Every customer (or those the filters select) as CSV, best first, streamed",
)
async def export_csv(request: Request, sel: Selection = Depends(selection)) -> Response:
    """The first chunk is read before the 200 is sent, so an unknown segment or a missing
    snapshot still gets its error status; the rest follow as DuckDB reads them, on a cursor of
    the export's own."""
    chunks = _service(request).snap.csv_chunks(sel)
    try:
        first = await run_in_threadpool(next, chunks, None)
    except BaseException:
        await _closed(chunks)
        raise
    return StreamingResponse(
        _stream(request, chunks, first),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="clv.csv"'},
    )


async def _stream(
    request: Request, chunks: Iterator[tuple[str, int]], chunk: tuple[str, int] | None
) -> AsyncIterator[bytes]:
    info = request.scope[INFO]
    try:
        while chunk is not None:
            text, rows = chunk
            info["rows"] += rows
            yield text.encode()
            chunk = await run_in_threadpool(next, chunks, None)
    finally:
        await _closed(chunks)


async def _closed(chunks: Iterator[tuple[str, int]]) -> None:
    """The export's cursor let go, even when its client left mid-stream."""
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(chunks.close)  # type: ignore[attr-defined]


SQL_EXAMPLE = "SELECT value_tier, count(*) AS customers, sum(clv) AS total_clv FROM customer_scores GROUP BY 1"
SQL_SUMMARY = (
    "Read-only SQL over the snapshot (writes, file access and settings refused); "
    "stopped after api_sql_timeout_s, at most api_sql_max_rows rows"
)


@router.get("/sql", response_model=schemas.SqlAnswer, responses=_errors("401 408 429 503"), summary=SQL_SUMMARY)
async def sql_get(
    request: Request,
    q: str = Query(min_length=1, examples=[SQL_EXAMPLE], description="the SQL text; missing or blank is answered 400"),
) -> Any:
    return await _sql(request, q)


@router.post(
    "/sql",
    response_model=schemas.SqlAnswer,
    responses=_errors("401 408 413 429 503"),
    summary=SQL_SUMMARY + "; the SQL text is the body (blank is answered 400)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/plain": {"schema": {"type": "string", "minLength": 1}, "example": SQL_EXAMPLE}},
        }
    },
)
async def sql_post(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SQL_BYTES:
            raise TooLarge("the SQL text is longer than 1 MiB")
    return await _sql(request, body.decode("utf-8", "replace"))


async def _sql(request: Request, text: str) -> Any:
    if not text.strip():
        raise QueryError("the SQL text is required: in q, or as the body of a POST")
    service = _service(request)
    try:
        answer = await service.sql_pool.run(partial(service.snap.sql, text, service.max_rows), request)
    except ClientLeft:
        request.scope[INFO]["left"] = True
        return Response(status_code=204)  # sent to nobody
    return _answer(request, answer._asdict(), len(answer.rows))


def _score_doc() -> dict[str, Any]:
    """`POST /score`'s body (the file as a multipart form's `file`, or the raw body) and its
    CSV answer with the headers that carry the rest."""
    text = {"type": "string"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
                "text/csv": {"schema": text},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "content": {"text/csv": {"schema": text}},
                "headers": {
                    "X-Model-Version": {"description": "the model that scored the file (out=csv)", "schema": text},
                    "X-As-Of": {"description": "the time scores are as of (out=csv)", "schema": text},
                    "X-Cleaning-Report": {
                        "description": "the cleaning report as one line of JSON (out=csv)",
                        "schema": text,
                    },
                    "X-Drift-Warning": {
                        "description": "present when the file's customers are unlike "
                        "the model's training cohort: the line `clv score` warns "
                        "with (out=csv)",
                        "schema": text,
                    },
                },
            }
        },
    }


@router.post(
    "/score",
    response_model=schemas.Scored,
    responses=_errors("401 413 429"),
    openapi_extra=_score_doc(),
    summary="Score an uploaded transaction file (any layout `clv inspect` knows) as `clv score` "
    "does: every customer's score as of the newest event (or as_of), with the cleaning "
    "report and the drift warning `clv score` prints, if any. JSON, or with out=csv "
    "the CSV `clv score` writes (the report in the "
    "X-Cleaning-Report header). A file that cannot be read is answered 400 with the "
    "reason `clv score` prints; one over api_score_max_bytes 413",
)
async def score(
    request: Request,
    format: Literal[FORMATS] | None = Query(None, description=PARAMS["format"]),  # type: ignore[valid-type]
    map: str | None = Query(None, description=PARAMS["map"]),
    duplicates: Literal[DUPLICATES] | None = Query(None, description=PARAMS["duplicates"]),  # type: ignore[valid-type]
    outlier_quantity: int | None = Query(None, ge=0, le=999_999_999, description=PARAMS["outlier_quantity"]),
    timezone: str | None = Query(None, description=PARAMS["timezone"]),
    as_of: date | None = Query(None, description=PARAMS["as_of"]),
    out: Literal[OUTPUTS] | None = Query(None, description=PARAMS["out"]),  # type: ignore[valid-type]
    at_least: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Query(
        [],
        description="repeatable: a dollar amount T adds the column p_at_least_T, each customer's probability "
        "of spending at least T over the horizon (`clv score --at-least`)",
    ),
) -> Any:
    """Checked by `score_options` as `clv score` checks its flags (FastAPI has checked the types)."""
    service = _service(request)
    opts, day, answer_as = score_options(request.query_params)
    with tempfile.TemporaryDirectory(prefix="clv-upload-") as tmp:
        path = await receive(request, service.score_max_bytes, Path(tmp))
        try:
            async with service.scoring:
                scored = await run_in_threadpool(partial(score_file, service.artifact, path, day, at_least, **opts))
        except LoadError as exc:
            raise QueryError(str(exc).replace(f"{tmp}/", "")) from None
    request.scope[INFO]["rows"] = len(scored.scores)
    drift = scored.drift.sentence() if scored.drift else None  # what `clv score` warns with
    if answer_as == "csv":
        text = io.StringIO()
        write_csv(scored.scores, text, scored.at_least)
        return Response(
            text.getvalue(),
            media_type="text/csv",
            headers={
                "X-Model-Version": service.artifact.version,
                "X-As-Of": scored.as_of.isoformat(),
                "X-Cleaning-Report": json.dumps(scored.report.as_dict(), separators=(",", ":")),
                **({"X-Drift-Warning": drift} if drift else {}),
            },
        )
    return JSONResponse(
        {
            "model_version": service.artifact.version,
            "horizon_months": service.artifact.horizon_months,
            "as_of": scored.as_of.isoformat(),
            "customers": len(scored.scores),
            "cleaning": scored.report.as_dict(),
            "drift_warning": drift,
            "scores": [
                {**{f: getattr(s, f) for f in CUSTOMER_FIELDS}, **{c: p[i] for c, p in scored.at_least.items()}}
                for i, s in enumerate(scored.scores)
            ],
        }
    )


@router.get(
    "/health",
    response_model=schemas.Health,
    responses=_errors(""),
    openapi_extra={"security": []},
    summary="Liveness: never needs a token, never rate-limited",
)
def health(request: Request) -> Any:
    snap = _service(request).snap
    return JSONResponse({"status": "ok", "snapshot": str(snap.path), "snapshot_exists": snap.path.exists()})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's findings as one line: which parameter, what is wrong with it."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"][1:]) or "request"
        parts.append(
            f"{where}: {err['msg']}"
            + (f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], (dict, list)) else "")
        )
    return "; ".join(parts)


def app_for(service: Service | None, on_close: list[Callable[[], Any]] | None = None) -> FastAPI:
    """The FastAPI application over `service` (None: only its description, for `openapi`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for close in on_close or ():
            result = close()
            if asyncio.iscoroutine(result):
                await result

    app = FastAPIOffline(
        title="CLV snapshot API",
        version="4",
        lifespan=lifespan,
        redoc_url=None,
        static_url=STATIC,
        description="Customer lifetime value scores, segments, insights and exports from the newest "
        'DuckDB snapshot. Every error is JSON {"error": ...}.',
    )
    app.state.service = service
    app.include_router(router)
    app.add_exception_handler(QueryError, _query_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    return app


async def _query_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(next((s for kind, s in STATUS.items() if isinstance(exc, kind)), 400), str(exc))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    return _error(400, _validation_message(exc))  # type: ignore[arg-type]


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """The router's own 404s and 405s as JSON errors."""
    assert isinstance(exc, HTTPException)
    allow = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
    return _error(exc.status_code, str(exc.detail), allow)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with what this API does its own way: bad input is answered 400 (not
    FastAPI's 422), errors are JSON on every path (the CSV export's too), and a bearer token
    guards every path but the open ones."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for ops in doc["paths"].values():
        for op in ops.values():
            op["responses"].pop("422", None)
            for code, answer in op["responses"].items():  # errors are JSON, whatever the 200 is
                if code != "200" and "content" in answer:
                    answer["content"] = {"application/json": next(iter(answer["content"].values()))}
    schemas_ = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas_.pop(name, None)
    doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    doc["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc


def openapi() -> dict[str, Any]:
    """The API's OpenAPI document, without starting it."""
    return app_for(None).openapi()


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


class _Server(uvicorn.Server):
    """uvicorn's server, stopping running SQL queries as soon as SIGTERM or Ctrl-C arrives
    (uvicorn would otherwise wait for them to end before shutting down)."""

    def __init__(self, config: uvicorn.Config, sql_pool: SqlPool) -> None:
        super().__init__(config)
        self.sql_pool = sql_pool
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.sql_pool.close()))


def build(settings: ApiSettings) -> tuple[FastAPI, SqlPool]:
    """The application with its gate (rate limit, token, audit log), and its SQL pool."""
    require_token(settings.api_host, settings.api_token, "api_host")
    sql_pool = SqlPool(settings.api_sql_concurrency, settings.api_sql_timeout_s)
    audit = AuditLog(settings.api_audit_log)
    snap = Snapshot(settings.snapshot_path)
    service = Service(
        snap,
        sql_pool,
        settings.api_sql_max_rows,
        Artifact.load(settings.model_dir or None),
        settings.api_score_max_bytes,
    )
    app = app_for(service, on_close=[sql_pool.close, snap.close, audit.close])
    limit = RateLimit(settings.api_rate_limit_per_min) if settings.api_rate_limit_per_min else None
    app.add_middleware(
        Gate,
        token=settings.api_token,
        limit=limit,
        audit=audit,
        open_paths=OPEN_PATHS,
        open_prefixes=(STATIC + "/",),
        unlimited_paths=UNLIMITED_PATHS,
    )
    return app, sql_pool


def serve(settings: ApiSettings) -> int:
    """Serve until SIGTERM or Ctrl-C: running queries are stopped at once (503), answers in
    progress (exports) get SHUTDOWN_GRACE_S to finish; exit 0."""
    app, sql_pool = build(settings)
    log.info(
        "analyst API on http://%s:%d (snapshot %s, model %s, auth %s, SQL: %d at once, %g s, "
        "%d rows; %s requests/min per client; audit log %s; docs at %s)",
        settings.api_host,
        settings.api_port,
        settings.snapshot_path,
        settings.model_dir or "shipped",
        "bearer token" if settings.api_token else "off",
        settings.api_sql_concurrency,
        settings.api_sql_timeout_s,
        settings.api_sql_max_rows,
        settings.api_rate_limit_per_min or "unlimited",
        "stderr" if settings.api_audit_log == "-" else settings.api_audit_log,
        DOCS,
    )
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,  # type: ignore[arg-type]
        server_header=False,
    )
    # uvicorn raises the signal it stopped on again once it is done, with the handler it found:
    # these make that an ordinary exit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    with suppress(KeyboardInterrupt):
        _Server(config, sql_pool).run()
    return 0
