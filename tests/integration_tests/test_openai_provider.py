"""The real provider path: the whole graph through ChatOpenAI against a loopback server."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, cast

import httpx
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph

from graphs.workflow import build_graph
from nodes.chat_models import MODEL_RETRY, make_chat_model, model_retry
from nodes.context import WorkflowContext
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import WorkflowResult
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from tests.openai_server import (
    FAULT_KINDS,
    SNAPSHOT,
    ChatRequest,
    FaultPlan,
    OpenAICompatibleServer,
)

MODEL = "openai:test-model"
SERVED = f"test-model-{SNAPSHOT}"
STRUCTURED = {"PlanDraft", "AssignmentDraft", "ReviewDecision"}


FAST_RETRY = model_retry(initial_interval=0.01, max_interval=0.01, jitter=False)
"""The default attempts without the waits: for tests that fault many calls."""


def _context(**options: Any) -> WorkflowContext:
    return WorkflowContext(model=MODEL, library=InMemoryWorkflowLibrary(), **options)


def _runner(retry: Any = None, **options: Any) -> SessionRunner:
    graph = build_graph(InMemorySaver(serde=checkpoint_serde()), model_retry=retry)
    return SessionRunner(graph, _context(**options))


def _forced_tool(request: ChatRequest) -> str | None:
    choice = request.tool_choice
    return choice["function"]["name"] if isinstance(choice, dict) else None


def _answers_its_tool_calls(request: ChatRequest) -> bool:
    """Whether every tool result in the request answers a call made earlier in it."""
    called: set[str] = set()
    for message in request.body["messages"]:
        called |= {c["id"] for c in message.get("tool_calls") or []}
        if message["role"] == "tool" and message["tool_call_id"] not in called:
            return False
    return bool(called)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_graph_completes_through_chat_openai(
    openai_server: OpenAICompatibleServer, make_event: Any
) -> None:
    result = await _runner().start(make_event(), "s-openai")

    assert result.status == "completed", result.error
    assert result.model == SERVED
    assert all(s.status == "done" and s.output for s in result.workflow.steps)
    steps = {s.id: s for s in result.workflow.steps}
    assert "eligible for disability" in steps["s3"].output  # the tool ran on the served call
    answered = openai_server.answered()
    assert len(answered) == len(openai_server.requests) == result.usage.llm_calls
    assert result.usage.input_tokens == sum(r.usage["prompt_tokens"] for r in answered if r.usage)
    assert result.usage.output_tokens == sum(
        r.usage["completion_tokens"] for r in answered if r.usage
    )
    assert {r.body["model"] for r in answered} == {"test-model"}
    assert {r.headers["authorization"] for r in answered} == {f"Bearer {openai_server.api_key}"}
    # structured output is a forced function call; agents get their tools unforced and
    # send the tool results back with the calls they answer
    assert {_forced_tool(r) for r in answered} - {None} == STRUCTURED
    assert any(r.body.get("tools") and r.tool_choice is None for r in answered)
    with_results = [r for r in answered if "tool" in r.roles]
    assert with_results and all(_answers_its_tool_calls(r) for r in with_results)
    assert not any(r.body.get("stream") for r in answered)  # the runner does not stream


async def test_a_rate_limit_is_retried_by_the_node_retry_policy(
    openai_server: OpenAICompatibleServer, make_event: Any
) -> None:
    openai_server.fail_next(status=429)
    result = await _runner().start(make_event(), "s-429")

    assert result.status == "completed", result.error
    limited, retried, *_ = openai_server.requests
    assert (limited.status, retried.status) == (429, 200)
    assert _forced_tool(limited) == _forced_tool(retried) == "PlanDraft"
    assert len(openai_server.requests) == result.usage.llm_calls + 1
    assert result.usage.by_node["plan"] == 1
    # the client does not retry (max_retries=0): LangGraph ran the node again, after
    # the policy's back-off
    assert {r.headers["x-stainless-retry-count"] for r in openai_server.requests} == {"0"}
    assert retried.received_at - limited.received_at >= MODEL_RETRY.initial_interval


@pytest.mark.parametrize(
    ("outage", "error"),
    [("server-error", "Error code: 500"), ("nothing-listens", "Connection error")],
    ids=["server-error", "nothing-listens"],
)
async def test_a_provider_that_keeps_failing_fails_the_run(
    openai_server: OpenAICompatibleServer,
    monkeypatch: pytest.MonkeyPatch,
    make_event: Any,
    outage: str,
    error: str,
) -> None:
    if outage == "server-error":
        openai_server.fail_next(status=500, count=None)
    else:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{_closed_port()}/v1")
        make_chat_model.cache_clear()

    async with asyncio.timeout(30):
        result = await _runner().start(make_event(), f"s-{outage}")

    assert result.status == "failed"
    assert result.error is not None and error in result.error, result.error
    # no offline answer stood in for the provider
    assert result.model == "" and result.usage.llm_calls == 0
    assert result.workflow.steps == [] and result.summary == ""
    if outage == "server-error":
        assert len(openai_server.requests) == MODEL_RETRY.max_attempts
        assert {r.status for r in openai_server.requests} == {500}
    else:
        assert openai_server.requests == []


async def test_a_rejected_key_fails_the_run_without_retries(
    openai_server: OpenAICompatibleServer, monkeypatch: pytest.MonkeyPatch, make_event: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    make_chat_model.cache_clear()

    result = await _runner().start(make_event(), "s-401")

    assert result.status == "failed"
    assert result.error is not None and "Error code: 401" in result.error, result.error
    assert [r.status for r in openai_server.requests] == [401]


async def _streamed_run(make_event: Any) -> tuple[WorkflowResult, list[tuple[Any, Any]]]:
    """Run the graph streaming model tokens, as LangGraph Studio does."""
    # build_graph's bare return type leaves the context type at its default, None
    graph = cast(
        CompiledStateGraph[Any, WorkflowContext, Any, Any],
        build_graph(InMemorySaver(serde=checkpoint_serde())),
    )
    config: RunnableConfig = {"configurable": {"thread_id": "s-stream"}}
    streamed = [
        (chunk, meta)
        async for chunk, meta in graph.astream(
            {"event": make_event()}, config, context=_context(), stream_mode="messages"
        )
    ]
    return (await graph.aget_state(config)).values["result"], streamed


async def test_streamed_messages_arrive_as_server_sent_events(
    openai_server: OpenAICompatibleServer, make_event: Any
) -> None:
    result, streamed = await _streamed_run(make_event)

    assert result.status == "completed", result.error
    assert result.model == SERVED
    assert openai_server.requests and all(r.body.get("stream") for r in openai_server.requests)
    assert any(c.tool_call_chunks for c, _ in streamed)
    assert any(c.text for c, meta in streamed if meta["langgraph_node"] == "finalize")


async def test_streamed_runs_count_the_served_tokens(
    openai_server: OpenAICompatibleServer, make_event: Any
) -> None:
    result, _ = await _streamed_run(make_event)

    assert result.status == "completed", result.error
    served = sum(r.usage["prompt_tokens"] for r in openai_server.answered() if r.usage)
    assert result.usage.input_tokens == served > 0


def _is_plan(body: dict[str, Any]) -> bool:
    return _forced_tool(ChatRequest("", {}, body)) == "PlanDraft"


def _is_agent_turn(body: dict[str, Any]) -> bool:
    """The first turn of an agent with tools (the offline model calls them then)."""
    roles = [m.get("role") for m in body.get("messages", [])]
    return bool(body.get("tools")) and body.get("tool_choice") is None and "tool" not in roles


def _is_summary(body: dict[str, Any]) -> bool:
    return "<summary-request>" in json.dumps(body.get("messages", []))


@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_each_fault_kind_is_retried_and_the_run_completes(
    openai_server: OpenAICompatibleServer, make_event: Any, kind: str
) -> None:
    openai_server.hang_s = 2.0
    openai_server.fault_when(kind, _is_plan)

    async with asyncio.timeout(60):
        result = await _runner(FAST_RETRY, model_timeout_s=1.0).start(make_event(), f"s-{kind}")

    assert result.status == "completed", result.error
    faulted, retried = [r for r in openai_server.requests if _is_plan(r.body)]
    assert (faulted.fault, retried.fault) == (kind, None)
    assert result.usage.by_node["plan"] == 1  # a failed attempt's writes are dropped


@pytest.mark.parametrize("kind", ["unknown_tool", "bad_tool_arguments"])
async def test_an_agents_bad_tool_call_is_answered_and_the_step_goes_on(
    openai_server: OpenAICompatibleServer, make_event: Any, kind: str
) -> None:
    openai_server.fault_when(kind, _is_agent_turn, count=None)

    result = await _runner(FAST_RETRY).start(make_event(), f"s-agent-{kind}")

    assert result.status == "completed", result.error
    assert all(s.status == "done" and s.output for s in result.workflow.steps)
    faulted = [r for r in openai_server.requests if r.fault == kind]
    assert faulted
    # the model's next turn carries an error result for the bad call, not a 400 for
    # a call left unanswered
    answers = [
        m
        for r in openai_server.answered()
        for m in r.body["messages"]
        if m["role"] == "tool"
        and ("no tool named" in m["content"] or "not valid JSON" in m["content"])
    ]
    assert answers
    assert all(_answers_its_tool_calls(r) for r in openai_server.answered() if "tool" in r.roles)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty_choices", "plan: the provider returned an empty answer (5 attempts)"),
        ("malformed_json", "plan: the provider returned a malformed answer (JSONDecodeError"),
        ("bad_tool_arguments", "plan: the model's PlanDraft arguments are not valid JSON"),
        ("invalid_structured_output", "plan: the model's answer is not a valid PlanDraft"),
        ("unknown_tool", "plan: the model did not answer with a PlanDraft"),
    ],
)
async def test_a_fault_that_persists_fails_the_run_with_a_reason(
    openai_server: OpenAICompatibleServer, make_event: Any, kind: str, reason: str
) -> None:
    openai_server.fault_when(kind, _is_plan, count=None)

    result = await _runner(FAST_RETRY).start(make_event(), f"s-always-{kind}")

    assert result.status == "failed"
    assert result.error is not None
    assert result.error.startswith(f"ModelCallError: {reason}") or result.error.startswith(
        f"StructuredOutputError: {reason}"
    ), result.error
    assert result.error.endswith("(5 attempts)"), result.error
    assert len([r for r in openai_server.requests if _is_plan(r.body)]) == 5


async def test_finalize_keeps_an_approved_workflow_when_the_summary_fails(
    openai_server: OpenAICompatibleServer, make_event: Any
) -> None:
    openai_server.fault_when("empty_choices", _is_summary, count=None)
    library = InMemoryWorkflowLibrary()
    graph = build_graph(InMemorySaver(serde=checkpoint_serde()), model_retry=FAST_RETRY)
    runner = SessionRunner(graph, WorkflowContext(model=MODEL, library=library))

    result = await runner.start(make_event(), "s-no-summary")

    assert result.status == "completed", result.error
    assert result.review.verdict == "approve"
    assert result.summary.startswith("Summary built from the steps (the model did not write one: ")
    assert "finalize: the provider returned an empty answer (5 attempts)" in result.summary
    assert [r.fault for r in openai_server.requests if _is_summary(r.body)] == ["empty_choices"] * 5
    assert len(library) == 1  # the approved workflow is kept for later sessions


def test_the_fault_plan_is_drawn_from_its_seed() -> None:
    plan = FaultPlan(rate=0.5, seed=11, kinds=("rate_limit", "server_error", "empty_choices"))
    draws = []
    for _ in range(2):
        with OpenAICompatibleServer(faults=plan) as server, httpx.Client() as client:
            for i in range(20):
                client.post(
                    f"{server.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {server.api_key}"},
                    json={"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]},
                )
            draws.append([r.fault for r in server.requests])
    assert draws[0] == draws[1]
    assert {"rate_limit", "server_error", "empty_choices", None} == set(draws[0])
