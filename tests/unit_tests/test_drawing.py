"""Drawing the graph and a session's path: every format, offline, from real runs."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from graphs.workflow import NODES, build_graph
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import CloudEvent
from service.config import load_settings
from service.observe.drawing import render_graph
from service.observe.path import SessionPath, format_duration, session_path
from service.runtime.replay import branch_history, transitions_from_history
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.transitions import Transition

SVG = "{http://www.w3.org/2000/svg}"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def run_session(
    event: CloudEvent, session_id: str, answer: str | None = None
) -> tuple[list[Transition], SessionRunner]:
    """Run an event on an in-memory checkpointer; resume with `answer` if it asks."""
    transitions: list[Transition] = []

    async def sink(t: Transition) -> None:
        transitions.append(t)

    graph = build_graph(InMemorySaver(serde=checkpoint_serde()))
    context = load_settings().context(library=InMemoryWorkflowLibrary())  # no reuse of past runs
    runner = SessionRunner(graph, context, sink=sink)
    result = await runner.start(event, session_id)
    if answer is not None:
        assert result.status == "interrupted"
        result = await runner.resume(session_id, answer)
    assert result.status == "completed"
    return transitions, runner


def t(
    seq: int, kind: str, node: str | None = None, ms: int | None = None, **kw: object
) -> Transition:
    return Transition(session_id="s", seq=seq, type=kind, node=node, duration_ms=ms, **kw)  # type: ignore[arg-type]


def test_session_path_counts_loops_parallel_tasks_and_interrupts() -> None:
    log = [
        t(1, "session.started"),
        t(2, "node.started", "discover"),
        t(3, "node.completed", "discover", 5),
        t(4, "node.started", "execute"),
        t(5, "node.completed", "execute", 1),
        t(6, "node.started", "execute_step", step_id="s1"),
        t(7, "node.started", "execute_step", step_id="s2"),
        t(8, "agent.message", "execute_step", step_id="s1"),
        t(9, "node.completed", "execute_step", 30, step_id="s2"),
        t(10, "node.completed", "execute_step", 40, step_id="s1"),
        t(11, "node.started", "execute"),
        t(12, "node.completed", "execute", 2),
        t(13, "node.started", "review"),
        t(14, "node.completed", "review", 7),
        t(15, "node.started", "escalate"),
        t(16, "session.interrupted"),
    ]
    path = session_path(log)
    assert path.session_id == "s" and path.status == "session.interrupted"
    assert path.nodes["execute_step"].visits == 2
    assert path.nodes["execute_step"].duration_ms == 70
    assert path.nodes["execute"].visits == 2 and path.nodes["execute"].duration_ms == 3
    assert path.edges[("execute", "execute_step")] == 2  # one per parallel task
    assert path.edges[("execute_step", "execute")] == 1  # one superstep joins them
    assert path.edges[("__start__", "discover")] == 1
    assert path.current == ["escalate"] and path.nodes["escalate"].visits == 0
    waiting = next(
        g
        for g in ET.fromstring(render_graph("svg", path)).iter(f"{SVG}g")
        if g.get("data-node") == "escalate"
    )
    assert "current" in waiting.get("class", "").split() and "waiting" in "".join(
        waiting.itertext()
    )
    # The human answers: escalate runs again as the same visit, then the session ends.
    resumed = [
        *log,
        t(17, "session.started", data={"resumed": True}),
        t(18, "node.started", "escalate"),
        t(19, "node.completed", "escalate", 1),
        t(20, "node.started", "finalize"),
        t(21, "node.completed", "finalize", 3),
        t(22, "session.completed"),
    ]
    path = session_path(reversed(resumed))  # order comes from seq
    assert path.edges[("review", "escalate")] == 1
    assert path.edges[("escalate", "finalize")] == 1
    assert path.nodes["escalate"].visits == 1 and path.nodes["escalate"].duration_ms == 1
    assert path.edges[("finalize", "__end__")] == 1 and path.visited("__end__")
    assert path.current == [] and path.status == "session.completed"
    assert path.as_dict()["edges"][0] == {"source": "__start__", "target": "discover", "count": 1}


def test_a_second_event_of_a_session_starts_from_start() -> None:
    run = [
        ("session.started", None),
        ("node.started", "discover"),
        ("node.completed", "discover"),
        ("node.started", "finalize"),
        ("node.completed", "finalize"),
        ("session.completed", None),
    ]
    log = [
        t(i, kind, node, 1, data={"resumed": False} if kind == "session.started" else None)
        for i, (kind, node) in enumerate(run + run, 1)
    ]
    path = session_path(log)
    assert path.edges[("__start__", "discover")] == 2
    assert path.edges[("finalize", "__end__")] == 2
    assert ("finalize", "discover") not in path.edges


def test_failed_node_is_marked_and_no_end() -> None:
    path = session_path(
        [
            t(1, "node.started", "plan"),
            t(2, "node.failed", "plan", 9, data={"error": "boom"}),
            t(3, "session.failed"),
        ]
    )
    assert path.failed == ["plan"] and not path.visited("__end__") and path.current == []


def test_svg_of_the_plain_graph_has_every_node_and_edge() -> None:
    svg = render_graph("svg")
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and "agentflow-graph" in root.get("class", "")
    nodes = {
        g.get("data-node"): g for g in root.iter(f"{SVG}g") if "node" in g.get("class", "").split()
    }
    assert set(nodes) == {*NODES, "__start__", "__end__"}
    assert all(g.get("id") == f"node-{name}" for name, g in nodes.items())
    edges = {p.get("id") for p in root.iter(f"{SVG}path") if "edge" in p.get("class", "").split()}
    drawable = build_graph().get_graph()
    assert edges == {f"edge-{e.source}-{e.target}" for e in drawable.edges}
    back = {p.get("id") for p in root.iter(f"{SVG}path") if "back" in p.get("class", "").split()}
    # escalate and finalize share a rank (both follow review): that edge runs sideways.
    assert back == {
        "edge-execute_step-execute",
        "edge-escalate-execute",
        "edge-escalate-finalize",
        "edge-review-execute",
    }
    assert all(" C " in p.get("d", "") for p in root.iter(f"{SVG}path") if p.get("id") in back)
    assert not [e for e in root.iter() if "visited" in e.get("class", "").split()]
    assert "http" not in svg.replace("http://www.w3.org/2000/svg", "")  # no CDN, no web font


async def test_svg_highlights_the_path_of_a_real_session(
    make_event: Callable[..., CloudEvent],
) -> None:
    transitions, _ = await run_session(
        make_event("claim_needs_review"), "draw-1", answer="approve: discharge confirmed"
    )
    path = session_path(transitions)
    root = ET.fromstring(render_graph("svg", path))
    classes = {
        g.get("data-node"): set(g.get("class", "").split())
        for g in root.iter(f"{SVG}g")
        if g.get("data-node")
    }
    for name in (
        "discover",
        "plan",
        "assign",
        "execute",
        "execute_step",
        "review",
        "escalate",
        "finalize",
    ):
        assert "visited" in classes[name], name
    edge_classes = {
        p.get("id"): set(p.get("class", "").split()) for p in root.iter(f"{SVG}path") if p.get("id")
    }
    assert "visited" in edge_classes["edge-review-escalate"]
    assert "visited" in edge_classes["edge-escalate-finalize"]  # approved: no review again
    assert "visited" not in edge_classes["edge-escalate-execute"]
    texts = ["".join(x.itertext()) for x in root.iter(f"{SVG}text")]
    execute = path.nodes["execute"]
    assert execute.visits > 1
    assert f"×{execute.visits} · {format_duration(execute.duration_ms)}" in texts
    steps = path.nodes["execute_step"].visits
    assert f"×{steps}" in texts  # the execute -> execute_step edge label


async def test_mermaid_ascii_and_png_with_a_path(make_event: Callable[..., CloudEvent]) -> None:
    transitions, _ = await run_session(make_event("claim_submitted"), "draw-2")
    path = session_path(transitions)
    mermaid = render_graph("mermaid", path)
    assert "classDef visited" in mermaid
    visited_line = next(
        line
        for line in mermaid.splitlines()
        if line.strip().startswith("class ") and line.rstrip().endswith("visited;")
    )
    assert "review" in visited_line and "escalate" not in visited_line
    assert "linkStyle" in mermaid and "&nbsp;×" in mermaid
    assert render_graph("mermaid").strip() == build_graph().get_graph().draw_mermaid().strip()
    ascii_art = render_graph("ascii", path)
    assert "*review" in ascii_art and "execute -> execute_step" in ascii_art
    plain, highlighted = render_graph("png"), render_graph("png", path)
    assert plain.startswith(PNG_MAGIC) and highlighted.startswith(PNG_MAGIC)
    assert plain != highlighted


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format 'pdf'"):
        render_graph("pdf")


async def test_path_from_checkpoints_matches_the_transition_log(
    make_event: Callable[..., CloudEvent],
) -> None:
    transitions, runner = await run_session(make_event("claim_submitted"), "draw-3")
    from_log = session_path(transitions)
    history = await branch_history(runner.graph, "draw-3")
    from_checkpoints = session_path(transitions_from_history(history, "draw-3"))
    assert set(from_checkpoints.nodes) == set(from_log.nodes)
    assert dict(from_checkpoints.edges) == dict(from_log.edges)
    assert {n: s.visits for n, s in from_checkpoints.nodes.items()} == {
        n: s.visits for n, s in from_log.nodes.items()
    }


def test_empty_path_draws_like_no_path() -> None:
    root = ET.fromstring(render_graph("svg", SessionPath()))
    assert not [e for e in root.iter() if "visited" in e.get("class", "").split()]


def agentflow(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in this process; return its exit code, stdout and stderr."""
    from service.cli.app import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_cli_draws_every_format_and_a_session_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTFLOW_REDIS_URL", raising=False)
    monkeypatch.setenv("AGENTFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = agentflow("graph", "--format", "svg", capsys=capsys)
    assert code == 0, err
    ET.fromstring(out)
    code, _, err = agentflow(
        "graph", "--format", "png", "--output", str(tmp_path / "g.png"), capsys=capsys
    )
    assert code == 0, err
    assert (tmp_path / "g.png").read_bytes().startswith(PNG_MAGIC)
    code, _, err = agentflow("graph", "--format", "pdf", capsys=capsys)
    assert code == 2 and "unknown format 'pdf'" in err
    code, _, err = agentflow("graph", "--session", "nope", capsys=capsys)
    assert code == 2 and "no sessions here" in err

    code, _, err = agentflow(
        "run", "examples/events/claim_submitted.json", "--session", "cli-draw", capsys=capsys
    )
    assert code == 0, err
    code, out, err = agentflow("graph", "--format", "svg", "--session", "cli-draw", capsys=capsys)
    assert code == 0, err
    root = ET.fromstring(out)
    visited = {
        g.get("data-node") for g in root.iter(f"{SVG}g") if "visited" in g.get("class", "").split()
    }
    assert {"plan", "assign", "execute", "execute_step", "review", "finalize", "__end__"} <= visited
    assert "escalate" not in visited
    code, _, err = agentflow("graph", "--session", "nope", capsys=capsys)
    assert code == 2 and "session nope is not in" in err


def test_cli_png_to_a_pipe_is_bytes(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from service.cli.app import main

    # Captured stdout is no terminal, as a pipe: the png goes to it as bytes.
    with pytest.raises(SystemExit) as exited:
        main(["graph", "--format", "png"])
    out, err = capsysbinary.readouterr()
    assert exited.value.code in (0, None), err
    assert out.startswith(PNG_MAGIC)
