"""A tool marked `approval: required` runs only when a human approves it, through the worker.

Real Tansu, Redis, worker and gateway: the tool writes each call it runs to a file the test
reads; parallel steps wait for their own approvals and are answered in reverse order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from service.config import Settings
from service.devtools.servers import LocalServers
from service.storage.questions import PendingInterrupt, QuestionStore
from service.worker import Worker
from tests.integration_tests.conftest import example, send
from tests.integration_tests.test_decisions import result_of
from tests.integration_tests.test_gateway import running_stack

Stack = tuple[Settings, str, Worker]


def approval_agents(directory: Path, grants: Path) -> Path:
    """One provisioner whose `grant_access` needs approval; its calls go to `grants`."""
    module = f"access_tools_{uuid.uuid4().hex[:8]}"
    (directory / f"{module}.py").write_text(
        "import json\n\n\n"
        "def grant_access(user: str, role: str) -> str:\n"
        '    """Grant a user a role."""\n'
        f"    with open({str(grants)!r}, 'a') as calls:\n"
        "        calls.write(json.dumps({'user': user, 'role': role}) + '\\n')\n"
        "    return f'GRANTED {role} to {user}'\n"
    )
    path = directory / "approval_agents.yaml"
    path.write_text(
        "agents:\n"
        "  - name: provisioner\n"
        "    description: Takes in, records and reviews claims, documents and eligibility.\n"
        "    capabilities: [take, record, review, document, assess, eligibility, claim]\n"
        "    system_prompt: You grant access.\n"
        f"    tools: [{{path: {module}.grant_access, approval: required}}]\n"
    )
    return path


@pytest.fixture(scope="module")
async def stack(
    servers: LocalServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, Path]]:
    directory = tmp_path_factory.mktemp("approval")
    grants = directory / "grants.jsonl"
    agents = approval_agents(directory, grants)
    async with running_stack(servers, directory, agents_file=agents) as started:
        yield started, grants


def granted(grants: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in grants.read_text().splitlines()] if grants.exists() else []


async def pending(redis: Redis, session_id: str) -> list[PendingInterrupt]:
    return await QuestionStore(redis).pending(session_id)


async def test_calls_wait_for_approval_and_parallel_ones_are_answered_in_any_order(
    stack: tuple[Stack, Path], producer: AIOKafkaProducer, redis: Redis
) -> None:
    (settings, url, _), grants = stack
    session_id = f"approve-{uuid.uuid4().hex[:8]}"
    event = example("claim_submitted", type=f"access.requested.t{uuid.uuid4().hex[:8]}")
    await send(producer, settings, {**event, "sessionid": session_id}, session_id)
    result = await result_of(settings, event["id"])
    assert result["status"] == "interrupted"
    assert "asks to call grant_access" in result["question"]
    asked: list[dict[str, Any]] = []
    parallel = False
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while result["status"] == "interrupted":
            waiting = await pending(redis, session_id)
            assert waiting and all(w.kind == "tool_approval" for w in waiting)
            assert granted(grants) == [a["args"] for a in asked if a["decision"] != "reject"]
            parallel = parallel or len(waiting) > 1
            last = waiting[-1]  # the latest first: each answer resumes its own interrupt
            assert last.payload["agent"] == "provisioner" and last.payload["tool"] == "grant_access"
            if not asked:
                # An edit the tool does not take is refused with the reason; it waits on.
                bad = {"interrupt_id": last.id, "decision": "edit", "args": {"user": "x"}}
                refused = await http.post(f"/sessions/{session_id}/resume", json=bad)
                assert refused.status_code == 422
                assert "do not fit grant_access: role: Field required" in refused.text
                assert last.id in [w.id for w in await pending(redis, session_id)]
                answer = {"decision": "edit", "args": {"user": "ann", "role": "reader"}}
            elif len(asked) == 1:
                answer = {"decision": "reject", "feedback": "manager did not approve"}
            else:
                answer = {"decision": "approve"}
            asked.append({**answer, "args": answer.get("args") or last.payload["args"]})
            accepted = await http.post(
                f"/sessions/{session_id}/resume", json={"interrupt_id": last.id, **answer}
            )
            assert accepted.status_code == 202, accepted.text
            result = await result_of(settings, accepted.json()["event_id"])
    assert result["status"] == "completed"
    assert parallel, "no two steps waited for approval at once"
    # Each approved or edited call ran once, with the arguments decided; the rejected never.
    assert granted(grants) == [a["args"] for a in asked if a["decision"] != "reject"]
    assert {"user": "ann", "role": "reader"} in granted(grants)
    outputs = " ".join(s["output"] for s in result["workflow"]["steps"])
    assert "manager did not approve" in outputs  # the agent read why its call was rejected
