"""Human decisions honoured through Kafka, HTTP and the CLI: status, library, history.

Each case escalates a claim (the offline reviewer asks a human when a step's output asks
for human review) of an event type of its own, answers it one way, and checks the final
status, whether the workflow was kept in the library, and who answered in the session's
history, record and transitions.
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

from nodes.models import HumanAnswer
from service.config import Settings
from service.devtools.servers import LocalServers
from service.storage.memory import session_history
from service.storage.publisher import read_log
from service.storage.questions import QuestionStore
from service.storage.sessions import SessionStore
from service.worker import Worker
from tests.integration_tests.conftest import (
    cli_env,
    example,
    own_settings,
    read_topic,
    results_by_event,
    send,
    wait_until,
)
from tests.integration_tests.test_cli_service import finished, start
from tests.integration_tests.test_gateway import running_stack
from tests.integration_tests.test_ids import dead_letters

TOKEN = "tok-alice-3f9"
Stack = tuple[Settings, str, Worker]


@pytest.fixture(scope="module")
async def stack(
    servers: LocalServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A worker and a gateway whose one token is named `alice`."""
    directory = tmp_path_factory.mktemp("agents")
    async with running_stack(servers, directory, api_tokens=[f"alice:{TOKEN}"]) as started:
        yield started


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=stack[1], timeout=30, headers=headers) as client:
        yield client


async def result_of(settings: Settings, event_id: str) -> dict[str, Any]:
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event_id in results_by_event(rs),
    )
    (result,) = results_by_event(records)[event_id]
    return result


async def escalated(stack: Stack, producer: AIOKafkaProducer) -> tuple[str, str]:
    """Send a claim that escalates, of a type of its own; return its session and type."""
    settings = stack[0]
    kind = f"claim.submitted.t{uuid.uuid4().hex[:8]}"
    event = example("claim_needs_review", type=kind)
    session_id = f"decide-{uuid.uuid4().hex[:8]}"
    await send(producer, settings, {**event, "sessionid": session_id}, session_id)
    assert (await result_of(settings, event["id"]))["status"] == "interrupted"
    return session_id, kind


async def answer_over_kafka(
    stack: Stack, producer: AIOKafkaProducer, session_id: str, data: dict[str, Any]
) -> dict[str, Any]:
    resume = example("claim_needs_review", type="agentflow.resume", data=data)
    resume["source"] = "urn:manager-desk"
    await send(producer, stack[0], {**resume, "sessionid": session_id}, session_id)
    return await result_of(stack[0], resume["id"])


async def answer_over_http(
    stack: Stack, http: httpx.AsyncClient, session_id: str, data: dict[str, Any]
) -> dict[str, Any]:
    accepted = await http.post(f"/sessions/{session_id}/resume", json=data)
    assert accepted.status_code == 202, accepted.text
    return await result_of(stack[0], accepted.json()["event_id"])


async def answer_with_cli(
    stack: Stack, tmp_path: Path, session_id: str, data: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    args = ["sessions", "answer", session_id, f"--{data['decision']}", "--wait", "--json"]
    if data.get("feedback"):
        args += ["--feedback", data["feedback"]]
    if data.get("steps"):
        args += ["--steps", ",".join(data["steps"])]
    code, out, err = await finished(await start(*args, env=cli_env(stack[0]), cwd=tmp_path))
    assert out, err
    return code, json.loads(out)


WHO = {"kafka": "urn:manager-desk", "http": "alice", "cli": "agentflow/cli"}


async def answer(
    path: str,
    stack: Stack,
    producer: AIOKafkaProducer,
    http: httpx.AsyncClient,
    tmp_path: Path,
    session_id: str,
    data: dict[str, Any],
) -> dict[str, Any]:
    if path == "kafka":
        return await answer_over_kafka(stack, producer, session_id, data)
    if path == "http":
        return await answer_over_http(stack, http, session_id, data)
    code, result = await answer_with_cli(stack, tmp_path, session_id, data)
    assert code == {"completed": 0, "rejected": 4, "interrupted": 3}[result["status"]]
    return result


async def kept(worker: Worker, kind: str) -> int:
    """How many workflows of this event type the worker's library keeps (and would offer)."""
    library = worker.runner.context.library
    total, _ = await library.recent(event_type=kind)  # type: ignore[union-attr]
    return total


async def recorded(stack: Stack, redis: Redis, session_id: str) -> list[HumanAnswer]:
    """The answers of a session, as its history, record and transitions all show them."""
    runs = await session_history(stack[2].runner.graph, session_id)
    in_history = [a for run in runs for a in run.answers]
    record = await SessionStore(redis, ttl_s=60).get(session_id)
    assert record is not None
    log = await read_log(redis, session_id)
    in_log = [HumanAnswer.model_validate(t.data) for t in log if t.type == "session.answered"]
    strip = {"answered_at"}
    assert [a.model_dump(exclude=strip) for a in record.answers] == [
        a.model_dump(exclude=strip) for a in in_log
    ]
    assert [a.model_dump(exclude=strip) for a in in_history] == [
        a.model_dump(exclude=strip) for a in in_log[-len(in_history) :]
    ]
    assert all(a.event_id in record.event_ids for a in record.answers)
    return record.answers


@pytest.mark.parametrize("path", ["kafka", "http", "cli"])
async def test_approve_completes_and_is_kept(
    path: str,
    stack: Stack,
    producer: AIOKafkaProducer,
    http: httpx.AsyncClient,
    redis: Redis,
    tmp_path: Path,
) -> None:
    session_id, kind = await escalated(stack, producer)
    data = {"decision": "approve", "feedback": "discharge confirmed"}
    result = await answer(path, stack, producer, http, tmp_path, session_id, data)
    assert result["status"] == "completed" and result["review"]["verdict"] == "approve"
    assert "discharge confirmed" in result["review"]["feedback"]
    await wait_until(lambda: _kept_is(stack, kind, 1), "the approved workflow in the library")
    (answered,) = await recorded(stack, redis, session_id)
    assert (answered.decision, answered.source, answered.who) == ("approve", path, WHO[path])


@pytest.mark.parametrize("path", ["kafka", "http", "cli"])
async def test_reject_ends_rejected_and_is_not_kept(
    path: str,
    stack: Stack,
    producer: AIOKafkaProducer,
    http: httpx.AsyncClient,
    redis: Redis,
    tmp_path: Path,
) -> None:
    session_id, kind = await escalated(stack, producer)
    data = {"decision": "reject", "feedback": "manager did not approve"}
    result = await answer(path, stack, producer, http, tmp_path, session_id, data)
    assert result["status"] == "rejected" and result["review"]["verdict"] == "reject"
    assert "manager did not approve" in result["error"]
    assert await kept(stack[2], kind) == 0  # never offered as an example
    (answered,) = await recorded(stack, redis, session_id)
    assert (answered.decision, answered.source, answered.who) == ("reject", path, WHO[path])
    record = await SessionStore(redis, ttl_s=60).get(session_id)
    assert record is not None and record.status == "rejected"


@pytest.mark.parametrize("path", ["kafka", "http", "cli"])
async def test_revise_runs_the_step_again_then_asks_again(
    path: str,
    stack: Stack,
    producer: AIOKafkaProducer,
    http: httpx.AsyncClient,
    redis: Redis,
    tmp_path: Path,
) -> None:
    session_id, kind = await escalated(stack, producer)
    data = {"decision": "revise", "steps": ["s3"], "feedback": "use the 2019 DD-214"}
    result = await answer(path, stack, producer, http, tmp_path, session_id, data)
    # s3 ran again with the feedback; its output still asks for a human, who is asked again.
    assert result["status"] == "interrupted"
    attempts = {s["id"]: s["attempts"] for s in result["workflow"]["steps"]}
    assert attempts["s3"] == 2 and attempts["s1"] == 1
    assert await kept(stack[2], kind) == 0
    done = await answer(path, stack, producer, http, tmp_path, session_id, {"decision": "approve"})
    assert done["status"] == "completed"
    decisions = [a.decision for a in await recorded(stack, redis, session_id)]
    assert decisions == ["revise", "approve"]


async def test_answers_that_cannot_be_taken_are_refused_with_the_reason(
    stack: Stack, producer: AIOKafkaProducer, http: httpx.AsyncClient, redis: Redis
) -> None:
    settings = stack[0]
    session_id, _ = await escalated(stack, producer)
    # HTTP: 422 with the reason, nothing sent.
    vague = await http.post(f"/sessions/{session_id}/resume", json={"answer": "looks fine"})
    assert vague.status_code == 422
    assert "start it with approve, reject or revise" in vague.json()["detail"]
    wrong = await http.post(
        f"/sessions/{session_id}/resume", json={"decision": "revise", "steps": ["s9"]}
    )
    assert wrong.status_code == 422 and "no step s9 to revise" in wrong.json()["detail"]
    unknown = await http.post(
        f"/sessions/{session_id}/resume", json={"decision": "approve", "interrupt_id": "nope"}
    )
    assert unknown.status_code == 422 and "no pending interrupt nope" in unknown.json()["detail"]
    # Kafka: the resume event goes to the dead-letter topic with the reason.
    resume = example("claim_needs_review", type="agentflow.resume", data={"answer": "sure"})
    await send(producer, settings, {**resume, "sessionid": session_id}, session_id)
    dlq = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_dlq,
        until=lambda rs: any(resume["id"] in r.value.decode() for r in rs),
    )
    reasons = [reason for key, _, reason in dead_letters(dlq) if key == session_id]
    assert reasons and reasons[-1].startswith("answer refused: the answer 'sure' names no")
    # The question is still there, and a good answer is taken.
    record = await SessionStore(redis, ttl_s=60).get(session_id)
    assert record is not None and record.status == "interrupted" and record.answers == []
    accepted = await http.post(f"/sessions/{session_id}/resume", json={"answer": "approve: ok"})
    assert accepted.status_code == 202
    assert (await result_of(settings, accepted.json()["event_id"]))["status"] == "completed"


async def _kept_is(stack: Stack, kind: str, count: int) -> bool:
    return await kept(stack[2], kind) == count


async def test_pending_interrupts_are_listed_and_one_is_answered_by_its_id(
    stack: Stack, producer: AIOKafkaProducer, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    session_id, _ = await escalated(stack, producer)
    listed = await http.get(f"/sessions/{session_id}/interrupts")
    assert listed.status_code == 200, listed.text
    (pending,) = listed.json()["interrupts"]
    assert pending["kind"] == "review" and pending["deadline"] is None
    assert "needs a human decision" in pending["payload"]["question"]
    assert pending["payload"]["decisions"] == ["approve", "reject", "revise"]
    assert pending["since"]
    assert (await http.get("/sessions/no-such-session/interrupts")).status_code == 404

    env = cli_env(stack[0])
    code, out, err = await finished(
        await start("sessions", "pending", session_id, "--json", env=env, cwd=tmp_path)
    )
    assert code == 0, err
    assert [(p["session_id"], p["id"]) for p in json.loads(out)] == [(session_id, pending["id"])]
    code, out, err = await finished(await start("sessions", "pending", env=env, cwd=tmp_path))
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith(session_id))
    assert line.split("\t")[1:3] == [pending["id"], "review"]

    code, out, err = await finished(
        await start(
            *("sessions", "answer", session_id, "--approve", "--interrupt", pending["id"]),
            *("--wait", "--json"),
            env=env,
            cwd=tmp_path,
        )
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "completed"
    assert (await http.get(f"/sessions/{session_id}/interrupts")).json()["interrupts"] == []


async def test_an_unanswered_question_ends_rejected_at_its_deadline(
    servers: LocalServers, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    settings = own_settings(servers, human_timeout_s=1.0)
    worker = await start_worker(settings)
    session_id = f"late-{uuid.uuid4().hex[:8]}"
    kind = f"claim.submitted.t{uuid.uuid4().hex[:8]}"
    event = example("claim_needs_review", type=kind, sessionid=session_id)
    await send(producer, settings, event, session_id)
    assert (await result_of(settings, event["id"]))["status"] == "interrupted"

    store = SessionStore(redis, ttl_s=60)

    async def ended() -> bool:
        record = await store.get(session_id)
        return record is not None and record.status == "rejected"

    await wait_until(ended, "the question's deadline to reject the session")
    record = await store.get(session_id)
    assert record is not None and record.result is not None
    (answer,) = record.answers
    assert (answer.decision, answer.feedback) == ("reject", "no answer within 1 s")
    assert (answer.source, answer.who) == ("kafka", "agentflow/human-timeout")
    assert record.result.status == "rejected" and record.result.event_id == answer.event_id
    assert await QuestionStore(redis).pending(session_id) == []
    assert await kept(worker, kind) == 0
    # Any worker on this Redis may have swept the deadline: the answer went to this
    # worker's events topic all the same, and this worker, the partition's owner, ran it.
