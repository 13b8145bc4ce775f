"""Bearer tokens: the dependencies that let a request through with one of AGENTFLOW_API_TOKENS.

With no tokens configured every request passes (local development; the app warns at start).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Query
from fastapi.exceptions import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.gateway.backends import BackendsDep
from service.gateway.schemas import Problem

__all__ = ["AUTH_ERRORS", "require_token", "require_token_or_query"]

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid bearer token."}
}
"""The 401 answer, for the OpenAPI document of every route that needs a token."""

_bearer = HTTPBearer(auto_error=False, description="A token from AGENTFLOW_API_TOKENS.")


def _check_token(settings: Settings, token: str | None) -> None:
    if not settings.api_tokens:
        return
    if token is None:
        raise HTTPException(
            401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if not any(secrets.compare_digest(token.encode(), t.encode()) for t in settings.api_tokens):
        raise HTTPException(
            401,
            "the bearer token is not valid",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


async def require_token(
    backends: BackendsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let a request through with a valid `Authorization: Bearer` token."""
    _check_token(backends.settings, credentials.credentials if credentials else None)


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
