"""Every error the service answers, as one table: a ServiceError subclass per error code.

Each class is one row: its HTTP status, its error code and a one-line description. Routes and lower
layers raise them; the HTTP front door renders them (service/http/errors.py), documents them in
``/openapi.json`` (service/http/schemas.py) and names the framework's own errors (unknown route,
wrong method) after the ``generic`` row of their status. Nothing else restates a status or a code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

# error code -> its class; filled as the classes below are defined.
ERRORS: dict[str, type[ServiceError]] = {}


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
    """An error answered as ``{"error": {"code": ..., "message": ...}}`` with ``status_code``.

    A subclass that sets ``code`` adds a row to :data:`ERRORS`; ``generic`` marks the row that names
    any error of its status the HTTP framework raises by itself (at most one per status).
    """

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    description: ClassVar[str] = "an unexpected failure"
    generic: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            return  # a refinement of a row, not a row of its own
        if cls.code in ERRORS:
            raise TypeError(f"error code {cls.code!r} of {cls.__name__} is {ERRORS[cls.code].__name__}'s")
        if "description" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} needs a description")
        if cls.generic and (taken := generic_error(cls.status_code)) is not None:
            raise TypeError(f"{cls.__name__} and {taken.__name__} are both generic for {cls.status_code}")
        ERRORS[cls.code] = cls

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


def generic_error(status_code: int) -> type[ServiceError] | None:
    """The row that names an error of this status when nothing more specific is known."""
    return next((cls for cls in ERRORS.values() if cls.generic and cls.status_code == status_code), None)


class BadRequest(ServiceError):
    status_code, code, generic = 400, "bad_request", True
    description = "a request that is not valid HTTP/1.1; the connection closes"


class InvalidImage(ServiceError):
    status_code, code = 400, "invalid_image"
    description = "not decodable, truncated, empty, or a malformed multipart body"


class Unauthorized(ServiceError):
    status_code, code, generic = 401, "unauthorized", True
    description = (
        "AUTH_TOKEN (or AUTH_TOKEN_FILE) is set and the request has no valid "
        "'Authorization: Bearer <token>' header (answered with WWW-Authenticate: Bearer)"
    )


class NotFound(ServiceError):
    status_code, code, generic = 404, "not_found", True
    description = "no such route"


class UnknownModel(ServiceError):
    status_code, code = 404, "unknown_model"
    description = "no such model (the message lists the served models)"


class MethodNotAllowed(ServiceError):
    status_code, code, generic = 405, "method_not_allowed", True
    description = "the route does not answer this method"


class HeaderTimeout(ServiceError):
    status_code, code = 408, "header_timeout"
    description = "the request headers did not arrive within HEADER_TIMEOUT_S; the connection closes"


class BodyReadTimeout(ServiceError):
    status_code, code = 408, "body_timeout"
    description = "the body did not arrive within BODY_READ_TIMEOUT_S; the connection closes"


class PayloadTooLarge(ServiceError):
    status_code, code, generic = 413, "payload_too_large", True
    description = "the body is over MAX_BODY_BYTES, or has more files than the model's queue holds"


class ImageTooLarge(ServiceError):
    status_code, code = 413, "image_too_large"
    description = "the image has more pixels than MAX_IMAGE_PIXELS (read from its header, never decoded)"


class HeadersTooLarge(ServiceError):
    status_code, code = 431, "headers_too_large"
    description = "the request line and headers are over MAX_HEADER_BYTES; the connection closes"


class UnsupportedMediaType(ServiceError):
    status_code, code = 415, "unsupported_media_type"
    description = "a declared type or recognised format this service does not decode"


class InvalidParameter(ServiceError):
    status_code, code = 422, "invalid_parameter"
    description = "a query parameter out of range or missing, or no `file` part"


class Overloaded(ServiceError):
    status_code, code = 429, "overloaded"
    description = "the model's places are all taken; retry after Retry-After seconds"


class ClientDisconnected(ServiceError):
    """The client went away before its answer: nobody reads this, but logs and metrics count it.

    499 is nginx's "client closed request"; it is never sent to a connected client.
    """

    status_code, code = 499, "client_disconnected"
    description = "the client went away before its answer (counted in logs and metrics, never sent)"


class InternalError(ServiceError):
    status_code, code, generic = 500, "internal_error", True
    description = "an unexpected failure, e.g. of inference (the message carries an error id for the log)"


class ModelUnavailable(ServiceError):
    status_code, code = 503, "model_unavailable"
    description = "the model is not loaded, failed, or the server is stopping"


class NotReady(ServiceError):
    status_code, code = 503, "not_ready"
    description = "a configured model is not loaded and warmed up yet (the body names each one)"


class RequestTimeout(ServiceError):
    status_code, code = 504, "timeout"
    description = "the request deadline (REQUEST_TIMEOUT_S) passed before its batch ran"


class OtherHTTPError(ServiceError):
    """Any other 4xx the framework raises by itself: rendered under the status it chose."""

    status_code, code = 400, "http_error"
    description = "another client error that the HTTP framework answered by itself (none is expected)"
