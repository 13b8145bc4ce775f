"""The `agentflow` commands that need no server, run in this process as a user types them.

The commands that talk to Kafka and Redis are tested in
`tests/integration_tests/test_cli_service.py`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import pytest
from rich.console import Console

from nodes.models import SimilarWorkflow, Step
from service.cli import console as cli_console
from service.cli.app import main
from service.cli.inputs import AGENTFLOW_LOGGERS, QUIET_LOGGERS
from service.devtools import demo
from service.observe.terminal import print_transition
from service.storage.transitions import Transition, TransitionType

ROOT = Path(__file__).resolve().parents[2]
EVENT = ROOT / "examples" / "events" / "claim_submitted.json"

Agentflow = Callable[..., tuple[int, str, str]]


@pytest.fixture
def agentflow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Agentflow:
    """Run the CLI in this process with a clean environment; return exit code, out, err."""
    for name in list(os.environ):
        if name.startswith("AGENTFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AGENTFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out, err = capsys.readouterr()
        return int(exited.value.code or 0), out, err

    return run


@pytest.fixture
def _restore_log_levels() -> Iterator[None]:
    names = (*AGENTFLOW_LOGGERS, *QUIET_LOGGERS)
    before = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_paragraph(err: str) -> bool:
    """Whether an error output is one paragraph with no traceback."""
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_prints_transitions_then_result(agentflow: Agentflow) -> None:
    code, out, err = agentflow("run", "examples/events/claim_submitted.json")
    assert code == 0, err
    lines = out.splitlines()
    assert "session.started" in lines[0]
    assert any("node.completed" in line and "plan" in line for line in lines)
    assert any("agent.message" in line and "eligibility_analyst" in line for line in lines)
    assert "COMPLETED" in out and "model offline" in out


def test_run_json_prints_only_the_result(agentflow: Agentflow) -> None:
    code, out, err = agentflow("run", "examples/events/claim_submitted.json", "--json")
    assert code == 0, err
    result = json.loads(out)
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


def test_interrupted_run_exits_3_and_resumes_from_disk_once(agentflow: Agentflow) -> None:
    code, out, err = agentflow(
        "run", "examples/events/claim_needs_review.json", "--session", "cli-esc"
    )
    assert code == 3, err
    assert "answer with: agentflow run --resume cli-esc --approve | --reject | --revise" in out
    code, out, err = agentflow("run", "--resume", "cli-esc", "--answer", "approve", "--json")
    assert code == 0, err
    assert json.loads(out)["review"]["verdict"] == "approve"
    # A finished session has nothing to answer: bad input, one paragraph.
    code, _, err = agentflow("run", "--resume", "cli-esc", "--approve")
    assert code == 2 and "session cli-esc is not waiting for an answer" in err
    assert one_paragraph(err), err


def test_reject_exits_4_and_revise_runs_steps_again(agentflow: Agentflow) -> None:
    event = "examples/events/claim_needs_review.json"
    assert agentflow("run", event, "--session", "cli-no")[0] == 3
    code, out, err = agentflow(
        "run", "--resume", "cli-no", "--reject", "--feedback", "manager did not approve", "--json"
    )
    assert code == 4, err
    result = json.loads(out)
    assert result["status"] == "rejected" and result["review"]["verdict"] == "reject"
    assert "manager did not approve" in result["review"]["feedback"]
    code, out, _ = agentflow("sessions", "history", "cli-no")
    assert code == 0 and "answered  reject by agentflow/cli (cli): manager did not" in out

    assert agentflow("run", event, "--session", "cli-redo")[0] == 3
    code, out, err = agentflow(
        "run", "--resume", "cli-redo", "--revise", "--steps", "s3", "--feedback", "recheck"
    )
    assert code == 3, err  # s3 ran again, and its output asks for a human again
    code, out, err = agentflow("run", "--resume", "cli-redo", "--answer", "approve: fine")
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--answer", "yes"], "names no decision: start it with approve, reject or revise"),
        (["--approve", "--reject"], "give one decision, not --approve and --reject"),
        (["--answer", "approve", "--feedback", "x"], "an answer text carries its own feedback"),
        (["--feedback", "x"], "give a decision"),
        (["--revise", "--steps", "s9"], "no step s9 to revise"),
        (["--edit", "{oops"], "--edit ARGS_JSON is not valid JSON"),
        (["--edit", "{}"], "a review interrupt takes approve, reject, revise, not edit"),
    ],
)
def test_answers_that_cannot_be_taken_are_bad_input(
    agentflow: Agentflow, args: list[str], message: str
) -> None:
    assert agentflow("run", "examples/events/claim_needs_review.json", "--session", "cli-bad")[0]
    code, out, err = agentflow("run", "--resume", "cli-bad", *args)
    assert code == 2 and out == "", err
    assert message in err and one_paragraph(err), err


def test_resume_of_an_unknown_session_is_bad_input(agentflow: Agentflow) -> None:
    code, out, err = agentflow("run", "--resume", "nosuch", "--approve")
    assert code == 2 and out == ""
    assert "session nosuch does not exist" in err and "agentflow sessions answer" in err
    assert one_paragraph(err), err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "not valid JSON"),
        ('{"specversion": "1.0", "id": "x", "source": "s"}', "field 'type'"),
        (
            '{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data": '
            + "[" * 2000
            + "]" * 2000
            + "}",
            "nests deeper than AGENTFLOW_MAX_JSON_DEPTH (64 levels)",
        ),
        (
            '{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "sessionid": "a/b"}',
            "field 'sessionid'",
        ),
    ],
)
def test_bad_event_file_exits_2_without_traceback(
    agentflow: Agentflow, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "event.json"
    path.write_text(content)
    code, _, err = agentflow("run", str(path))
    assert code == 2
    assert message in err and "Traceback" not in err


def test_run_holds_session_and_event_ids_to_the_rules(
    agentflow: Agentflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = agentflow("run", str(EVENT), "--session", "a/b")
    assert code == 2 and "--session 'a/b': must be 1 to 200 characters" in err
    monkeypatch.setenv("AGENTFLOW_MAX_ID_BYTES", "40")
    path = tmp_path / "event.json"
    path.write_text(EVENT.read_text().replace('"evt-claim-2001"', '"' + "x" * 41 + '"'))
    code, _, err = agentflow("run", str(path))
    assert code == 2 and "41 bytes of UTF-8, over AGENTFLOW_MAX_ID_BYTES (40)" in err


def test_missing_file_and_bad_agents_file_exit_2(
    agentflow: Agentflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = agentflow("run", "nope.json")
    assert code == 2 and "cannot read event file" in err
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "agents:\n  - {name: a, description: d, system_prompt: p, tools: [math.nope]}\n"
    )
    monkeypatch.setenv("AGENTFLOW_AGENTS_FILE", str(agents))
    code, _, err = agentflow("run", "examples/events/claim_submitted.json")
    assert code == 2
    assert "tool 'math.nope' cannot be imported" in err and "Traceback" not in err


def test_graph_prints_mermaid_and_ascii(agentflow: Agentflow) -> None:
    code, out, _ = agentflow("graph", "--format", "mermaid")
    assert code == 0
    assert "execute_step" in out and "graph TD" in out
    code, out, _ = agentflow("graph", "--format", "ascii")
    assert code == 0 and "| review |" in out


def test_client_commands_need_no_agents_file(
    agentflow: Agentflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the repository (no examples/agents.yaml), only `run` asks for agents."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = agentflow("run", str(EVENT))
    assert code == 2 and "agents" in err  # running the graph here does need them

    port = closed_port()
    monkeypatch.setenv("AGENTFLOW_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", f"redis://127.0.0.1:{port}")
    # Each gets as far as the server it needs: none stops at the agents file.
    code, _, err = agentflow("health")
    assert code == 1 and "unhealthy Redis" in err and "unhealthy Kafka" in err
    code, _, err = agentflow("send", str(EVENT))
    assert code == 1 and "cannot reach Kafka" in err
    assert one_paragraph(err), err
    for args in (
        ("send", str(EVENT), "--wait"),
        ("watch", "some-session"),
        ("library", "list"),
        ("sessions", "history", "some-session"),
        ("sessions", "answer", "some-session", "approve"),
    ):
        code, _, err = agentflow(*args)
        assert code == 1 and "cannot reach" in err, (args, err)
        assert "agents" not in err and one_paragraph(err), (args, err)


def test_health_exits_2_without_urls_as_its_help_says(agentflow: Agentflow) -> None:
    code, _, err = agentflow("health")
    assert code == 2 and "AGENTFLOW_KAFKA_BOOTSTRAP" in err
    code, out, _ = agentflow("health", "--help")
    assert code == 0
    assert "2 AGENTFLOW_KAFKA_BOOTSTRAP or AGENTFLOW_REDIS_URL is not set" in " ".join(out.split())


def test_help_of_dev_send_and_answer(agentflow: Agentflow) -> None:
    code, out, _ = agentflow("dev", "--help")
    assert code == 0 and "gateway" in out
    code, out, _ = agentflow("send", "--help")
    assert "4 rejected" in " ".join(out.split())
    assert "7 no result within --timeout" in " ".join(out.split())
    code, out, _ = agentflow("sessions", "--help")
    assert code == 0 and "answer" in out


def test_dev_agents_host_of_an_agent_not_in_the_file_stops_start_up(
    agentflow: Agentflow, tmp_path: Path
) -> None:
    code, out, err = agentflow("dev", "--agents-host", "eligibility_analyst", "--agents-host", "x")
    assert code == 2 and out == ""
    assert (
        "there is no agent 'x' to host in" in err and "examples/agents.yaml; it has intake" in err
    )
    assert one_paragraph(err) and not (tmp_path / "data").exists()  # nothing written, started
    code, out, _ = agentflow("dev", "--help")
    assert code == 0 and "--agents-host" in out


def test_a_remote_agents_wait_and_messages_read_as_lines() -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, width=200, color_system=None)
    wait = {"agent": "eligibility_analyst", "step_id": "s3", "attempt": 2, "timeout_s": 300.0}
    for transition in (
        Transition(
            session_id="s",
            seq=7,
            type="session.waiting",
            data={"status": "waiting", "result": {"waiting_on": [wait]}},
        ),
        Transition(
            session_id="s",
            seq=8,
            type="agent.message",
            step_id="s3",
            agent="eligibility_analyst",
            data={"task_id": "t", "content": "", "tool_calls": [{"name": "check", "args": {}}]},
        ),
    ):
        print_transition(terminal, transition)
    waiting, message = screen.getvalue().splitlines()
    assert waiting.split()[2] == "session.waiting"
    assert waiting.endswith(
        "waits for eligibility_analyst over Kafka (step s3, attempt 2, answer within 300 s)"
    )
    assert "[s3] eligibility_analyst" in message and message.endswith("over Kafka: calls check")
    coloured = Console(file=io.StringIO(), force_terminal=True, color_system="standard")
    for kind in get_args(TransitionType):  # every type has its colour, none breaks the line
        with coloured.capture() as line:
            print_transition(coloured, Transition(session_id="s", type=kind))
        assert "\x1b[" in line.get().split(kind)[0], kind


@pytest.mark.usefixtures("_restore_log_levels")
def test_worker_verbose_turns_agentflow_loggers_to_debug(agentflow: Agentflow) -> None:
    # No Kafka or Redis set: the command stops at its settings, after configuring logging.
    code, _, err = agentflow("worker")
    assert code == 2 and "AGENTFLOW_KAFKA_BOOTSTRAP" in err
    assert logging.getLogger("service.worker").getEffectiveLevel() > logging.DEBUG
    assert logging.getLogger("aiokafka.consumer").getEffectiveLevel() == logging.WARNING
    code, _, _ = agentflow("worker", "--verbose")
    assert code == 2
    for name in ("service.worker.worker", "nodes.execution", "graphs.workflow"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.DEBUG, name
    assert logging.getLogger("aiokafka.consumer").getEffectiveLevel() == logging.WARNING


def workflow(workflow_id: str, **fields: object) -> SimilarWorkflow:
    """A one-step library workflow."""
    return SimilarWorkflow.model_validate(
        {
            "id": workflow_id,
            "event_type": "claim.submitted",
            "intent": "Handle the claim",
            "steps": [Step(id="s1", title="Take in the claim", agents=["intake"])],
            **fields,
        }
    )


def test_workflow_list_piped_prints_ids_whole(capsys: pytest.CaptureFixture[str]) -> None:
    long_id = "wf-" + "a-rather-long-workflow-identifier-" * 3 + "end"
    items = [workflow(long_id, intent="x " * 60), workflow("tpl-short", source="template")]
    cli_console.print_workflows(items, total=2)  # captured: not a terminal
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split("\t")[:3] == ["id", "event type", "source"]
    assert [row.split("\t")[0] for row in rows] == [long_id, "tpl-short"]
    assert rows[1].split("\t")[2] == "template"


def test_workflow_list_on_a_narrow_terminal_keeps_ids_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_id = "wf-" + "a-rather-long-workflow-identifier-" * 2 + "end"
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=60, color_system=None)
    monkeypatch.setattr(cli_console, "console", terminal)
    cli_console.print_workflows([workflow(long_id), workflow("tpl-short")], total=2)
    lines = screen.getvalue().splitlines()
    assert lines[0].split()[:3] == ["id", "event", "type"]
    assert [line.split()[0] for line in lines[1:3]] == [long_id, "tpl-short"]
    assert lines[-1] == "2 of 2 workflow(s)"


def test_workflow_show_labels_its_fields(capsys: pytest.CaptureFixture[str]) -> None:
    cli_console.print_workflow(workflow("tpl-x", source="template", verdict="template"))
    out = capsys.readouterr().out
    assert "source     template    verdict template" in out
    assert "workflow   tpl-x" in out and "event type claim.submitted" in out


def test_demo_keeps_the_page_up_only_for_a_person(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stdin", Terminal())
    assert demo.interactive()
    monkeypatch.setenv("CI", "true")
    assert not demo.interactive()
    monkeypatch.delenv("CI")
    monkeypatch.setattr("sys.stdin", io.StringIO())
    assert not demo.interactive()


def test_health_shows_no_redis_password(
    agentflow: Agentflow, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    monkeypatch.setenv("AGENTFLOW_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", f"redis://:s3cret@127.0.0.1:{port}/0")
    code, out, err = agentflow("health")
    assert code == 1 and "unhealthy Redis at redis://:***@127.0.0.1" in err
    assert "s3cret" not in out + err + caplog.text


def test_library_load_with_a_missing_agents_file_is_bad_input(
    agentflow: Agentflow, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", f"redis://127.0.0.1:{closed_port()}/0")
    monkeypatch.setenv("AGENTFLOW_AGENTS_FILE", str(tmp_path / "missing.yaml"))
    code, _, err = agentflow("library", "load", str(ROOT / "examples" / "workflows"))
    assert code == 2 and "missing.yaml" in err
    assert one_paragraph(err), err


def test_library_commands_on_a_cluster_ask_for_a_library_redis(
    agentflow: Agentflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", f"redis://127.0.0.1:{closed_port()}/0")
    monkeypatch.setenv("AGENTFLOW_REDIS_CLUSTER", "true")
    code, _, err = agentflow("library", "list")
    assert code == 2 and "set AGENTFLOW_LIBRARY_REDIS_URL" in " ".join(err.split())
    assert "cannot live on the Redis Cluster" in " ".join(err.split())
