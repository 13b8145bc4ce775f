"""Run the notebooks as Jupyter does: on a kernel of this venv, from the notebooks/ folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 240
"""Only catches a hung cell: the slowest takes seconds."""


async def run_notebook(name: str) -> NotebookNode:
    """Execute a notebook from the notebooks/ folder on the `python3` kernel; return it.

    `python3` is ipykernel's own spec, which jupyter_client starts with this interpreter
    (`sys.executable`), so the kernel sees this venv's packages and this process's
    environment (AGENTFLOW_* variables included).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised.
        AssertionError: LangGraph warned of a checkpoint type the project's serde does not
            register: the notebook built a checkpointer without it.
    """
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    await client.async_execute()
    warned = [line for line in text(notebook).splitlines() if "unregistered type" in line]
    assert not warned, f"{name}: " + "\n".join(warned)
    return notebook


def outputs(notebook: NotebookNode, mime: str) -> list[str]:
    """Every output of one MIME type, in order."""
    return [
        out["data"][mime]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if mime in out.get("data", {})
    ]


def text(notebook: NotebookNode) -> str:
    """Everything the cells printed, stdout and stderr, in order."""
    return "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
