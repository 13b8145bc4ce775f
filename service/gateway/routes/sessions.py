"""The sessions: list, detail, result, checkpoint history, and the resume and cancel commands."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import HTTPException

from nodes.errors import AnswerError
from nodes.models import (
    CANCEL_EVENT_TYPE,
    GATEWAY_SOURCE,
    CloudEvent,
    ResultWorkflow,
    WorkflowResult,
)
from service.client import resume_event, session_id_for
from service.errors import UnknownSessionError
from service.gateway.auth import AUTH_ERRORS, TokenName, require_token
from service.gateway.backends import Backends, BackendsDep, known_session
from service.gateway.schemas import (
    KAFKA_DOWN,
    REDIS_DOWN,
    CheckpointSummary,
    EventAccepted,
    Problem,
    ResumeRequest,
    SessionDetail,
    SessionHistory,
    SessionInterrupts,
    SessionPage,
    SessionReview,
    SessionSummary,
    unprocessable,
)
from service.runtime.runner import check_answer
from service.storage.checkpoints import session_states
from service.storage.publisher import read_log
from service.storage.questions import QuestionStore
from service.storage.sessions import WAITS, SessionStatus

__all__ = ["router"]

router = APIRouter(dependencies=[Depends(require_token)], responses=AUTH_ERRORS)


@router.get("/sessions", response_model=SessionPage, responses={422: {"model": Problem}})
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
        sessions=[SessionSummary.of(r) for r in records], total=total, limit=limit, offset=offset
    )


@router.get(
    "/sessions/{session_id}",
    response_model=SessionDetail,
    responses={404: {"model": Problem}, **REDIS_DOWN},
)
async def get_session(session_id: str, backends: BackendsDep) -> SessionDetail:
    """Return a session: status, current node, workflow, review and result."""
    record = await known_session(backends, session_id)
    graph = await backends.graph()
    snapshot = await graph.aget_state({"configurable": {"thread_id": session_id}})
    values = snapshot.values or {}
    detail = SessionDetail(
        **SessionSummary.of(record).model_dump(),
        event_ids=record.event_ids,
        answers=record.answers,
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


@router.get(
    "/sessions/{session_id}/result",
    response_model=WorkflowResult,
    responses={404: {"model": Problem, "description": "No such session or no result yet."}},
)
async def get_result(
    session_id: str,
    backends: BackendsDep,
    event_id: Annotated[str | None, Query(description="The result of this event.")] = None,
) -> WorkflowResult:
    """Return the session's latest result (of one event, with `event_id`).

    An earlier event's result (one refused, superseded or rolled back by a newer event,
    or run before the latest) is read from the session's transition log.
    """
    record = await known_session(backends, session_id)
    result = record.result
    if result is not None and (event_id is None or result.event_id == event_id):
        return result
    if event_id is not None:
        for transition in reversed(await read_log(backends.redis, session_id)):
            found = (transition.data or {}).get("result") if transition.terminal else None
            if isinstance(found, dict) and found.get("event_id") == event_id:
                return WorkflowResult.model_validate(found)
    raise HTTPException(404, f"session {session_id} has no result for that event yet")


@router.get(
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
    # A session has a record from its first event on; asking for it first answers 404 for
    # any other id without handing that id to the checkpointer's search.
    await known_session(backends, session_id)
    graph = await backends.graph()
    checkpoints: list[CheckpointSummary] = []
    async for snapshot in session_states(graph, session_id, limit=limit, before=before):
        configurable = snapshot.config["configurable"]
        parent = (snapshot.parent_config or {}).get("configurable", {})
        created = snapshot.created_at
        metadata = snapshot.metadata or {}
        checkpoints.append(
            CheckpointSummary(
                checkpoint_id=configurable["checkpoint_id"],
                parent_checkpoint_id=parent.get("checkpoint_id"),
                created_at=datetime.fromisoformat(created) if created else None,
                step=metadata.get("step"),
                source=metadata.get("source"),
                next=list(snapshot.next),
                tasks=[task.name for task in snapshot.tasks],
                interrupts=[i.value for i in snapshot.interrupts],
                steps={s.id: s.status for s in (snapshot.values or {}).get("steps", [])},
            )
        )
    return SessionHistory(session_id=session_id, checkpoints=checkpoints)


@router.get(
    "/sessions/{session_id}/interrupts",
    response_model=SessionInterrupts,
    responses={404: {"model": Problem}, **REDIS_DOWN},
)
async def list_interrupts(session_id: str, backends: BackendsDep) -> SessionInterrupts:
    """Return the interrupts a session waits on a human for: id, kind, payload, since when.

    An answer names one with `interrupt_id` (`POST /sessions/{id}/resume`).
    """
    await known_session(backends, session_id)
    pending = await QuestionStore(backends.redis).pending(session_id)
    return SessionInterrupts(session_id=session_id, interrupts=pending)


@router.post(
    "/sessions/{session_id}/resume",
    status_code=202,
    response_model=EventAccepted,
    responses={
        404: {"model": Problem},
        409: {"model": Problem, "description": "The session is not waiting for an answer."},
        422: {"model": Problem},
        **KAFKA_DOWN,
    },
)
async def resume_session(
    session_id: str, body: ResumeRequest, backends: BackendsDep, token: TokenName
) -> EventAccepted:
    """Answer a session's interrupt: an `agentflow.resume` event goes to the worker.

    The decision is checked against the pending interrupt first (422 with the reason when
    it names no decision, no pending interrupt, or does not fit it). The answer is
    recorded as given through `http` by the token's name (`name:token` in
    AGENTFLOW_API_TOKENS).
    """
    record = await known_session(backends, session_id)
    if (why := record.why_not_answerable()) is not None:
        raise HTTPException(409, why)
    try:
        decision = body.read()
        await check_answer(
            await backends.graph(),
            session_id,
            decision,
            agents_file=backends.settings.agents_file,
        )
    except AnswerError as exc:
        raise unprocessable(str(exc), []) from None
    except UnknownSessionError:
        # The record says it waits but its checkpoint does not (answered meanwhile, or
        # its state was lost): the worker's answer to the event says which.
        pass
    event = resume_event(session_id, decision, source=GATEWAY_SOURCE, authid=token)
    return await _command(backends, event)


@router.post(
    "/sessions/{session_id}/cancel",
    status_code=202,
    response_model=EventAccepted,
    responses={
        404: {"model": Problem},
        409: {"model": Problem, "description": "The session has already ended."},
        **KAFKA_DOWN,
    },
)
async def cancel_session(session_id: str, backends: BackendsDep) -> EventAccepted:
    """Cancel a session: an `agentflow.cancel` event stops its run in the worker."""
    record = await known_session(backends, session_id)
    if record.status not in ("running", *WAITS):
        raise HTTPException(409, f"session {session_id} has already ended ({record.status})")
    cancel = CloudEvent.wrap(CANCEL_EVENT_TYPE, None, session_id=session_id, source=GATEWAY_SOURCE)
    return await _command(backends, cancel)


async def _command(backends: Backends, event: CloudEvent) -> EventAccepted:
    """Send a command event (resume, cancel) to its session's run, through Kafka."""
    session_id = session_id_for(event)
    await backends.send(event, session_id)
    return EventAccepted.of(session_id, event.id)
