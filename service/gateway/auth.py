"""Bearer tokens: a request gets through with one of AGENTFLOW_API_TOKENS.

Two parts check the same rule. `RequestGate`, an ASGI middleware, checks the token before
anything of the request's body is read (FastAPI parses a route's body parameters before it
runs the route's dependencies) and bounds the body. The dependencies, `require_token` and
`require_token_or_query`, mark the routes that need a token, for the gate and for the
OpenAPI document, and check it again inside the route.

With no tokens configured every request passes (local development; the app warns at start).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Query
from fastapi.exceptions import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.gateway.backends import BackendsDep
from service.gateway.schemas import Problem

__all__ = ["AUTH_ERRORS", "RequestGate", "TokenName", "require_token", "require_token_or_query"]

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid bearer token."}
}
"""The 401 answer, for the OpenAPI document of every route that needs a token."""

_bearer = HTTPBearer(auto_error=False, description="A token from AGENTFLOW_API_TOKENS.")


def _check_token(settings: Settings, token: str | None) -> str | None:
    """Check a presented token; return its name (None: unnamed, or no tokens configured)."""
    if not settings.api_tokens:
        return None
    if token is None:
        raise HTTPException(
            401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    found = None
    for name, known in settings.named_tokens():  # every one compared: no early exit
        if secrets.compare_digest(token.encode(), known.encode()):
            found = (name,)
    if found is None:
        raise HTTPException(
            401,
            "the bearer token is not valid",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return found[0]


async def require_token(
    backends: BackendsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """Let a request through with a valid `Authorization: Bearer` token; return its name."""
    return _check_token(backends.settings, credentials.credentials if credentials else None)


TokenName = Annotated[str | None, Depends(require_token)]
"""The name of the request's token (`name:token` in AGENTFLOW_API_TOKENS), if it has one."""


async def require_token_or_query(
    backends: BackendsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[
        str | None, Query(description="The token, for clients that cannot set headers.")
    ] = None,
) -> None:
    """Like `require_token`, also taking `?access_token=` (EventSource sets no headers)."""
    token = credentials.credentials if credentials else access_token
    _check_token(backends.settings, token)


class RequestGate:
    """ASGI middleware: check the token and the body's size before a byte of the body is read.

    FastAPI reads a route's body parameters before it runs the route's dependencies, so
    `require_token` alone would let anyone make the gateway read, and hold, a body of any
    size. The gate guards the request's `receive`: when the route (chosen by then) first
    asks for the body, a route that declares `require_token` (or `require_token_or_query`,
    itself or through its router) gets a 401 unless the token is valid, and every body
    gets a 413 when its `Content-Length` says more than AGENTFLOW_MAX_EVENT_BYTES (whatever
    the API takes becomes an event), or as soon as the bytes read pass it. A route that
    never reads its body never holds it. Starlette's own `max_body_size` bounds too, but
    answers a plain `Content Too Large` that names no setting, and cannot authenticate.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        """Wrap `app`."""
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with its `receive` guarded."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._guarded(scope, receive), send)

    def _guarded(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.settings.max_event_bytes
        read: int | None = None  # None: the body was not asked for yet

        async def guarded() -> Message:
            nonlocal read
            if read is None:
                self._authenticate(scope)
                declared = Headers(scope=scope).get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise _too_large(limit)
                read = 0
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise _too_large(limit)
            return message

        return guarded

    def _authenticate(self, scope: Scope) -> None:
        """Check the token when the request's route needs one (what its dependencies say).

        Raises:
            HTTPException: 401, as the dependencies answer it.
        """
        route = scope.get("route")  # set by the router once it has chosen the route
        needs = {getattr(d, "dependency", None) for d in getattr(route, "dependencies", [])}
        if require_token_or_query in needs:
            _check_token(self.settings, _presented(scope, query=True))
        elif require_token in needs:
            _check_token(self.settings, _presented(scope, query=False))


def _presented(scope: Scope, *, query: bool) -> str | None:
    """Return the token a request carries, as `HTTPBearer` reads it (or `?access_token=`)."""
    scheme, credentials = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
    if scheme.lower() == "bearer" and credentials:
        return credentials
    if query:
        return QueryParams(scope["query_string"]).get("access_token")
    return None


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        413, f"the request body is larger than AGENTFLOW_MAX_EVENT_BYTES ({limit} bytes)"
    )
