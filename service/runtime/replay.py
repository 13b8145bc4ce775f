"""Time travel: read a session's checkpoints, fork it from one of them, run the branch.

Sessions live in the Redis checkpointer when `AGENTFLOW_REDIS_URL` is set (the worker's),
otherwise in the SQLite file of `agentflow run` under `AGENTFLOW_DATA_DIR`. A replay never
rewrites a checkpoint: LangGraph stores the fork as new checkpoints of the same thread
that branch off at the chosen one, so the original history stays readable by checkpoint
id and the session's head moves to the new branch.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import StateSnapshot
from pydantic import TypeAdapter, ValidationError

from graphs.workflow import build_graph
from nodes.models import CloudEvent, WorkflowResult, session_id_problem
from nodes.state import WorkflowState
from service.bootstrap import RedisClient, open_session_checkpointer
from service.config import Settings
from service.errors import ReplayError
from service.observe.path import SessionPath, session_path
from service.runtime.runner import InMemorySequence, SessionRunner
from service.runtime.stream import TransitionSink
from service.storage.checkpoints import expire_session, session_states
from service.storage.publisher import TransitionPublisher, read_log
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition

__all__ = [
    "ReplayResult",
    "SessionGraph",
    "branch_history",
    "checkpoint_id",
    "copy_session",
    "describe",
    "fork",
    "load_session_path",
    "open_session_graph",
    "parse_edits",
    "replay",
    "replay_session",
    "transitions_from_history",
]

logger = logging.getLogger(__name__)


@dataclass
class SessionGraph:
    """The workflow graph on the checkpointer that holds the sessions."""

    graph: CompiledStateGraph
    """The compiled graph, with the sessions' checkpointer."""
    redis: RedisClient | None
    """The Redis client when sessions live in Redis (for their logs and records)."""
    where: str
    """Where the checkpoints are, for messages."""


@asynccontextmanager
async def open_session_graph(settings: Settings) -> AsyncIterator[SessionGraph]:
    """Open the graph on the sessions' checkpointer: Redis if configured, else SQLite.

    Raises:
        ReplayError: no Redis is configured and `agentflow run` has no checkpoint file.
    """
    async with AsyncExitStack() as stack:
        try:
            sessions = await stack.enter_async_context(open_session_checkpointer(settings))
        except FileNotFoundError as exc:
            raise ReplayError(
                f"no sessions here: {exc.args[0]} does not exist and AGENTFLOW_REDIS_URL is "
                "not set (run an event with `agentflow run`, or point AGENTFLOW_REDIS_URL at "
                "the worker's Redis)"
            ) from None
        graph = build_graph(sessions.saver, model_retry=settings.model_retry())
        yield SessionGraph(graph, sessions.redis, sessions.where)


def _thread(session_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    configurable: dict[str, Any] = {"thread_id": session_id}
    if checkpoint_id:
        # Savers echo this config back; SQLite's then needs the namespace to write.
        configurable |= {"checkpoint_ns": "", "checkpoint_id": checkpoint_id}
    return {"configurable": configurable}


def checkpoint_id(snapshot: StateSnapshot) -> str:
    """Return the id of the checkpoint a snapshot was read from."""
    return str(snapshot.config["configurable"]["checkpoint_id"])


def _parent_id(snapshot: StateSnapshot) -> str | None:
    parent = snapshot.parent_config
    return str(parent["configurable"]["checkpoint_id"]) if parent else None


async def branch_history(
    graph: CompiledStateGraph, session_id: str, head: str | None = None
) -> list[StateSnapshot]:
    """Return the checkpoints from a session's first to `head` (default: its latest).

    Other branches of the same thread (earlier forks) are left out: this is the path
    that led to `head`, oldest first.
    """
    snapshots = {checkpoint_id(s): s async for s in session_states(graph, session_id)}
    if not snapshots:
        return []
    current: str | None = head or max(snapshots)
    chain = []
    while current is not None and current in snapshots:
        chain.append(snapshots[current])
        current = _parent_id(snapshots[current])
    return chain[::-1]


def describe(snapshot: StateSnapshot) -> str:
    """One line about a checkpoint: step, id, source and what runs next."""
    meta = snapshot.metadata or {}
    nxt = ", ".join(snapshot.next) or "(end)"
    waits = " (waiting for a human)" if snapshot.interrupts else ""
    return f"step {meta.get('step', '?'):>3}  {checkpoint_id(snapshot)}  next {nxt}{waits}"


def transitions_from_history(
    snapshots: Iterable[StateSnapshot], session_id: str
) -> list[Transition]:
    """Rebuild a session's node transitions from its checkpoints, oldest first.

    Used when a session has no transition log (`agentflow run`, notebooks): each
    superstep's tasks start at its checkpoint and finish at the next one, so a node's
    duration is its superstep's.
    """
    chain = list(snapshots)
    out: list[Transition] = []

    def add(**fields: Any) -> None:
        out.append(Transition(session_id=session_id, seq=len(out) + 1, **fields))

    for i, snap in enumerate(chain):
        at = _created(snap)
        tasks = [t for t in snap.tasks if t.name != "__start__"]
        if not tasks:
            continue
        if i + 1 < len(chain) and (chain[i + 1].metadata or {}).get("source") in FORKS:
            continue  # an edit or a replay forked here: these tasks ran on the new checkpoint
        for task in tasks:
            add(type="node.started", node=task.name, step_id=task.id, ts=at)
        if i + 1 >= len(chain):
            break  # still to run, or waiting for a human
        done = _created(chain[i + 1])
        took = int(max(timedelta(0), done - at) / timedelta(milliseconds=1))
        for task in tasks:
            kind = "node.failed" if task.error else "node.completed"
            add(type=kind, node=task.name, step_id=task.id, ts=done, duration_ms=took)
    if chain:
        last = chain[-1]
        if last.interrupts:
            add(type="session.interrupted", ts=_created(last))
        elif not last.next and last.values.get("result") is not None:
            add(type="session.completed", ts=_created(last))
    return out


FORKS = frozenset({"update", "fork"})
"""Checkpoint sources that start a branch rather than record a superstep's run."""


def _created(snapshot: StateSnapshot) -> datetime:
    return datetime.fromisoformat(snapshot.created_at) if snapshot.created_at else datetime.min


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(WorkflowState)


def parse_edits(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse `KEY=JSON` state edits and validate each value against the state's type.

    Raises:
        ReplayError: a malformed pair, an unknown key or a value of the wrong shape.
    """
    edits: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ReplayError(f"--set {pair!r}: use KEY=JSON, e.g. --set 'goals=[\"x\"]'")
        if key not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ReplayError(f"--set {key}: not a state key; use one of {known}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ReplayError(f"--set {key}: the value is not JSON ({exc.msg}): {raw!r}") from None
        try:
            edits[key] = TypeAdapter(_FIELD_TYPES[key]).validate_python(value)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise ReplayError(
                f"--set {key}: {problem['msg']}" + (f" at {where}" if where else "")
            ) from None
    return edits


@dataclass
class ReplayResult:
    """What a replay did."""

    session_id: str
    from_checkpoint: str
    """The checkpoint the branch was forked from."""
    fork_checkpoint: str
    """The branch's first checkpoint (a copy of `from_checkpoint`, or the edited state)."""
    head_checkpoint: str
    """The branch's latest checkpoint: the session's head now."""
    edits: dict[str, Any]
    result: WorkflowResult


async def fork(
    graph: CompiledStateGraph,
    session_id: str,
    from_checkpoint: str,
    edits: dict[str, Any] | None = None,
) -> RunnableConfig:
    """Make a new branch of a session at a checkpoint, with optional state edits.

    Without edits the checkpoint is copied (LangGraph's `__copy__`), so the same nodes
    run next. With edits the values are written as if by the node that produced the
    checkpoint, so its edges are taken again on the edited state.

    Returns:
        The config of the branch's first checkpoint.

    Raises:
        ReplayError: the checkpoint does not exist or cannot take the edits.
    """
    saver = graph.checkpointer
    assert isinstance(saver, BaseCheckpointSaver), "replay needs a graph with a checkpointer"
    config = _thread(session_id, from_checkpoint)
    saved = await saver.aget_tuple(config)
    if saved is None:
        raise ReplayError(await _unknown_checkpoint(graph, session_id, from_checkpoint))
    base = await graph.aget_state(config)
    if base.parent_config is None or not isinstance(base.values.get("event"), CloudEvent):
        raise ReplayError(
            f"checkpoint {from_checkpoint} is the run's input and holds no state yet; "
            "fork from a later checkpoint"
        )
    if not edits:
        return await graph.aupdate_state(base.config, None, as_node="__copy__")
    writers = await _writers(graph, base)
    if len(writers) != 1:
        raise ReplayError(
            f"checkpoint {from_checkpoint} was written by {', '.join(writers) or 'no node'}; "
            "edits need a checkpoint written by one node"
        )
    try:
        return await graph.aupdate_state(base.config, edits, as_node=writers[0])
    except Exception as exc:
        raise ReplayError(
            f"cannot apply the edits at checkpoint {from_checkpoint} as node `{writers[0]}`: "
            f"{str(exc).rstrip('.')}; pick a checkpoint before or after it, or replay "
            "without --set"
        ) from exc


async def _writers(graph: CompiledStateGraph, snapshot: StateSnapshot) -> list[str]:
    """The nodes whose superstep produced a checkpoint."""
    if snapshot.parent_config is None:
        return []
    parent = await graph.aget_state(snapshot.parent_config)
    return sorted({t.name for t in parent.tasks})


async def _unknown_checkpoint(graph: CompiledStateGraph, session_id: str, wanted: str) -> str:
    history = await branch_history(graph, session_id)
    if not history:
        return f"session {session_id} has no checkpoints"
    lines = "\n".join(f"  {describe(s)}" for s in history)
    return f"session {session_id} has no checkpoint {wanted}; its checkpoints:\n{lines}"


async def replay(
    graph: CompiledStateGraph,
    session_id: str,
    from_checkpoint: str,
    *,
    context: Any,
    edits: dict[str, Any] | None = None,
    sink: TransitionSink | None = None,
    sequence: Any = InMemorySequence,
    forked_from: str | None = None,
) -> ReplayResult:
    """Fork a session at a checkpoint, with optional edits, and run the branch on.

    The run goes through `SessionRunner`, so it emits the same transitions as any run
    (its `session.started` carries `replay_from`) and stops at an interrupt like one.

    Args:
        graph: the workflow graph on the sessions' checkpointer.
        session_id: the session (thread) to fork.
        from_checkpoint: the checkpoint to fork from.
        context: the per-run options (`WorkflowContext`).
        edits: state values to set on the branch before it runs.
        sink: receives the branch's transitions; the `session.started` one carries
            `replay_from`, `fork_checkpoint` and `after` (the nodes that ran just before
            the fork).
        sequence: numbers transitions (see `SessionRunner`); None when the sink does.
        forked_from: the session this one was copied from (`replay --as`), for the
            `session.started` transition.

    Raises:
        ReplayError: the checkpoint does not exist or cannot take the edits.
    """
    edits = edits or {}
    fork_config = await fork(graph, session_id, from_checkpoint, edits)
    event = (await graph.aget_state(fork_config)).values["event"]
    after = await _writers(graph, await graph.aget_state(_thread(session_id, from_checkpoint)))

    async def mark(transition: Transition) -> None:
        if transition.type == "session.started":
            transition.data = {
                **(transition.data or {}),
                "replay_from": from_checkpoint,
                "fork_checkpoint": fork_config["configurable"]["checkpoint_id"],
                "after": after,
            } | ({"forked_from": forked_from} if forked_from else {})
        if sink is not None:
            await sink(transition)

    runner = SessionRunner(graph, context, sink=mark, sequence=sequence)
    result = await runner.start(event, session_id)
    final = await graph.aget_state(_thread(session_id))
    logger.info(
        "session %s forked at %s, branch head %s: %s",
        session_id,
        from_checkpoint,
        checkpoint_id(final),
        result.status,
    )
    return ReplayResult(
        session_id=session_id,
        from_checkpoint=from_checkpoint,
        fork_checkpoint=str(fork_config["configurable"]["checkpoint_id"]),
        head_checkpoint=checkpoint_id(final),
        edits=edits,
        result=result,
    )


async def replay_session(
    settings: Settings,
    session_id: str,
    from_checkpoint: str,
    edits: dict[str, Any] | None = None,
    *,
    as_session: str | None = None,
    on_transition: TransitionSink | None = None,
) -> ReplayResult:
    """Replay a session where the service keeps it: Redis if configured, else SQLite.

    On Redis the branch's transitions go to the session's log and channels like any
    run's (so `agentflow watch` and the gateway follow it) and the session record gets
    the branch's result. With `as_session` the session's whole history is first copied
    to that new session, which takes the branch: the original stays as it was.

    Raises:
        ReplayError: no such session or checkpoint, the session is running, the new
            session exists or breaks the session-id rule, or the edits cannot be applied.
    """
    async with open_session_graph(settings) as opened:
        sequence: Any = InMemorySequence
        sink = on_transition
        store: SessionStore | None = None
        target = session_id
        if opened.redis is not None:
            sessions = SessionStore(opened.redis, ttl_s=settings.session_ttl_s)
            record = await sessions.get(session_id)
            if record is not None and record.status == "running":
                raise ReplayError(f"session {session_id} is running; replay it once it has stopped")
            store = sessions if record is not None else None
        if as_session is not None:
            event = await _event_at(opened.graph, session_id, from_checkpoint)
            target = await copy_session(opened, session_id, as_session, from_checkpoint)
            if opened.redis is not None:
                await sessions.open(
                    target, event_id=event.id, event_type=event.type, subject=event.subject
                )
                store = sessions
        if opened.redis is not None:
            publisher = TransitionPublisher(
                opened.redis, ttl_s=settings.session_ttl_s, maxlen=settings.transition_log_maxlen
            )

            async def publish(transition: Transition) -> None:
                # Numbers it and moves the record's current node, as the worker's sink does.
                await publisher.publish(transition)
                if on_transition is not None:
                    await on_transition(transition)

            sink, sequence = publish, None
        outcome = await replay(
            opened.graph,
            target,
            from_checkpoint,
            context=settings.context(),
            edits=edits,
            sink=sink,
            sequence=sequence,
            forked_from=None if target == session_id else session_id,
        )
        if opened.redis is not None and outcome.result.status != "interrupted":
            await expire_session(
                opened.graph.checkpointer,
                target,
                settings.session_ttl_s,
                retention=settings.checkpoint_retention,
            )
        if store is not None:
            await store.close(outcome.result)
        return outcome


async def copy_session(
    opened: SessionGraph, session_id: str, new_session_id: str, from_checkpoint: str
) -> str:
    """Copy a session's whole history (every checkpoint and write) to a new session.

    The checkpointer's `acopy_thread` does it where it has one (agentflow's `RedisSaver`);
    otherwise (`agentflow run`'s SQLite) the checkpoints are put again, oldest first.

    Returns:
        The new session id.

    Raises:
        ReplayError: the checkpoint to fork from is unknown, or the new session id is taken
            or breaks the session-id rule.
    """
    graph = opened.graph
    saver = graph.checkpointer
    assert isinstance(saver, BaseCheckpointSaver), "replay needs a graph with a checkpointer"
    if (problem := session_id_problem(new_session_id)) is not None:
        raise ReplayError(f"--as {new_session_id!r}: a session id {problem}")
    if await saver.aget_tuple(_thread(session_id, from_checkpoint)) is None:
        raise ReplayError(await _unknown_checkpoint(graph, session_id, from_checkpoint))
    taken = await saver.aget_tuple(_thread(new_session_id)) is not None
    if not taken and opened.redis is not None:
        taken = await SessionStore(opened.redis, ttl_s=60).get(new_session_id) is not None
    if taken:
        raise ReplayError(f"session {new_session_id} exists already; --as needs a new session id")
    if type(saver).acopy_thread is not BaseCheckpointSaver.acopy_thread:
        await saver.acopy_thread(session_id, new_session_id)
        return new_session_id
    copied = [t async for t in saver.alist({"configurable": {"thread_id": session_id}})]
    for saved in reversed(copied):  # oldest first: a parent before its children
        configurable = {
            "thread_id": new_session_id,
            "checkpoint_ns": saved.config["configurable"].get("checkpoint_ns", ""),
        }
        if saved.parent_config is not None:
            configurable["checkpoint_id"] = saved.parent_config["configurable"]["checkpoint_id"]
        checkpoint = saved.checkpoint
        stored = await saver.aput(
            {"configurable": configurable},
            checkpoint,
            saved.metadata,
            checkpoint["channel_versions"],
        )
        by_task: dict[str, list[tuple[str, Any]]] = {}
        for task_id, channel, value in saved.pending_writes or []:
            by_task.setdefault(task_id, []).append((channel, value))
        for task_id, writes in by_task.items():
            await saver.aput_writes(stored, writes, task_id)
    return new_session_id


async def _event_at(graph: CompiledStateGraph, session_id: str, checkpoint: str) -> CloudEvent:
    """The event a checkpoint's run answers (the checkpoint must hold state)."""
    saver = graph.checkpointer
    assert isinstance(saver, BaseCheckpointSaver), "replay needs a graph with a checkpointer"
    if await saver.aget_tuple(_thread(session_id, checkpoint)) is None:
        raise ReplayError(await _unknown_checkpoint(graph, session_id, checkpoint))
    event = (await graph.aget_state(_thread(session_id, checkpoint))).values.get("event")
    if not isinstance(event, CloudEvent):
        raise ReplayError(
            f"checkpoint {checkpoint} is the run's input and holds no state yet; "
            "fork from a later checkpoint"
        )
    return event


async def load_session_path(settings: Settings, session_id: str) -> SessionPath:
    """Return the path a session took.

    From its transition log in Redis when there is one (real node durations), else
    from its checkpoints (durations of whole supersteps).

    Raises:
        ReplayError: the session is unknown.
    """
    async with open_session_graph(settings) as opened:
        if opened.redis is not None and (log := await read_log(opened.redis, session_id)):
            return session_path(log)
        history = await branch_history(opened.graph, session_id)
        if not history:
            raise ReplayError(f"session {session_id} is not in {opened.where}")
        return session_path(transitions_from_history(history, session_id))
