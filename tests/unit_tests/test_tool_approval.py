"""A tool marked `approval: required` runs only once a human approves (or edits) the call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.types import Command

from nodes.agents import load_agents
from nodes.context import WorkflowContext
from nodes.errors import AnswerError
from nodes.execution import run_agent_turn, step_task_message
from nodes.models import ApprovedCall, CloudEvent, Step, WorkflowResult
from service.runtime.runner import SessionRunner
from tests.unit_tests.helpers import ScriptedModel, runner_for, scripted, write_agents

TOOLS = '''
import json
import os


def grant_access(user: str, role: str) -> str:
    """Grant a user a role."""
    with open(os.environ["GRANTS_FILE"], "a") as calls:
        calls.write(json.dumps({"user": user, "role": role}) + "\\n")
    return f"GRANTED {role} to {user}"
'''

AGENTS = """
agents:
  - name: provisioner
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: You grant access.
    tools: [{path: approval_tools.grant_access, approval: required}]
"""


def _proposing(roles: list[str]) -> Any:
    """A hook: each turn that has not called a tool yet proposes the next role of `roles`.

    A real model may propose another call when asked again: the roles differ per call.
    """
    proposals: list[str] = []

    def hook(text: str, kw: dict[str, Any]) -> ChatResult | None:
        if not kw.get("tools") or kw.get("tool_choice") or '"id": "s1"' not in text:
            return None  # other steps: the offline model proposes from the event
        if "GRANTED" in text or "rejected this call" in text:
            return None
        role = roles[min(len(proposals), len(roles) - 1)]
        proposals.append(role)
        call = {
            "name": "grant_access",
            "args": {"user": "ann", "role": role},
            "id": f"c{len(proposals)}",
        }
        return ChatResult(generations=[ChatGeneration(message=AIMessage("", tool_calls=[call]))])

    hook.proposals = proposals  # type: ignore[attr-defined]
    return hook


def _setup(
    tmp_path: Path, monkeypatch: Any, roles: list[str]
) -> tuple[SessionRunner, ScriptedModel, Path, Any]:
    grants = tmp_path / "grants.jsonl"
    monkeypatch.setenv("GRANTS_FILE", str(grants))
    agents = write_agents(tmp_path, TOOLS, AGENTS, module="approval_tools")
    hook = _proposing(roles)
    model = scripted(hook)
    runner, _ = runner_for(WorkflowContext(agents_file=str(agents), chat_model=model))
    return runner, model, grants, hook


def _grants(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _answer_each(
    runner: SessionRunner, sid: str, result: WorkflowResult, decide: Any
) -> tuple[WorkflowResult, list[dict[str, Any]]]:
    """Answer each tool approval with `decide(payload)` until the run ends; return them.

    A question of the review is approved.
    """
    asked: list[dict[str, Any]] = []
    while result.status == "interrupted":
        pending = (await runner.questions(sid))[0]
        if pending.value["kind"] == "review":  # the reviewer's question: not this test's
            result = await runner.resume(sid, {"interrupt_id": pending.id, "decision": "approve"})
            continue
        asked.append(pending.value)
        answer = {"interrupt_id": pending.id, **decide(pending.value)}
        result = await runner.resume(sid, answer)
    return result, asked


async def test_a_call_runs_only_once_approved_and_its_turn_is_not_asked_again(
    tmp_path: Path, monkeypatch: Any, make_event: Any
) -> None:
    runner, _, grants, hook = _setup(tmp_path, monkeypatch, ["reader", "admin"])
    result = await runner.start(make_event(), "ok")
    assert result.status == "interrupted" and result.question
    (pending,) = await runner.questions("ok")
    assert pending.value["kind"] == "tool_approval"
    assert pending.value["agent"] == "provisioner" and pending.value["tool"] == "grant_access"
    assert pending.value["args"] == {"user": "ann", "role": "reader"}
    assert pending.value["tool_call_id"] == "c1"
    assert _grants(grants) == []  # not before a human approves
    assert hook.proposals == ["reader"]
    result = await runner.resume("ok", {"interrupt_id": pending.id, "decision": "approve"})
    # The model that proposed the call was not asked again (it would have said admin):
    # the approved call ran once, as proposed.
    assert _grants(grants)[0] == {"user": "ann", "role": "reader"}
    result, asked = await _answer_each(runner, "ok", result, lambda p: {"decision": "approve"})
    assert result.status == "completed"
    # Each step's call asked about once, each run once with the arguments approved.
    assert hook.proposals == ["reader"]
    assert len({p["step_id"] for p in asked}) == len(asked) and "s1" not in asked
    assert _grants(grants) == [{"user": "ann", "role": "reader"}] + [p["args"] for p in asked]
    state = await runner.graph.aget_state(runner.config("ok"))
    s1 = state.values["conversations"]["s1"]
    results = [m.text for m in s1 if isinstance(m, ToolMessage)]
    assert results == ["GRANTED reader to ann"]
    done = next(s for s in state.values["steps"] if s.id == "s1")
    assert done.approved_calls == [
        {
            "agent": "provisioner",
            "tool": "grant_access",
            "proposed": {"user": "ann", "role": "reader"},
            "args": {"user": "ann", "role": "reader"},
            "result": "GRANTED reader to ann",
        }
    ]
    assert [a.kind for a in state.values["answers"]] == ["tool_approval"] * (1 + len(asked))


async def test_an_edit_runs_the_call_with_the_new_arguments_and_a_bad_edit_is_refused(
    tmp_path: Path, monkeypatch: Any, make_event: Any
) -> None:
    runner, _, grants, _ = _setup(tmp_path, monkeypatch, ["admin"])
    await runner.start(make_event(), "edit")
    (pending,) = await runner.questions("edit")
    with pytest.raises(AnswerError, match="the arguments do not fit grant_access: role: Field"):
        await runner.check_answer("edit", {"decision": "edit", "args": {"user": "ann"}})
    with pytest.raises(AnswerError, match="args go with edit only"):
        await runner.check_answer("edit", {"decision": "approve", "args": {"role": "x"}})
    assert [i.id for i in await runner.questions("edit")] == [pending.id]  # it waits on
    assert _grants(grants) == []
    edited = {"user": "ann", "role": "reader"}
    await runner.resume("edit", {"interrupt_id": pending.id, "decision": "edit", "args": edited})
    assert _grants(grants) == [edited]
    state = await runner.graph.aget_state(runner.config("edit"))
    assert [m.text for m in state.values["conversations"]["s1"] if isinstance(m, ToolMessage)] == [
        "GRANTED reader to ann"
    ]


async def test_a_bad_edit_that_reaches_the_step_is_asked_again_with_the_reason(
    tmp_path: Path, monkeypatch: Any, make_event: Any
) -> None:
    runner, _, grants, _ = _setup(tmp_path, monkeypatch, ["admin"])
    await runner.start(make_event(), "again")
    (pending,) = await runner.questions("again")
    # Past the service's check (LangGraph's own server, a notebook): the step asks again.
    bad = {"decision": "edit", "args": {"user": "ann", "role": 3}}
    config = runner.config("again")
    await runner.graph.ainvoke(Command(resume={pending.id: bad}), config, context=runner.context)
    (again,) = await runner.questions("again")
    assert again.id != pending.id and again.value["args"] == pending.value["args"]
    assert "role: Input should be a valid string" in again.value["problem"]
    assert _grants(grants) == []


async def test_a_rejected_call_does_not_run_and_the_agent_reads_why(
    tmp_path: Path, monkeypatch: Any, make_event: Any
) -> None:
    runner, _, grants, _ = _setup(tmp_path, monkeypatch, ["admin"])
    result = await runner.start(make_event(), "no")
    reject = {"decision": "reject", "feedback": "manager did not approve"}
    result, asked = await _answer_each(runner, "no", result, lambda p: reject)
    assert result.status == "completed" and asked
    assert _grants(grants) == []
    state = await runner.graph.aget_state(runner.config("no"))
    s1 = state.values["conversations"]["s1"]
    rejected = [m for m in s1 if isinstance(m, ToolMessage)]
    assert len(rejected) == 1 and rejected[0].status == "error"
    assert rejected[0].tool_call_id == "c1"
    assert "rejected" in rejected[0].text and "manager did not approve" in rejected[0].text
    # The agent went on with its turn, and its next message shows it read the rejection.
    after = s1[s1.index(rejected[0]) + 1 :]
    assert isinstance(after[0], AIMessage) and "manager did not approve" in after[0].text
    done = next(s for s in state.values["steps"] if s.id == "s1")
    assert done.status == "done" and done.approved_calls == []


async def test_an_approved_call_made_again_is_answered_from_the_record_not_run(
    tmp_path: Path, monkeypatch: Any
) -> None:
    runner, model, grants, _ = _setup(tmp_path, monkeypatch, ["reader"])
    registry = load_agents(runner.context.agents_file)
    done = ApprovedCall(
        agent="provisioner",
        tool="grant_access",
        proposed={"user": "ann", "role": "admin"},
        args={"user": "ann", "role": "reader"},
        result="GRANTED reader to ann",
    )
    task = step_task_message(
        Step(id="s1", title="Grant"), make_event_for_turn(), intent="grant", inputs={}, feedback=[]
    )
    turn = await run_agent_turn(
        registry.get("provisioner"),
        [task],
        model=model,
        tools=registry.tools_of("provisioner"),
        max_iterations=3,
        timeout_s=5,
        approval=registry.approval_of("provisioner"),
        approved=[done],
    )
    # The same call as run (a revise that proposes it again): its recorded result, no wait.
    assert turn.awaiting == []
    (result,) = [m for m in turn.messages if isinstance(m, ToolMessage)]
    assert result.text == "GRANTED reader to ann" and result.tool_call_id == "c1"
    assert _grants(grants) == []
    other = await run_agent_turn(
        registry.get("provisioner"),
        [task],
        model=scripted(_proposing(["admin"])),
        tools=registry.tools_of("provisioner"),
        max_iterations=3,
        timeout_s=5,
        approval=registry.approval_of("provisioner"),
        approved=[{**done, "agent": "someone-else"}],
    )
    # Another agent's record is not this one's: the call waits for a human.
    assert [c["args"] for c in other.awaiting] == [{"user": "ann", "role": "admin"}]
    assert _grants(grants) == []


def make_event_for_turn() -> CloudEvent:
    return CloudEvent.wrap("access.requested", {"user": "ann"}, subject="ann")
