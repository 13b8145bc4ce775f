"""`langgraph.json` loads in LangGraph's own dev server; a sample event runs to the end.

The server is `langgraph dev` (langgraph-cli with the in-memory runtime) as a subprocess,
offline: analytics, version checks and tracing are switched off by environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from langgraph_sdk import get_client

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "examples" / "events"

OFFLINE_ENV = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",  # the CLI's usage ping
    "LANGGRAPH_NO_VERSION_CHECK": "true",  # the server's PyPI version check
    "LANGSMITH_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run `langgraph dev` on a free port; yield its URL; stop it."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("langgraph-dev") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTFLOW_", "OPENAI_"))}
    env.update(OFFLINE_ENV)
    binary = Path(sys.executable).parent / "langgraph"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "dev",
                "--no-browser",
                "--no-reload",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--config",
                str(ROOT / "langgraph.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"langgraph dev exited:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/ok", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"langgraph dev not up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def example(name: str) -> dict[str, object]:
    return json.loads((EVENTS / f"{name}.json").read_text())


async def test_dev_server_serves_the_graph(dev_server: str) -> None:
    client = get_client(url=dev_server)
    assistants = await client.assistants.search(graph_id="agentflow")
    assert [a["graph_id"] for a in assistants] == ["agentflow"]
    drawn = await client.assistants.get_graph(assistants[0]["assistant_id"])
    names = {node["id"] for node in drawn["nodes"]}
    assert {"discover", "plan", "assign", "execute", "execute_step", "review", "finalize"} <= names


async def test_sample_event_runs_to_completion(dev_server: str) -> None:
    client = get_client(url=dev_server)
    thread = await client.threads.create()
    event = example("claim_submitted")
    output = await client.runs.wait(thread["thread_id"], "agentflow", input={"event": event})
    assert isinstance(output, dict), output
    result = output["result"]
    assert result["status"] == "completed" and result["event_id"] == event["id"]
    assert result["model"] == "offline"
    assert [s["status"] for s in result["workflow"]["steps"]] == ["done"] * len(
        result["workflow"]["steps"]
    )
    history = await client.threads.get_history(thread["thread_id"], limit=100)
    assert len(history) > 5 and history[0]["next"] == []


async def test_escalation_interrupts_and_resumes(dev_server: str) -> None:
    client = get_client(url=dev_server)
    thread = await client.threads.create()
    await client.runs.wait(
        thread["thread_id"], "agentflow", input={"event": example("claim_needs_review")}
    )
    state = await client.threads.get_state(thread["thread_id"])
    assert state["next"] == ["escalate"]
    assert state["interrupts"] and state["interrupts"][0]["value"]["question"]
    output = await client.runs.wait(
        thread["thread_id"],
        "agentflow",
        command={"resume": "approve: discharge confirmed"},
    )
    assert isinstance(output, dict) and output["result"]["status"] == "completed"
