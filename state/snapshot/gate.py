"""What every request to the analyst API passes before and after its answer, as one ASGI
middleware: who the client is, its rate limit, its bearer token, and its line in the audit log.

The client is the token's holder when the request carries the API's token, else its peer
address (so guesses at the token are limited too). The limit is a moving window of
`per_min` requests a minute per client (`limits`); liveness probes are never limited, and the
API's description and its pages need no token. The audit log has one JSON line per request,
written when its answer has gone (a streamed export's when its last chunk has), with the
client, path, status, rows and duration; it never holds a credential.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping, TextIO

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from state.auth import accepts, token_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

INFO = "clv"  # the scope key handlers write their row count into (`scope[INFO]["rows"]`)
CLIENT_LEFT = 499  # the status logged for a client that left before its answer


class AuditLog:
    """One JSON line per request, to a file (appended, line-buffered) or `-` for stderr."""

    def __init__(self, target: str) -> None:
        if target == "-":
            self.out: TextIO = sys.stderr
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self.out = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (kept open: closed at shutdown)

    def write(self, client: str, method: str, path: str, status: int, rows: int, started: float) -> None:
        self.out.write(
            json.dumps(
                {
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "client": client,
                    "method": method,
                    "path": path,
                    "status": status,
                    "rows": rows,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                }
            )
            + "\n"
        )

    def close(self) -> None:
        if self.out is not sys.stderr:
            self.out.close()


class RateLimit:
    """`per_min` requests a minute per client, over a moving window."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self.item = RateLimitItemPerMinute(per_min)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def wait(self, client: str) -> int:
        """0 when `client` may go ahead (the request is counted), else whole seconds until it may."""
        if self.limiter.hit(self.item, client):
            return 0
        reset = self.limiter.get_window_stats(self.item, client).reset_time
        return min(60, max(1, math.ceil(reset - time.time())))


class Gate:
    """The ASGI middleware in front of the API's routes."""

    def __init__(
        self,
        app: App,
        token: str,
        limit: RateLimit | None,
        audit: AuditLog,
        open_paths: frozenset[str],
        open_prefixes: tuple[str, ...],
        unlimited_paths: frozenset[str],
    ) -> None:
        self.app, self.token, self.limit, self.audit = app, token, limit, audit
        self.holder = token_id(token)
        self.open_paths, self.open_prefixes, self.unlimited = open_paths, open_prefixes, unlimited_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        valid = bool(self.token) and accepts(header, self.token)
        peer = scope.get("client")
        info = scope[INFO] = {"client": self.holder if valid else (peer[0] if peer else "unknown"), "rows": 0}
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            wait = 0 if self.limit is None or path in self.unlimited else self.limit.wait(info["client"])
            if wait:
                await _answer(
                    sending,
                    429,
                    f"more than {self.limit.per_min} requests a minute "  # type: ignore[union-attr]
                    "(api_rate_limit_per_min)",
                    [(b"retry-after", str(wait).encode())],
                )
            elif self.token and not valid and not self._open(path):
                await _answer(
                    sending,
                    401,
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                    [(b"www-authenticate", b"Bearer")],
                )
            else:
                await self.app(scope, receive, sending)
        finally:
            if info.get("left"):  # a handler saw its client leave before the answer
                status = CLIENT_LEFT
            self.audit.write(info["client"], scope["method"], path, status, info["rows"], started)

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)


async def _answer(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
