"""The `agentflow` commands against a real broker, Redis and worker, run as a user runs them.

Each command is a subprocess started outside the repository (a temporary directory), so
the client commands prove they need no agents file. Commands that run the graph here
(`sessions replay`, `worker`) get `AGENTFLOW_AGENTS_FILE`.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service.client import last_seq
from service.config import Settings
from service.runtime.replay import branch_history, checkpoint_id, open_session_graph
from service.storage.publisher import read_log
from tests.integration_tests.conftest import cli_env, example

ROOT = Path(__file__).resolve().parents[2]
AGENTS_FILE = ROOT / "examples" / "agents.yaml"


async def start(
    *args: str, env: dict[str, str], cwd: Path, module: str = "service.cli", **kw: Any
) -> asyncio.subprocess.Process:
    """Start `python -m MODULE ARGS` with its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **kw,
    )


async def finished(
    proc: asyncio.subprocess.Process, timeout_s: float = 120.0
) -> tuple[int, str, str]:
    """Wait for a process to end (the bound only catches a hang); return code, out, err."""
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"still running after {timeout_s} s: {out!r} {err!r}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def agentflow(settings: Settings, tmp_path: Path) -> Callable[..., Any]:
    """Run `python -m service.cli ARGS` outside the repository with the service's settings."""

    async def run(*args: str, timeout_s: float = 120.0, **extra: str) -> tuple[int, str, str]:
        proc = await start(*args, env=cli_env(settings, **extra), cwd=tmp_path)
        return await finished(proc, timeout_s)

    return run


def event_file(tmp_path: Path, name: str, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    """Write an example event with a fresh id to a file; return the file and the event."""
    raw = example(name, **overrides)
    path = tmp_path / f"{raw['id']}.json"
    path.write_text(json.dumps(raw))
    return path, raw


def transition_types(out: str) -> list[str]:
    """The transition types of `print_transition` lines, in order."""
    return [m.group(1) for m in re.finditer(r"^\s*\d+ \S+\s+(\S+)", out, re.MULTILINE)]


async def test_send_wait_of_a_handled_event_returns_its_result(
    settings: Settings, start_worker: Any, agentflow: Any, tmp_path: Path
) -> None:
    await start_worker(settings)
    path, raw = event_file(tmp_path, "claim_submitted")
    code, out, err = await agentflow("send", str(path), "--wait", "--json", "--timeout", "120")
    assert code == 0, err
    first = json.loads(out)
    assert first["event_id"] == raw["id"] and first["status"] == "completed"

    # Sent again, the worker skips it as handled: no new transition comes, and the
    # command ends with the result it already has, well within --timeout.
    code, out, err = await agentflow("send", str(path), "--wait", "--timeout", "30")
    assert code == 0, err
    assert transition_types(out) == []
    assert "COMPLETED" in out and f"event {raw['id']}" in out

    # A result that never comes: the wait ends at --timeout with exit code 7.
    other, raw = event_file(tmp_path, "status_requested")
    code, out, err = await agentflow(
        "send", str(other), "--wait", "--timeout", "2", AGENTFLOW_TOPIC_RESULTS=settings.topic_dlq
    )
    assert code == 7, (out, err)
    assert f"no result for event {raw['id']}" in err and "within 2 s" in err
    assert "agentflow watch" in err


async def test_watch_and_answer_a_session_that_waits_for_a_human(
    settings: Settings, start_worker: Any, agentflow: Any, tmp_path: Path
) -> None:
    await start_worker(settings)
    path, raw = event_file(tmp_path, "claim_needs_review")
    session_id = raw.get("sessionid") or f"session-{raw['id']}"
    # Started before the event is sent: the session does not exist yet.
    watcher = await start("watch", session_id, env=cli_env(settings), cwd=tmp_path)

    code, out, err = await agentflow("send", str(path), "--wait")
    assert code == 3, err
    assert f"answer with: agentflow sessions answer {session_id} --approve | --reject" in out

    # A new event for the waiting session that says `reject` is refused: exit 5.
    other, refused = event_file(tmp_path, "claim_submitted", sessionid=session_id)
    code, out, err = await agentflow("send", str(other), "--wait", "--multitask", "reject")
    assert code == 5, (out, err)
    assert "REFUSED" in out and f"event {refused['id']}" in out
    assert transition_types(out) == ["event.refused"]

    code, out, err = await agentflow(
        "sessions", "answer", session_id, "approve: discharge confirmed", "--wait", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "completed" and result["review"]["verdict"] == "approve"

    # The watcher followed the session through the question and the answered run.
    code, out, err = await finished(watcher)
    assert code == 0, err
    seen = transition_types(out)
    assert seen.count("session.started") == 2
    assert seen.index("session.interrupted") < seen.index("session.completed") == len(seen) - 1

    # Watched again after it ended: from just before the end, the end alone; from the
    # end or past it, nothing, and the command ends at once (the bound only catches a
    # watcher that waits for a transition that will never come).
    end = await last_seq(settings, session_id)
    code, out, err = await agentflow("watch", session_id, "--after", str(end - 1), timeout_s=30)
    assert code == 0, err
    assert transition_types(out) == ["session.completed"]
    for after in (end, end + 5):
        code, out, err = await agentflow("watch", session_id, "--after", str(after), timeout_s=30)
        assert (code, out) == (0, ""), err

    code, _, err = await agentflow("sessions", "answer", session_id, "--approve")
    assert code == 2 and f"session {session_id} is completed, not waiting" in err
    code, _, err = await agentflow("sessions", "answer", "no-such-session", "--reject")
    assert code == 2 and "session no-such-session does not exist" in err
    code, _, err = await agentflow("sessions", "answer", "no-such-session", "x")
    assert code == 2 and "names no decision: start it with approve, reject or revise" in err

    # Replayed on Redis up to the question again, the session is the service's to answer.
    async with open_session_graph(settings) as opened:
        history = await branch_history(opened.graph, session_id)
    base = next(s for s in history if s.next == ("plan",))
    code, out, err = await agentflow(
        "sessions",
        "replay",
        session_id,
        "--from",
        checkpoint_id(base),
        AGENTFLOW_AGENTS_FILE=str(AGENTS_FILE),
    )
    assert code == 3, err
    assert f"answer with: agentflow sessions answer {session_id}" in out
    assert "agentflow run --resume" not in out
    code, out, err = await agentflow("sessions", "answer", session_id, "approve", "--wait")
    assert code == 0, err
    assert transition_types(out)[-1] == "session.completed" and "COMPLETED" in out


async def test_watch_of_an_unknown_session_gives_up_after_its_timeout(agentflow: Any) -> None:
    code, out, err = await agentflow("watch", f"no-such-{uuid.uuid4().hex[:6]}", "--timeout", "1")
    assert code == 2 and out == ""
    assert "is unknown" in err and "within 1 s" in err and "Traceback" not in err


async def test_library_list_piped_prints_ids_whole_and_show_labels_fields(
    agentflow: Any, tmp_path: Path
) -> None:
    workflow_id = f"tpl-{'a-long-template-identifier-' * 3}{uuid.uuid4().hex[:6]}"
    template = tmp_path / "template.yaml"
    template.write_text(
        f"id: {workflow_id}\nevent_type: claim.submitted\nintent: Handle a claim\n"
        "steps: [{id: s1, title: Take in the claim, agents: [intake]}]\n"
    )
    agents = {"AGENTFLOW_AGENTS_FILE": str(AGENTS_FILE)}
    code, _, err = await agentflow("library", "load", str(template), **agents)
    assert code == 0, err
    try:
        code, out, err = await agentflow("library", "list", "--limit", "1000", COLUMNS="80")
        assert code == 0, err
        ids = [line.split("\t")[0] for line in out.splitlines()]
        assert ids[0] == "id" and workflow_id in ids
        code, out, err = await agentflow("library", "show", workflow_id)
        assert code == 0, err
        assert f"workflow   {workflow_id}" in out and "source     template" in out
    finally:
        await agentflow("library", "delete", workflow_id)


async def test_worker_start_up_is_quiet(settings: Settings, tmp_path: Path) -> None:
    worker = await start(
        "worker", env=cli_env(settings, AGENTFLOW_AGENTS_FILE=str(AGENTS_FILE)), cwd=tmp_path
    )
    assert worker.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not any("assigned partitions" in line for line in lines):
                line = await worker.stderr.readline()
                assert line, f"worker ended before its partitions were assigned: {lines}"
                lines.append(line.decode())
    finally:
        worker.send_signal(signal.SIGTERM)
        code, _, err = await finished(worker, 60)
    lines += err.splitlines()
    assert code == 0, lines
    assert any("started: group" in line for line in lines)
    assert not [line for line in lines if re.search(r" INFO (aiokafka|langgraph)", line)]


async def test_worker_stops_on_sigterm_while_redis_does_not_answer(
    settings: Settings, tmp_path: Path
) -> None:
    # A Redis that takes the worker's first command and never answers it. The signal goes
    # as soon as the command has come (redis-py gives up on a silent server after 5 s).
    asked = asyncio.Event()
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        if await reader.read(1024):
            asked.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"redis://127.0.0.1:{port}/0"
        env = cli_env(settings, AGENTFLOW_REDIS_URL=url, AGENTFLOW_AGENTS_FILE=str(AGENTS_FILE))
        worker = await start("worker", env=env, cwd=tmp_path)
        async with asyncio.timeout(90):
            await asked.wait()
        worker.send_signal(signal.SIGTERM)
        code, _, err = await finished(worker, 60)
    finally:
        for writer in connections:
            writer.close()
        server.close()
    assert code == 0, err
    assert "stopped while starting" in err
    assert "stopped while starting" in err


async def test_demo_ends_by_itself_when_run_non_interactively(tmp_path: Path) -> None:
    demo = await start(
        module="service.devtools.demo",
        env=cli_env(None),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    code, out, err = await finished(demo, 240)
    assert code == 0, err
    assert "Worker(demo-worker" in out and "stay browsable" not in out
    # The eligibility analyst is its own service: sessions wait for it and it answers them.
    assert "eligibility_analyst runs as its own service" in out
    lines = out.splitlines()
    waits = [line for line in lines if "waits for eligibility_analyst over Kafka" in line]
    said = [
        line
        for line in lines
        if re.search(r"agent\.message .*eligibility_analyst +over Kafka", line)
    ]
    assert waits and all("session.waiting" in line for line in waits), out
    assert len(said) >= len(waits), out
    answered = re.search(r"AgentHost\(eligibility-service .*?answered=(\d+)", out, re.DOTALL)
    assert answered and int(answered.group(1)) >= len(waits), out
    assert re.search(r"s3 +done +eligibility_analyst", out), out


async def test_demo_keeps_the_page_up_on_a_terminal_until_ctrl_c(tmp_path: Path) -> None:
    terminal, tty = pty.openpty()
    try:
        demo = await start(module="service.devtools.demo", env=cli_env(None), cwd=ROOT, stdin=tty)
    finally:
        os.close(tty)
    assert demo.stdout is not None
    try:
        url = None
        async with asyncio.timeout(240):
            while url is None:
                line = (await demo.stdout.readline()).decode()
                assert line, "the demo ended without keeping the page up"
                if "Ctrl-C ends the demo" in line:
                    url = re.search(r"(http://\S+);", line)
        assert url is not None
        async with httpx.AsyncClient() as client:
            page = await client.get(url.group(1))
        assert page.status_code == 200 and "<html" in page.text.lower()
        demo.send_signal(signal.SIGINT)
        code, _, err = await finished(demo, 60)
        assert code == 0, err
    finally:
        os.close(terminal)
        if demo.returncode is None:
            demo.kill()
            await demo.wait()


async def test_dev_hosts_an_agent_that_the_worker_waits_for(
    settings: Settings, agentflow: Any, tmp_path: Path, redis: Redis
) -> None:
    env = cli_env(
        settings,
        AGENTFLOW_AGENTS_FILE=str(AGENTS_FILE),
        AGENTFLOW_GATEWAY_PORT="0",
        AGENTFLOW_DATA_DIR=str(tmp_path / "data"),
    )
    dev = await start("dev", "--agents-host", "eligibility_analyst", env=env, cwd=tmp_path)
    assert dev.stdout is not None
    try:
        said: list[str] = []
        async with asyncio.timeout(120):
            while not any("gateway and web page" in line for line in said):
                line = (await dev.stdout.readline()).decode()
                assert line, f"agentflow dev ended while starting: {said}"
                said.append(line)
        assert any("hosted here over Kafka: eligibility_analyst" in line for line in said), said
        sid = f"dev-{uuid.uuid4().hex[:8]}"
        path, raw = event_file(tmp_path, "claim_submitted", sessionid=sid)
        code, out, err = await agentflow("send", str(path), "--wait", "--json", "--timeout", "120")
        assert code == 0, (out, err)
        result = json.loads(out)
    finally:
        dev.send_signal(signal.SIGINT)
        code, _, err = await finished(dev, 60)
    assert code == 0, err
    assert result["event_id"] == raw["id"] and result["status"] == "completed", result
    hosted = [s for s in result["workflow"]["steps"] if s["agents"] == ["eligibility_analyst"]]
    assert hosted and all(s["status"] == "done" and s["output"] for s in hosted), result
    log = await read_log(redis, sid)
    waited = [t for t in log if t.type == "session.waiting"]
    assert waited and waited[0].data is not None
    assert [w["agent"] for w in waited[0].data["result"]["waiting_on"]] == ["eligibility_analyst"]
    told = [t for t in log if t.type == "agent.message" and t.agent == "eligibility_analyst"]
    assert told and all(t.data and "task_id" in t.data for t in told)  # over Kafka, not local
    assert AGENTS_FILE.read_text().count("runs: kafka") == 0  # the user's file is untouched
