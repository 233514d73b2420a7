"""`clv api`: the analyst HTTP API, served from the DuckDB snapshot (never the live worker).

Bearer-token auth is optional on loopback and required on any other bind address. Queries run in
a thread so a slow one does not stall other requests.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from features.segments import SEGMENTS
from state.queries import QueryError, Snapshot
from state.snapshot import TIERS
from stream.settings import Settings, SettingsError

log = logging.getLogger("clv.api")
OPEN_PATHS = {"/health", "/openapi.json"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _segment_param() -> dict[str, Any]:
    return {"name": "segment", "in": "query", "required": False,
            "schema": {"type": "string", "enum": [*SEGMENTS, *TIERS]},
            "description": "a named segment or a value tier"}


def openapi() -> dict[str, Any]:
    rows = {"type": "array", "items": {"type": "object"}}

    def op(summary: str, params: list[dict[str, Any]] | None = None,
           content: str = "application/json", schema: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"get": {"summary": summary, "parameters": params or [], "responses": {
            "200": {"description": "OK", "content": {content: {"schema": schema or {"type": "object"}}}},
            "400": {"description": "bad parameter or refused query"},
            "401": {"description": "missing or wrong bearer token"},
            "503": {"description": "no snapshot yet"}}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "CLV snapshot API", "version": "1",
                 "description": "Customer lifetime value scores, segments and exports from the "
                                "newest DuckDB snapshot."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/top": op("Customers with the highest expected CLV (expected spend over the horizon)", [
                {"name": "n", "in": "query", "schema": {"type": "integer", "default": 20,
                                                        "minimum": 1, "maximum": 10000}},
                _segment_param()], schema=rows),
            "/segments": op("Per segment: customers, total and mean expected CLV, share of the "
                            "total, and its playbook (who, what to do)", schema=rows),
            "/tiers": op("Per value tier (terciles of expected CLV): customers, CLV range, totals "
                         "and shares", schema=rows),
            "/customers/{customer_id}": op("One customer's newest score and RFM fields", [
                {"name": "customer_id", "in": "path", "required": True, "schema": {"type": "string"}}]),
            "/summary": op("Snapshot metadata and totals"),
            "/export.csv": op("Every customer (or one segment) as CSV", [_segment_param()],
                              content="text/csv", schema={"type": "string"}),
            "/sql": op("Read-only SQL over the snapshot (writes and file access refused)", [
                {"name": "q", "in": "query", "required": True, "schema": {"type": "string"}}]),
            "/health": op("Liveness"),
        },
    }


def build(settings: Settings) -> web.Application:
    if settings.api_token == "" and not _is_loopback(settings.api_host):
        raise SettingsError(f"api_host {settings.api_host!r} is not loopback: set CLV_API_TOKEN")
    snap = Snapshot(settings.snapshot_path)
    token = settings.api_token.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, token):
                return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except QueryError as exc:
            status = 503 if "no snapshot" in str(exc) else 400
            return web.json_response({"error": str(exc)}, status=status)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def int_param(request: web.Request, name: str, default: int, high: int) -> int:
        text = request.query.get(name, str(default))
        try:
            value = int(text)
        except ValueError:
            raise QueryError(f"{name} must be a whole number, got {text!r}") from None
        if not 1 <= value <= high:
            raise QueryError(f"{name} must be between 1 and {high}, got {value}")
        return value

    async def top(request: web.Request) -> web.Response:
        n = int_param(request, "n", 20, 10_000)
        return web.json_response(await run(snap.top, n, request.query.get("segment")))

    async def segments(request: web.Request) -> web.Response:
        return web.json_response(await run(snap.segments))

    async def tiers(request: web.Request) -> web.Response:
        return web.json_response(await run(snap.tiers))

    async def customer(request: web.Request) -> web.Response:
        cid = request.match_info["customer_id"]
        row = await run(snap.customer, cid)
        if row is None:
            return web.json_response({"error": f"customer {cid!r} is not in the snapshot"}, status=404)
        return web.json_response(row)

    async def summary(request: web.Request) -> web.Response:
        return web.json_response(await run(snap.summary))

    async def export_csv(request: web.Request) -> web.StreamResponse:
        chunks = await run(lambda: list(snap.csv_chunks(request.query.get("segment"))))
        resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                           "Content-Disposition": 'attachment; filename="clv.csv"'})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk.encode())
        await resp.write_eof()
        return resp

    async def sql(request: web.Request) -> web.Response:
        text = request.query.get("q") or (await request.text() if request.method == "POST" else "")
        if not text.strip():
            raise QueryError("q (the SQL text) is required")
        columns, rows = await run(snap.sql, text)
        return web.json_response({"columns": columns, "rows": rows})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "snapshot": str(snap.path),
                                  "snapshot_exists": snap.path.exists()})

    async def spec(request: web.Request) -> web.Response:
        return web.json_response(openapi())

    app = web.Application(middlewares=[guard])
    app.add_routes([
        web.get("/top", top), web.get("/segments", segments), web.get("/tiers", tiers),
        web.get("/customers/{customer_id}", customer), web.get("/summary", summary),
        web.get("/export.csv", export_csv), web.get("/sql", sql), web.post("/sql", sql),
        web.get("/health", health), web.get("/openapi.json", spec),
    ])
    return app


def serve(settings: Settings) -> int:
    app = build(settings)
    log.info("analyst API on http://%s:%d (snapshot %s, auth %s)", settings.api_host,
             settings.api_port, settings.snapshot_path, "bearer token" if settings.api_token else "off")
    web.run_app(app, host=settings.api_host, port=settings.api_port, print=None,
                access_log=None, handle_signals=True)
    return 0

