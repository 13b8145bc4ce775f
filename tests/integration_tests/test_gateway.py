"""The gateway over real HTTP, in front of a real broker, Redis and worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis

from nodes.models import WorkflowResult
from service.bootstrap import check_startup
from service.config import Settings, load_settings
from service.devtools.servers import KafkaBroker, LocalServers
from service.gateway.app import serve_gateway
from service.gateway.backends import SEND_TIMEOUT_S
from service.observe import metrics as service_metrics
from service.storage.keys import session_channel
from service.storage.publisher import TransitionPublisher, read_log
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition
from service.worker import Worker
from tests.integration_tests.conftest import offsets, read_topic, results_by_event, wait_until

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "examples" / "events"
TOOLS_MODULE = "gateway_test_tools"

StartGateway = Callable[..., Awaitable[str]]
ANSWERED_S = SEND_TIMEOUT_S * 3
"""A request that Kafka cannot take is answered 503 within SEND_TIMEOUT_S; this catches a hang."""


def example(name: str) -> dict[str, Any]:
    """An example event with a fresh id."""
    raw = json.loads((EVENTS / f"{name}.json").read_text())
    raw["id"] = f"{raw['id']}-{uuid.uuid4().hex[:8]}"
    return raw


def short(name: str) -> dict[str, Any]:
    """The `{type, data, subject}` form of an example event."""
    raw = json.loads((EVENTS / f"{name}.json").read_text())
    return {"type": raw["type"], "data": raw["data"], "subject": raw["subject"]}


def held_agents(directory: Path) -> Path:
    """Write the example agents with tools that `held_tools` can hold."""
    tools = [
        '"""The example claims tools; while `HOLD` is set, each call waits for its release."""',
        "import asyncio",
        "import functools",
        "import importlib.util",
        "",
        f"_spec = importlib.util.spec_from_file_location('_claims', {str(ROOT / 'examples' / 'claims_tools.py')!r})",  # noqa: E501
        "_real = importlib.util.module_from_spec(_spec)",
        "_spec.loader.exec_module(_real)",
        "",
        "class Hold:",
        "    def __init__(self):",
        "        self.entered = asyncio.Event()  # a tool call is waiting",
        "        self.released = asyncio.Event()",
        "        self.cancelled = 0  # calls cancelled while waiting",
        "",
        "HOLD = None",
        "",
        "def _held(func):",
        "    @functools.wraps(func)",
        "    async def tool(*args, **kwargs):",
        "        hold = HOLD",
        "        if hold is not None:",
        "            hold.entered.set()",
        "            try:",
        "                await hold.released.wait()",
        "            except asyncio.CancelledError:",
        "                hold.cancelled += 1",
        "                raise",
        "        return func(*args, **kwargs)",
        "    return tool",
        "",
    ]
    for name in ("lookup_claim", "lookup_veteran", "list_documents", "check_eligibility"):
        tools.append(f"{name} = _held(_real.{name})")
    (directory / f"{TOOLS_MODULE}.py").write_text("\n".join(tools) + "\n")
    agents = (ROOT / "examples" / "agents.yaml").read_text()
    path = directory / "agents.yaml"
    path.write_text(agents.replace("claims_tools.", f"{TOOLS_MODULE}."))
    return path


@contextmanager
def held_tools() -> Iterator[Any]:
    """Hold every tool call of the runs until `hold.released` is set (or the block ends).

    `hold.entered` is set when a run waits in a tool; `hold.cancelled` counts the calls
    cancelled while waiting.
    """
    tools = sys.modules[TOOLS_MODULE]
    hold = tools.Hold()
    tools.HOLD = hold
    try:
        yield hold
    finally:
        tools.HOLD = None
        hold.released.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def running_stack(
    servers: LocalServers, directory: Path, **overrides: Any
) -> AsyncIterator[tuple[Settings, str, Worker]]:
    """Run a worker (with tools `held_tools` can hold) and a gateway on topics of their own."""
    tag = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka_bootstrap": servers.kafka_bootstrap,
        "redis_url": servers.redis_url,
        "consumer_group": f"agentflow-workers-{tag}",
        "topic_events": f"agentflow.events.{tag}",
        "topic_results": f"agentflow.results.{tag}",
        "topic_sessions": f"agentflow.sessions.{tag}",
        "topic_dlq": f"agentflow.events.dlq.{tag}",
        # Every worker consumes its replies topic: stacks must not share one.
        "topic_agents_prefix": f"agentflow.agents.{tag}.",
        "topic_agent_replies": f"agentflow.agents.{tag}.replies",
        "topic_partitions": 3,
        "shutdown_grace_s": 5,
        "agents_file": held_agents(directory),
    }
    settings = load_settings(**(values | overrides))
    check_startup(settings)  # loads the agents, and so the tools module `held_tools` holds
    worker = Worker(settings, name=f"gateway-test-worker-{tag}")
    await worker.start()
    running = asyncio.create_task(worker.run())
    server, task, url = await serve_gateway(settings, host="127.0.0.1", port=0)
    try:
        yield settings, url, worker
    finally:
        server.should_exit = True
        worker.stop()
        await asyncio.wait_for(task, 15)
        await asyncio.wait_for(running, 30)


@pytest.fixture(scope="module")
async def stack(
    servers: LocalServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Settings, str, Worker]]:
    """One worker and one gateway for the module's tests."""
    directory = tmp_path_factory.mktemp("agents")
    async with running_stack(servers, directory, metrics_port=free_port()) as started:
        yield started


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Start extra gateways (other settings) in this loop; each is stopped at the end."""
    running: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(settings: Settings, **kw: Any) -> str:
        server, task, url = await serve_gateway(settings, host="127.0.0.1", port=0, **kw)
        running.append((server, task))
        return url

    yield start
    for server, _ in running:
        server.should_exit = True
    for _, task in running:
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def client(stack: tuple[Settings, str, Worker]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack[1], timeout=30) as http:
        yield http


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Parse a Server-Sent Events body: yields messages and `{"comment": ...}` lines."""
    message: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line == "":
            if "data" in message:
                message["transition"] = json.loads(message["data"])
                yield message
            message = {}
        else:
            name, _, value = line.partition(":")
            message[name] = value[1:] if value.startswith(" ") else value


async def collect(
    http: httpx.AsyncClient,
    session_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    until: Callable[[dict[str, Any]], bool] | None = None,
    into: list[dict[str, Any]] | None = None,
    timeout_s: float = 60,
) -> tuple[list[dict[str, Any]], bool]:
    """Read a session's stream; return its messages and whether the server ended it.

    `into` receives the messages as they come, for a caller that watches the progress.
    """
    messages: list[dict[str, Any]] = [] if into is None else into
    async with asyncio.timeout(timeout_s):
        async with http.stream(
            "GET", f"/sessions/{session_id}/stream", headers=headers, params=params
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for message in sse(response):
                if "transition" not in message:
                    continue
                messages.append(message)
                if until is not None and until(message):
                    return messages, False
    return messages, True


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [int(m["id"]) for m in messages]


async def post_event(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/events", json=body)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


async def finished_session(redis: Redis, session_id: str) -> None:
    """Log a short, completed session directly (for tests that need no worker)."""
    publisher = TransitionPublisher(redis, ttl_s=600)
    result = WorkflowResult(session_id=session_id, event_id="e-1", status="completed")
    await publisher.publish(Transition(session_id=session_id, type="session.started"))
    await publisher.publish(
        Transition(
            session_id=session_id,
            type="session.completed",
            data={"status": "completed", "result": result.model_dump(mode="json")},
        )
    )


# --- the main path ---------------------------------------------------------------------------


async def _record_says(client: httpx.AsyncClient, session_id: str, status: str) -> None:
    """Wait until the session record has a status (written just after the last transition)."""

    async def recorded() -> bool:
        return (await client.get(f"/sessions/{session_id}")).json()["status"] == status

    await wait_until(recorded, f"the session record to say {status}")


async def test_start_a_workflow_and_stream_it_to_completion(
    stack: tuple[Settings, str, Worker], client: httpx.AsyncClient, redis: Redis
) -> None:
    settings = stack[0]
    accepted = await post_event(client, short("claim_submitted"))
    session_id, event_id = accepted["session_id"], accepted["event_id"]
    assert session_id == f"session-{event_id}"
    assert accepted["links"] == {
        "self": f"/sessions/{session_id}",
        "stream": f"/sessions/{session_id}/stream",
        "result": f"/sessions/{session_id}/result?event_id={event_id}",
    }

    messages, ended = await collect(client, session_id)
    assert ended  # the server closed the stream after the session ended
    assert seqs(messages) == list(range(1, len(messages) + 1))
    assert all(m["event"] == m["transition"]["type"] for m in messages)
    assert all(int(m["id"]) == m["transition"]["seq"] for m in messages)
    assert [m["transition"] for m in messages] == [
        t.model_dump(mode="json") for t in await read_log(redis, session_id)
    ]
    last = messages[-1]["transition"]
    assert last["type"] == "session.completed"
    assert last["data"]["result"]["status"] == "completed"
    assert last["data"]["result"]["event_id"] == event_id

    await _record_says(client, session_id, "completed")
    detail = (await client.get(accepted["links"]["self"])).json()
    assert detail["current_node"] == "finalize"
    assert detail["event_type"] == "claim.submitted" and detail["subject"] == "C-2001"
    steps = detail["workflow"]["steps"]
    assert len(steps) >= 2 and all(s["agents"] and s["status"] == "done" for s in steps)
    assert detail["workflow"]["intent"]
    assert detail["review"]["verdict"] == "approve"
    assert detail["result"]["status"] == "completed" and detail["next"] == []

    result = await client.get(accepted["links"]["result"])
    assert result.status_code == 200 and result.json()["event_id"] == event_id
    other = await client.get(f"/sessions/{session_id}/result", params={"event_id": "nope"})
    assert other.status_code == 404

    # The event went to Kafka keyed by its session.
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_events,
        until=lambda rs: any(r.key == session_id.encode() for r in rs),
    )
    sent = next(r for r in records if r.key == session_id.encode())
    assert json.loads(sent.value)["id"] == event_id
    assert json.loads(sent.value)["source"] == "agentflow/gateway"


async def test_session_list_and_history(
    stack: tuple[Settings, str, Worker], client: httpx.AsyncClient
) -> None:
    ids = []
    for _ in range(3):
        accepted = await post_event(client, short("status_requested"))
        ids.append(accepted["session_id"])
    for session_id in ids:
        await collect(client, session_id)

    page = (await client.get("/sessions", params={"status": "completed", "limit": 200})).json()
    listed = [s["session_id"] for s in page["sessions"]]
    assert set(ids) <= set(listed)
    assert all(s["status"] == "completed" for s in page["sessions"])
    assert page["total"] >= 3 and page["limit"] == 200 and page["offset"] == 0
    updated = [s["updated_at"] for s in page["sessions"]]
    assert updated == sorted(updated, reverse=True)  # most recently updated first
    first = (await client.get("/sessions", params={"status": "completed", "limit": 1})).json()
    second = (
        await client.get("/sessions", params={"status": "completed", "limit": 1, "offset": 1})
    ).json()
    assert len(first["sessions"]) == len(second["sessions"]) == 1
    assert first["total"] == page["total"]
    assert [first["sessions"][0]["session_id"], second["sessions"][0]["session_id"]] == listed[:2]
    running = (await client.get("/sessions", params={"status": "interrupted"})).json()
    assert not set(ids) & {s["session_id"] for s in running["sessions"]}

    history = (await client.get(f"/sessions/{ids[0]}/history")).json()
    checkpoints = history["checkpoints"]
    assert len(checkpoints) >= 5
    created = [c["created_at"] for c in checkpoints]
    assert created == sorted(created, reverse=True)  # newest first
    steps = [c["step"] for c in checkpoints]
    assert steps == sorted(steps, reverse=True)
    assert checkpoints[0]["next"] == [] and checkpoints[-1]["source"] == "input"
    assert checkpoints[0]["parent_checkpoint_id"] == checkpoints[1]["checkpoint_id"]
    assert any(c["next"] == ["finalize"] for c in checkpoints)
    assert set(checkpoints[0]["steps"].values()) == {"done"}
    older = (
        await client.get(
            f"/sessions/{ids[0]}/history",
            params={"before": checkpoints[1]["checkpoint_id"], "limit": 2},
        )
    ).json()
    assert [c["checkpoint_id"] for c in older["checkpoints"]] == [
        c["checkpoint_id"] for c in checkpoints[2:4]
    ]
    assert (await client.get("/sessions/no-such-session/history")).status_code == 404
    assert (await client.get("/sessions/no-such-session")).status_code == 404


async def test_a_full_cloudevent_is_taken_as_is(client: httpx.AsyncClient) -> None:
    event = example("document_uploaded")
    event["sessionid"] = f"doc-{uuid.uuid4().hex[:8]}"
    accepted = await post_event(client, event)
    assert accepted["session_id"] == event["sessionid"] and accepted["event_id"] == event["id"]
    messages, ended = await collect(client, event["sessionid"])
    assert ended and messages[-1]["transition"]["type"] == "session.completed"
    assert messages[0]["transition"]["data"]["event_id"] == event["id"]


# --- the stream: reconnects and late joins ----------------------------------------------------


async def test_reconnect_mid_stream_with_last_event_id(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    with held_tools() as hold:  # the run waits in its first tool: the reconnect is mid-run
        session_id = (await post_event(client, short("claim_submitted")))["session_id"]
        first, ended = await collect(client, session_id, until=lambda m: int(m["id"]) >= 5)
        assert not ended and seqs(first) == [1, 2, 3, 4, 5]
        await asyncio.wait_for(hold.entered.wait(), 60)
        status = (await client.get(f"/sessions/{session_id}")).json()["status"]
        assert status == "running"

        # The reconnected stream replays what was logged after 5, then goes on live once
        # the tools are released.
        logged = (await read_log(redis, session_id))[-1].seq
        assert logged > 5
        rest: list[dict[str, Any]] = []
        reading = asyncio.create_task(
            collect(client, session_id, headers={"Last-Event-ID": "5"}, into=rest)
        )
        await wait_until(lambda: bool(rest) and int(rest[-1]["id"]) >= logged, "the replay")
        hold.released.set()
        _, ended = await reading
    assert ended
    assert seqs(rest)[0] == 6 and seqs(rest)[-1] > logged  # some logged, some live
    assert seqs(first) + seqs(rest) == list(range(1, seqs(rest)[-1] + 1))  # no gap, no dup
    assert rest[-1]["event"] == "session.completed"

    # `?after=` does the same; Last-Event-ID (set by EventSource on reconnect) wins.
    after, _ = await collect(client, session_id, params={"after": 3})
    assert seqs(after) == list(range(4, seqs(rest)[-1] + 1))
    both, _ = await collect(
        client, session_id, params={"after": 3}, headers={"Last-Event-ID": "10"}
    )
    assert seqs(both)[0] == 11


async def test_late_join_gets_every_transition_and_the_result(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    accepted = await post_event(client, short("document_uploaded"))
    session_id = accepted["session_id"]
    await collect(client, session_id)  # wait for the end

    late, ended = await collect(client, session_id)
    assert ended
    log = await read_log(redis, session_id)
    assert seqs(late) == [t.seq for t in log] == list(range(1, len(log) + 1))
    result = late[-1]["transition"]["data"]["result"]
    assert result["status"] == "completed" and result["event_id"] == accepted["event_id"]

    # Reconnecting after the last transition of an ended session: 204, EventSource stops.
    done = await client.get(
        f"/sessions/{session_id}/stream", headers={"Last-Event-ID": str(len(log))}
    )
    assert done.status_code == 204


async def test_idle_stream_sends_keepalives_and_stops_when_the_client_goes(
    stack: tuple[Settings, str, Worker], start_gateway: StartGateway, redis: Redis
) -> None:
    url = await start_gateway(stack[0], keepalive_s=0.2)
    session_id = f"idle-{uuid.uuid4().hex[:8]}"
    channel = session_channel(session_id)
    comments: list[str] = []

    async def subscribed() -> int:
        return int(dict(await redis.pubsub_numsub(channel))[channel])

    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", f"/sessions/{session_id}/stream") as response,
    ):
        async for message in sse(response):
            comments.extend([message["comment"]] if "comment" in message else [])
            if comments.count("keep-alive") >= 2:
                # Checked before leaving the loop: closing `sse` closes the response.
                assert await subscribed() == 1  # following the session's channel
                break
    # The gateway stops following when the client leaves.
    await wait_until(lambda: _subscribers(subscribed, 0), "the gateway to unsubscribe")


async def test_stopping_the_gateway_ends_open_streams(
    stack: tuple[Settings, str, Worker], redis: Redis
) -> None:
    server, serving, url = await serve_gateway(stack[0], host="127.0.0.1", port=0)
    session_id = f"open-{uuid.uuid4().hex[:8]}"
    channel = session_channel(session_id)

    async def subscribed() -> int:
        return int(dict(await redis.pubsub_numsub(channel))[channel])

    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("GET", f"/sessions/{session_id}/stream") as response,
    ):
        lines = response.aiter_lines()
        assert await anext(lines) == ": following session"
        await wait_until(lambda: _subscribers(subscribed, 1), "the gateway to subscribe")
        server.should_exit = True
        rest = [line async for line in lines]  # the server ends the body: no broken read
        await asyncio.wait_for(serving, 60)
    assert "retry: 2000" in rest
    await wait_until(lambda: _subscribers(subscribed, 0), "the gateway to unsubscribe")


async def _subscribers(subscribed: Callable[[], Awaitable[int]], count: int) -> bool:
    return await subscribed() == count


# --- human in the loop and cancel -------------------------------------------------------------


async def test_resume_an_escalated_session_over_http(client: httpx.AsyncClient) -> None:
    accepted = await post_event(client, short("claim_needs_review"))
    session_id = accepted["session_id"]
    messages: list[dict[str, Any]] = []
    interrupted = asyncio.Event()

    async def follow() -> bool:
        async with client.stream("GET", f"/sessions/{session_id}/stream") as response:
            async for message in sse(response):
                if "transition" in message:
                    messages.append(message)
                    if message["event"] == "session.interrupted":
                        interrupted.set()
        return True

    following = asyncio.create_task(follow())
    await asyncio.wait_for(interrupted.wait(), 60)
    # An interrupted session's stream stays open: the same stream carries the resumed
    # run to the end (two session.started below).
    assert not following.done()
    await _record_says(client, session_id, "interrupted")
    detail = (await client.get(f"/sessions/{session_id}")).json()
    question = messages[-1]["transition"]["data"]["question"]
    assert question and detail["question"] == question and detail["review"]["question"]
    assert detail["next"] == ["escalate"]

    missing = await client.post(f"/sessions/{session_id}/resume", json={})
    assert missing.status_code == 422
    assert "give either decision or answer" in missing.json()["errors"][0]["reason"]
    vague = await client.post(f"/sessions/{session_id}/resume", json={"answer": "yes"})
    assert vague.status_code == 422
    assert "names no decision: start it with approve, reject or revise" in vague.json()["detail"]
    resumed = await client.post(
        f"/sessions/{session_id}/resume", json={"answer": "approve: discharge confirmed"}
    )
    assert resumed.status_code == 202
    assert resumed.json()["session_id"] == session_id

    assert await asyncio.wait_for(following, 60)  # the same stream runs on to the end
    types = [m["event"] for m in messages]
    assert types.count("session.started") == 2 and types[-1] == "session.completed"
    answered = messages[types.index("session.interrupted") + 1]["transition"]
    assert answered["type"] == "session.answered" and answered["data"]["decision"] == "approve"
    assert answered["data"]["source"] == "http" and answered["data"]["who"] == "agentflow/gateway"
    assert messages[types.index("session.answered") + 1]["transition"]["data"]["resumed"]
    assert seqs(messages) == list(range(1, len(messages) + 1))
    final = messages[-1]["transition"]["data"]["result"]
    assert final["status"] == "completed"
    assert "discharge confirmed" in final["review"]["feedback"]

    await _record_says(client, session_id, "completed")
    again = await client.post(f"/sessions/{session_id}/resume", json={"answer": "yes"})
    assert again.status_code == 409 and "completed" in again.json()["detail"]
    unknown = await client.post("/sessions/no-such-session/resume", json={"answer": "yes"})
    assert unknown.status_code == 404


async def test_cancel_stops_a_running_session(
    stack: tuple[Settings, str, Worker], client: httpx.AsyncClient, redis: Redis
) -> None:
    settings, _, worker = stack
    # Held, the run would wait in its tool for ever: only the cancel can end it.
    with held_tools() as hold:
        accepted = await post_event(client, short("claim_submitted"))
        session_id = accepted["session_id"]
        before, _ = await collect(client, session_id, until=lambda m: m["event"] == "step.started")
        await asyncio.wait_for(hold.entered.wait(), 60)
        cancel = await client.post(f"/sessions/{session_id}/cancel")
        assert cancel.status_code == 202
        rest, ended = await collect(client, session_id, headers={"Last-Event-ID": before[-1]["id"]})
        assert ended
        assert hold.cancelled >= 1  # stopped inside the tool, not after it
        last = rest[-1]["transition"]
        assert last["type"] == "session.failed" and last["data"]["error"] == "cancelled"
        assert last["data"]["result"]["event_id"] == accepted["event_id"]
        assert [m["event"] for m in rest].count("session.failed") == 1
        assert (await client.get(f"/sessions/{session_id}")).json()["status"] == "cancelled"
        checkpoints = [f"agentflow:checkpoint:{{{session_id}}}:{part}" for part in ("i", "d")]
        assert await redis.exists(*checkpoints) == 2
        assert all([await redis.ttl(k) > 0 for k in checkpoints])  # retention

        cancel_id = cancel.json()["event_id"]
        records = await read_topic(
            settings.kafka_bootstrap or "",
            settings.topic_results,
            until=lambda rs: {accepted["event_id"], cancel_id} <= set(results_by_event(rs)),
        )
        results = results_by_event(records)
        assert len(results[accepted["event_id"]]) == 1  # one result for the cancelled event
        for event_id in (accepted["event_id"], cancel_id):
            assert results[event_id][0]["status"] == "failed"
            assert results[event_id][0]["error"] == "cancelled"

        # Every offset is committed, the cancelled event's too, and the worker is idle: a
        # run of it again (which the held tools would keep in flight) cannot be pending.
        async def settled() -> bool:
            committed, end = await offsets(settings)
            return committed == end and worker.in_flight == 0

        await wait_until(settled, "every offset committed and no run in flight")
        log = await read_log(redis, session_id)
        assert [t.type for t in log].count("session.started") == 1  # never run again

    ended_again = await client.post(f"/sessions/{session_id}/cancel")
    assert ended_again.status_code == 409
    assert (await client.post("/sessions/no-such-session/cancel")).status_code == 404


# --- auth, validation, Kafka outages ----------------------------------------------------------


async def test_auth(
    stack: tuple[Settings, str, Worker], start_gateway: StartGateway, redis: Redis
) -> None:
    settings = stack[0].model_copy(
        update={"api_tokens": ["token-one", "token-two"], "cors_origins": ["http://app.test"]}
    )
    url = await start_gateway(settings)
    session_id = f"auth-{uuid.uuid4().hex[:8]}"
    await finished_session(redis, session_id)
    protected = [
        ("POST", "/events"),
        ("GET", "/sessions"),
        ("GET", f"/sessions/{session_id}"),
        ("GET", f"/sessions/{session_id}/history"),
        ("GET", f"/sessions/{session_id}/result"),
        ("GET", f"/sessions/{session_id}/stream"),
        ("GET", f"/sessions/{session_id}/interrupts"),
        ("POST", f"/sessions/{session_id}/resume"),
        ("POST", f"/sessions/{session_id}/cancel"),
        ("GET", "/graph"),
        ("GET", "/metrics"),
    ]
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for method, path in protected:
            response = await http.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer", path
            assert response.json()["detail"] == "a bearer token is required"
            wrong = await http.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, (method, path)
            assert "invalid_token" in wrong.headers["www-authenticate"]

        good = {"Authorization": "Bearer token-two"}
        assert (await http.get("/sessions", headers=good)).status_code == 200
        assert (await http.get("/graph", headers=good)).status_code == 200
        # EventSource cannot set headers: the stream alone takes ?access_token=.
        stream = await http.get(
            f"/sessions/{session_id}/stream", params={"access_token": "token-one"}
        )
        assert stream.status_code == 200 and "event: session.completed" in stream.text
        assert (
            await http.get("/sessions", params={"access_token": "token-one"})
        ).status_code == 401
        bad_query = await http.get(
            f"/sessions/{session_id}/stream", params={"access_token": "nope"}
        )
        assert bad_query.status_code == 401

        # Open: health, the page and its files (the page asks for the token).
        assert (await http.get("/healthz")).status_code == 200
        page = await http.get("/")
        assert page.status_code == 200 and "<title>agentflow</title>" in page.text
        for name in ("app.js", "app.css"):
            assert (await http.get(f"/static/{name}")).status_code == 200

        preflight = await http.options(
            "/events",
            headers={
                "Origin": "http://app.test",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.test"
        other = await http.get("/sessions", headers={**good, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


async def test_double_texting_over_http(client: httpx.AsyncClient, redis: Redis) -> None:
    """`multitask` on POST /events: refused, or parked behind a question and run after it."""
    accepted = await post_event(client, short("claim_needs_review"))
    session_id = accepted["session_id"]

    async def status_is(status: str) -> bool:
        return (await client.get(f"/sessions/{session_id}")).json().get("status") == status

    await wait_until(lambda: status_is("interrupted"), "the session to wait for a human")
    question = (await client.get(f"/sessions/{session_id}")).json()["question"]

    bad = await client.post(
        "/events", json=short("claim_submitted") | {"session_id": session_id, "multitask": "x"}
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "multitask"

    refused = await post_event(
        client, short("claim_submitted") | {"session_id": session_id, "multitask": "reject"}
    )
    parked = await post_event(
        client, short("claim_submitted") | {"session_id": session_id, "multitask": "interrupt"}
    )

    async def result_of(accepted: dict[str, Any]) -> dict[str, Any] | None:
        response = await client.get(accepted["links"]["result"])
        return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]

    async def has_result(accepted: dict[str, Any]) -> bool:
        return await result_of(accepted) is not None

    await wait_until(lambda: has_result(refused), "the refused event's result")
    answer = await result_of(refused)
    assert answer is not None and answer["status"] == "refused"
    assert answer["error"] == f"refused: session {session_id} waits for a human answer"

    async def parked_yet() -> bool:
        return any(t.type == "event.parked" for t in await read_log(redis, session_id))

    await wait_until(parked_yet, "the interrupting event to be parked behind the question")
    detail = (await client.get(f"/sessions/{session_id}")).json()
    assert detail["status"] == "interrupted" and detail["question"] == question

    resumed = await client.post(
        f"/sessions/{session_id}/resume", json={"answer": "approve: discharge confirmed"}
    )
    assert resumed.status_code == 202
    await wait_until(lambda: has_result(parked), "the parked event's result")
    ran = await result_of(parked)
    assert ran is not None and ran["status"] == "completed"
    assert ran["event_id"] == parked["event_id"]


async def test_validation_errors(
    stack: tuple[Settings, str, Worker], start_gateway: StartGateway
) -> None:
    settings = stack[0].model_copy(update={"max_event_bytes": 2048})
    url = await start_gateway(settings)

    async def problem(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        body: dict[str, Any] = response.json()
        assert body["detail"]
        return body

    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        body = await problem(await http.post("/events", json={"data": {}}), 422)
        assert body["errors"] == [{"field": "type", "reason": "Field required"}]
        assert "field 'type'" in body["detail"]

        event = example("claim_submitted")
        del event["source"]
        body = await problem(await http.post("/events", json=event), 422)
        assert [e["field"] for e in body["errors"]] == ["source"]

        event = example("claim_submitted") | {"specversion": "0.3"}
        body = await problem(await http.post("/events", json=event), 422)
        assert body["errors"][0]["field"] == "specversion"

        body = await problem(await http.post("/events", content=b"{not json"), 422)
        assert body["errors"][0]["field"] == "(body)" and "JSON" in body["errors"][0]["reason"]
        body = await problem(await http.post("/events", json=[1, 2]), 422)
        assert "JSON object" in body["detail"]
        body = await problem(await http.post("/events", json={"type": "x", "tpye": 1}), 422)
        assert body["errors"][0]["field"] == "tpye"
        body = await problem(
            await http.post("/events", json={"type": "x", "session_id": "has space"}), 422
        )
        assert body["errors"][0]["field"] == "session_id"

        big = {"type": "claim.submitted", "data": {"blob": "x" * 3000}}
        body = await problem(await http.post("/events", json=big), 413)
        assert "AGENTFLOW_MAX_EVENT_BYTES" in body["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            yield b'{"type": "claim.submitted", "data": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        await problem(await http.post("/events", content=chunks()), 413)
        nearly = {"type": "claim.submitted", "data": "z" * 1900}  # small body, big event
        await problem(await http.post("/events", json=nearly), 413)

        body = await problem(await http.get("/sessions", params={"status": "bogus"}), 422)
        assert body["errors"][0]["field"] == "status"
        body = await problem(await http.get("/sessions", params={"limit": 0}), 422)
        assert body["errors"][0]["field"] == "limit"
        body = await problem(
            await http.get("/sessions/x/stream", headers={"Last-Event-ID": "abc"}), 422
        )
        assert body["errors"][0]["field"] == "Last-Event-ID"
        body = await problem(await http.get("/graph", params={"format": "png"}), 422)
        assert body["errors"][0]["field"] == "format"
        await problem(await http.get("/sessions/no-such-session"), 404)


async def test_deep_json_bad_session_ids_and_long_event_ids_answer_422(
    client: httpx.AsyncClient,
) -> None:
    async def problem(body: bytes) -> list[dict[str, str]]:
        response = await client.post(
            "/events", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (response.status_code, response.text[:300])
        answer: dict[str, Any] = response.json()
        assert set(answer) == {"detail", "errors"} and answer["detail"].startswith("invalid")
        return answer["errors"]  # type: ignore[no-any-return]

    too_deep = [
        {"field": "(body)", "reason": "nests deeper than AGENTFLOW_MAX_JSON_DEPTH (64 levels)"}
    ]
    for levels in (64, 150, 900, 1_000, 100_000):  # under the body (level 1) and `data`
        nested = "[" * levels + "1" + "]" * levels
        short_form = f'{{"type": "claim.submitted", "data": {nested}}}'.encode()
        assert await problem(short_form) == too_deep, levels
        event = json.dumps(example("claim_submitted") | {"data": "NESTED"})
        assert await problem(event.replace('"NESTED"', nested).encode()) == too_deep, levels
    # at the limit: the body and 63 levels of data
    at_limit = {"type": "claim.submitted", "data": json.loads("[" * 63 + "]" * 63)}
    assert (await client.post("/events", json=at_limit)).status_code == 202

    for session_id in ("a/b", "has space", "x" * 201, "caf\u00e9", ""):
        body = json.dumps({"type": "claim.submitted", "session_id": session_id}).encode()
        [error] = await problem(body)
        assert error["field"] == "session_id" and "1 to 200 characters" in error["reason"]
        event = example("claim_submitted") | {"sessionid": session_id}
        [error] = await problem(json.dumps(event).encode())
        assert error["field"] == "sessionid" and "A-Z a-z 0-9 . _ : @ -" in error["reason"]

    [error] = await problem(json.dumps(example("claim_submitted") | {"id": "x" * 257}).encode())
    assert error["field"] == "id" and "AGENTFLOW_MAX_ID_BYTES (256)" in error["reason"]
    [error] = await problem(json.dumps(example("claim_submitted") | {"id": "a\x1bb"}).encode())
    assert error["field"] == "id" and "control characters" in error["reason"]

    # an id that is no session id gives a derived one that is: its links open
    event_id = f"claim 7/{uuid.uuid4().hex[:8]}"
    accepted = await post_event(client, example("status_requested") | {"id": event_id})
    digest = hashlib.sha256(event_id.encode()).hexdigest()[:32]
    assert accepted["session_id"] == f"session-{digest}"
    messages, ended = await collect(client, accepted["session_id"])
    assert ended and messages[-1]["transition"]["data"]["result"]["event_id"] == event_id
    assert (await client.get(accepted["links"]["self"])).status_code == 200
    assert (await client.get(accepted["links"]["result"])).json()["event_id"] == event_id


async def test_kafka_down_answers_503_and_the_gateway_reconnects(
    stack: tuple[Settings, str, Worker], start_gateway: StartGateway, redis: Redis
) -> None:
    # A port nothing listens on.
    nowhere = stack[0].model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    url = await start_gateway(nowhere)
    store = SessionStore(redis, ttl_s=600)
    session_id = f"waiting-{uuid.uuid4().hex[:8]}"
    await store.open(session_id, event_id="e-1", event_type="claim.submitted", subject=None)
    await store.close(
        WorkflowResult(session_id=session_id, event_id="e-1", status="interrupted", question="?")
    )
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        # Answered, not hung: the bound only fails a gateway that waits past SEND_TIMEOUT_S.
        response = await http.post("/events", json=short("claim_submitted"), timeout=ANSWERED_S)
        assert response.status_code == 503
        assert "Kafka" in response.json()["detail"] and response.headers["retry-after"]
        resume = await http.post(f"/sessions/{session_id}/resume", json={"answer": "approve: ok"})
        assert resume.status_code == 503
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["kafka"]["ok"] is False and health.json()["redis"]["ok"] is True

    # A broker that goes away and comes back on the same port.
    broker = await KafkaBroker().astart()
    try:
        settings = stack[0].model_copy(update={"kafka_bootstrap": broker.bootstrap})
        url = await start_gateway(settings)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            assert (await http.post("/events", json=short("claim_submitted"))).status_code == 202
            await asyncio.to_thread(broker.kill)
            down = await http.post("/events", json=short("claim_submitted"), timeout=ANSWERED_S)
            assert down.status_code == 503
            assert (await http.get("/healthz")).status_code == 503
            await broker.astart()
            again = await http.post("/events", json=short("claim_submitted"))
            assert again.status_code == 202, again.text
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await broker.astop()


async def first_answer(
    url: str, path: str, headers: dict[str, str], start: bytes
) -> tuple[int, dict[str, Any]]:
    """POST a head and the start of a body; return the answer that comes before the rest.

    A gateway that waits for the whole body never answers: the bound catches that.
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: gateway\r\n{head}\r\n".encode() + start)
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            status = int((await reader.readline()).split()[1])
            answer = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                answer[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(answer["content-length"]))
    finally:
        writer.close()
    return status, json.loads(body)


async def test_the_token_is_checked_and_the_body_bounded_before_the_body_is_read(
    stack: tuple[Settings, str, Worker], start_gateway: StartGateway, redis: Redis
) -> None:
    settings = stack[0].model_copy(update={"api_tokens": ["token-one"], "max_event_bytes": 4096})
    url = await start_gateway(settings)
    store = SessionStore(redis, ttl_s=600)
    session_id = f"ended-{uuid.uuid4().hex[:8]}"
    await store.open(session_id, event_id="e-1", event_type="claim.submitted", subject=None)
    await store.close(WorkflowResult(session_id=session_id, event_id="e-1", status="completed"))
    json_body = {"Content-Type": "application/json"}
    huge = {"Content-Length": str(200 * 1024 * 1024)}  # announced, never sent
    start = b'{"answer": "' + b"x" * 1000
    chunk = b"x" * 5000
    chunked = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    good = json_body | {"Authorization": "Bearer token-one"}
    cancel = f"/sessions/{session_id}/cancel"
    for path in ("/events", f"/sessions/{session_id}/resume", cancel):
        status, body = await first_answer(url, path, json_body | huge, start)
        assert (status, body["detail"]) == (401, "a bearer token is required"), path
        wrong = json_body | huge | {"Authorization": "Bearer nope"}
        status, body = await first_answer(url, path, wrong, start)
        assert (status, body["detail"]) == (401, "the bearer token is not valid"), path
    for path in ("/events", f"/sessions/{session_id}/resume"):
        # With the token, over AGENTFLOW_MAX_EVENT_BYTES by its length: 413 before reading.
        status, body = await first_answer(url, path, good | huge, start)
        assert status == 413 and "AGENTFLOW_MAX_EVENT_BYTES (4096 bytes)" in body["detail"], path
        # Of no announced length: 413 once what is read passes the bound.
        chunked_head = good | {"Transfer-Encoding": "chunked"}
        status, body = await first_answer(url, path, chunked_head, chunked)
        assert status == 413 and "AGENTFLOW_MAX_EVENT_BYTES" in body["detail"], path
    # Cancel takes no body: it answers without reading (or holding) what is sent.
    status, body = await first_answer(url, cancel, good | huge, start)
    assert status == 409 and "already ended" in body["detail"]

    async with httpx.AsyncClient(base_url=url, timeout=30, headers=good) as http:
        # Within the bound, the body reaches the route (which says the session has ended).
        resume = await http.post(f"/sessions/{session_id}/resume", json={"answer": "approve"})
        assert resume.status_code == 409, resume.text


async def test_a_redis_password_never_shows_in_answers_or_logs(
    stack: tuple[Settings, str, Worker],
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    nowhere = f"redis://default:{password}@127.0.0.1:{free_port()}/0"
    settings = stack[0].model_copy(update={"redis_url": nowhere})
    caplog.set_level(logging.DEBUG)
    url = await start_gateway(settings)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for path in ("/sessions", "/sessions/some-session", "/sessions/some-session/history"):
            response = await http.get(path)
            assert response.status_code == 503, (path, response.text)
            assert "redis://default:***@127.0.0.1" in response.json()["detail"], path
            assert password not in response.text, path
        health = await http.get("/healthz")
        assert health.status_code == 503 and health.json()["redis"]["ok"] is False
        assert password not in health.text
        for path in ("/metrics", "/sessions/some-session/stream"):
            assert password not in (await http.get(path)).text
    assert caplog.records  # the gateway did log
    assert password not in caplog.text


# --- graph, metrics, OpenAPI ------------------------------------------------------------------


async def test_graph_metrics_and_openapi(
    stack: tuple[Settings, str, Worker], client: httpx.AsyncClient, redis: Redis
) -> None:
    settings, _, worker = stack
    svg = await client.get("/graph", params={"format": "svg"})
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert '<g class="node" id="node-plan"' in svg.text
    assert 'id="edge-review-finalize"' in svg.text
    assert not re.search(r'class="[^"]*\bvisited\b', svg.text)  # no path without a session
    mermaid = await client.get("/graph", params={"format": "mermaid"})
    assert mermaid.headers["content-type"].startswith("text/plain")
    assert "plan --> assign" in mermaid.text
    session_id = f"drawn-{uuid.uuid4().hex[:8]}"
    await finished_session(redis, session_id)
    path = await client.get("/graph", params={"format": "svg", "session": session_id})
    assert 'class="node terminal visited" id="node-__end__"' in path.text
    unknown = await client.get("/graph", params={"session": "no-such-session"})
    assert unknown.status_code == 404

    measured = await post_event(client, short("status_requested"))
    await collect(client, measured["session_id"])
    metrics = await client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        'agentflow_events_received_total{component="gateway"}',
        "agentflow_runs_in_flight",
        'agentflow_run_duration_seconds_count{status="completed"}',
        'agentflow_node_duration_seconds_count{node="plan"}',
        "agentflow_dlq_events_total",
        'agentflow_sessions{status="completed"}',
    ):
        assert name in metrics.text, name
    assert worker.settings.metrics_port
    async with httpx.AsyncClient(timeout=10) as plain:
        own = await plain.get(f"http://127.0.0.1:{worker.settings.metrics_port}/metrics")
    assert 'agentflow_events_received_total{component="worker"}' in own.text

    spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) == {
        "/events",
        "/sessions",
        "/sessions/{session_id}",
        "/sessions/{session_id}/result",
        "/sessions/{session_id}/history",
        "/sessions/{session_id}/stream",
        "/sessions/{session_id}/interrupts",
        "/sessions/{session_id}/resume",
        "/sessions/{session_id}/cancel",
        "/graph",
        "/metrics",
        "/healthz",
    }
    post = spec["paths"]["/events"]["post"]
    assert {"202", "401", "413", "422", "503"} <= set(post["responses"])
    assert post["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert "EventAccepted" in json.dumps(post["responses"]["202"])
    detail = spec["paths"]["/sessions/{session_id}"]["get"]["responses"]["200"]
    assert "SessionDetail" in json.dumps(detail)
    stream = spec["paths"]["/sessions/{session_id}/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert {p["name"] for p in stream["parameters"]} >= {"after", "last-event-id", "access_token"}
    assert "401" not in spec["paths"]["/healthz"]["get"]["responses"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_api_docs_load_nothing_from_another_host(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "agentflow gateway - Swagger UI" in docs.text
    assert "//" not in docs.text  # no URL of another host
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert {a.rsplit(".", 1)[-1] for a in assets} >= {"js", "css"}
    for asset in assets:
        served = await client.get(asset)
        assert served.status_code == 200 and served.content, asset
    assert (await client.get("/redoc")).status_code == 404  # ReDoc would fetch from its CDN


def svg_style_hash(svg: str) -> str:
    """The CSP hash source of the `<style>` of a drawn graph."""
    import base64
    import hashlib

    found = re.search(r"<style>(.*?)</style>", svg, re.DOTALL)
    assert found
    return f"'sha256-{base64.b64encode(hashlib.sha256(found[1].encode()).digest()).decode()}'"


async def test_security_headers_on_every_answer(
    stack: tuple[Settings, str, Worker], start_gateway: StartGateway
) -> None:
    settings = stack[0].model_copy(update={"api_tokens": ["token-one"], "max_event_bytes": 2048})
    url = await start_gateway(settings)
    token = {"Authorization": "Bearer token-one"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        svg = (await http.get("/graph", headers=token)).text
        answers = {
            "page": await http.get("/"),
            "page script": await http.get("/static/app.js"),
            "docs": await http.get("/docs"),
            "docs script": await http.get("/static/docs.js"),
            "docs asset": await http.get("/static-offline-docs/swagger-ui.css"),
            "openapi": await http.get("/openapi.json"),
            "health": await http.get("/healthz"),
            "api": await http.get("/sessions", headers=token),
            "graph": await http.get("/graph", headers=token),
            "401": await http.get("/sessions"),
            "404": await http.get("/no-such-page"),
            "413": await http.post("/events", headers=token, content=b"x" * 3000),
            "422": await http.get("/sessions", headers=token, params={"limit": 0}),
        }
    for name, answer in answers.items():
        expected = int(name) if name.isdigit() else 200
        assert answer.status_code == expected, (name, answer.text)
        assert answer.headers["x-content-type-options"] == "nosniff", name
        assert answer.headers["x-frame-options"] == "DENY", name
        assert answer.headers["referrer-policy"] == "no-referrer", name
        policy = dict(
            (part.split(" ", 1) + [""])[:2]
            for part in (p.strip() for p in answer.headers["content-security-policy"].split(";"))
        )
        assert policy["default-src"] == "'self'", name
        assert policy["script-src"] == "'self'", name
        assert policy["frame-ancestors"] == "'none'", name
        # Inline styles: only the drawn graph's <style>, by its hash.
        assert policy["style-src"] == f"'self' {svg_style_hash(svg)}", name
        assert "unsafe" not in answer.headers["content-security-policy"], name

    # No inline script in the pages: every <script> is a file of this gateway.
    for name in ("page", "docs"):
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", answers[name].text, re.DOTALL)
        assert scripts, name
        for attributes, inline in scripts:
            assert re.search(r'src="/static', attributes) and not inline.strip(), name
        assert not re.search(r"\son\w+=", answers[name].text), name  # no onclick= and such


async def test_worker_metrics_listen_on_this_machine_unless_told(
    stack: tuple[Settings, str, Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def answers(host: str, port: int) -> bool:
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                return (await http.get(f"http://{host}:{port}/metrics")).status_code == 200
        except httpx.ConnectError:
            return False

    settings, _, worker = stack
    port = worker.settings.metrics_port
    assert port and settings.metrics_host == "127.0.0.1"
    assert await answers("127.0.0.1", port)
    # 127.0.0.2 is this machine too (all of 127/8 is loopback on Linux): a listener on
    # 0.0.0.0 would take it, one on 127.0.0.1 does not.
    assert not await answers("127.0.0.2", port)

    monkeypatch.setenv("AGENTFLOW_METRICS_HOST", "0.0.0.0")
    everywhere = load_settings()
    assert everywhere.metrics_host == "0.0.0.0"
    other = free_port()
    stop = service_metrics.serve_metrics(other, everywhere.metrics_host)
    try:
        assert await answers("127.0.0.2", other)
    finally:
        stop()
