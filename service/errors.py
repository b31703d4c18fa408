"""Every error the API returns, as one exception type with its status code and error code.

Routes and lower layers raise these; one exception handler turns them into
``{"error": {"code": ..., "message": ...}}`` (DESIGN.md, Serving API).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def error_body(code: str, message: str) -> dict:
    """The body of every error response (DESIGN.md): ``{"error": {"code": ..., "message": ...}}``."""
    return {"error": {"code": code, "message": message}}


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: client input is echoed,
    never amplified (a 60 KB model name gets a short answer)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(errors: Iterable[Mapping[str, Any]], field: str | None = None) -> str:
    """One line for pydantic's errors: ``where: what (got 'input')``, joined with ``; ``.

    ``field`` names the value when the errors' locations do not (a validated lone value)."""
    problems = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ())) or field or "request"
        given = f" (got {shown(error['input'])})" if error.get("input") is not None else ""
        problems.append(f"{where}: {error.get('msg', 'invalid')}{given}")
    return "; ".join(problems) or "invalid request"


class ServiceError(Exception):
    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_body(self) -> dict:
        return error_body(self.code, self.message)


class InvalidImage(ServiceError):
    status_code, code = 400, "invalid_image"


class UnknownModel(ServiceError):
    status_code, code = 404, "unknown_model"


class PayloadTooLarge(ServiceError):
    status_code, code = 413, "payload_too_large"


class BodyReadTimeout(ServiceError):
    status_code, code = 408, "body_timeout"


class ImageTooLarge(ServiceError):
    status_code, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status_code, code = 422, "invalid_parameter"


class Overloaded(ServiceError):
    status_code, code = 429, "overloaded"


class ClientDisconnected(ServiceError):
    """The client went away before its answer: nobody reads this, but logs and metrics count it.

    499 is nginx's "client closed request"; it is never sent to a connected client.
    """

    status_code, code = 499, "client_disconnected"


class InternalError(ServiceError):
    status_code, code = 500, "internal_error"


class ModelUnavailable(ServiceError):
    status_code, code = 503, "model_unavailable"


class RequestTimeout(ServiceError):
    status_code, code = 504, "timeout"
