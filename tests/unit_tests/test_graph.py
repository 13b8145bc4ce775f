"""The whole workflow graph, run in-process on the offline model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from graphs.workflow import build_graph
from nodes.chat_models import MODEL_RETRY
from nodes.context import WorkflowContext
from nodes.library import InMemoryWorkflowLibrary
from service.errors import UnknownSessionError
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.transitions import Transition
from tests.unit_tests.helpers import runner_for, scripted, write_agents

SLOW_TOOLS = '''
import asyncio
CALLS = []
SECOND_STARTED = asyncio.Event()

async def slow_lookup(claim_id: str) -> str:
    """Look something up; the second call holds until a third one has started."""
    CALLS.append(claim_id)
    if len(CALLS) == 3:
        SECOND_STARTED.set()
    if len(CALLS) == 2:
        # Calls 2 and 3 are the steps s2 and s3 (s1 runs first, s4 last). The third call can
        # only start while this one is held if the two steps run side by side; the bound only
        # keeps a sequential run from hanging (it then fails the overlap assertion).
        try:
            await asyncio.wait_for(SECOND_STARTED.wait(), 30)
        except TimeoutError:
            pass
    return f"looked up {claim_id}"
'''


async def test_example_event_completes_with_plan_agents_and_review(make_event: Any) -> None:
    library = InMemoryWorkflowLibrary()
    runner, seen = runner_for(WorkflowContext(library=library))
    result = await runner.start(make_event(), "s-1")

    assert result.status == "completed"
    assert result.session_id == "s-1" and result.event_id == "evt-claim-2001"
    assert result.model == "offline"
    assert result.review.verdict == "approve"
    steps = {s.id: s for s in result.workflow.steps}
    assert steps["s3"].depends_on == ["s1"] and steps["s4"].depends_on == ["s2", "s3"]
    assert steps["s3"].agents == ["eligibility_analyst"]
    assert all(s.status == "done" and s.output for s in steps.values())
    assert "eligible for disability" in steps["s3"].output  # the tool really ran
    assert result.usage.llm_calls == result.usage.by_node["plan"] + sum(
        n for k, n in result.usage.by_node.items() if k != "plan"
    )
    assert result.usage.by_node["plan"] == 1 and result.usage.input_tokens > 0
    assert result.started_at is not None and result.finished_at >= result.started_at
    # transitions are numbered without gaps and end with the session's outcome
    assert [t.seq for t in seen] == list(range(1, len(seen) + 1))
    assert seen[0].type == "session.started" and seen[-1].type == "session.completed"
    completed = [t.node for t in seen if t.type == "node.completed"]
    assert completed[:3] == ["discover", "plan", "assign"] and completed[-2:] == [
        "review",
        "finalize",
    ]
    assert {t.agent for t in seen if t.type == "agent.message"} >= {"intake", "eligibility_analyst"}
    # the approved workflow is kept, and the next similar event finds it
    assert len(library) == 1
    second = await runner.start(make_event(id="evt-2"), "s-2")
    assert second.status == "completed"
    discovered = [t for t in seen if t.node == "discover" and t.type == "node.completed"][-1]
    assert discovered.data is not None and discovered.data["similar"][0]["score"] > 0.5


async def test_ready_steps_run_in_parallel(tmp_path: Path, make_event: Any) -> None:
    agents = write_agents(
        tmp_path,
        SLOW_TOOLS,
        """
agents:
  - name: worker
    description: Does every kind of work, records, documents, eligibility and reports.
    capabilities: [take, record, review, documents, assess, eligibility, report, outcome]
    system_prompt: Work.
    tools: [slow_tools.slow_lookup]
""",
        module="slow_tools",
    )
    runner, seen = runner_for(WorkflowContext(agents_file=str(agents)))
    result = await runner.start(make_event(), "par")
    assert result.status == "completed"
    import slow_tools  # type: ignore[import-not-found]

    assert len(slow_tools.CALLS) == 4
    # s2 and s3 both depend only on s1: each started before the other completed
    started = {t.step_id: t.seq for t in seen if t.type == "step.started"}
    completed = {t.step_id: t.seq for t in seen if t.type == "step.completed"}
    assert max(started["s2"], started["s3"]) < min(completed["s2"], completed["s3"]), [
        (t.seq, t.type, t.step_id) for t in seen if t.type.startswith("step.")
    ]
    assert completed["s1"] < min(started["s2"], started["s3"])
    assert max(completed["s2"], completed["s3"]) < started["s4"]


async def test_failed_step_is_revised_then_completes(make_event: Any) -> None:
    # every attempt of the node's retry policy fails, then the step is failed
    failures = {"left": MODEL_RETRY.max_attempts}

    def hook(text: str, kw: dict[str, Any]) -> Any:
        if '"id": "s3"' in text and "<step>" in text and failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("model endpoint reset")
        return None

    runner, seen = runner_for(WorkflowContext(chat_model=scripted(hook)))
    result = await runner.start(make_event(), "rev")
    assert result.status == "completed", result.error
    s3 = next(s for s in result.workflow.steps if s.id == "s3")
    assert s3.status == "done" and s3.attempts == 2
    verdicts = [
        t.data["verdict"] for t in seen if t.node == "review" and t.type == "node.completed"
    ]
    assert verdicts == ["revise", "approve"]
    # s4 (after s2 and s3) ran once, and only after s3 was redone
    s3_done = [t.seq for t in seen if t.type == "step.completed" and t.step_id == "s3"]
    s4_runs = [t.seq for t in seen if t.type == "step.started" and t.step_id == "s4"]
    s3_statuses = [
        (t.data or {}).get("status")
        for t in seen
        if t.type == "step.completed" and t.step_id == "s3"
    ]
    assert s3_statuses == ["failed", "done"]
    assert len(s4_runs) == 1 and s4_runs[0] > s3_done[-1], (s3_done, s4_runs)


async def test_step_that_keeps_failing_fails_the_run_after_bounded_rounds(make_event: Any) -> None:
    def hook(text: str, kw: dict[str, Any]) -> Any:
        if '"id": "s3"' in text and "<step>" in text:
            raise ConnectionError("model endpoint reset")
        return None

    runner, seen = runner_for(WorkflowContext(chat_model=scripted(hook), max_revise_rounds=1))
    result = await runner.start(make_event(), "fail")
    assert result.status == "failed"
    # bounded: the first review and one revise round, each running s3 with its node retries
    verdicts = [
        t.data["verdict"] for t in seen if t.node == "review" and t.type == "node.completed"
    ]
    assert verdicts == ["revise", "revise"]
    s3_tries = [t for t in seen if t.type == "step.started" and t.step_id == "s3"]
    assert len(s3_tries) == 2 * MODEL_RETRY.max_attempts
    assert next(s for s in result.workflow.steps if s.id == "s3").attempts == 2
    assert result.error is not None and "did not approve" in result.error
    statuses = {s.id: s.status for s in result.workflow.steps}
    assert statuses == {"s1": "done", "s2": "done", "s3": "failed", "s4": "skipped"}
    assert seen[-1].type == "session.failed"


async def test_escalation_interrupts_and_resume_continues(make_event: Any) -> None:
    runner, seen = runner_for(WorkflowContext())
    result = await runner.start(make_event("claim_needs_review"), "esc")
    assert result.status == "interrupted"
    assert result.question and "s3" in result.question
    assert seen[-1].type == "session.interrupted"
    plan_calls_before = sum(1 for t in seen if t.node == "plan" and t.type == "node.started")

    resumed = await runner.resume("esc", "approve: discharge confirmed")
    assert resumed.status == "completed"
    assert resumed.review.verdict == "approve"
    assert "discharge confirmed" in resumed.review.feedback
    assert (
        sum(1 for t in seen if t.node == "plan" and t.type == "node.started") == plan_calls_before
    )
    assert [t.seq for t in seen] == list(range(1, len(seen) + 1))


async def test_resume_of_unknown_or_running_session_is_refused(make_event: Any) -> None:
    runner, _ = runner_for(WorkflowContext())
    with pytest.raises(UnknownSessionError, match="does not exist"):
        await runner.resume("nope", "yes")
    await runner.start(make_event(), "done")
    with pytest.raises(UnknownSessionError, match="not waiting"):
        await runner.resume("done", "yes")


async def test_cyclic_plan_is_repaired_or_rejected(make_event: Any) -> None:
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    cyclic = {
        "intent": "loop",
        "goals": ["g"],
        "steps": [
            {"id": "a", "title": "A", "description": "a", "depends_on": ["b"]},
            {"id": "b", "title": "B", "description": "b", "depends_on": ["a"]},
        ],
    }

    def always_cyclic(text: str, kw: dict[str, Any]) -> Any:
        tools = kw.get("tools") or []
        if tools and tools[0]["function"]["name"] == "PlanDraft":
            call = {"name": "PlanDraft", "args": cyclic, "id": "c1", "type": "tool_call"}
            return ChatResult(
                generations=[ChatGeneration(message=AIMessage("", tool_calls=[call]))]
            )
        return None

    model = scripted(always_cyclic)
    runner, seen = runner_for(WorkflowContext(chat_model=model))
    result = await runner.start(make_event(), "cyc")
    assert result.status == "failed"
    assert result.error is not None and "cycle" in result.error
    assert any(t.type == "node.failed" and t.node == "plan" for t in seen)
    assert sum("cannot be used" in c for c in model.calls) == 1  # one repair request

    once = {"left": 1}

    def cyclic_once(text: str, kw: dict[str, Any]) -> Any:
        if (
            once["left"]
            and (tools := kw.get("tools"))
            and tools[0]["function"]["name"] == "PlanDraft"
        ):
            once["left"] -= 1
            return always_cyclic(text, kw)
        return None

    runner, _ = runner_for(WorkflowContext(chat_model=scripted(cyclic_once)))
    result = await runner.start(make_event(), "cyc2")
    assert result.status == "completed"
    assert [s.id for s in result.workflow.steps] == ["s1", "s2", "s3", "s4"]


async def test_unknown_agent_is_never_accepted(make_event: Any) -> None:
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    def invent_agent(text: str, kw: dict[str, Any]) -> Any:
        tools = kw.get("tools") or []
        if tools and tools[0]["function"]["name"] == "AssignmentDraft":
            args = {
                "assignments": [{"step_id": f"s{i}", "agents": ["wizard"]} for i in range(1, 5)]
            }
            call = {"name": "AssignmentDraft", "args": args, "id": "c1", "type": "tool_call"}
            return ChatResult(
                generations=[ChatGeneration(message=AIMessage("", tool_calls=[call]))]
            )
        return None

    runner, _ = runner_for(WorkflowContext(chat_model=scripted(invent_agent)))
    result = await runner.start(make_event(), "unk")
    assert result.status == "failed"
    assert result.error is not None and "unknown agent(s) wizard" in result.error


async def test_several_agents_take_turns_on_a_step(tmp_path: Path, make_event: Any) -> None:
    agents = write_agents(
        tmp_path,
        "def note(claim_id: str) -> str:\n    '''Note.'''\n    return 'noted ' + claim_id\n",
        """
agents:
  - name: first
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: First.
    tools: [team_tools.note]
  - name: second
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: Second.
""",
        module="team_tools",
    )
    graph = build_graph(InMemorySaver(serde=checkpoint_serde()))
    runner = SessionRunner(graph, WorkflowContext(agents_file=str(agents)))
    result = await runner.start(make_event(), "team")
    assert result.status == "completed"
    assert all(s.agents == ["first", "second"] for s in result.workflow.steps)
    state = await graph.aget_state(runner.config("team"))
    names = [getattr(m, "name", None) for m in state.values["conversations"]["s1"]]
    assert names.index("first") < names.index("second")
    assert (
        "first:" in result.workflow.steps[0].output and "second:" in result.workflow.steps[0].output
    )


async def test_graph_runs_without_context_like_langgraph_server() -> None:
    from graphs.workflow import graph

    event = json.loads(Path("examples/events/status_requested.json").read_text())
    out = await graph.ainvoke({"event": event}, {"configurable": {"thread_id": "x"}})
    assert out["result"].status == "completed"


class Crash(Exception):
    """Stands for the process dying between a node's writes and the next checkpoint."""


class CrashingSaver(InMemorySaver):
    """Saves pending writes but fails to save the checkpoint of one step, like a SIGKILL."""

    crash_at_step: int | None = None

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        if metadata.get("step") == self.crash_at_step:
            raise Crash(f"killed before checkpoint of step {self.crash_at_step}")
        return await super().aput(config, checkpoint, metadata, new_versions)


@pytest.mark.parametrize("crash_at_step", [2, 3, 5])
async def test_redelivered_event_after_crash_runs_no_finished_node_again(
    make_event: Any, crash_at_step: int
) -> None:
    saver = CrashingSaver(serde=checkpoint_serde())
    saver.crash_at_step = crash_at_step
    seen: list[Transition] = []

    async def sink(t: Transition) -> None:
        seen.append(t)

    def runner() -> SessionRunner:
        return SessionRunner(
            build_graph(saver),
            WorkflowContext(),
            sink=sink,
            is_infra_error=lambda exc: isinstance(exc, Crash),
        )

    with pytest.raises(Crash):
        await runner().start(make_event(), "crashed")
    finished = [t.node for t in seen if t.type == "node.completed"]
    before = len(seen)
    saver.crash_at_step = None
    result = await runner().start(make_event(), "crashed")

    assert result.status == "completed", result.error
    started = [t.node for t in seen if t.type == "node.started"]
    for node in ("discover", "plan", "assign"):
        # a node that finished before the crash ran exactly once in all
        assert started.count(node) == 1, (node, finished, started)
    # the step that finished just before the crash is reported from its saved writes
    restored = [t.node for t in seen[before:] if (t.data or {}).get("restored")]
    assert restored and set(restored) <= set(finished) | {"execute_step"}, restored


async def test_a_superseded_run_stops_at_the_next_step_boundary(make_event: Any) -> None:
    """`interrupt`: the step in flight finishes and is checkpointed; the next never starts."""
    runner, seen = runner_for(WorkflowContext(library=InMemoryWorkflowLibrary()))

    def superseded_by() -> str | None:
        planned = any(t.type == "node.completed" and t.node == "plan" for t in seen)
        return "evt-newer" if planned else None

    result = await runner.start(make_event(), "s-stop", stop=superseded_by)

    assert result.status == "superseded" and result.error == "superseded by event evt-newer"
    assert result.event_id == "evt-claim-2001"
    assert [s.id for s in result.workflow.steps]  # plan's writes were checkpointed
    started = [t.node for t in seen if t.type == "node.started"]
    completed = [t.node for t in seen if t.type == "node.completed"]
    assert started == completed == ["discover", "plan"]  # nothing cut off half-way
    assert seen[-1].type == "session.superseded" and seen[-1].data is not None
    assert seen[-1].data["by"] == "evt-newer"
    snapshot = await runner.graph.aget_state(runner.config("s-stop"))
    assert snapshot.next == ("assign",)  # the state is that of a step boundary

    again = await runner.start(make_event(id="evt-newer"), "s-stop")
    assert again.status == "completed"  # the newer event runs on the session's state


async def test_a_run_superseded_before_it_starts_does_not_run(make_event: Any) -> None:
    runner, seen = runner_for(WorkflowContext(library=InMemoryWorkflowLibrary()))
    result = await runner.start(make_event(), "s-never", stop=lambda: "evt-newer")
    assert result.status == "superseded"
    assert [t.type for t in seen] == ["session.started", "session.superseded"]
    assert not (await runner.graph.aget_state(runner.config("s-never"))).values
