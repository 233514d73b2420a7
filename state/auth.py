"""Bearer tokens for the product's HTTP endpoints (the analyst API, the worker's web views).

`Authorization: Bearer <token>` is parsed as RFC 7235 says (the scheme is case-insensitive), a
bare token or another scheme is refused, and tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Awaitable, Callable

from aiohttp import web


class TokenRequired(ValueError):
    """A server asked to listen beyond loopback without a bearer token."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token(host: str, token: str, setting: str) -> None:
    """A server on a non-loopback address without a token would answer anyone on the network."""
    if token == "" and not is_loopback(host):
        raise TokenRequired(f"{setting} {host!r} is not loopback: set CLV_API_TOKEN")


def presented(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for any other form."""
    scheme, _, rest = header.strip().partition(" ")
    token = rest.strip()
    return token if scheme.lower() == "bearer" and token else None


def accepts(header: str, token: str) -> bool:
    given = presented(header)
    return hmac.compare_digest((given or "").encode(), token.encode()) and given is not None


def token_id(token: str) -> str:
    """Names a token's holder in logs without writing the credential itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def guard(token: str, open_paths: frozenset[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """aiohttp middleware: every path but `open_paths` needs the token."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or accepts(request.headers.get("Authorization", ""), token):
            return await handler(request)
        return web.json_response(
            {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    return check
