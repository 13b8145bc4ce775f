"""GET /sessions/{session_id}/stream: follow a session live over Server-Sent Events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from service.gateway.auth import AUTH_ERRORS, require_token_or_query
from service.gateway.backends import BackendsDep
from service.gateway.schemas import FieldProblem, Problem, unprocessable
from service.gateway.sse import session_stream
from service.storage.publisher import ended_by, newest_seq

__all__ = ["router"]

# EventSource cannot set headers: this route also takes `?access_token=`.
router = APIRouter(dependencies=[Depends(require_token_or_query)], responses=AUTH_ERRORS)


@router.get(
    "/sessions/{session_id}/stream",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `id` is the transition's seq, `event` its "
            "type, `data` the transition JSON. Ends after the session ends.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {"description": "The session ended and nothing follows the given id."},
        422: {"model": Problem},
    },
)
async def stream_session(
    session_id: str,
    backends: BackendsDep,
    after: Annotated[int, Query(ge=0, description="Start after this seq.")] = 0,
    last_event_id: Annotated[
        str | None, Header(description="Set by EventSource on reconnect; wins over `after`.")
    ] = None,
) -> Response:
    """Follow a session: its logged transitions first, then live ones, without a gap.

    A client that joins after the end still gets every transition (within retention);
    the last one carries the result in `data.result`, then the stream ends. A session that
    has no record and no transition yet may be about to start: the stream waits up to 30 s
    for it, then ends with an `error` event whose data is
    `{"error": "unknown session", "session_id": ...}`.
    """
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise unprocessable(
                "invalid request",
                [FieldProblem(field="Last-Event-ID", reason="must be a transition seq")],
            )
        after = int(last_event_id)
    if await ended_by(backends.redis, session_id, after):
        return Response(status_code=204)  # EventSource stops reconnecting on 204

    async def known() -> bool:
        return await backends.store.get(session_id) is not None or bool(
            (await newest_seq(backends.redis, session_id))[0]
        )

    return session_stream(
        backends.hub,
        session_id,
        after,
        keepalive_s=backends.keepalive_s,
        known=known,
        hold_s=backends.unknown_hold_s,
    )
