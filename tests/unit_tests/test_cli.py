"""`agentflow run` and `agentflow graph` as a user runs them: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENTFLOW = [sys.executable, "-m", "service.cli"]


def agentflow(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTFLOW_", "OPENAI_"))}
    full_env.update({"AGENTFLOW_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200", **env})
    return subprocess.run(
        [*AGENTFLOW, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_run_prints_transitions_then_result(tmp_path: Path) -> None:
    out = agentflow("run", "examples/events/claim_submitted.json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "session.started" in lines[0]
    assert any("node.completed" in line and "plan" in line for line in lines)
    assert any("agent.message" in line and "eligibility_analyst" in line for line in lines)
    assert "COMPLETED" in out.stdout and "model offline" in out.stdout


def test_run_json_prints_only_the_result(tmp_path: Path) -> None:
    out = agentflow("run", "examples/events/claim_submitted.json", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "completed" and result["event_id"] == "evt-claim-2001"
    assert set(result) >= {
        "session_id",
        "workflow",
        "review",
        "summary",
        "usage",
        "model",
        "started_at",
        "finished_at",
    }
    assert result["usage"]["llm_calls"] > 0


def test_interrupted_run_exits_3_and_resumes_from_disk(tmp_path: Path) -> None:
    first = agentflow(
        "run",
        "examples/events/claim_needs_review.json",
        "--json",
        "--session",
        "cli-esc",
        tmp_path=tmp_path,
    )
    assert first.returncode == 3, first.stderr
    assert json.loads(first.stdout)["question"]
    second = agentflow(
        "run", "--resume", "cli-esc", "--answer", "approve", "--json", tmp_path=tmp_path
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["review"]["verdict"] == "approve"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "not valid JSON"),
        ('{"specversion": "1.0", "id": "x", "source": "s"}', "field 'type'"),
    ],
)
def test_bad_event_file_exits_2_without_traceback(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "event.json"
    path.write_text(content)
    out = agentflow("run", str(path), tmp_path=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_missing_file_and_bad_agents_file_exit_2(tmp_path: Path) -> None:
    out = agentflow("run", "nope.json", tmp_path=tmp_path)
    assert out.returncode == 2 and "cannot read event file" in out.stderr
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "agents:\n  - {name: a, description: d, system_prompt: p, tools: [math.nope]}\n"
    )
    out = agentflow(
        "run",
        "examples/events/claim_submitted.json",
        tmp_path=tmp_path,
        AGENTFLOW_AGENTS_FILE=str(agents),
    )
    assert out.returncode == 2
    assert "tool 'math.nope' cannot be imported" in out.stderr and "Traceback" not in out.stderr


def test_graph_prints_mermaid_and_ascii(tmp_path: Path) -> None:
    mermaid = agentflow("graph", "--format", "mermaid", tmp_path=tmp_path)
    assert mermaid.returncode == 0
    assert "execute_step" in mermaid.stdout and "graph TD" in mermaid.stdout
    ascii_out = agentflow("graph", "--format", "ascii", tmp_path=tmp_path)
    assert ascii_out.returncode == 0 and "| review |" in ascii_out.stdout
