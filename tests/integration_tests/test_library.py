"""The workflow library on a real Redis: indexing, ranking, hybrid search, reuse, templates."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.embeddings import Embeddings
from redis.asyncio import Redis

from nodes.context import WorkflowContext
from nodes.library import InMemoryWorkflowLibrary, event_text, workflow_text
from nodes.models import CloudEvent, SimilarWorkflow, Step, Workflow
from service.devtools.servers import LocalServers
from service.errors import CorruptWorkflowError
from service.storage.checkpoints import open_checkpointer
from service.storage.library import RedisWorkflowLibrary, seed_library
from service.storage.memory import open_subject_store
from tests.unit_tests.helpers import runner_for

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "examples" / "workflows"
STEPS = [
    Step(id="s1", title="Take in the request", description="Record it.", agents=["intake"]),
    Step(id="s2", title="Answer", depends_on=["s1"], agents=["customer_communicator"]),
]

# A deterministic embedding for tests: words map to concepts (synonyms share one),
# concepts are hashed into a small vector.
CONCEPTS = {"application": "claim", "filed": "submitted", "pension": "benefit", "ref": "id"}


class ConceptEmbeddings(Embeddings):
    """Bag of concepts hashed into 32 dimensions, normalised; no model, no download."""

    dims = 32

    def embed_query(self, text: str) -> list[float]:
        vector = [0.0] * self.dims
        for word in re.findall(r"[a-z]+", text.lower()):
            concept = CONCEPTS.get(word, word)
            vector[int(hashlib.md5(concept.encode()).hexdigest(), 16) % self.dims] += 1.0
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(t) for t in texts]


def workflow(event_type: str, data: Any, intent: str, **extra: Any) -> Workflow:
    event = CloudEvent.wrap(event_type, data, subject="S-1")
    return Workflow(event=event, intent=intent, goals=["done"], steps=STEPS, **extra)


@pytest.fixture
async def library(redis: Redis) -> AsyncIterator[RedisWorkflowLibrary]:
    """A library under a prefix of this test's own; its index is dropped at the end."""
    lib = RedisWorkflowLibrary(redis, prefix=f"test-{uuid.uuid4().hex[:8]}:workflow")
    await lib.setup()
    yield lib
    await lib.index.delete(drop=True)


async def test_workflows_are_indexed_listed_counted_and_deleted(
    library: RedisWorkflowLibrary, redis: Redis
) -> None:
    first = await library.add(workflow("claim.submitted", {"claim_id": "C-1"}, "Handle C-1"))
    ids = await seed_library(library, TEMPLATES)
    assert await library.count() == 4
    total, items = await library.recent()
    assert total == 4 and items[0].id in ids  # last used first: the templates came later
    assert {i.id for i in items} == {first, *ids}
    total, only = await library.recent(event_type="claim.submitted")
    assert total == 2 and {i.event_type for i in only} == {"claim.submitted"}

    kept = await library.get(first)
    assert kept is not None and kept.intent == "Handle C-1" and kept.source == "session"
    assert kept.steps[1].agents == ["customer_communicator"] and kept.steps[1].output == ""
    assert kept.data_summary == '{"claim_id":"C-1"}' and kept.subject == "S-1"

    await library.mark_used(first, quality=0.5)
    used = await library.get(first)
    assert used is not None and used.reuse_count == 1 and used.quality == 0.75
    assert used.last_used is not None and kept.last_used is not None
    assert used.last_used > kept.last_used
    assert (await library.recent())[1][0].id == first  # now the last used

    document = await redis.json().get(library.key(first))  # type: ignore[misc]
    assert set(document) == {"workflow", "text", "last_used_ts"}

    assert await library.delete(first) is True
    assert await library.delete(first) is False
    assert await library.get(first) is None and await library.count() == 3


async def test_a_similar_workflow_ranks_above_unrelated_ones(
    library: RedisWorkflowLibrary,
) -> None:
    memory = InMemoryWorkflowLibrary()
    for wf in [
        workflow("invoice.paid", {"invoice": "I-9", "amount": 40}, "Book the payment"),
        workflow("document.uploaded", {"claim_id": "C-1", "document": "dd214"}, "File it"),
        workflow("claim.submitted", {"claim_id": "C-1", "benefit": "disability"}, "Handle"),
        workflow("order.shipped", {"order": "O-1", "carrier": "dhl"}, "Tell the customer"),
    ]:
        for lib in (library, memory):
            await lib.add(wf, summary="done")
    event = CloudEvent.wrap("claim.submitted", {"claim_id": "C-7", "benefit": "education"})

    found = await library.search(event, limit=4)
    assert [w.event_type for w in found[:2]] == ["claim.submitted", "document.uploaded"]
    assert found[0].score == 0.9 and found[0].score > 2 * found[1].score
    assert all(0 <= w.score <= 1 for w in found)
    assert [w.score for w in found] == sorted((w.score for w in found), reverse=True)
    assert "invoice.paid" not in {w.event_type for w in found}  # nothing in common
    # the same formula as the in-memory library of `agentflow run`
    same = await memory.search(event, limit=4)
    assert [(w.event_type, w.score) for w in same] == [(w.event_type, w.score) for w in found]


async def test_hybrid_search_finds_by_meaning_what_text_misses(redis: Redis) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:workflow"
    hybrid = RedisWorkflowLibrary(redis, prefix=prefix, embeddings=ConceptEmbeddings())
    text_only = RedisWorkflowLibrary(redis, prefix=prefix)
    await hybrid.setup()
    try:
        claim = workflow("claim.submitted", {"claim_id": "C-1"}, "Handle the claim")
        await hybrid.add(claim)
        await hybrid.add(workflow("invoice.paid", {"invoice": "I-9"}, "Book the payment"))
        event = CloudEvent.wrap("application.filed", {"application_ref": "A-1"})

        assert await text_only.search(event) == []  # no word in common
        found = await hybrid.search(event)
        assert found[0].event_type == "claim.submitted"
        embed = ConceptEmbeddings()
        cosine = sum(
            a * b
            for a, b in zip(
                embed.embed_query(event_text(event)),
                embed.embed_query(workflow_text(found[0])),
                strict=True,
            )
        )
        assert cosine > 0.5
        assert found[0].score == pytest.approx(0.25 * cosine, abs=1e-3)
        assert all(w.score < found[0].score for w in found[1:])
        # the text-only part still counts: a shared word raises the score by its share
        closer = CloudEvent.wrap("application.filed", {"claim_id": "A-1"})
        (best, *_) = await hybrid.search(closer)
        assert best.event_type == "claim.submitted" and best.score > found[0].score
    finally:
        await hybrid.index.delete(drop=True)
        assert hybrid.vector_index is not None
        await hybrid.vector_index.delete(drop=False)


async def test_only_approved_workflows_and_templates_are_offered(
    library: RedisWorkflowLibrary,
) -> None:
    data = {"claim_id": "C-1"}
    await library.add(workflow("claim.submitted", data, "Rejected", verdict="revise"))
    event = CloudEvent.wrap("claim.submitted", data)
    assert await library.search(event) == []
    assert (await library.recent())[0] == 1  # kept, marked, never offered
    await seed_library(library, TEMPLATES / "claim_submitted.yaml")
    assert [w.id for w in await library.search(event)] == ["tpl-claim-submitted"]


async def test_a_corrupted_document_is_skipped_and_logged(
    library: RedisWorkflowLibrary, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    good = await library.add(workflow("claim.submitted", {"claim_id": "C-1"}, "Handle"))
    broken = {
        "workflow": {"id": "bad", "event_type": "claim.submitted", "verdict": "approve"},
        "text": "claim submitted claim id",
        "last_used_ts": 1.0,
    }
    broken["workflow"]["steps"] = "not a list"
    await redis.execute_command("JSON.SET", library.key("bad"), "$", json.dumps(broken))
    await redis.execute_command("JSON.SET", library.key("junk"), "$", '"just a string"')

    with caplog.at_level(logging.WARNING, logger="service.storage.library"):
        found = await library.search(CloudEvent.wrap("claim.submitted", {"claim_id": "C-2"}))
        total, listed = await library.recent()
    assert [w.id for w in found] == [good]
    assert [w.id for w in listed] == [good] and total == 3
    assert "skipping corrupted workflow document" in caplog.text and ":bad" in caplog.text
    with pytest.raises(CorruptWorkflowError, match="steps"):
        await library.get("bad")


async def test_setting_up_existing_indexes_logs_nothing(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    lib = RedisWorkflowLibrary(
        redis, prefix=f"test-{uuid.uuid4().hex[:8]}:workflow", embeddings=ConceptEmbeddings()
    )
    for _ in range(2):  # the second round finds every index there
        await lib.setup()
        await open_checkpointer(redis)
        await open_subject_store(redis)
    assert lib.vector_index is not None and await lib.vector_index.exists()
    with caplog.at_level(logging.DEBUG):
        await lib.setup()
        await open_checkpointer(redis)
        await open_subject_store(redis)
    await lib.index.delete(drop=True)
    await lib.vector_index.delete(drop=True)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []


async def test_discovery_with_an_empty_library(
    library: RedisWorkflowLibrary, make_event: Any
) -> None:
    runner, seen = runner_for(WorkflowContext(library=library, reuse="direct"))
    result = await runner.start(make_event(), "empty")
    assert result.status == "completed" and result.based_on is None
    (discovered,) = [t for t in seen if t.node == "discover" and t.type == "node.completed"]
    assert discovered.data == {"similar": []}
    assert await library.count() == 1  # the approved run is kept


@pytest.mark.parametrize("mode", ["direct", "adapt"])
async def test_reuse_modes_on_redis(
    library: RedisWorkflowLibrary, make_event: Any, mode: str
) -> None:
    runner, _ = runner_for(WorkflowContext(library=library, reuse=mode))  # type: ignore[arg-type]
    cold = await runner.start(make_event(), "cold")
    data = {"claim_id": "C-3001", "veteran_id": "V-1001", "benefit": "education"}
    warm = await runner.start(make_event(id="evt-warm", subject="C-3001", data=data), "warm")

    assert cold.based_on is None and warm.status == "completed"
    assert warm.based_on is not None and warm.based_on["mode"] == mode
    assert warm.based_on["score"] >= 0.75
    assert warm.usage.by_node.get("plan", 0) == (0 if mode == "direct" else 1)
    assert "assign" not in warm.usage.by_node and cold.usage.by_node["assign"] == 1
    basis = await library.get(warm.based_on["id"])
    assert basis is not None and basis.reuse_count == 1 and basis.quality == 1.0
    assert await library.count() == 1  # the warm run repeats its basis: not kept twice


async def test_templates_are_reused(library: RedisWorkflowLibrary, make_event: Any) -> None:
    await seed_library(library, TEMPLATES)
    runner, _ = runner_for(WorkflowContext(library=library, reuse="direct"))
    result = await runner.start(make_event("document_uploaded"), "tpl")
    assert result.status == "completed"
    assert result.based_on is not None and result.based_on["id"] == "tpl-document-uploaded"
    assert [s.title for s in result.workflow.steps][0] == "Match the document to its claim"
    assert result.usage.llm_calls == result.usage.by_node["execute"] + 2  # review, finalize


def test_library_commands(
    servers: LocalServers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli.app import main

    monkeypatch.setenv("AGENTFLOW_REDIS_URL", servers.redis_url)
    monkeypatch.setenv("COLUMNS", "200")

    def agentflow(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as done:
            main(["library", *args])
        out = capsys.readouterr()
        return int(done.value.code or 0), out.out, out.err

    ids = ["tpl-claim-submitted", "tpl-document-uploaded", "tpl-claim-status-requested"]
    try:
        code, out, err = agentflow("load", "examples/workflows")
        assert code == 0 and "loaded 3 workflow template(s)" in out, err
        code, out, err = agentflow("list", "--json", "--limit", "1000")
        assert code == 0, err
        assert set(ids) <= {json.loads(line)["id"] for line in out.splitlines()}
        code, out, _ = agentflow("show", "tpl-claim-submitted")
        assert code == 0 and "eligibility_analyst" in out
        assert "Assess eligibility  (after s1)" in out
        code, out, _ = agentflow("show", "tpl-claim-submitted", "--json")
        assert SimilarWorkflow.model_validate_json(out).source == "template"
        code, out, _ = agentflow(
            "search", "documents of a claim", "--event-type", "document.uploaded", "--limit", "50"
        )
        lines = out.splitlines()
        assert code == 0 and lines[0].split()[2] == "document.uploaded"
        assert "tpl-document-uploaded" in out
        assert agentflow("delete", "tpl-claim-submitted")[0] == 0
        code, _, err = agentflow("show", "tpl-claim-submitted")
        assert code == 2 and "no workflow 'tpl-claim-submitted'" in err
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            "id: t\nevent_type: a.b\nintent: x\nsteps: [{id: s1, title: T, agents: [x]}]"
        )
        code, _, err = agentflow("load", str(bad))
        assert code == 2 and "agent(s) x" in err
    finally:
        for workflow_id in ids:
            agentflow("delete", workflow_id)
    monkeypatch.delenv("AGENTFLOW_REDIS_URL")
    code, _, err = agentflow("list")
    assert code == 2 and "AGENTFLOW_REDIS_URL" in err
