"""`agentflow gateway`: the HTTP API and the live web page.

Events go in over HTTP and out to Kafka (the worker runs them); sessions are read from
Redis (records from `SessionStore`, state and history from the checkpointer) and
followed live over Server-Sent Events (the transition log, then pub/sub).

Example:
    ```python
    server, task, url = await serve_gateway(settings, host="127.0.0.1", port=8080)
    ...
    server.should_exit = True
    await task
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import redis.exceptions
import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException

from nodes.models import (
    CANCEL_EVENT_TYPE,
    RESUME_EVENT_TYPE,
    CloudEvent,
    ResultWorkflow,
    WorkflowResult,
)
from service.client import session_id_for
from service.config import Settings
from service.errors import KafkaUnavailable
from service.observe import metrics
from service.storage.keys import INDEX_KEY, log_key, session_key
from service.storage.publisher import follow, read_log
from service.storage.sessions import SessionRecord, SessionStatus, SessionStore
from service.storage.transitions import Transition

__all__ = ["create_app", "serve_gateway"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
SEND_TIMEOUT_S = 5.0
"""How long a request waits for Kafka to acknowledge an event before answering 503."""
ENDED = frozenset({"session.completed", "session.failed"})
"""Transitions after which a session's stream ends (an interrupted one waits for a resume)."""
STATUSES: tuple[str, ...] = ("running", "interrupted", "completed", "failed", "cancelled")


# --- API models ------------------------------------------------------------------------


class FieldProblem(BaseModel):
    """One problem of a request, and the field it is in."""

    field: str = Field(description="Dotted path of the field, e.g. `data` or `source`.")
    reason: str


class Problem(BaseModel):
    """An error answer."""

    detail: str = Field(description="What went wrong, in one sentence.")
    errors: list[FieldProblem] = Field(default_factory=list)


class EventRequest(BaseModel):
    """A short form of an event; the gateway wraps it into a CloudEvent."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, description="Event type, e.g. `claim.submitted`.")
    data: Any = Field(default=None, description="The event payload.")
    subject: str | None = Field(default=None, description="What the event is about.")
    session_id: str | None = Field(
        default=None, description="Continue this session instead of opening one."
    )


class Links(BaseModel):
    """Where to follow an accepted event."""

    self: str = Field(description="The session.")
    stream: str = Field(description="The session's transitions as Server-Sent Events.")
    result: str = Field(description="The event's result, once there is one.")


class EventAccepted(BaseModel):
    """An event that Kafka acknowledged; the worker will run it."""

    session_id: str
    event_id: str
    links: Links


class ResumeRequest(BaseModel):
    """The answer to an escalated review."""

    model_config = ConfigDict(extra="forbid")

    answer: str = Field(min_length=1, description="e.g. `approve: discharge confirmed`.")


class SessionSummary(BaseModel):
    """A session as listed."""

    session_id: str
    status: SessionStatus
    current_node: str | None = None
    event_type: str | None = None
    subject: str | None = None
    created_at: datetime
    updated_at: datetime
    question: str | None = None


class SessionPage(BaseModel):
    """One page of sessions, newest first."""

    sessions: list[SessionSummary]
    total: int = Field(description="Sessions with this status (all sessions without a filter).")
    limit: int
    offset: int


class SessionReview(BaseModel):
    """The latest review of a session."""

    verdict: str | None = None
    feedback: str = ""
    question: str | None = None


class SessionDetail(SessionSummary):
    """A session: where it is, its workflow, its review and its result."""

    event_ids: list[str] = Field(default_factory=list)
    next: list[str] = Field(default_factory=list, description="Nodes that run next.")
    workflow: ResultWorkflow = Field(default_factory=ResultWorkflow)
    review: SessionReview = Field(default_factory=SessionReview)
    result: WorkflowResult | None = None


class CheckpointSummary(BaseModel):
    """One checkpoint of a session's thread."""

    checkpoint_id: str
    parent_checkpoint_id: str | None = None
    created_at: datetime | None = None
    step: int | None = Field(default=None, description="The superstep that wrote it.")
    source: str | None = Field(default=None, description="input, loop, update or fork.")
    next: list[str] = Field(default_factory=list, description="Nodes due to run after it.")
    tasks: list[str] = Field(default_factory=list, description="Tasks pending at it.")
    interrupts: list[Any] = Field(default_factory=list)
    steps: dict[str, str] = Field(default_factory=dict, description="Step id to status.")


class SessionHistory(BaseModel):
    """A session's checkpoints, newest first."""

    session_id: str
    checkpoints: list[CheckpointSummary]


class Reachability(BaseModel):
    """Whether one server answered."""

    ok: bool
    error: str | None = None


class Health(BaseModel):
    """Whether the gateway can reach Kafka and Redis."""

    status: Literal["ok", "unavailable"]
    kafka: Reachability
    redis: Reachability


# --- the servers behind the API -----------------------------------------------------------


class Backends:
    """Kafka, Redis and the checkpointer, shared by all requests of one app."""

    def __init__(self, settings: Settings, *, keepalive_s: float) -> None:
        if not settings.kafka_bootstrap or not settings.redis_url:
            raise ValueError(
                "the gateway needs AGENTFLOW_KAFKA_BOOTSTRAP and AGENTFLOW_REDIS_URL "
                "(or run `agentflow dev`, which starts local servers)"
            )
        self.settings = settings
        self.keepalive_s = keepalive_s
        self.redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=3, decode_responses=True
        )
        self.store = SessionStore(self.redis, ttl_s=settings.session_ttl_s)
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._graph: Any = None
        self._graph_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Backends(kafka={self.settings.kafka_bootstrap!r}, up={self._producer is not None})"

    async def producer(self) -> AIOKafkaProducer:
        """Return the long-lived producer, (re)connecting it when needed."""
        async with self._producer_lock:
            if self._producer is None:
                s = self.settings
                producer = AIOKafkaProducer(
                    bootstrap_servers=s.kafka_bootstrap,
                    acks="all" if s.producer_acks == "all" else int(s.producer_acks),
                    enable_idempotence=s.producer_idempotence,
                    max_request_size=max(s.max_event_bytes * 2, 1024 * 1024),
                    request_timeout_ms=int(SEND_TIMEOUT_S * 1000),
                )
                try:
                    await asyncio.wait_for(producer.start(), SEND_TIMEOUT_S)
                except BaseException:
                    await _quietly(producer.stop())
                    raise
                self._producer = producer
            return self._producer

    async def send(self, event: CloudEvent, session_id: str) -> None:
        """Produce an event keyed by its session and wait for Kafka's acknowledgement.

        Raises:
            KafkaUnavailable: Kafka did not acknowledge it within `SEND_TIMEOUT_S`.
        """
        value = event.model_dump_json(exclude_none=True).encode()
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            producer = None
            try:
                producer = await asyncio.wait_for(self.producer(), max(left, 0.01))
                await asyncio.wait_for(
                    producer.send_and_wait(
                        self.settings.topic_events, value, key=session_id.encode()
                    ),
                    max(deadline - time.monotonic(), 0.01),
                )
                break
            except (KafkaError, OSError, TimeoutError) as exc:
                await self._drop_producer(producer)
                left = deadline - time.monotonic()
                # Unreachable or out of time: answer now. Else (a broker-side error, e.g.
                # a topic being created after a restart) try again within the deadline.
                if isinstance(exc, KafkaConnectionError | OSError | TimeoutError) or left < 0.5:
                    raise KafkaUnavailable(
                        f"Kafka at {self.settings.kafka_bootstrap} did not acknowledge event "
                        f"{event.id} ({type(exc).__name__}: {exc or 'timed out'}); send it "
                        "again (an event id runs once)"
                    ) from exc
                await asyncio.sleep(0.25)
        metrics.EVENTS_RECEIVED.labels("gateway").inc()

    async def _drop_producer(self, failed: AIOKafkaProducer | None) -> None:
        """Forget a failed producer (the next request connects a new one); stop it aside."""
        async with self._producer_lock:
            if failed is None or failed is not self._producer:
                return  # never connected, or already replaced
            producer, self._producer = self._producer, None
        if producer is not None:
            task = asyncio.create_task(_quietly(producer.stop()))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def graph(self) -> Any:
        """Return the workflow graph on the Redis checkpointer (for state and history)."""
        async with self._graph_lock:
            if self._graph is None:
                from graphs.workflow import build_graph
                from service.storage.checkpoints import open_checkpointer

                self._graph = build_graph(await open_checkpointer(self.redis))
            return self._graph

    async def kafka_health(self) -> Reachability:
        producer = None
        try:
            producer = await self.producer()
            await asyncio.wait_for(producer.client.fetch_all_metadata(), SEND_TIMEOUT_S)
        except Exception as exc:
            await self._drop_producer(producer)
            return Reachability(ok=False, error=f"{type(exc).__name__}: {exc or 'timed out'}")
        return Reachability(ok=True)

    async def redis_health(self) -> Reachability:
        try:
            await asyncio.wait_for(self.redis.ping(), SEND_TIMEOUT_S)
        except Exception as exc:
            return Reachability(ok=False, error=f"{type(exc).__name__}: {exc or 'timed out'}")
        return Reachability(ok=True)

    async def count_by_status(self) -> dict[str, int]:
        """Count the indexed sessions by status (one pipelined read of all statuses)."""
        ids: list[Any] = list(await self.redis.zrange(INDEX_KEY, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw_id in ids:
                pipe.hget(session_key(raw_id), "status")
            statuses = await pipe.execute() if ids else []
        counts = dict.fromkeys(STATUSES, 0)
        for status in statuses:
            if status is not None:
                counts[status] = counts.get(status, 0) + 1
        return counts

    async def close(self) -> None:
        await self._drop_producer(self._producer)
        if self._closing:
            await asyncio.wait(self._closing)
        await self.redis.aclose()


async def _quietly(awaitable: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(awaitable, SEND_TIMEOUT_S)


def _backends(request: Request) -> Backends:
    return request.app.state.backends  # type: ignore[no-any-return]


BackendsDep = Annotated[Backends, Depends(_backends)]


# --- auth ----------------------------------------------------------------------------------

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


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid bearer token."}
}
_REDIS_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "Redis is unreachable."}
}
_KAFKA_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "Kafka did not acknowledge the event."}
}

api = APIRouter(dependencies=[Depends(require_token)], responses=_AUTH_ERRORS)
streams = APIRouter(dependencies=[Depends(require_token_or_query)], responses=_AUTH_ERRORS)
public = APIRouter()


# --- events --------------------------------------------------------------------------------


def _unprocessable(detail: str, errors: list[FieldProblem]) -> HTTPException:
    text = "; ".join(f"field '{e.field}': {e.reason}" for e in errors)
    return HTTPException(422, {"detail": f"{detail}: {text}" if text else detail, "errors": errors})


def _problems(exc: ValidationError, rename: dict[str, str] | None = None) -> list[FieldProblem]:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(body)"
        problems.append(FieldProblem(field=(rename or {}).get(field, field), reason=err["msg"]))
    return problems


async def _read_body(request: Request, limit: int) -> bytes:
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


def _parse_event(raw: bytes) -> CloudEvent:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = f"not valid JSON ({exc})"
        problem = FieldProblem(field="(body)", reason=reason)
        raise _unprocessable("invalid event", [problem]) from None
    if not isinstance(body, dict):
        reason = "must be a JSON object"
        raise _unprocessable("invalid event", [FieldProblem(field="(body)", reason=reason)])
    if "specversion" in body:
        try:
            return CloudEvent.model_validate(body)
        except ValidationError as exc:
            raise _unprocessable("invalid CloudEvent", _problems(exc)) from None
    try:
        short = EventRequest.model_validate(body)
        return CloudEvent.wrap(
            short.type,
            short.data,
            subject=short.subject,
            session_id=short.session_id,
            source="agentflow/gateway",
        )
    except ValidationError as exc:
        raise _unprocessable("invalid event", _problems(exc, {"sessionid": "session_id"})) from None


def _accepted(session_id: str, event_id: str) -> EventAccepted:
    base = f"/sessions/{quote(session_id, safe='')}"
    return EventAccepted(
        session_id=session_id,
        event_id=event_id,
        links=Links(
            self=base,
            stream=f"{base}/stream",
            result=f"{base}/result?event_id={quote(event_id, safe='')}",
        ),
    )


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


@api.post(
    "/events",
    status_code=202,
    response_model=EventAccepted,
    openapi_extra={"requestBody": _EVENT_BODY},
    responses={
        413: {"model": Problem, "description": "Larger than AGENTFLOW_MAX_EVENT_BYTES."},
        422: {"model": Problem, "description": "Not a valid event; names the field."},
        **_KAFKA_DOWN,
    },
)
async def post_event(request: Request, backends: BackendsDep) -> EventAccepted:
    """Validate an event and produce it to the events topic, keyed by its session.

    The body is a CloudEvent (with `specversion`), or `{type, data, subject?,
    session_id?}`, which is wrapped into one with a fresh id.
    """
    limit = backends.settings.max_event_bytes
    event = _parse_event(await _read_body(request, limit))
    size = len(event.model_dump_json(exclude_none=True).encode())
    if size > limit:  # wrapping adds a few fields
        raise HTTPException(
            413, f"the event is {size} bytes, over AGENTFLOW_MAX_EVENT_BYTES ({limit})"
        )
    session_id = session_id_for(event)
    await backends.send(event, session_id)
    return _accepted(session_id, event.id)


# --- sessions ------------------------------------------------------------------------------


def _summary(record: SessionRecord) -> SessionSummary:
    return SessionSummary.model_validate(
        record.model_dump(include=set(SessionSummary.model_fields))
    )


async def _record(backends: Backends, session_id: str) -> SessionRecord:
    record = await backends.store.get(session_id)
    if record is None:
        raise HTTPException(404, f"no session {session_id}")
    return record


@api.get("/sessions", response_model=SessionPage, responses={422: {"model": Problem}})
async def list_sessions(
    backends: BackendsDep,
    status: Annotated[SessionStatus | None, Query(description="Only sessions in it.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> SessionPage:
    """List sessions, most recently updated first."""
    records, total = await backends.store.list(status=status, offset=offset, limit=limit)
    if status is not None:
        total = (await backends.count_by_status()).get(status, 0)
    return SessionPage(
        sessions=[_summary(r) for r in records], total=total, limit=limit, offset=offset
    )


@api.get(
    "/sessions/{session_id}",
    response_model=SessionDetail,
    responses={404: {"model": Problem}, **_REDIS_DOWN},
)
async def get_session(session_id: str, backends: BackendsDep) -> SessionDetail:
    """Return a session: status, current node, workflow, review and result."""
    record = await _record(backends, session_id)
    graph = await backends.graph()
    snapshot = await graph.aget_state({"configurable": {"thread_id": session_id}})
    values = snapshot.values or {}
    detail = SessionDetail(
        **_summary(record).model_dump(),
        event_ids=record.event_ids,
        next=list(snapshot.next),
        result=record.result,
    )
    if values:
        detail.workflow = ResultWorkflow(
            intent=values.get("intent", ""),
            goals=values.get("goals", []),
            steps=values.get("steps", []),
        )
    elif record.result is not None:
        detail.workflow = record.result.workflow
    decision = values.get("review")
    if decision is not None:
        detail.review = SessionReview(
            verdict=decision.verdict,
            feedback=decision.feedback,
            question=record.question or decision.question or None,
        )
    elif record.result is not None:
        detail.review = SessionReview(**record.result.review.model_dump())
    return detail


@api.get(
    "/sessions/{session_id}/result",
    response_model=WorkflowResult,
    responses={404: {"model": Problem, "description": "No such session or no result yet."}},
)
async def get_result(
    session_id: str,
    backends: BackendsDep,
    event_id: Annotated[str | None, Query(description="The result of this event.")] = None,
) -> WorkflowResult:
    """Return the session's latest result (of one event, with `event_id`)."""
    record = await _record(backends, session_id)
    result = record.result
    if result is None or (event_id is not None and result.event_id != event_id):
        raise HTTPException(404, f"session {session_id} has no result for that event yet")
    return result


@api.get(
    "/sessions/{session_id}/history",
    response_model=SessionHistory,
    responses={404: {"model": Problem}},
)
async def get_history(
    session_id: str,
    backends: BackendsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None, Query(description="Only checkpoints older than this checkpoint id.")
    ] = None,
) -> SessionHistory:
    """Return a session's checkpoints, newest first."""
    graph = await backends.graph()
    config = {"configurable": {"thread_id": session_id}}
    checkpoints: list[CheckpointSummary] = []
    # The Redis saver ignores `before`; checkpoint ids sort by time, so filter here.
    async for snapshot in graph.aget_state_history(config, limit=None if before else limit):
        if len(checkpoints) == limit:
            break
        configurable = snapshot.config["configurable"]
        if before is not None and configurable["checkpoint_id"] >= before:
            continue
        parent = (snapshot.parent_config or {}).get("configurable", {})
        metadata = snapshot.metadata or {}
        checkpoints.append(
            CheckpointSummary(
                checkpoint_id=configurable["checkpoint_id"],
                parent_checkpoint_id=parent.get("checkpoint_id"),
                created_at=snapshot.created_at,
                step=metadata.get("step"),
                source=metadata.get("source"),
                next=list(snapshot.next),
                tasks=[task.name for task in snapshot.tasks],
                interrupts=[i.value for i in snapshot.interrupts],
                steps={s.id: s.status for s in (snapshot.values or {}).get("steps", [])},
            )
        )
    if not checkpoints and before is None:
        await _record(backends, session_id)  # 404 for an unknown session
    return SessionHistory(session_id=session_id, checkpoints=checkpoints)


async def _command(
    backends: Backends, session_id: str, kind: str, data: dict[str, Any] | None
) -> EventAccepted:
    event = CloudEvent.wrap(kind, data, session_id=session_id, source="agentflow/gateway")
    await backends.send(event, session_id)
    return _accepted(session_id, event.id)


@api.post(
    "/sessions/{session_id}/resume",
    status_code=202,
    response_model=EventAccepted,
    responses={
        404: {"model": Problem},
        409: {"model": Problem, "description": "The session is not waiting for an answer."},
        422: {"model": Problem},
        **_KAFKA_DOWN,
    },
)
async def resume_session(
    session_id: str, body: ResumeRequest, backends: BackendsDep
) -> EventAccepted:
    """Answer an escalated review: an `agentflow.resume` event goes to the worker."""
    record = await _record(backends, session_id)
    if record.status != "interrupted":
        raise HTTPException(
            409, f"session {session_id} is {record.status}, not waiting for an answer"
        )
    return await _command(backends, session_id, RESUME_EVENT_TYPE, {"answer": body.answer})


@api.post(
    "/sessions/{session_id}/cancel",
    status_code=202,
    response_model=EventAccepted,
    responses={
        404: {"model": Problem},
        409: {"model": Problem, "description": "The session has already ended."},
        **_KAFKA_DOWN,
    },
)
async def cancel_session(session_id: str, backends: BackendsDep) -> EventAccepted:
    """Cancel a session: an `agentflow.cancel` event stops its run in the worker."""
    record = await _record(backends, session_id)
    if record.status not in ("running", "interrupted"):
        raise HTTPException(409, f"session {session_id} has already ended ({record.status})")
    return await _command(backends, session_id, CANCEL_EVENT_TYPE, None)


# --- the live stream -----------------------------------------------------------------------


def _sse(transition: Transition) -> str:
    return (
        f"id: {transition.seq}\nevent: {transition.type}\ndata: {transition.model_dump_json()}\n\n"
    )


async def _last_seq(redis: Redis, session_id: str) -> tuple[int, str | None]:
    """Return the seq and type of a session's last logged transition (0 if none)."""
    entries: Any = await redis.xrevrange(log_key(session_id), count=1)
    if not entries:
        return 0, None
    last = Transition.model_validate_json(entries[0][1]["transition"])
    return last.seq, last.type


async def _event_stream(backends: Backends, session_id: str, after: int) -> AsyncIterator[str]:
    """Yield a session's transitions as SSE messages, with keep-alive comments."""
    queue: asyncio.Queue[Transition | BaseException] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        try:
            async for transition in follow(backends.redis, session_id, after):
                await queue.put(transition)
        except Exception as exc:
            await queue.put(exc)

    task = asyncio.create_task(pump(), name=f"stream {session_id}")
    try:
        yield "retry: 2000\n: following session\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), backends.keepalive_s)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if isinstance(item, BaseException):
                logger.warning("stream of session %s broke: %s", session_id, item)
                return  # the client reconnects with Last-Event-ID
            yield _sse(item)
            if item.type in ENDED:
                last, _ = await _last_seq(backends.redis, session_id)
                if last <= item.seq:  # nothing newer: a later run would have logged more
                    return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@streams.get(
    "/sessions/{session_id}/stream",
    response_class=StreamingResponse,
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
    the last one carries the result in `data.result`, then the stream ends.
    """
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise _unprocessable(
                "invalid request",
                [FieldProblem(field="Last-Event-ID", reason="must be a transition seq")],
            )
        after = int(last_event_id)
    last, kind = await _last_seq(backends.redis, session_id)
    if kind in ENDED and after >= last:
        return Response(status_code=204)  # EventSource stops reconnecting on 204
    return StreamingResponse(
        _event_stream(backends, session_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --- graph, health, metrics, page ----------------------------------------------------------


@cache
def _drawing(fmt: Literal["svg", "mermaid"]) -> str:
    from service.observe.drawing import render_graph

    return render_graph(fmt)


@api.get(
    "/graph",
    responses={
        200: {
            "description": "The workflow graph.",
            "content": {"image/svg+xml": {}, "text/plain": {}},
        },
        404: {"model": Problem},
        422: {"model": Problem},
    },
)
async def get_graph(
    backends: BackendsDep,
    format: Annotated[Literal["svg", "mermaid"], Query()] = "svg",
    session: Annotated[
        str | None, Query(description="Highlight the path this session took.")
    ] = None,
) -> Response:
    """Draw the workflow graph as SVG or Mermaid text."""
    media = "image/svg+xml" if format == "svg" else "text/plain; charset=utf-8"
    if session is None:
        return Response(_drawing(format), media_type=media)
    from service.observe.drawing import render_graph, session_path

    transitions = await read_log(backends.redis, session)
    if not transitions:
        await _record(backends, session)
    return Response(render_graph(format, session_path(transitions)), media_type=media)


@api.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def get_metrics(backends: BackendsDep) -> Response:
    """Prometheus metrics: events received, runs in flight, durations, DLQ count."""
    with contextlib.suppress(*_REDIS_ERRORS):
        for status, count in (await backends.count_by_status()).items():
            metrics.SESSIONS.labels(status).set(count)
    return Response(metrics.latest(), media_type=metrics.CONTENT_TYPE_LATEST)


@public.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Kafka or Redis is unreachable."}},
)
async def healthz(backends: BackendsDep) -> JSONResponse:
    """Say whether Kafka and Redis answer (no token needed)."""
    kafka, redis_ = await asyncio.gather(backends.kafka_health(), backends.redis_health())
    ok = kafka.ok and redis_.ok
    health = Health(status="ok" if ok else "unavailable", kafka=kafka, redis=redis_)
    return JSONResponse(health.model_dump(), status_code=200 if ok else 503)


@public.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# --- the app -------------------------------------------------------------------------------

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _problem(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    body = detail if isinstance(detail, dict) else {"detail": detail}
    return JSONResponse(Problem.model_validate(body).model_dump(), status, headers=headers)


def create_app(settings: Settings, *, keepalive_s: float = 15.0) -> FastAPI:
    """Build the gateway app: the API under token auth, the page and `/healthz` open.

    Args:
        settings: Kafka, Redis, topics, tokens and CORS origins.
        keepalive_s: seconds between keep-alive comments on idle streams.

    Raises:
        ValueError: Kafka or Redis is not configured.
    """
    backends = Backends(settings, keepalive_s=keepalive_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_tokens:
            logger.warning(
                "AGENTFLOW_API_TOKENS is empty: the gateway API needs no token; "
                "set it before exposing the gateway beyond this machine"
            )
        try:
            await backends.producer()
        except Exception as exc:  # the API answers 503 until Kafka is back
            logger.warning("Kafka at %s unreachable at start: %s", settings.kafka_bootstrap, exc)
        try:
            yield
        finally:
            await backends.close()

    app = FastAPI(
        title="agentflow gateway",
        version="0.1.0",
        description="Start workflows, follow sessions live, answer escalations.",
        lifespan=lifespan,
    )
    app.state.backends = backends
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, exc.detail, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if loc and loc[0] in ("body", "query", "path", "header"):
                loc = loc[1:]
            errors.append(FieldProblem(field=".".join(loc) or "(body)", reason=err["msg"]))
        return _problem(422, _unprocessable("invalid request", errors).detail)

    @app.exception_handler(KafkaUnavailable)
    async def kafka_down(request: Request, exc: KafkaUnavailable) -> JSONResponse:
        return _problem(503, str(exc), {"Retry-After": "5"})

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        return _problem(503, f"Redis at {settings.redis_url} is unreachable: {exc}")

    for error in _REDIS_ERRORS:
        app.add_exception_handler(error, redis_down)

    app.include_router(public)
    app.include_router(api)
    app.include_router(streams)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the program that runs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve_gateway(
    settings: Settings, *, host: str, port: int, keepalive_s: float = 15.0
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Start the gateway in the running loop; return the server, its task and its URL.

    Stop it with `server.should_exit = True` and await the task. Port 0 picks a free one.

    Raises:
        OSError: the address cannot be bound (with the address in the message).
    """
    # IPPROTO_TCP given explicitly: asyncio sets TCP_NODELAY only on sockets that say so,
    # and without it every response waits ~40 ms for a delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings, keepalive_s=keepalive_s),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="gateway")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise RuntimeError("the gateway stopped during start-up")
        await asyncio.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}"
    logger.info("gateway on %s", url)
    return server, task, url
