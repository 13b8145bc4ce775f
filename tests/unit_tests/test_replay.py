"""Replay on `agentflow run`'s SQLite checkpoints, through the CLI, and state edits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from nodes.models import ReviewDecision, Step
from service.config import load_settings
from service.errors import ReplayError
from service.runtime.replay import (
    branch_history,
    checkpoint_id,
    open_session_graph,
    parse_edits,
)


def test_parse_edits_validates_against_the_state_types() -> None:
    edits = parse_edits(
        [
            'feedback=["check the dates"]',
            'review={"verdict": "revise", "feedback": "again", "steps_to_redo": ["s2"]}',
            'steps=[{"id": "s2", "title": "Redo", "description": "Do it again"}]',
        ]
    )
    assert edits["feedback"] == ["check the dates"]
    assert isinstance(edits["review"], ReviewDecision) and edits["review"].verdict == "revise"
    assert isinstance(edits["steps"][0], Step) and edits["steps"][0].status == "pending"
    for bad, message in [
        ("goals", "use KEY=JSON"),
        ("colour=1", "not a state key"),
        ("goals=[oops", "not JSON"),
        ('review={"verdict": "maybe"}', "review: Input should be"),
        ('steps=[{"title": "no id"}]', "Field required at 0.id"),
    ]:
        with pytest.raises(ReplayError, match=message):
            parse_edits([bad])


def agentflow(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in this process; return its exit code, stdout and stderr."""
    from service.cli.app import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def history(session_id: str) -> list[tuple[str, tuple[str, ...], str]]:
    """The session's current branch from the SQLite file: id, next and values."""

    async def read() -> list[Any]:
        async with open_session_graph(load_settings()) as opened:
            return await branch_history(opened.graph, session_id)

    return [
        (checkpoint_id(s), s.next, json.dumps(s.values, default=str)) for s in asyncio.run(read())
    ]


def test_cli_replays_a_sqlite_session_as_a_new_branch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTFLOW_REDIS_URL", raising=False)
    monkeypatch.setenv("AGENTFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    code, _, err = agentflow("sessions", "replay", "s", "--from", "x", capsys=capsys)
    assert code == 2 and "no sessions here" in err

    code, _, err = agentflow(
        "run", "examples/events/claim_submitted.json", "--session", "rp-1", capsys=capsys
    )
    assert code == 0, err
    original = history("rp-1")
    before_review = next(cid for cid, nxt, _ in original if nxt == ("review",))

    code, _, err = agentflow("sessions", "replay", "rp-1", "--from", "nope", capsys=capsys)
    assert code == 2 and "has no checkpoint nope" in err and before_review in err

    code, out, err = agentflow(
        "sessions",
        "replay",
        "rp-1",
        "--from",
        before_review,
        "--set",
        'feedback=["replayed"]',
        "--json",
        capsys=capsys,
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "completed"
    branch = history("rp-1")
    cut = [cid for cid, _, _ in original].index(before_review) + 1
    assert branch[:cut] == original[:cut]  # the shared part is the same checkpoints
    assert branch[-1][0] != original[-1][0]  # a new head
    assert '"replayed"' in branch[-1][2] and '"replayed"' not in original[-1][2]

    async def still_there() -> Any:
        async with open_session_graph(load_settings()) as opened:
            config = {"configurable": {"thread_id": "rp-1", "checkpoint_id": original[-1][0]}}
            return await opened.graph.aget_state(config)

    assert json.dumps(asyncio.run(still_there()).values, default=str) == original[-1][2]

    code, out, err = agentflow("sessions", "replay", "rp-1", "--from", before_review, capsys=capsys)
    assert code == 0, err
    assert "forked at" in out and "node.completed" in out and "review" in out
