"""The notebooks run top to bottom, offline, on the venv's kernel; `make notebooks` serves them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nbformat
import pytest
from nbclient import NotebookClient
from tornado.websocket import websocket_connect

from tests.integration_tests.notebook_helpers import ROOT, outputs, run_notebook, text

LAB_URL = re.compile(r"http://(?P<address>[^/\s]+)/lab\?token=(?P<token>\w+)")
BOUND_S = 120
"""Only catches a hang: JupyterLab starts, and a kernel answers, in seconds."""


async def test_the_kernel_is_this_venv() -> None:
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)")]
    )
    await NotebookClient(notebook, timeout=BOUND_S, kernel_name="python3").async_execute()
    assert notebook.cells[0].outputs[0]["text"].strip() == sys.prefix


async def test_prompt_iteration_notebook() -> None:
    notebook = await run_notebook("01_prompt_iteration.ipynb")
    tables = "\n".join(outputs(notebook, "text/html"))
    for title in ("plan variants", "assign variants", "review variants", "intent of a full run"):
        assert title in tables
    printed = text(notebook)
    assert "model: offline" in printed
    assert "agents: examples/agents.yaml" in printed
    assert "event: examples/events/claim_submitted.json" in printed
    # The variant that loses the event shows up as such, in the node and in the full graph.
    assert tables.count("Handle the event event for the requester") == 2
    assert "invalid agent assignment" in tables  # the catalogue-less assign variant


async def test_prompt_iteration_takes_the_event_and_agents_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A domain of one's own: another event type, and agents of another file (with its tools).
    agents = tmp_path / "agents.yaml"
    yaml = (ROOT / "examples/agents.yaml").read_text()
    agents.write_text(yaml.replace("customer_communicator", "letter_writer"))
    shutil.copy(ROOT / "examples/claims_tools.py", tmp_path)
    monkeypatch.setenv("AGENTFLOW_AGENTS_FILE", str(agents))
    monkeypatch.setenv("AGENTFLOW_EVENT_FILE", "examples/events/status_requested.json")
    notebook = await run_notebook("01_prompt_iteration.ipynb")
    printed = text(notebook)
    assert f"agents: {agents} (" in printed and "letter_writer" in printed
    assert "event: examples/events/status_requested.json" in printed
    (plan_prompt,) = next(c for c in notebook.cells if c.id == "c04").outputs
    assert "evt-status-4001" in plan_prompt["text"]  # the id in status_requested.json
    assert "evt-claim-2001" not in plan_prompt["text"]
    tables = "\n".join(outputs(notebook, "text/html"))
    assert "letter_writer" in tables and "customer_communicator" not in tables


async def test_graph_walkthrough_notebook() -> None:
    notebook = await run_notebook("02_graph_walkthrough.ipynb")
    assert outputs(notebook, "image/svg+xml"), "the graph is drawn"
    html = "\n".join(outputs(notebook, "text/html"))
    assert "stops before each node" in html and "two branches of one thread" in html
    assert html.count('class="agentflow-graph"') == 2  # both branches drawn
    assert "needs a human decision" in text(notebook)
    assert "event: examples/events/claim_submitted.json" in text(notebook)


async def test_make_notebooks_serves_the_folder_on_localhost_with_this_venv(
    tmp_path: Path,
) -> None:
    # Jupyter directories of the test's own, where the user has a `python3` kernelspec of
    # another Python and prefers user kernelspecs: the venv's kernel must win all the same.
    user_kernel = tmp_path / "data" / "kernels" / "python3"
    user_kernel.mkdir(parents=True)
    (user_kernel / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (the user's)",
                "language": "python",
            }
        )
    )
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_PREFER_ENV_PATH": "0",
    }
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        lab = await asyncio.create_subprocess_exec(
            "make",
            "-s",
            "notebooks",
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with asyncio.timeout(BOUND_S):
            while not (found := LAB_URL.search(log.read_text())):
                assert lab.returncode is None, f"make notebooks exited:\n{log.read_text()}"
                await asyncio.sleep(0.2)
        address, token = found["address"], found["token"]
        assert address.startswith("127.0.0.1:"), found[0]
        async with httpx.AsyncClient(
            base_url=f"http://{address}", headers={"Authorization": f"token {token}"}
        ) as http:
            listing = (await http.get("/api/contents")).raise_for_status().json()
            names = {item["name"] for item in listing["content"]}
            assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} <= names
            specs = (await http.get("/api/kernelspecs")).raise_for_status().json()
            kernel = (
                (await http.post("/api/kernels", json={"name": specs["default"]}))
                .raise_for_status()
                .json()
            )
            try:
                printed = await execute(
                    f"ws://{address}/api/kernels/{kernel['id']}/channels?token={token}",
                    "import sys\nprint(sys.prefix)",
                )
            finally:
                await http.delete(f"/api/kernels/{kernel['id']}")
            assert printed.strip() == sys.prefix
            await http.post("/api/shutdown")
        async with asyncio.timeout(BOUND_S):
            await lab.wait()
    finally:
        if lab.returncode is None:
            os.killpg(lab.pid, signal.SIGKILL)
            await lab.wait()
    assert lab.returncode == 0, log.read_text()


async def execute(channels_url: str, code: str) -> str:
    """Run code on a kernel through the server's websocket; return what it printed."""
    msg_id = uuid.uuid4().hex
    request = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "test",
            "session": uuid.uuid4().hex,
            "version": "5.3",
            "date": datetime.now(UTC).isoformat(),
        },
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False, "store_history": False},
        "channel": "shell",
        "buffers": [],
    }
    printed: list[str] = []
    async with asyncio.timeout(BOUND_S):
        socket = await websocket_connect(channels_url)
        try:
            await socket.write_message(json.dumps(request))
            while True:
                raw = await socket.read_message()
                assert raw is not None, "the kernel's websocket closed"
                message = json.loads(raw)
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "stream":
                    printed.append(content["text"])
                elif kind == "error":
                    raise AssertionError("\n".join(content["traceback"]))
                elif kind == "status" and content["execution_state"] == "idle":
                    return "".join(printed)  # idle comes after every output of the request
        finally:
            socket.close()
