"""Run the workflow graph for one session and report its transitions."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, Interrupt, StreamMode

from nodes.agents import load_agents
from nodes.context import WorkflowContext
from nodes.errors import AnswerError
from nodes.execution import AGENT_TASK, TOOL_APPROVAL, approval_problem
from nodes.finalize import build_result
from nodes.models import (
    AgentWait,
    AnswerSource,
    CloudEvent,
    HumanAnswer,
    HumanDecision,
    InterruptKind,
    WorkflowResult,
    utcnow,
)
from service.errors import EpochLost, StaleWriter, UnknownSessionError
from service.runtime.stream import TransitionMapper, TransitionSink
from service.storage.checkpointer import (
    EPOCH_CONFIG_KEY,
    SAVED_WRITES_CONFIG_KEY,
    RedisSaver,
    SavedWrites,
)
from service.storage.transitions import ENDED_BY_STATUS, Transition

__all__ = [
    "InMemorySequence",
    "SessionRunner",
    "StopCheck",
    "TakeSession",
    "check_answer",
    "interrupt_kind",
    "questions",
]

logger = logging.getLogger(__name__)

STREAM_MODES: list[StreamMode] = ["tasks", "updates", "custom"]
DURABILITY: Literal["sync"] = "sync"
"""Each step's checkpoint is saved before the next step starts. With LangGraph's default
("async") a step can finish while the previous checkpoint is still being written; after
a crash that step has no checkpoint to hang its writes on and runs a second time."""


class InMemorySequence:
    """Per-session transition counter for one process (the embedded mode)."""

    def __init__(self) -> None:
        self._seq: defaultdict[str, int] = defaultdict(int)

    async def next(self, session_id: str) -> int:
        """Return the session's next sequence number, starting at 1."""
        self._seq[session_id] += 1
        return self._seq[session_id]


async def _discard(transition: Transition) -> None:
    return None


StopCheck = Callable[[], str | None]
"""Asked at a run's step boundaries: the id of a newer event that supersedes it, or None."""


def _never() -> str | None:
    return None


TakeSession = Callable[[str], Awaitable[int]]
"""Takes a session for a run: raises the session's fencing epoch and returns it."""


class SessionRunner:
    """Drive a compiled graph for a session and turn its stream into transitions.

    The same runner serves `agentflow run`, the Kafka worker and the notebooks; only
    the checkpointer behind the graph and the sink differ.
    """

    def __init__(
        self,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        context: WorkflowContext,
        *,
        sink: TransitionSink = _discard,
        sequence: Any = InMemorySequence,
        is_infra_error: Callable[[BaseException], bool] = lambda exc: False,
        take: TakeSession | None = None,
    ) -> None:
        """Make a runner.

        Args:
            graph: the compiled workflow graph, with its checkpointer.
            context: the per-run options.
            sink: receives every transition.
            sequence: numbers transitions (an object with `async next(session_id)`),
                or None when the sink numbers them itself.
            is_infra_error: tells errors of the infrastructure (Redis, Kafka) that must not be
                turned into a failed result: they are raised so the caller can retry.
            take: fences the session's runs (`SessionStore.take`): each run takes a new
                epoch and carries it in its config and transitions, so the checkpointer
                and the publisher refuse the writes of a run a newer one took over
                (`StaleWriter`, raised to the caller; `EpochLost` when Redis lost the
                epoch, raised too, to be retried). None: runs are not fenced.
        """
        self.graph = graph
        self.context = context
        self.sink = sink
        self.sequence = sequence() if sequence is InMemorySequence else sequence
        self.is_infra_error = is_infra_error
        self.take = take

    def __repr__(self) -> str:
        return f"SessionRunner(model={self.context.model!r})"

    async def start(
        self, event: CloudEvent, session_id: str, *, stop: StopCheck = _never
    ) -> WorkflowResult:
        """Run an event in a session.

        A redelivered event (same id as the session's current run) is not run again:
        a half-way run continues from its last checkpoint, a finished or interrupted
        one returns the result it reached.

        Args:
            event: the event.
            session_id: its session.
            stop: asked at every step boundary; the id of a newer event that supersedes
                this run stops it there (result `superseded`, checkpoints kept).
        """
        config = self.config(session_id)
        snapshot = await self.graph.aget_state(config)
        if snapshot.values and _event_id_of(snapshot.values) == event.id:
            if snapshot.interrupts:
                return self._paused(session_id, snapshot)
            result = snapshot.values.get("result")
            if isinstance(result, WorkflowResult) and result.event_id == event.id:
                return result
            if snapshot.tasks:
                # Half-way: go on from the last checkpoint. Tasks that finished before a
                # crash saved their writes (then `next` no longer names them); LangGraph
                # applies those writes instead of running the tasks again.
                return await self._drive(session_id, None, event.id, resumed=True, stop=stop)
        return await self._drive(session_id, {"event": event}, event.id, resumed=False, stop=stop)

    async def questions(self, session_id: str) -> list[Interrupt]:
        """Return the interrupts of a session that wait for a human (see `questions`)."""
        return await questions(self.graph, session_id)

    async def check_answer(
        self,
        session_id: str,
        decision: HumanDecision | Any,
        *,
        source: AnswerSource | None = None,
        who: str = "",
        event_id: str | None = None,
    ) -> HumanAnswer:
        """Check an answer against the session's pending interrupts (see `check_answer`)."""
        return await check_answer(
            self.graph,
            session_id,
            decision,
            source=source,
            who=who,
            event_id=event_id,
            agents_file=self.context.agents_file,
        )

    async def resume(
        self,
        session_id: str,
        answer: HumanAnswer | HumanDecision | Any,
        *,
        event_id: str | None = None,
        stop: StopCheck = _never,
    ) -> WorkflowResult:
        """Resume the interrupt an answer is for, and run on.

        A `session.answered` transition says who decided what, before the run goes on.

        Args:
            session_id: the interrupted session.
            answer: the human's answer as `check_answer` returns it (with who and how);
                anything else is checked here first (`check_answer`, no origin).
            event_id: the id of the event that carried the answer; the result reports it.
            stop: as for `start`.

        Raises:
            UnknownSessionError: the session does not wait for that interrupt.
            AnswerError: an unchecked answer cannot be taken.
        """
        if not isinstance(answer, HumanAnswer) or answer.interrupt_id is None:
            answer = await self.check_answer(session_id, answer, event_id=event_id)
        pending = await self.questions(session_id)
        if not any(i.id == answer.interrupt_id for i in pending):
            raise UnknownSessionError(
                f"session {session_id} is not waiting for an answer to {answer.interrupt_id}"
            )
        snapshot = await self.graph.aget_state(self.config(session_id))
        original = _event_id_of(snapshot.values) or ""
        resume: Command[Any] = Command(resume={answer.interrupt_id: answer.model_dump(mode="json")})
        return await self._drive(
            session_id,
            resume,
            original,
            resumed=True,
            reply_to=event_id,
            stop=stop,
            answered=answer,
        )

    async def continue_run(
        self, session_id: str, *, event_id: str, stop: StopCheck = _never
    ) -> WorkflowResult:
        """Continue a run that stopped half-way (after a crash) from its checkpoint.

        Raises:
            UnknownSessionError: the session has nothing left to run.
        """
        snapshot = await self.graph.aget_state(self.config(session_id))
        if not snapshot.values or not snapshot.tasks or snapshot.interrupts:
            raise UnknownSessionError(f"session {session_id} has no run to continue")
        original = _event_id_of(snapshot.values) or ""
        return await self._drive(
            session_id, None, original, resumed=True, reply_to=event_id, stop=stop
        )

    async def run_of(self, session_id: str) -> str | None:
        """Return the run id of a session's current run: the id of the event it began with."""
        snapshot = await self.graph.aget_state(self.config(session_id))
        return _event_id_of(snapshot.values) if snapshot.values else None

    @staticmethod
    def config(session_id: str, run_id: str | None = None) -> RunnableConfig:
        """Return the graph config of a session (its thread), and of one run of it.

        A run's id is the id of the event that began it (resumes and continues after a
        crash keep it): its checkpoints carry it, and `adelete_for_runs` rolls it back.
        """
        if run_id is None:
            return {"configurable": {"thread_id": session_id}}
        return {"configurable": {"thread_id": session_id, "run_id": run_id}}

    async def emit(self, transition: Transition, *, epoch: int | None = None) -> None:
        """Number a transition and hand it to the sink.

        Args:
            transition: the transition.
            epoch: the fencing epoch of the run that emits it, if the run is fenced.
        """
        transition.epoch = epoch
        if self.sequence is not None:
            transition.seq = await self.sequence.next(transition.session_id)
        await self.sink(transition)

    async def _drive(
        self,
        session_id: str,
        graph_input: Any,
        event_id: str,
        *,
        resumed: bool,
        reply_to: str | None = None,
        stop: StopCheck = _never,
        answered: HumanAnswer | None = None,
    ) -> WorkflowResult:
        # Taken before the session's state is read: a run it fences off writes nothing after.
        epoch = await self.take(session_id) if self.take is not None else None
        if answered is not None:
            await self.emit(
                Transition(
                    session_id=session_id,
                    type="session.answered",
                    data=answered.model_dump(mode="json", exclude_none=True),
                ),
                epoch=epoch,
            )
        config = self.config(session_id, event_id or None)
        if epoch is not None:
            config["configurable"][EPOCH_CONFIG_KEY] = epoch
        saved = SavedWrites() if isinstance(self.graph.checkpointer, RedisSaver) else None
        if saved is not None:
            config["configurable"][SAVED_WRITES_CONFIG_KEY] = saved
        restored = {}
        if resumed:
            before = await self.graph.aget_state(config)
            restored = {t.id: t.result for t in before.tasks if t.result is not None}
        mapper = TransitionMapper(session_id, restored)
        await self.emit(
            Transition(
                session_id=session_id,
                type="session.started",
                data={"event_id": event_id, "resumed": resumed, "model": self.context.model},
            ),
            epoch=epoch,
        )
        result: Any = None
        superseded_by = stop()  # before its first step: it does not start
        running: set[str] = set()
        try:
            stream: AsyncGenerator[Any, None] = (
                self._nothing()
                if superseded_by
                else cast(
                    AsyncGenerator[Any, None],
                    self.graph.astream(
                        graph_input,
                        config,
                        context=self.context,
                        stream_mode=STREAM_MODES,
                        durability=DURABILITY,
                    ),
                )
            )
            async with aclosing(stream):
                async for mode, chunk in stream:
                    if mode == "tasks":
                        if "input" not in chunk:  # a task's end
                            running.discard(chunk["id"])
                        elif running or (superseded_by := stop()) is None:
                            running.add(chunk["id"])
                        else:
                            # A step boundary: the step before is checkpointed (durability
                            # "sync"), the new step's tasks are dropped with the stream.
                            break
                    finalized = chunk.get("finalize") if isinstance(chunk, dict) else None
                    if mode == "updates" and isinstance(finalized, dict):
                        result = finalized.get("result")
                    for transition in mapper.map(mode, chunk):
                        if await self._unsaved(transition, saved):
                            continue  # the stream raises the saver's error next
                        await self.emit(transition, epoch=epoch)
        except Exception as exc:
            if isinstance(exc, (StaleWriter, EpochLost)) or self.is_infra_error(exc):
                raise
            logger.warning("session %s failed: %s", session_id, exc)
            snapshot = await self.graph.aget_state(config)
            error = f"{type(exc).__name__}: {exc}"
            result = build_result(
                snapshot.values, session_id=session_id, status="failed", error=error
            )
            # The state may not hold this event (its first checkpoint was not written),
            # or hold the session's previous one: the result names the event it answers.
            result.event_id = event_id or result.event_id
            await self._end(result, "session.failed", reply_to, epoch)
            return result
        if superseded_by is not None and result is None:
            snapshot = await self.graph.aget_state(config)
            error = f"superseded by event {superseded_by}"
            result = build_result(
                snapshot.values, session_id=session_id, status="superseded", error=error
            )
            result.event_id = event_id or result.event_id
            await self._end(result, "session.superseded", reply_to, epoch, by=superseded_by)
            return result
        if isinstance(result, WorkflowResult) and result.event_id == event_id:
            # The usual end: the result is in finalize's writes. Reading the state back
            # would rebuild the conversations from every checkpoint of the run.
            await self._end(result, ENDED_BY_STATUS[result.status], reply_to, epoch)
            return result
        snapshot = await self.graph.aget_state(config)
        if snapshot.interrupts:
            result = self._paused(session_id, snapshot)
            if result.status == "waiting":
                await self._end(result, "session.waiting", None, epoch)
            else:
                await self._end(result, "session.interrupted", reply_to, epoch)
            return result
        result = snapshot.values.get("result")
        if not isinstance(result, WorkflowResult) or result.event_id != event_id:
            result = build_result(
                snapshot.values,
                session_id=session_id,
                status="failed",
                error="the graph stopped without a result",
            )
            result.event_id = event_id or result.event_id
        await self._end(result, ENDED_BY_STATUS[result.status], reply_to, epoch)
        return result

    @staticmethod
    async def _unsaved(transition: Transition, saved: SavedWrites | None) -> bool:
        """Wait until a finished task's writes are stored; True when they were not.

        Announced before they are stored, a task a crash cuts short would be announced
        again when the next run of the session runs it again.
        """
        if saved is None or transition.type != "node.completed" or transition.task_id is None:
            return False
        if (transition.data or {}).get("restored"):
            return False
        return not await saved.saved(transition.task_id)

    @staticmethod
    async def _nothing() -> AsyncGenerator[Any, None]:
        return
        yield

    @staticmethod
    def _paused(session_id: str, snapshot: Any) -> WorkflowResult:
        """The result of a run that stopped at interrupts: for a human, or for remote agents.

        A human's question comes first: the agents' tasks wait with the session.
        """
        human = [i for i in snapshot.interrupts if not _is_agent_task(i.value)]
        if human:
            value = human[0].value
            question = value.get("question") if isinstance(value, dict) else str(value)
            return build_result(
                snapshot.values, session_id=session_id, status="interrupted", question=question
            )
        result = build_result(snapshot.values, session_id=session_id, status="waiting")
        result.waiting_on = [_agent_wait(i) for i in snapshot.interrupts]
        return result

    async def agent_tasks(self, session_id: str) -> list[Interrupt]:
        """Return the remote agents' tasks a session waits for (interrupts of kind agent_task)."""
        snapshot = await self.graph.aget_state(self.config(session_id))
        return [i for i in snapshot.interrupts if _is_agent_task(i.value)]

    async def reply(
        self, session_id: str, task_id: str, reply: dict[str, Any], *, stop: StopCheck = _never
    ) -> WorkflowResult:
        """Resume a session that waits for a remote agent with the agent's reply.

        Only the interrupt that waits for this task is answered; the run goes on until its
        next end, which may be another wait.

        Raises:
            UnknownSessionError: the session does not wait for this task (a duplicate or
                late reply, or an unknown task).
        """
        snapshot = await self.graph.aget_state(self.config(session_id))
        pending = [
            i
            for i in snapshot.interrupts
            if _is_agent_task(i.value) and i.value.get("task_id") == task_id
        ]
        if not pending:
            raise UnknownSessionError(f"session {session_id} does not wait for task {task_id}")
        original = _event_id_of(snapshot.values) or ""
        resume: Command[Any] = Command(resume={pending[0].id: reply})
        return await self._drive(session_id, resume, original, resumed=True, stop=stop)

    async def _end(
        self,
        result: WorkflowResult,
        kind: Any,
        reply_to: str | None,
        epoch: int | None,
        *,
        by: str | None = None,
    ) -> None:
        if reply_to:
            result.event_id = reply_to
        data = {
            "status": result.status,
            "error": result.error,
            "question": result.question,
            "result": result.model_dump(mode="json"),
        }
        if by is not None:
            data["by"] = by
        await self.emit(Transition(session_id=result.session_id, type=kind, data=data), epoch=epoch)


async def questions(
    graph: CompiledStateGraph[Any, Any, Any, Any], session_id: str
) -> list[Interrupt]:
    """Return the interrupts of a session that wait for a human (not for remote agents).

    Raises:
        UnknownSessionError: the session has no checkpoint.
    """
    snapshot = await graph.aget_state(SessionRunner.config(session_id))
    if not snapshot.values:
        raise UnknownSessionError(f"session {session_id} does not exist")
    return [i for i in snapshot.interrupts if not _is_agent_task(i.value)]


async def check_answer(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    session_id: str,
    decision: HumanDecision | Any,
    *,
    source: AnswerSource | None = None,
    who: str = "",
    event_id: str | None = None,
    agents_file: str | Path | None = None,
) -> HumanAnswer:
    """Check an answer against a session's pending interrupts; return it as kept.

    Its `interrupt_id` may be left out when exactly one interrupt waits for a human.

    Args:
        graph: the compiled graph, with the session's checkpointer.
        session_id: the session.
        decision: a `HumanDecision`, or what `HumanDecision.read` reads (free text that
            starts with a decision, a mapping), read once the session is known.
        source: how the answer came.
        who: who answered.
        event_id: the event that carried it.
        agents_file: the agents file: an edit of a tool call is checked against the
            tool's arguments (without it, the step checks it when it resumes).

    Raises:
        UnknownSessionError: the session does not exist or waits for no human.
        AnswerError: the answer names no decision or no pending interrupt, leaves the
            interrupt to guess, or does not fit it (the message says what would).
    """
    pending = await questions(graph, session_id)
    if not pending:
        raise UnknownSessionError(f"session {session_id} is not waiting for an answer")
    decision = HumanDecision.read(decision)
    ids = ", ".join(i.id for i in pending)
    if decision.interrupt_id is None:
        if len(pending) > 1:
            raise AnswerError(
                f"session {session_id} has {len(pending)} pending interrupts ({ids}): "
                "name the one answered with interrupt_id"
            )
        chosen = pending[0]
    else:
        found = [i for i in pending if i.id == decision.interrupt_id]
        if not found:
            raise AnswerError(
                f"session {session_id} has no pending interrupt {decision.interrupt_id}; "
                f"pending: {ids}"
            )
        chosen = found[0]
    payload = chosen.value if isinstance(chosen.value, dict) else {}
    kind = interrupt_kind(chosen)
    if kind == TOOL_APPROVAL and agents_file is not None:
        registry = await asyncio.to_thread(load_agents, agents_file)
        problem = approval_problem(registry, payload, decision)
    else:
        problem = decision.problem_with(kind, payload)
    if problem is not None:
        raise AnswerError(problem)
    return HumanAnswer(
        **decision.model_dump(include=set(HumanDecision.model_fields) - {"interrupt_id"}),
        interrupt_id=chosen.id,
        kind=kind,
        source=source,
        who=who,
        event_id=event_id,
        answered_at=utcnow(),
    )


def interrupt_kind(interrupt: Interrupt) -> InterruptKind:
    """What a human interrupt asks; the review's questions of older sessions carry no kind."""
    value = interrupt.value
    kind = value.get("kind") if isinstance(value, dict) else None
    return TOOL_APPROVAL if kind == TOOL_APPROVAL else "review"


def _is_agent_task(value: Any) -> bool:
    return isinstance(value, dict) and value.get("kind") == AGENT_TASK


def _agent_wait(interrupt: Interrupt) -> AgentWait:
    value = interrupt.value
    return AgentWait(
        task_id=value["task_id"],
        agent=value["agent"],
        step_id=value["step"]["id"],
        attempt=value.get("attempt", 1),
        timeout_s=value["timeout_s"],
        interrupt_id=interrupt.id,
    )


def _event_id_of(values: dict[str, Any]) -> str | None:
    event = values.get("event")
    if isinstance(event, CloudEvent):
        return event.id
    if isinstance(event, dict):
        return event.get("id")
    return None
