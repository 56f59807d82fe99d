"""Every error the server answers, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Owns the exception type routes raise and the handlers the app installs, including the ones for
what never reaches a route (unknown paths, wrong methods) and the last resort for a bug (a 500 in
the same shape, never a plain-text page or a dropped connection).
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2audio.errors import AdapterNotFoundError, ContextLengthError, InputError
from qwen2audio.server.protocol import error_body

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def respond(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
            code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return respond(exc.status, exc.message, exc.kind, exc.param, exc.code)


async def input_error(_: Request, exc: InputError) -> JSONResponse:
    if isinstance(exc, AdapterNotFoundError):  # unloaded between the model check and the engine
        return respond(404, str(exc), param="model", code="model_not_found")
    return respond(400, str(exc), code="context_length_exceeded" if isinstance(exc, ContextLengthError) else None)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) as OpenAI words them."""
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return respond(exc.status_code, message, code=exc.status_code if exc.status_code in (404, 405) else None)


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return respond(400, f"invalid request: {exc.errors()[0].get('msg', 'bad value') if exc.errors() else exc}")


async def unhandled(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered in the same shape."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return respond(500, f"internal server error ({type(exc).__name__})", "server_error")


HANDLERS = {
    APIError: api_error,
    InputError: input_error,
    StarletteHTTPException: http_error,
    RequestValidationError: validation_error,
    Exception: unhandled,
}
