"""POST /events: validate an event and produce it to Kafka, keyed by its session."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import HTTPException
from pydantic import ValidationError

from nodes.errors import EventValidationError
from nodes.models import CloudEvent, EventLimits, exceeds_json_depth
from service.client import session_id_for
from service.gateway.auth import AUTH_ERRORS, require_token
from service.gateway.backends import BackendsDep
from service.gateway.schemas import (
    KAFKA_DOWN,
    EventAccepted,
    EventRequest,
    FieldProblem,
    Problem,
    unprocessable,
)

__all__ = ["router"]

router = APIRouter(dependencies=[Depends(require_token)], responses=AUTH_ERRORS)

_EVENT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    CloudEvent.model_json_schema(),
                    EventRequest.model_json_schema(),
                ]
            }
        }
    },
}


@router.post(
    "/events",
    status_code=202,
    response_model=EventAccepted,
    openapi_extra={"requestBody": _EVENT_BODY},
    responses={
        413: {"model": Problem, "description": "Larger than AGENTFLOW_MAX_EVENT_BYTES."},
        422: {
            "model": Problem,
            "description": (
                "Not a valid event; names the field. Also: JSON deeper than "
                "AGENTFLOW_MAX_JSON_DEPTH, an id over AGENTFLOW_MAX_ID_BYTES, a session id "
                "that breaks the rule."
            ),
        },
        **KAFKA_DOWN,
    },
)
async def post_event(request: Request, backends: BackendsDep) -> EventAccepted:
    """Validate an event and produce it to the events topic, keyed by its session.

    The body is a CloudEvent (with `specversion`, `multitask` as an extension attribute),
    or `{type, data, subject?, session_id?, multitask?}`, which is wrapped into one with a
    fresh id.
    """
    limit = backends.settings.max_event_bytes
    event = _parse_event(await _read_body(request, limit), backends.settings.event_limits())
    size = len(event.model_dump_json(exclude_none=True).encode())
    if size > limit:  # wrapping adds a few fields
        raise HTTPException(
            413, f"the event is {size} bytes, over AGENTFLOW_MAX_EVENT_BYTES ({limit})"
        )
    session_id = session_id_for(event)
    await backends.send(event, session_id)
    return EventAccepted.of(session_id, event.id)


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, answering 413 as soon as it is over `limit` (declared or counted)."""
    too_big = HTTPException(
        413, f"the event is larger than AGENTFLOW_MAX_EVENT_BYTES ({limit} bytes)"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _parse_event(raw: bytes, limits: EventLimits) -> CloudEvent:
    """Return the CloudEvent of a body: taken as is, or wrapped from the short form."""
    too_deep = FieldProblem(
        field="(body)",
        reason=f"nests deeper than AGENTFLOW_MAX_JSON_DEPTH ({limits.max_json_depth} levels)",
    )
    if exceeds_json_depth(raw, limits.max_json_depth):  # before a parser recurses into it
        raise unprocessable("invalid event", [too_deep])
    try:
        body = json.loads(raw)
    except RecursionError:
        raise unprocessable("invalid event", [too_deep]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = f"not valid JSON ({exc})"
        problem = FieldProblem(field="(body)", reason=reason)
        raise unprocessable("invalid event", [problem]) from None
    if not isinstance(body, dict):
        reason = "must be a JSON object"
        raise unprocessable("invalid event", [FieldProblem(field="(body)", reason=reason)])
    if "specversion" in body:
        try:
            return CloudEvent.parse(body, limits)
        except EventValidationError as exc:
            problems = [FieldProblem(field=f, reason=r) for f, r in exc.problems]
            raise unprocessable("invalid CloudEvent", problems) from None
    try:
        short = EventRequest.model_validate(body)
        event = CloudEvent.wrap(
            short.type,
            short.data,
            subject=short.subject,
            session_id=short.session_id,
            source="agentflow/gateway",
        )
        event.multitask = short.multitask
        return event
    except ValidationError as exc:
        raise unprocessable("invalid event", _problems(exc, {"sessionid": "session_id"})) from None


def _problems(exc: ValidationError, rename: dict[str, str] | None = None) -> list[FieldProblem]:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(body)"
        problems.append(FieldProblem(field=(rename or {}).get(field, field), reason=err["msg"]))
    return problems
