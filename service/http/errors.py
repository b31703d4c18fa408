"""The one error renderer: every ``{"error": {"code": ..., "message": ...}}`` the service answers is
built here, from a ServiceError (the table in service/errors.py).

That covers the errors routes and lower layers raise, the 401 of the bearer-token check, FastAPI's
validation errors (422), Starlette's own HTTP errors (unknown route, wrong method: named after the
table's generic row for their status), the last-resort 500, the 503 of ``/readyz`` (the error beside
the per-model status) and the canned responses the HTTP parser writes before any app runs.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service.errors import (
    InternalError,
    InvalidParameter,
    NotFound,
    OtherHTTPError,
    ServiceError,
    generic_error,
    validation_message,
)
from service.http.schemas import ErrorBody

log = logging.getLogger("service")


def error_body(error: ServiceError) -> ErrorBody:
    return {"error": {"code": error.code, "message": error.message}}


def error_response(error: ServiceError, *, status_code: int | None = None, **fields: Any) -> JSONResponse:
    """The error as a response, with its headers; ``fields`` go beside ``error`` in the body."""
    return JSONResponse(
        {**error_body(error), **fields},
        status_code=status_code or error.status_code,
        headers=error.headers,
    )


def service_error_response(request: Request, error: ServiceError) -> JSONResponse:
    """A raised ServiceError's response; a 5xx is logged too (a 4xx is the client's, in the access log)."""
    if error.status_code >= 500:
        log.warning(
            "%s %s -> %d %s: %s",
            request.method,
            request.url.path,
            error.status_code,
            error.code,
            error.message,
        )
    return error_response(error)


def closing_response(error: ServiceError) -> bytes:
    """A whole HTTP/1.1 response carrying the error, after which the connection closes: for what the
    HTTP parser answers by itself, before (or without) a request for the app."""
    status = HTTPStatus(error.status_code)
    body = json.dumps(error_body(error)).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (status.value, status.phrase.encode(), len(body), body)
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every exception FastAPI answers, its own included, leaves through :func:`error_response`."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return service_error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI's locations start with where the value was ("query", "path", "body"): dropped.
    errors = [{**error, "loc": tuple(error.get("loc", ()))[1:]} for error in exc.errors()]
    return error_response(InvalidParameter(validation_message(errors)))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    row = generic_error(status) or (InternalError if status >= 500 else OtherHTTPError)
    message = f"no route {request.method} {request.url.path}" if row is NotFound else str(exc.detail)
    return error_response(row(message, dict(exc.headers or {})), status_code=status)
