"""Optional bearer-token authentication (AUTH_TOKEN / AUTH_TOKEN_FILE), as a pure ASGI middleware.

Off unless a token is configured. On, every route needs ``Authorization: Bearer <token>`` except the
probes (``/healthz``, ``/readyz``) and the page's HTML at ``/``; routes that do not exist answer 401
too, so an unauthenticated client learns nothing about which ones do. The token is compared in
constant time (:func:`hmac.compare_digest` on bytes), and neither it nor the header is ever logged.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized
from service.http.errors import error_response

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
REALM = "classifier"


def _unauthorized(message: str, *, invalid: bool) -> Unauthorized:
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid else "")
    return Unauthorized(message, headers={"WWW-Authenticate": challenge})


class BearerAuth:
    """Answers 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` unless the request carries the token."""

    def __init__(self, app: ASGIApp, token: bytes, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self.app = app
        self._token = token
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self._open_paths:
            await self.app(scope, receive, send)
            return
        given = bearer_token(scope)
        if given is None:
            error = _unauthorized(
                "this server needs a bearer token: send 'Authorization: Bearer <token>'", invalid=False
            )
        elif not hmac.compare_digest(given, self._token):
            error = _unauthorized("the bearer token is not valid", invalid=True)
        else:
            await self.app(scope, receive, send)
            return
        await error_response(error)(scope, receive, send)


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's first ``Authorization: Bearer`` header, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None
