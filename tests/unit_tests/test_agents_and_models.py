from __future__ import annotations

from pathlib import Path

import pytest

from nodes.agents import AgentRegistry
from nodes.chat_models import OfflineChatModel, make_chat_model
from nodes.errors import AgentConfigError, ModelConfigError
from service.config import load_settings
from service.devtools.hosting import host_agents
from service.errors import ConfigError


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(body)
    return path


def test_example_agents_load_with_tools() -> None:
    registry = AgentRegistry.from_yaml("examples/agents.yaml")
    assert "eligibility_analyst" in registry
    tools = {t.name for t in registry.tools_of("eligibility_analyst")}
    assert tools == {"check_eligibility"}
    assert (
        registry.tools_of("eligibility_analyst")[0]
        .invoke({"claim_id": "C-2001"})
        .startswith("claim C-2001: eligible")
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "agents:\n  - {name: a, description: d, system_prompt: p}\n"
            "  - {name: a, description: e, system_prompt: q}\n",
            "agent name 'a' appears twice",
        ),
        (
            "agents:\n  - {name: a, description: d, system_prompt: p, tools: [os.path.nope]}\n",
            "agent 'a' in .*: tool 'os.path.nope' cannot be imported",
        ),
        ("agents:\n  - {name: a, system_prompt: p}\n", "field 'description': Field required"),
        (
            "agents:\n  - {name: a, description: d, system_prompt: p, "
            "tools: [{path: os.getcwd, approval: always}]}\n",
            "agent 'a' in .*: field 'tools.0.approval': Input should be 'required' or 'none'",
        ),
        (
            "agents:\n  - {name: a, description: d, system_prompt: p, "
            "tools: [{approval: required}]}\n",
            "agent 'a' in .*: field 'tools.0.path': Field required",
        ),
        (
            "agents:\n  - {name: a, description: d, runs: kafka, "
            "tools: [{path: os.getcwd, approval: required}]}\n",
            "agent 'a' in .*: it runs on Kafka, and `approval: required` is for tools of agents "
            "that run here",
        ),
        ("agents: [\n", "not valid YAML"),
        ("agents: []\n", "non-empty list"),
    ],
)
def test_bad_agent_files_name_the_problem(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(AgentConfigError, match=message):
        AgentRegistry.from_yaml(write(tmp_path, body))


def test_a_tool_may_need_a_humans_approval(tmp_path: Path) -> None:
    body = (
        "agents:\n  - name: a\n    description: d\n    system_prompt: p\n    tools:\n"
        "      - os.getcwd\n      - {path: os.getpid, approval: required}\n"
        "      - {path: os.getppid, approval: none}\n"
    )
    registry = AgentRegistry.from_yaml(write(tmp_path, body))
    assert [t.name for t in registry.tools_of("a")] == ["getcwd", "getpid", "getppid"]
    assert registry.approval_of("a") == {"getpid"}
    assert registry.get("a").card()["tools"] == ["getcwd", "getpid", "getppid"]


REMOTE = (
    "agents:\n"
    "  - {name: intake, description: d, system_prompt: p}\n"
    "  - name: analyst\n"
    "    description: Assesses claims.\n"
    "    capabilities: [assess]\n"
    "    runs: kafka\n"
)


def test_a_kafka_agent_needs_only_name_description_and_capabilities(tmp_path: Path) -> None:
    registry = AgentRegistry.from_yaml(write(tmp_path, REMOTE))
    analyst = registry.get("analyst")
    assert (analyst.runs, analyst.system_prompt, analyst.timeout_s, analyst.max_attempts) == (
        "kafka",
        None,
        None,  # AGENTFLOW_AGENT_TIMEOUT_S then
        2,
    )
    assert registry.get("intake").runs == "local"
    assert registry.remote_names == ["analyst"] and registry.hosted == []
    assert [c["name"] for c in registry.catalogue()] == ["intake", "analyst"]  # assigned alike


def test_a_kafka_agents_prompt_tools_and_model_are_its_hosts(tmp_path: Path) -> None:
    body = REMOTE + "    system_prompt: You assess.\n    tools: [team_b_only.assess]\n"
    path = write(tmp_path, body + "    timeout_s: 30\n    max_attempts: 3\n")
    registry = AgentRegistry.from_yaml(path)  # the orchestrator does not import its tools
    assert registry.tools_of("analyst") == []
    assert (registry.get("analyst").timeout_s, registry.get("analyst").max_attempts) == (30, 3)
    with pytest.raises(AgentConfigError, match="tool 'team_b_only.assess' cannot be imported"):
        AgentRegistry.from_yaml(path, hosted=["analyst"])  # its host does


@pytest.mark.parametrize(
    ("body", "hosted", "message"),
    [
        (
            "agents:\n  - {name: a, description: d}\n",
            (),
            "agent 'a' in .*: it runs locally .* and needs a `system_prompt`; an agent another "
            "service hosts says `runs: kafka`",
        ),
        (
            f"agents:\n  - {{name: {'x' * 201}, description: d, runs: kafka}}\n",
            (),
            "it runs on Kafka, so its name is in a topic name: must be at most 200 "
            "characters of A-Z a-z 0-9 . _ -",
        ),
        (
            "agents:\n  - {name: replies, description: d, runs: kafka}\n",
            (),
            "agent 'replies' in .*: .*'replies' is reserved for the protocol's own topics",
        ),
        ("agents:\n  - {name: a, description: d, runs: remote}\n", (), "field 'runs'"),
        ("agents:\n  - {name: a, description: d, runs: kafka, timeout_s: 0}\n", (), "timeout_s"),
        (
            "agents:\n  - {name: a, description: d, runs: kafka, max_attempts: 0}\n",
            (),
            "max_attempts",
        ),
        (REMOTE, ("analyst",), "agent 'analyst' in .* is hosted here and needs a `system_prompt`"),
        (REMOTE, ("nobody",), "there is no agent 'nobody' to host in .*; it has intake, analyst"),
        (
            "agents:\n  - {name: cancel, description: d, system_prompt: p}\n",
            ("cancel",),
            "agent 'cancel' in .* cannot be hosted: .*reserved",
        ),
    ],
)
def test_agent_rules_name_the_agent_and_the_fix(
    tmp_path: Path, body: str, hosted: tuple[str, ...], message: str
) -> None:
    with pytest.raises(AgentConfigError, match=message):
        AgentRegistry.from_yaml(write(tmp_path, body), hosted=hosted)


def test_factory_makes_offline_and_refuses_unknown_providers() -> None:
    assert isinstance(make_chat_model("offline"), OfflineChatModel)
    with pytest.raises(ModelConfigError, match="nosuchprovider:model"):
        make_chat_model("nosuchprovider:model")


def test_openai_without_key_is_an_error_not_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelConfigError, match="openai:gpt-4.1-mini"):
        make_chat_model("openai:gpt-4.1-mini")


def test_settings_read_models_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MODEL", "openai:gpt-4.1-mini")
    monkeypatch.setenv("AGENTFLOW_MODEL_REVIEW", "openai:gpt-4.1")
    context = load_settings().context()
    assert context.model_for("plan") == "openai:gpt-4.1-mini"
    assert context.model_for("review") == "openai:gpt-4.1"


def test_default_model_is_offline_without_credentials() -> None:
    assert load_settings().model == "offline"


def test_bad_settings_say_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MAX_IN_FLIGHT", "lots")
    with pytest.raises(ConfigError, match="AGENTFLOW_MAX_IN_FLIGHT"):
        load_settings()
    monkeypatch.delenv("AGENTFLOW_MAX_IN_FLIGHT")
    monkeypatch.setenv("AGENTFLOW_MODEL", "gpt4")
    with pytest.raises(ConfigError, match="AGENTFLOW_MODEL: .*provider:model"):
        load_settings()


def test_tools_dir_names_where_the_tools_modules_are(tmp_path: Path) -> None:
    (tmp_path / "team_tools").mkdir()
    (tmp_path / "team_tools" / "far_away_tools.py").write_text(
        'def assess() -> str:\n    """Assess."""\n    return "ok"\n'
    )
    (tmp_path / "files").mkdir()
    agents = (
        "agents:\n  - {name: a, description: d, system_prompt: p, tools: [far_away_tools.assess]}\n"
    )
    path = write(tmp_path / "files", "tools_dir: ../team_tools\n" + agents)
    assert [t.name for t in AgentRegistry.from_yaml(path).tools_of("a")] == ["assess"]
    with pytest.raises(AgentConfigError, match="`tools_dir` must be a folder"):
        AgentRegistry.from_yaml(write(tmp_path / "files", "tools_dir: 3\n" + agents))


def test_agents_hosted_beside_the_worker_run_over_kafka_in_a_copy(tmp_path: Path) -> None:
    source = Path("examples/agents.yaml")
    before = source.read_text()
    settings = load_settings(data_dir=tmp_path / "data")
    hosted = host_agents(settings, ["eligibility_analyst", "eligibility_analyst"])
    assert source.read_text() == before  # the user's file is left as it is
    assert hosted.names == ["eligibility_analyst"] and hosted.registry.hosted == hosted.names
    assert hosted.agents_file.parent == tmp_path / "data" / "hosted-agents"
    copy = AgentRegistry.from_yaml(hosted.agents_file)
    assert copy.remote_names == ["eligibility_analyst"]
    assert copy.names == AgentRegistry.from_yaml(source).names
    assert [t.name for t in copy.tools_of("intake")] == ["lookup_claim", "lookup_veteran"]
    # the host imports the hosted agent's tools from the original's folder
    assert [t.name for t in hosted.registry.tools_of("eligibility_analyst")] == [
        "check_eligibility"
    ]
    assert host_agents(settings, ["eligibility_analyst"]).agents_file == hosted.agents_file
    assert hosted.settings_for(settings).agents_file == hosted.agents_file
    with pytest.raises(
        ConfigError, match="there is no agent 'nobody' to host in .*examples/agents.yaml"
    ):
        host_agents(settings, ["nobody"])
