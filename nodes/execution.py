"""`execute` and `execute_step`: run ready steps in parallel, each by its agents."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.tools import BaseTool, InjectedToolArg, StructuredTool
from langgraph.config import get_config
from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime
from langgraph.types import Send, interrupt
from pydantic import BaseModel, ValidationError

from nodes._llm import bind_tools, chat_model, invoke, model_name
from nodes._runtime import ask_human, context_of, dumps, write
from nodes.agents import AgentRegistry, AgentSpec, load_agents
from nodes.chat_models import MODEL_MAX_ATTEMPTS, is_retryable
from nodes.context import WorkflowContext
from nodes.errors import RemoteAgentError
from nodes.models import (
    DECISIONS,
    ApprovedCall,
    CloudEvent,
    HumanAnswer,
    HumanDecision,
    InterruptKind,
    SessionNote,
    Step,
    Usage,
    subject_namespace,
)
from nodes.prompts import STEP_AGENT_PROMPT, STEP_TASK_PROMPT
from nodes.protocol import AgentReply, ConversationMessage, TaskStep
from nodes.state import StepTask, WorkflowState

__all__ = [
    "AGENT_TASK",
    "AgentTurn",
    "TOOL_APPROVAL",
    "agent_task_id",
    "approval_problem",
    "dispatch_ready_steps",
    "edit_problem",
    "execute",
    "execute_step",
    "ready_steps",
    "recall_subject",
    "run_agent_turn",
    "step_task_message",
]

logger = logging.getLogger(__name__)


def ready_steps(steps: list[Step]) -> list[Step]:
    """Return the pending steps whose dependencies are all done."""
    status = {s.id: s.status for s in steps}
    return [
        s
        for s in steps
        if s.status == "pending" and all(status.get(d) == "done" for d in s.depends_on)
    ]


async def execute(state: WorkflowState) -> dict[str, Any]:
    """Schedule the next wave: skip steps whose dependencies failed.

    The ready steps themselves are sent to `execute_step` by `dispatch_ready_steps`.
    """
    steps = {s.id: s for s in state.get("steps", [])}
    skipped: dict[str, Step] = {}
    changed = True
    while changed:  # a skip can make further steps unreachable
        changed = False
        for step in steps.values():
            if step.status != "pending":
                continue
            bad = [d for d in step.depends_on if steps[d].status in ("failed", "skipped")]
            if bad:
                step = step.model_copy(
                    update={"status": "skipped", "output": f"skipped: {bad[0]} did not finish"}
                )
                steps[step.id] = skipped[step.id] = step
                changed = True
    return {"steps": list(skipped.values())} if skipped else {}


def dispatch_ready_steps(state: WorkflowState) -> list[Send] | Literal["review"]:
    """Send every ready step to its own `execute_step` task, or go to review."""
    steps = state.get("steps", [])
    ready = ready_steps(steps)
    if not ready:
        return "review"
    outputs = {s.id: s.output for s in steps}
    conversations = state.get("conversations", {})
    return [
        Send(
            "execute_step",
            StepTask(
                step=step,
                event=state["event"],
                intent=state.get("intent", ""),
                feedback=state.get("feedback", []),
                inputs={d: outputs[d] for d in step.depends_on},
                history=conversations.get(step.id, []),
            ),
        )
        for step in ready
    ]


# The injected arguments stay out of the docstring: it is the tool description the model reads.
async def recall_subject(  # noqa: D417
    query: str = "",
    *,
    subject: Annotated[str, InjectedToolArg] = "",
    store: Annotated[Any, InjectedToolArg] = None,
    limit: Annotated[int, InjectedToolArg] = 5,
) -> str:
    """Recall what earlier sessions about this event's subject did and how they ended.

    Args:
        query: optional words to put the most relevant sessions first.
    """
    namespace = subject_namespace(subject)
    items = await store.asearch(namespace, limit=100)
    # The search is by namespace prefix: keep this subject's own notes only.
    notes = [SessionNote.model_validate(i.value) for i in items if tuple(i.namespace) == namespace]
    wanted = set(query.lower().split())

    def rank(note: SessionNote) -> tuple[int, datetime]:
        text = f"{note.event_type} {note.intent} {note.summary}".lower()
        return (sum(1 for w in wanted if w in text), note.finished_at)

    notes.sort(key=rank, reverse=True)
    if not notes:
        return f"No earlier sessions about {subject}."
    lines = [
        f"- {n.finished_at:%Y-%m-%d %H:%M} {n.event_type} (session {n.session_id}, "
        f"{n.status}): {n.summary or n.intent}"
        for n in notes[:limit]
    ]
    return f"Earlier sessions about {subject}:\n" + "\n".join(lines)


RECALL_TOOL: BaseTool = StructuredTool.from_function(
    coroutine=recall_subject, name="recall_subject", handle_tool_error=True
)
"""The tool agents use to recall earlier sessions about the event's subject. Made once:
the store and the subject are filled in per call, so its binding to a model is reused."""


@dataclass
class AgentTurn:
    """What one agent's turn on a step produced."""

    messages: list[BaseMessage]
    """Its messages in order: its answers (named after it) and the results of its tools."""
    answer: str
    """Its last answer with text: the step's output when it works alone."""
    usage: Usage
    """The model calls and tokens it spent."""
    model: str
    """The name of the model that answered."""
    awaiting: list[ToolCall]
    """The tool calls the turn stopped at, for a human to approve (none: it is over)."""


def step_task_message(
    step: Step | TaskStep,
    event: CloudEvent,
    *,
    intent: str,
    inputs: Mapping[str, str],
    feedback: Sequence[str],
) -> HumanMessage:
    """Return the message that gives agents a step: the first of the step's turn."""
    return HumanMessage(
        STEP_TASK_PROMPT.format(
            intent=intent,
            step=dumps(step.model_dump(include={"id", "title", "description"})),
            inputs=dumps(dict(inputs)),
            feedback="; ".join(feedback[-3:]) or "none",
            event=dumps(event.model_dump(mode="json", exclude_none=True)),
        )
    )


async def run_agent_turn(
    agent: AgentSpec,
    conversation: Sequence[BaseMessage],
    *,
    model: BaseChatModel,
    tools: Sequence[BaseTool] = (),
    max_iterations: int,
    timeout_s: float,
    on_message: Callable[[BaseMessage], Awaitable[None] | None] | None = None,
    injected: Mapping[str, dict[str, Any]] | None = None,
    approval: Collection[str] = (),
    approved: Sequence[ApprovedCall] = (),
    spent: int = 0,
) -> AgentTurn:
    """Let one agent take its turn on a step, in a bounded tool-calling loop.

    The worker runs it for a local agent, `agentflow agents serve` for a hosted one.
    A call of a tool in `approval` is not run: the turn stops after the model's message
    that proposed it (its other calls run) and hands the calls back in `awaiting`; once a
    human has answered each, the turn goes on (`conversation` then ends with them).

    Args:
        agent: the agent, with its system prompt.
        conversation: the step's conversation so far, its task message first
            (`step_task_message`), then earlier turns.
        model: the agent's chat model.
        tools: the tools it may call.
        max_iterations: model calls at most; then the turn ends with what it has.
        timeout_s: timeout of one model call.
        on_message: called with each message of the turn as it is produced (awaited
            when it returns an awaitable).
        injected: arguments the model does not see, by tool name (the recall tool's
            store and subject).
        approval: names of the tools whose calls a human approves first.
        approved: approved calls that ran: the same call again is answered with the
            result it had, and not asked about or run again.
        spent: model calls the turn made before it stopped for approvals.

    Raises:
        ModelCallError: a model call gave no usable answer (see `nodes._llm.invoke`).
    """
    bound = bind_tools(model, tuple(tools)) if tools else model
    by_name = {t.name: t for t in tools}
    system = SystemMessage(
        STEP_AGENT_PROMPT.format(system_prompt=agent.system_prompt or "", agent=agent.name)
    )
    turn: list[BaseMessage] = []

    async def add(message: BaseMessage) -> None:
        turn.append(message)
        if on_message is not None and inspect.isawaitable(done := on_message(message)):
            await done

    usage = Usage()
    answer = ""
    ai = AIMessage(content="")
    awaiting: list[ToolCall] = []
    for _ in range(spent, max_iterations):
        ai, used = await invoke(
            bound, [system, *conversation, *turn], node="execute", timeout_s=timeout_s
        )
        usage = usage + used
        ai.name = agent.name
        answer = ai.text or answer
        await add(ai)
        if not ai.tool_calls and not ai.invalid_tool_calls:
            break
        for call in ai.tool_calls:
            if call["name"] not in approval:
                await add(await _call_tool(call, by_name, injected or {}))
            elif (done := _approved_before(approved, agent.name, call)) is not None:
                await add(_tool_message(call, done["result"]))
            else:
                awaiting.append(call)
        for bad in ai.invalid_tool_calls:  # arguments that are not JSON: let the model retry
            await add(
                ToolMessage(
                    f"the arguments of your {bad.get('name')} call are not valid JSON: "
                    f"{bad.get('error') or bad.get('args')}",
                    tool_call_id=bad.get("id") or "",
                    status="error",
                )
            )
        if awaiting:
            break
    else:
        answer = answer or f"stopped after {max_iterations} model turns"
    return AgentTurn(
        messages=turn,
        answer=answer,
        usage=usage,
        model=model_name(model, ai),
        awaiting=awaiting,
    )


def _approved_before(
    approved: Sequence[ApprovedCall], agent: str, call: ToolCall
) -> ApprovedCall | None:
    """The approved call that ran with these arguments (as proposed, or as run), if any."""
    for done in approved:
        same_tool = done["agent"] == agent and done["tool"] == call["name"]
        if same_tool and call["args"] in (done["proposed"], done["args"]):
            return done
    return None


def _tool_message(call: ToolCall, content: str, *, error: bool = False) -> ToolMessage:
    return ToolMessage(
        content,
        tool_call_id=call["id"] or "",
        name=call["name"],
        status="error" if error else "success",
    )


async def _call_tool(
    call: ToolCall, by_name: dict[str, BaseTool], injected: Mapping[str, dict[str, Any]]
) -> BaseMessage:
    """Run one tool call; a call the tools cannot take is answered with an error."""
    tool = by_name.get(call["name"])
    if tool is None:
        return ToolMessage(
            f"there is no tool named {call['name']}; use one of: {', '.join(by_name) or 'none'}",
            tool_call_id=call["id"] or "",
            status="error",
        )
    args = {**call["args"], **injected.get(tool.name, {})}
    try:
        result: BaseMessage = await tool.ainvoke({**call, "args": args})
    except ValidationError as exc:  # arguments that do not fit the tool's schema
        return _tool_message(call, _args_problem(tool, exc), error=True)
    return result


def _record_message(
    turn: list[BaseMessage],
    runtime: Runtime[WorkflowContext],
    step_id: str,
    agent: str,
    message: BaseMessage,
) -> None:
    """Keep a local agent's message in the step's turn; its answers are transitions too."""
    turn.append(message)
    if isinstance(message, AIMessage):
        write(
            runtime,
            {
                "type": "agent.message",
                "step_id": step_id,
                "agent": agent,
                "content": message.text[:2000],
                "tool_calls": [c["name"] for c in message.tool_calls],
            },
        )


AGENT_TASK = "agent_task"
"""The `kind` of an interrupt that waits for a remote agent's reply (a human's has none)."""


def agent_task_id(session_id: str, step: Step, turn: int, attempt: int) -> str:
    """The id of a remote agent's task: the same every time the step's node runs again.

    Made of the session, the step and its round (`attempts`: a revised step runs in a new
    round), the turn and the task's attempt.
    """
    raw = "\0".join((session_id, step.id, str(step.attempts), str(turn), str(attempt)))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


async def execute_step(
    task: StepTask,
    runtime: Runtime[WorkflowContext],
    *,
    max_attempts: int = MODEL_MAX_ATTEMPTS,
) -> dict[str, Any]:
    """Run one step with its agent(s) taking turns; mark it failed if it keeps failing.

    Transient errors are raised while the node's retry policy has attempts left; after
    the last attempt the step is marked failed so the review sees it.

    A turn of a remote agent (`runs: kafka`) is a wait: the node interrupts with the
    agent's task (kind `agent_task`), the worker sends it, and the reply resumes the node.
    LangGraph runs an interrupted node again from its start on every resume, so a wait
    always begins a node: local turns before it end the node with the step still
    pending at that turn, and `execute` sends the step here again.

    Args:
        task: the step and what it needs, from `dispatch_ready_steps`.
        runtime: the run's runtime.
        max_attempts: the `max_attempts` of the node's retry policy (the graph binds it).
    """
    context = context_of(runtime)
    step = Step.model_validate(task["step"])
    info = runtime.execution_info
    attempt = info.node_attempt if info is not None else max_attempts
    started = time.monotonic()
    history: list[BaseMessage] = list(task.get("history", []))
    event = task["event"]
    turn: list[BaseMessage] = []
    if step.turn == 0 and step.task_attempt == 1 and step.awaiting is None:  # a new round
        write(runtime, {"type": "step.started", "step_id": step.id, "agents": step.agents})
        turn.append(
            step_task_message(
                step,
                event,
                intent=task.get("intent", ""),
                inputs=task.get("inputs", {}),
                feedback=task.get("feedback", []),
            )
        )
    usage = Usage()
    models: list[str] = []
    local: dict[str, str] = {}  # answers of the local turns this time
    update: dict[str, Any]
    try:
        registry = await asyncio.to_thread(load_agents, context.agents_file)
        injected = (
            {RECALL_TOOL.name: {"store": runtime.store, "subject": event.subject}}
            if runtime.store is not None and event.subject
            else {}
        )
        names = step.agents or registry.names[:1]
        if step.awaiting:  # the wait for a human's approval begins the node
            call = cast(ToolCall, step.awaiting[0])
            message, answer, ran = await _ask_approval(
                call, step.id, names[step.turn], registry, injected
            )
            turn.append(message)
            update = {
                "awaiting": step.awaiting[1:],
                "approved_calls": [*step.approved_calls, *([ran] if ran else [])],
            }
            return _step_update(step.model_copy(update=update), turn, usage, models, [answer])
        for index in range(step.turn, len(names)):
            name = names[index]
            agent = registry.get(name)
            if agent.runs != "kafka":
                tools = [*registry.tools_of(name), *([RECALL_TOOL] if injected else [])]
                part_way = index == step.turn and step.awaiting is not None
                agent_turn = await run_agent_turn(
                    agent,
                    [*history, *turn],
                    model=chat_model(context, "execute", agent.model),
                    tools=tools,
                    max_iterations=context.max_tool_iterations,
                    timeout_s=context.model_timeout_s,
                    on_message=partial(_record_message, turn, runtime, step.id, name),
                    injected=injected,
                    approval=registry.approval_of(name),
                    approved=step.approved_calls,
                    spent=_model_calls(history, name) if part_way else 0,
                )
                usage, local[name] = usage + agent_turn.usage, agent_turn.answer
                models.append(agent_turn.model)
                if agent_turn.awaiting:  # each approval is a wait: it begins a node
                    calls = [dict(c) for c in agent_turn.awaiting]
                    pending = step.model_copy(
                        update={"turn": index, "task_attempt": 1, "awaiting": calls}
                    )
                    return _step_update(pending, turn, usage, models)
                continue
            if index > step.turn:  # the wait begins a node of its own
                pending = step.model_copy(update={"turn": index, "task_attempt": 1})
                return _step_update(pending, turn, usage, models)
            reply = _wait_for_agent(task, step, name, context, registry, [*history, *turn])
            turn += reply.conversation()
            if reply.output and not _answered(turn, name, reply.output):
                turn.append(AIMessage(content=reply.output, name=name))
            if reply.usage is not None:
                usage = usage + Usage(**reply.usage.model_dump())
            if reply.status == "timeout":
                if step.task_attempt < agent.max_attempts:
                    again = step.model_copy(update={"task_attempt": step.task_attempt + 1})
                    return _step_update(again, turn, usage, models)
                timeout_s = agent.timeout_s or context.agent_timeout_s
                raise RemoteAgentError(f"agent {name} did not answer within {timeout_s:g} s")
            if reply.status != "done":
                raise RemoteAgentError(f"agent {name} failed: {reply.error or 'no reason given'}")
        answers = [(n, local.get(n) or a) for n, a in _round_answers([*history, *turn], names)]
        output = answers[0][1] if len(answers) == 1 else "\n".join(f"{n}: {a}" for n, a in answers)
        update = {"status": "done", "output": output, "error": None}
    except GraphBubbleUp:  # the wait's interrupt
        raise
    except RemoteAgentError as exc:
        logger.warning("step %s failed: %s", step.id, exc)
        update = {"status": "failed", "output": "", "error": str(exc)}
    except Exception as exc:
        if attempt < max_attempts and is_retryable(exc):
            raise
        logger.warning("step %s failed after %d attempt(s): %s", step.id, attempt, exc)
        update = {"status": "failed", "output": "", "error": f"{type(exc).__name__}: {exc}"}
    duration_ms = int((time.monotonic() - started) * 1000)
    done = step.model_copy(
        update={
            **update,
            "attempts": step.attempts + 1,
            "duration_ms": duration_ms,
            "turn": 0,
            "task_attempt": 1,
            "awaiting": None,
        }
    )
    write(
        runtime,
        {
            "type": "step.completed",
            "step_id": step.id,
            "status": done.status,
            "duration_ms": duration_ms,
            "error": done.error,
        },
    )
    return _step_update(done, turn, usage, models)


def _step_update(
    step: Step,
    turn: list[BaseMessage],
    usage: Usage,
    models: list[str],
    answers: list[HumanAnswer] | None = None,
) -> dict[str, Any]:
    update = {"steps": [step], "conversations": {step.id: turn}, "usage": usage, "models": models}
    return {**update, "answers": answers} if answers else update


TOOL_APPROVAL: InterruptKind = "tool_approval"
"""The `kind` of an interrupt that asks a human to approve a tool call before it runs."""


async def _ask_approval(
    call: ToolCall,
    step_id: str,
    name: str,
    registry: AgentRegistry,
    injected: Mapping[str, dict[str, Any]],
) -> tuple[ToolMessage, HumanAnswer, ApprovedCall | None]:
    """Ask a human about a tool call of agent `name`; run it when approved.

    Returns the tool message the agent reads (the result, or why the call was rejected),
    the answer, and the call as it ran (None when rejected). An answer that does not fit
    (an edit whose arguments the tool does not take) is asked again with the reason.
    """
    by_name = {t.name: t for t in registry.tools_of(name)}
    tool = by_name[call["name"]]
    question: dict[str, Any] = {
        "kind": TOOL_APPROVAL,
        "question": f"{name} asks to call {tool.name} with {dumps(call['args'])}",
        "agent": name,
        "tool": tool.name,
        "args": call["args"],
        "tool_call_id": call["id"],
        "step_id": step_id,
        "description": tool.description,
        "args_schema": schema.model_json_schema() if (schema := _call_schema(tool)) else {},
        "decisions": list(DECISIONS[TOOL_APPROVAL]),
    }
    answer = ask_human(question, lambda answer: approval_problem(registry, question, answer))
    if answer.decision == "reject":
        why = answer.feedback or "no reason given"
        rejected = f"a human rejected this call of {tool.name}; it did not run. Why: {why}"
        return _tool_message(call, rejected, error=True), answer, None
    args = answer.args if answer.decision == "edit" and answer.args is not None else call["args"]
    message = await _call_tool({**call, "args": args}, by_name, injected)
    ran = ApprovedCall(
        agent=name, tool=tool.name, proposed=call["args"], args=args, result=message.text
    )
    return cast(ToolMessage, message), answer, ran


def approval_problem(
    registry: AgentRegistry, payload: Mapping[str, Any], answer: HumanDecision
) -> str | None:
    """Why an answer to a tool approval (asking `payload`) cannot be taken, or None.

    The service checks it before the run resumes, so a wrong edit is refused with the
    reason and the interrupt waits on; the step checks it again when it resumes.
    """
    if problem := answer.problem_with(TOOL_APPROVAL, dict(payload)):
        return problem
    tools = {t.name: t for t in registry.tools_of(str(payload.get("agent")))}
    tool = tools.get(str(payload.get("tool")))
    return edit_problem(tool, answer) if tool is not None else None


def edit_problem(tool: BaseTool, answer: HumanDecision) -> str | None:
    """Why an edit's arguments do not fit the tool's schema, or None (also for non-edits)."""
    schema = _call_schema(tool)
    if answer.decision != "edit" or schema is None:
        return None
    try:
        schema.model_validate(answer.args or {})
    except ValidationError as exc:
        return _args_problem(tool, exc)
    return None


def _call_schema(tool: BaseTool) -> type[BaseModel] | None:
    """The model of the arguments the agent's model gives the tool (no injected ones)."""
    schema = tool.tool_call_schema
    return schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None


def _args_problem(tool: BaseTool, exc: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return f"the arguments do not fit {tool.name}: {problems}"


def _model_calls(conversation: list[BaseMessage], name: str) -> int:
    """How many model calls an agent made in the step's latest round."""
    opened = max((i for i, m in enumerate(conversation) if isinstance(m, HumanMessage)), default=-1)
    return sum(1 for m in conversation[opened + 1 :] if isinstance(m, AIMessage) and m.name == name)


def _wait_for_agent(
    task: StepTask,
    step: Step,
    name: str,
    context: WorkflowContext,
    registry: AgentRegistry,
    conversation: list[BaseMessage],
) -> AgentReply:
    """Interrupt with a remote agent's task; return its reply (the value the run resumes with).

    Everything here is the same each time the node runs again, the task id first. The
    worker turns the payload into the protocol's task (with its deadline and reply topic).
    """
    spec = registry.get(name)
    session_id = str(get_config()["configurable"]["thread_id"])
    task_id = agent_task_id(session_id, step, step.turn, step.task_attempt)
    answer = interrupt(
        {
            "kind": AGENT_TASK,
            "task_id": task_id,
            "agent": name,
            "attempt": step.task_attempt,
            "timeout_s": spec.timeout_s or context.agent_timeout_s,
            "step": step.model_dump(include={"id", "title", "description"}),
            "intent": task.get("intent", ""),
            "event": task["event"].model_dump(mode="json", exclude_none=True),
            "inputs": task.get("inputs", {}),
            "feedback": task.get("feedback", []),
            "history": [
                ConversationMessage.of(m).model_dump(mode="json", exclude_none=True)
                for m in conversation
            ],
        }
    )
    try:
        reply = AgentReply.model_validate(answer)
    except ValidationError as exc:
        raise RemoteAgentError(f"agent {name}: its reply cannot be read ({exc})") from None
    if reply.task_id != task_id:
        raise RemoteAgentError(f"agent {name}: the run was resumed with another task's reply")
    return reply


def _answered(turn: list[BaseMessage], name: str, output: str) -> bool:
    last = next((m for m in reversed(turn) if isinstance(m, AIMessage)), None)
    return last is not None and last.name == name and last.text == output


def _round_answers(conversation: list[BaseMessage], names: list[str]) -> list[tuple[str, str]]:
    """Each agent's last answer in the step's latest round (since its last task message)."""
    opened = max((i for i, m in enumerate(conversation) if isinstance(m, HumanMessage)), default=-1)
    answers: dict[str, str] = {}
    for message in conversation[opened + 1 :]:
        if isinstance(message, AIMessage) and message.name in names and message.text:
            answers[message.name] = message.text
    return [(n, answers.get(n, "")) for n in dict.fromkeys(names)]
