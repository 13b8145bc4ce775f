"""Reusing known workflows: scores, reuse modes, templates, cached calls, settings."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.messages import HumanMessage
from redis.asyncio import Redis

import nodes.library
from nodes._llm import invoke, invoke_structured
from nodes.agents import load_agents
from nodes.chat_models import OfflineChatModel
from nodes.context import WorkflowContext
from nodes.discovery import choose_basis
from nodes.library import InMemoryWorkflowLibrary, blend_quality, similarity, terms
from nodes.models import CloudEvent, PlanDraft, SimilarWorkflow, Step, WorkflowResult
from service.bootstrap import check_startup
from service.config import load_settings
from service.errors import ConfigError, TemplateError
from service.storage.library import RedisWorkflowLibrary, load_templates
from tests.unit_tests.helpers import runner_for, scripted

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "examples" / "workflows"
EDUCATION = {"claim_id": "C-3001", "veteran_id": "V-1001", "benefit": "education"}


async def cold_then_warm(
    make_event: Any, reuse: str, **context: Any
) -> tuple[InMemoryWorkflowLibrary, WorkflowResult, WorkflowResult]:
    library = InMemoryWorkflowLibrary()
    runner, _ = runner_for(WorkflowContext(library=library, reuse=reuse, **context))  # type: ignore[arg-type]
    cold = await runner.start(make_event(), "cold")
    warm = await runner.start(make_event(id="evt-warm", subject="C-3001", data=EDUCATION), "warm")
    return library, cold, warm


def test_score_is_the_documented_formula() -> None:
    item = SimilarWorkflow(
        id="w", event_type="claim.submitted", intent="Handle the claim", data_summary="benefit"
    )
    words, kind = terms("claim submitted handle benefit"), item.event_type
    assert similarity(["claim", "benefit"], "claim.submitted", kind, words) == 1.0
    assert similarity(["claim", "pages"], "claim.submitted", kind, words) == 0.75
    assert similarity(["claim", "pages"], "document.uploaded", kind, words) == 0.25
    assert similarity(["claim", "pages"], "claim.submitted", kind, words, vector=0.2) == 0.675
    assert similarity(["claim", "pages"], "claim.submitted", kind, words, vector=-1) == 0.625
    assert terms("C-2001 V_1001 claim.submitted a 42") == ["claim", "submitted"]


async def test_direct_reuse_takes_known_steps_and_agents_without_model_calls(
    make_event: Any,
) -> None:
    library, cold, warm = await cold_then_warm(make_event, "direct")

    assert cold.based_on is None and cold.usage.by_node["plan"] == 1
    assert cold.usage.by_node["assign"] == 1
    assert warm.status == "completed" and warm.review.verdict == "approve"
    assert "plan" not in warm.usage.by_node and "assign" not in warm.usage.by_node
    assert warm.usage.llm_calls == cold.usage.llm_calls - 2
    (kept,) = [w for w in await library.search(make_event(), limit=5)]
    assert warm.based_on is not None
    assert (warm.based_on["id"], warm.based_on["mode"]) == (kept.id, "direct")
    assert warm.based_on["score"] >= 0.75
    assert [(s.id, s.agents) for s in warm.workflow.steps] == [
        (s.id, s.agents) for s in cold.workflow.steps
    ]
    assert "C-3001" in warm.workflow.intent and "C-2001" not in warm.workflow.intent
    # the repeat is not kept twice: the known workflow counts one more use instead
    assert len(library) == 1 and kept.reuse_count == 1 and kept.quality == 1.0


async def test_adapt_reuse_makes_one_plan_call_and_no_assign_call(make_event: Any) -> None:
    model = scripted(lambda text, kw: None)
    _, cold, warm = await cold_then_warm(make_event, "adapt", chat_model=model)

    assert warm.status == "completed"
    assert warm.usage.by_node["plan"] == 1 and "assign" not in warm.usage.by_node
    assert warm.based_on is not None and warm.based_on["mode"] == "adapt"
    plan_prompts = [c for c in model.calls if "<event>" in c and "intent agent" in c]
    assert len(plan_prompts) == 2
    assert "Adapt it" not in plan_prompts[0] and "Adapt it" in plan_prompts[1]
    assert [(s.id, s.agents) for s in warm.workflow.steps] == [
        (s.id, s.agents) for s in cold.workflow.steps
    ]


async def test_reuse_off_plans_from_scratch_with_examples(make_event: Any) -> None:
    _, _, warm = await cold_then_warm(make_event, "off")
    assert warm.based_on is None
    assert warm.usage.by_node["plan"] == 1 and warm.usage.by_node["assign"] == 1


def test_basis_needs_same_type_steps_and_score() -> None:
    event = CloudEvent.wrap("claim.submitted", {"claim_id": "C-1"})
    step = Step(id="s1", title="Take in the claim", agents=["intake"])

    def known(event_type: str, score: float, steps: list[Step] | None = None) -> SimilarWorkflow:
        return SimilarWorkflow(
            id=event_type, score=score, event_type=event_type, intent="x", steps=steps or [step]
        )

    context = WorkflowContext(reuse="direct", reuse_score=0.8)
    chosen = choose_basis(event, [known("claim.submitted", 0.9), known("x.y", 0.5)], context)
    assert [w.reuse for w in chosen] == ["direct", None]
    assert choose_basis(event, [known("document.uploaded", 0.9)], context)[0].reuse is None
    assert choose_basis(event, [known("claim.submitted", 0.79)], context)[0].reuse is None
    no_steps = known("claim.submitted", 0.9)
    no_steps.steps = []
    assert choose_basis(event, [no_steps], context)[0].reuse is None
    off = WorkflowContext(reuse="off")
    assert choose_basis(event, [known("claim.submitted", 1.0)], off)[0].reuse is None
    # a mark from an earlier run never carries over
    stale = known("claim.submitted", 0.5).model_copy(update={"reuse": "adapt"})
    assert choose_basis(event, [stale], context)[0].reuse is None


async def test_known_agents_missing_from_the_registry_go_to_the_assigner(
    make_event: Any,
) -> None:
    library = InMemoryWorkflowLibrary()
    template = load_templates(TEMPLATES / "claim_submitted.yaml")[0]
    template.steps[2].agents = ["retired_analyst"]
    await library.put(template)
    model = scripted(lambda text, kw: None)
    runner, _ = runner_for(WorkflowContext(library=library, reuse="direct", chat_model=model))
    result = await runner.start(make_event(), "unknown-agent")

    assert result.status == "completed" and result.based_on is not None
    assert "plan" not in result.usage.by_node and result.usage.by_node["assign"] == 1
    (assign_prompt,) = [c for c in model.calls if "Assign agents" in c]
    assert '"id": "s3"' in assign_prompt and '"id": "s1"' not in assign_prompt
    agents = {s.id: s.agents for s in result.workflow.steps}
    assert agents["s1"] == ["intake"] and agents["s3"] == ["eligibility_analyst"]


async def test_direct_basis_with_a_broken_plan_falls_back_to_planning(make_event: Any) -> None:
    library = InMemoryWorkflowLibrary()
    broken = load_templates(TEMPLATES / "claim_submitted.yaml")[0]
    broken.steps[0].depends_on = ["s4"]  # s1 -> s2 -> s4 -> s1: a cycle
    await library.put(broken)
    model = scripted(lambda text, kw: None)
    runner, _ = runner_for(WorkflowContext(library=library, reuse="direct", chat_model=model))
    result = await runner.start(make_event(), "broken")
    # the planner is asked, with the known workflow as a mere example, and no basis is reported
    assert result.based_on is None
    assert any("Similar workflows handled before" in c and broken.intent in c for c in model.calls)


async def test_mark_used_counts_and_blends_quality() -> None:
    library = InMemoryWorkflowLibrary()
    (template,) = load_templates(TEMPLATES / "status_requested.yaml")
    await library.put(template)
    await library.mark_used(template.id, quality=0.0)
    await library.mark_used(template.id, quality=1.0)
    await library.mark_used("missing", quality=1.0)
    kept = await library.get(template.id)
    assert kept is not None and kept.reuse_count == 2
    assert kept.quality == blend_quality(blend_quality(1.0, 0, 0.0), 1, 1.0) == 0.6667
    assert kept.last_used is not None and kept.last_used > template.last_used  # type: ignore[operator]


async def test_rejected_workflows_are_never_offered(make_event: Any) -> None:
    library = InMemoryWorkflowLibrary()
    (template,) = load_templates(TEMPLATES / "claim_submitted.yaml")
    await library.put(template.model_copy(update={"verdict": "revise"}))
    assert await library.search(make_event()) == []


def test_example_templates_load_against_the_example_agents() -> None:
    templates = load_templates(TEMPLATES, load_agents(ROOT / "examples" / "agents.yaml"))
    assert {t.event_type for t in templates} == {
        "claim.submitted",
        "document.uploaded",
        "claim.status_requested",
    }
    assert all(t.source == "template" and t.verdict == "template" for t in templates)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("id: t1\nevent_type: a.b\nintent: x\nsteps: []\n", "field 'steps'"),
        ("id: t1\nevent_type: a.b\nsteps: [{id: s1, title: T, agents: [intake]}]\n", "intent"),
        (
            "id: t1\nevent_type: a.b\nintent: x\nsteps:\n"
            "  - {id: s1, title: T, agents: [intake]}\n  - {id: s1, title: U, agents: [intake]}\n",
            "s1 appear more than once",
        ),
        (
            "id: t1\nevent_type: a.b\nintent: x\nsteps:\n"
            "  - {id: s1, title: T, agents: [intake], depends_on: [s9]}\n",
            "unknown step(s) s9",
        ),
        (
            "id: t1\nevent_type: a.b\nintent: x\nsteps:\n"
            "  - {id: s1, title: T, agents: [intake], depends_on: [s2]}\n"
            "  - {id: s2, title: U, agents: [intake], depends_on: [s1]}\n",
            "cycle",
        ),
        (
            "id: t1\nevent_type: a.b\nintent: x\nsteps: [{id: s1, title: T, agents: [wizard]}]\n",
            "agent(s) wizard",
        ),
        ("id: t1\nevent_type: [\n", "not valid YAML"),
        ("- 1\n- 2\n", "workflow #1"),
    ],
)
def test_invalid_templates_are_refused_with_a_sentence(
    tmp_path: Path, body: str, problem: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TemplateError) as err:
        load_templates(path, load_agents(ROOT / "examples" / "agents.yaml"))
    assert problem in str(err.value) and "bad.yaml" in str(err.value)


def test_missing_template_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        load_templates(tmp_path / "nope.yaml")
    with pytest.raises(TemplateError, match="holds no workflow templates"):
        load_templates(tmp_path)


async def test_embedded_run_seeds_the_in_memory_library(
    monkeypatch: pytest.MonkeyPatch, make_event: Any
) -> None:
    from service.runtime.embedded import run_embedded

    monkeypatch.setattr(nodes.library, "_DEFAULT", InMemoryWorkflowLibrary())
    settings = load_settings(library_seed=TEMPLATES, reuse="direct")
    check_startup(settings)
    result = await run_embedded(
        settings, session_id="seeded", event=make_event("status_requested"), memory=True
    )
    assert result.status == "completed"
    assert result.based_on is not None and result.based_on["id"] == "tpl-claim-status-requested"
    assert "plan" not in result.usage.by_node and "assign" not in result.usage.by_node
    assert len(nodes.library.default_library()) == 3


def test_settings_wire_discovery_and_reuse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENTFLOW_REUSE", "direct")
    monkeypatch.setenv("AGENTFLOW_REUSE_SCORE", "0.9")
    monkeypatch.setenv("AGENTFLOW_DISCOVERY_MIN_SCORE", "0.2")
    context = load_settings().context()
    assert (context.reuse, context.reuse_score, context.min_similarity) == ("direct", 0.9, 0.2)
    assert load_settings(reuse="off").context().reuse == "off"
    assert load_settings().llm_cache == "off" and load_settings().embeddings is None
    for name, value in [
        ("AGENTFLOW_REUSE", "always"),
        ("AGENTFLOW_REUSE_SCORE", "1.5"),
        ("AGENTFLOW_LLM_CACHE", "semantic"),
        ("AGENTFLOW_EMBEDDINGS", "text-embedding-3-small"),
    ]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_settings()
        monkeypatch.delenv(name)
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: t\nevent_type: a.b\nintent: x\nsteps: [{id: s1, title: T, agents: [x]}]\n")
    with pytest.raises(ConfigError, match="AGENTFLOW_LIBRARY_SEED: .*agent"):
        check_startup(load_settings(library_seed=bad))


async def test_cache_hits_are_counted_apart_from_model_calls() -> None:
    model = OfflineChatModel(cache=InMemoryCache())
    messages = [HumanMessage("<summary-request>yes</summary-request><intent>x</intent>")]
    _, first = await invoke(model, messages, node="finalize", timeout_s=5)
    _, again = await invoke(model, messages, node="finalize", timeout_s=5)
    assert (first.llm_calls, first.cached_calls, first.by_node) == (1, 0, {"finalize": 1})
    assert (again.llm_calls, again.cached_calls, again.input_tokens) == (0, 1, 0)
    assert again.by_node == {}

    plan = [HumanMessage('<event>{"type": "a.b"}</event>')]
    _, _, cold = await invoke_structured(model, PlanDraft, plan, node="plan", timeout_s=5)
    draft, _, hot = await invoke_structured(model, PlanDraft, plan, node="plan", timeout_s=5)
    assert (cold.llm_calls, hot.llm_calls, hot.cached_calls) == (1, 0, 1) and draft.steps


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionError("Connection refused"), "Connection refused"),
        (TimeoutError(), "TimeoutError"),
    ],
)
async def test_failing_library_leaves_a_note_and_the_run_goes_on(
    make_event: Any, error: Exception, reason: str
) -> None:
    class DownLibrary(InMemoryWorkflowLibrary):
        async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
            raise error

    runner, seen = runner_for(WorkflowContext(library=DownLibrary(), reuse="direct"))
    result = await runner.start(make_event(), "down")
    assert result.status == "completed" and result.based_on is None
    (discovered,) = [t for t in seen if t.node == "discover" and t.type == "node.completed"]
    assert discovered.data is not None
    assert discovered.data["note"] == f"workflow library unavailable: {reason}"


async def test_discovery_with_redis_unavailable_goes_on_without_examples(
    make_event: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    library = RedisWorkflowLibrary(client)
    runner, seen = runner_for(WorkflowContext(library=library, reuse="direct"))
    with caplog.at_level(logging.WARNING):
        result = await runner.start(make_event(), "no-redis")
    await client.aclose()
    assert result.status == "completed" and result.usage.by_node["plan"] == 1
    (discovered,) = [t for t in seen if t.node == "discover" and t.type == "node.completed"]
    assert discovered.data is not None and discovered.data["similar"] == []
    assert discovered.data["note"].startswith("workflow library unavailable: ")
    assert str(port) in discovered.data["note"]
    assert "could not update the workflow library" in caplog.text
