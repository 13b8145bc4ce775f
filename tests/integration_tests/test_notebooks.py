"""The notebooks run top to bottom, offline, on the venv's kernel; they are stored clean."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
TIME_LIMIT_S = 60


def run_notebook(name: str) -> NotebookNode:
    """Execute a notebook from the notebooks/ folder on the `python3` kernel; return it.

    `python3` is ipykernel's own spec, which jupyter_client starts with this interpreter
    (`sys.executable`), so the kernel sees this venv's packages and environment.
    """
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=TIME_LIMIT_S * 2,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    started = time.monotonic()
    client.execute()
    took = time.monotonic() - started
    assert took < TIME_LIMIT_S, f"{name} took {took:.0f} s"
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
    return "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code), path.name


def test_the_kernel_is_this_venv() -> None:
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)")]
    )
    NotebookClient(notebook, timeout=60, kernel_name="python3").execute()
    assert notebook.cells[0].outputs[0]["text"].strip() == sys.prefix


def test_prompt_iteration_notebook() -> None:
    notebook = run_notebook("01_prompt_iteration.ipynb")
    tables = "\n".join(outputs(notebook, "text/html"))
    for title in ("plan variants", "assign variants", "review variants", "intent of a full run"):
        assert title in tables
    assert "model: offline" in text(notebook)
    # The variant that loses the event shows up as such, in the node and in the full graph.
    assert tables.count("Handle the event event for the requester") == 2
    assert "invalid agent assignment" in tables  # the catalogue-less assign variant


def test_graph_walkthrough_notebook() -> None:
    notebook = run_notebook("02_graph_walkthrough.ipynb")
    assert outputs(notebook, "image/svg+xml"), "the graph is drawn"
    html = "\n".join(outputs(notebook, "text/html"))
    assert "stops before each node" in html and "two branches of one thread" in html
    assert html.count('class="agentflow-graph"') == 2  # both branches drawn
    assert "needs a human decision" in text(notebook)
