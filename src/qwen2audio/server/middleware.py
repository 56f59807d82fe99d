"""Plain ASGI middleware: the body-size limit, the API key, and request counting.

Owns what happens to every HTTP request before and after its route. Written against ASGI directly
(not Starlette's BaseHTTPMiddleware, which hides a client's disconnect from the route and so kept
abandoned non-streamed requests running to the end).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from qwen2audio.server.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Counter = Callable[[str | None, int], None]  # (route template or None, status code)


async def send_error(send: Send, status: int, message: str, kind: str = "invalid_request_error",
                     code: str | None = None) -> None:
    body = json.dumps(error_body(message, kind, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body past the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, f"the request body is larger than the {self.max_bytes} byte limit",
                         code="request_too_large")


class _TooLarge(Exception):
    pass


class Gate:
    """The API key on /v1/ routes, then a count of every answered request by route template and status.

    ``counter(route, status)`` is looked up per request (the server state appears with the app's
    lifespan); the template is the matched route's path, so unknown paths share one label."""

    def __init__(self, app: ASGIApp, api_key: str | None, counter: Callable[[], Counter | None]) -> None:
        self.app, self.api_key, self.counter = app, api_key, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
                await send_error(noting, 401, "invalid or missing API key", "authentication_error", "invalid_api_key")
                return
            await self.app(scope, receive, noting)
        finally:
            count = self.counter()
            if count is not None:
                count(_route_template(scope), status)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        return headers.get(b"authorization", b"") == f"Bearer {self.api_key}".encode()


def _route_template(scope: Scope) -> str | None:
    """The matched route's path template (a mount's prefix for static files); None when nothing matched."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", None)
    if scope.get("endpoint") is not None:  # a mount: its prefix is the matched part of the path
        return scope.get("root_path") or None
    return None
