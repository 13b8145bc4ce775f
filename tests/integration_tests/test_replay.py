"""Time travel on the worker's Redis: fork a session, keep the original, draw its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from graphs.workflow import build_graph
from nodes.models import CloudEvent
from service.config import Settings
from service.errors import ReplayError
from service.observe.drawing import render_graph, session_path
from service.runtime.replay import branch_history, checkpoint_id, replay_session
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import open_checkpointer
from service.storage.keys import session_key
from service.storage.publisher import TransitionPublisher, read_log
from service.storage.sessions import SessionStore

ROOT = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"


async def run_on_redis(
    settings: Settings, redis: Redis, event: CloudEvent, session_id: str
) -> SessionRunner:
    """Run an event as the worker does: Redis checkpoints, published transitions, a record."""
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    publisher = TransitionPublisher(redis, ttl_s=settings.session_ttl_s)
    await store.open(session_id, event_id=event.id, event_type=event.type, subject=event.subject)
    graph = build_graph(await open_checkpointer(redis))
    runner = SessionRunner(graph, settings.context(), sink=publisher.publish, sequence=None)
    result = await runner.start(event, session_id)
    await store.close(result)
    return runner


async def snapshot_history(runner: SessionRunner, session_id: str) -> dict[str, Any]:
    """Every checkpoint of the thread (all branches): id -> parent, next and values."""
    out = {}
    async for snap in runner.graph.aget_state_history(runner.config(session_id)):
        parent = snap.parent_config["configurable"]["checkpoint_id"] if snap.parent_config else None
        out[checkpoint_id(snap)] = (
            parent,
            snap.next,
            json.dumps(snap.values, default=lambda v: getattr(v, "model_dump", str)()),
        )
    return out


async def test_replay_forks_a_new_branch_and_keeps_the_original(
    settings: Settings, redis: Redis, make_event: Callable[..., CloudEvent]
) -> None:
    session_id = f"replay-{uuid.uuid4().hex[:8]}"
    runner = await run_on_redis(settings, redis, make_event("claim_submitted"), session_id)
    before = await snapshot_history(runner, session_id)
    original = await branch_history(runner.graph, session_id)
    base = next(s for s in original if s.next == ("review",))
    seq_before = len(await read_log(redis, session_id))

    outcome = await replay_session(
        settings, session_id, checkpoint_id(base), {"feedback": ["replayed: check the dates"]}
    )

    assert outcome.result.status == "completed"
    after = await snapshot_history(runner, session_id)
    # Nothing of the original changed; the branch only added checkpoints.
    assert {k: after[k] for k in before} == before
    added = set(after) - set(before)
    assert outcome.fork_checkpoint in added and outcome.head_checkpoint in added
    assert after[outcome.fork_checkpoint][0] == checkpoint_id(base)
    branch = await branch_history(runner.graph, session_id)
    ids = [checkpoint_id(s) for s in branch]
    assert ids[-1] == outcome.head_checkpoint
    assert ids[: ids.index(checkpoint_id(base)) + 1] == [
        checkpoint_id(s) for s in original[: original.index(base) + 1]
    ]
    assert branch[-1].values["feedback"][-1] == "replayed: check the dates"
    assert "replayed: check the dates" not in original[-1].values.get("feedback", [])
    # The original branch is still readable at its own head.
    old_head = await runner.graph.aget_state(
        {"configurable": {"thread_id": session_id, "checkpoint_id": checkpoint_id(original[-1])}}
    )
    assert old_head.values["result"].status == "completed"

    # The branch's transitions went to the session's log, marked as a replay.
    log = await read_log(redis, session_id)
    replayed = log[seq_before:]
    assert replayed[0].type == "session.started"
    assert replayed[0].data and replayed[0].data["replay_from"] == checkpoint_id(base)
    assert [t.node for t in replayed if t.type == "node.completed"] == ["review", "finalize"]
    assert replayed[-1].type == "session.completed"
    record = await SessionStore(redis, ttl_s=60).get(session_id)
    assert record is not None and record.result is not None
    assert record.result.finished_at == outcome.result.finished_at


async def test_replay_refuses_unknown_checkpoints_and_running_sessions(
    settings: Settings, redis: Redis, make_event: Callable[..., CloudEvent]
) -> None:
    session_id = f"replay-{uuid.uuid4().hex[:8]}"
    await run_on_redis(settings, redis, make_event("claim_submitted"), session_id)
    with pytest.raises(ReplayError, match="has no checkpoint nope; its checkpoints:"):
        await replay_session(settings, session_id, "nope")
    with pytest.raises(ReplayError, match="has no checkpoints"):
        await replay_session(settings, "no-such-session", "nope")
    await redis.hset(session_key(session_id), "status", "running")
    with pytest.raises(ReplayError, match="is running"):
        await replay_session(settings, session_id, "nope")


def agentflow(*args: str, settings: Settings) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTFLOW_", "OPENAI_"))}
    env.update({"AGENTFLOW_REDIS_URL": settings.redis_url or "", "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )


async def test_cli_replays_and_draws_a_redis_session(
    settings: Settings, redis: Redis, make_event: Callable[..., CloudEvent]
) -> None:
    session_id = f"replay-{uuid.uuid4().hex[:8]}"
    runner = await run_on_redis(settings, redis, make_event("claim_needs_review"), session_id)
    await runner.resume(session_id, "approve: discharge confirmed")

    # The drawing comes from the session's transition log: real per-node durations.
    drawn = agentflow("graph", "--format", "svg", "--session", session_id, settings=settings)
    assert drawn.returncode == 0, drawn.stderr
    root = ET.fromstring(drawn.stdout)
    nodes = {g.get("data-node"): g for g in root.iter(f"{SVG}g") if g.get("data-node")}
    path = session_path(await read_log(redis, session_id))
    for name in ("plan", "review", "escalate", "finalize"):
        assert "visited" in nodes[name].get("class", "").split(), name
    runs = path.nodes["execute"].visits
    stats = "".join(nodes["execute"].itertext())
    assert runs > 1 and f"×{runs}" in stats

    history = await branch_history(runner.graph, session_id)
    base = next(s for s in history if s.next == ("plan",))
    out = agentflow(
        "sessions",
        "replay",
        session_id,
        "--from",
        checkpoint_id(base),
        "--set",
        'goals=["a goal set by hand"]',
        "--json",
        settings=settings,
    )
    # The plan runs again on the branch and reaches the same escalation.
    assert out.returncode == 3, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "interrupted" and result["question"]
    head = await runner.graph.aget_state(runner.config(session_id))
    assert head.interrupts  # the branch waits for a human, like the original did
    assert render_graph("svg", session_path(await read_log(redis, session_id)))

    bad = agentflow("sessions", "replay", session_id, "--from", "nope", settings=settings)
    assert bad.returncode == 2 and b"its checkpoints" in bad.stderr


async def test_replay_as_a_new_session_copies_the_history_and_leaves_the_original(
    settings: Settings, redis: Redis, make_event: Callable[..., CloudEvent]
) -> None:
    session_id = f"replay-{uuid.uuid4().hex[:8]}"
    new_id = f"{session_id}-fork"
    runner = await run_on_redis(settings, redis, make_event("claim_submitted"), session_id)
    before = await snapshot_history(runner, session_id)
    log_before = await read_log(redis, session_id)
    original = await branch_history(runner.graph, session_id)
    base = next(s for s in original if s.next == ("review",))

    out = agentflow(
        "sessions",
        "replay",
        session_id,
        "--from",
        checkpoint_id(base),
        "--as",
        new_id,
        "--set",
        'feedback=["forked: check the dates"]',
        "--json",
        settings=settings,
    )

    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["session_id"] == new_id
    # The original session is exactly as it was: checkpoints, log and head.
    assert await snapshot_history(runner, session_id) == before
    assert await read_log(redis, session_id) == log_before
    # The new one holds the whole copied history, and its own branch on top.
    copied = await snapshot_history(runner, new_id)
    assert {k: copied[k] for k in before} == before
    branch = await branch_history(runner.graph, new_id)
    assert checkpoint_id(base) in [checkpoint_id(s) for s in branch]
    assert branch[-1].values["feedback"][-1] == "forked: check the dates"
    assert branch[-1].values["result"].session_id == new_id
    record = await SessionStore(redis, ttl_s=60).get(new_id)
    assert record is not None and record.status == "completed"
    log = await read_log(redis, new_id)
    assert log[0].type == "session.started" and log[0].data
    assert log[0].data["forked_from"] == session_id
    assert log[0].data["replay_from"] == checkpoint_id(base)

    taken = agentflow(
        "sessions", "replay", session_id, "--from", checkpoint_id(base), "--as", new_id,
        settings=settings,
    )  # fmt: skip
    assert taken.returncode == 2 and b"exists already" in taken.stderr
    with pytest.raises(ReplayError, match="a session id must be"):
        await replay_session(settings, session_id, checkpoint_id(base), as_session="bad id!")


async def test_replay_as_a_new_session_on_agentflow_runs_sqlite(
    tmp_path: Path, make_event: Callable[..., CloudEvent]
) -> None:
    from service.config import load_settings
    from service.runtime.embedded import run_embedded
    from service.runtime.replay import open_session_graph

    settings = load_settings(redis_url=None, kafka_bootstrap=None, data_dir=tmp_path)
    result = await run_embedded(settings, session_id="local", event=make_event("claim_submitted"))
    assert result.status == "completed"
    async with open_session_graph(settings) as opened:
        original = await branch_history(opened.graph, "local")
    base = next(s for s in original if s.next == ("review",))

    outcome = await replay_session(settings, "local", checkpoint_id(base), as_session="copy")

    assert outcome.session_id == "copy" and outcome.result.status == "completed"
    async with open_session_graph(settings) as opened:
        assert [checkpoint_id(s) for s in await branch_history(opened.graph, "local")] == [
            checkpoint_id(s) for s in original
        ]
        branch = await branch_history(opened.graph, "copy")
    # The SQLite saver has no copy_thread: the checkpoints were put again, oldest first,
    # and the copy's history before the fork is the original's, state for state.
    shared = [checkpoint_id(s) for s in original].index(checkpoint_id(base))
    assert shared > 5
    assert [(checkpoint_id(s), s.values) for s in branch[:shared]] == [
        (checkpoint_id(s), s.values) for s in original[:shared]
    ]
    assert branch[-1].values["result"].session_id == "copy"
