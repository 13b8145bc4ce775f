"""Start-up checks and the start-up line: what stops a service before it connects."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis, RedisCluster

from service.bootstrap import (
    check_hosting,
    check_startup,
    infra_cause,
    is_infra_error,
    kafka_producer,
    redis_client,
    setup_lost,
    startup_summary,
)
from service.config import load_settings
from service.errors import ConfigError
from service.storage.memory import check_llm_cache

AGENT_WITH_MODEL = """
agents:
  - name: clerk
    description: Takes in and records claims.
    capabilities: [claim]
    system_prompt: You are a clerk.
    model: openai:gpt-4.1
"""


def test_the_default_configuration_passes() -> None:
    check_startup(load_settings())


def test_an_openai_model_without_a_key_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MODEL", "openai:gpt-4.1-mini")
    with pytest.raises(ConfigError) as caught:
        check_startup(load_settings())
    message = str(caught.value)
    assert "AGENTFLOW_MODEL=openai:gpt-4.1-mini needs OPENAI_API_KEY" in message
    assert "AGENTFLOW_MODEL=offline" in message  # and the other fix


def test_a_key_or_a_local_server_with_any_key_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MODEL", "openai:gpt-4.1-mini")
    monkeypatch.setenv("OPENAI_API_KEY", "anything")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    check_startup(load_settings())  # makes the client; calls nothing


def test_a_per_node_model_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MODEL_REVIEW", "openai:gpt-4.1")
    with pytest.raises(ConfigError, match="AGENTFLOW_MODEL_REVIEW=openai:gpt-4.1 needs"):
        check_startup(load_settings())


def test_an_agents_model_names_the_agent_and_the_file(tmp_path: Path) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(AGENT_WITH_MODEL)
    with pytest.raises(ConfigError) as caught:
        check_startup(load_settings(agents_file=agents))
    message = str(caught.value)
    assert f"agent 'clerk' in {agents}" in message and "OPENAI_API_KEY" in message
    assert "remove its `model:` line" in message


def test_a_kafka_agents_model_is_checked_by_its_host_not_the_worker(tmp_path: Path) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(AGENT_WITH_MODEL.replace("    model:", "    runs: kafka\n    model:"))
    settings = load_settings(agents_file=agents)
    check_startup(settings)  # the worker only sends it tasks
    with pytest.raises(ConfigError, match=f"agent 'clerk' in {agents}.*OPENAI_API_KEY"):
        check_hosting(settings)  # every `runs: kafka` agent of the file by default
    assert check_hosting(load_settings(), ["intake"]).hosted == ["intake"]


def test_a_host_with_nothing_to_serve_says_how_to_name_agents() -> None:
    with pytest.raises(ConfigError, match="no agent with `runs: kafka` to host.*--agent"):
        check_hosting(load_settings())


def test_an_unknown_provider_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MODEL", "nosuchprovider:model")
    with pytest.raises(ConfigError, match="AGENTFLOW_MODEL=nosuchprovider:model cannot be used"):
        check_startup(load_settings())


def test_a_missing_agents_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AGENTFLOW_AGENTS_FILE"):
        check_startup(load_settings(agents_file=tmp_path / "none.yaml"))


def test_the_start_up_line_says_agents_models_and_reuse(tmp_path: Path) -> None:
    line = startup_summary(load_settings())
    assert "agents examples/agents.yaml (the example; AGENTFLOW_AGENTS_FILE" in line
    assert "model offline (deterministic" in line and "reuse adapt at score 0.75" in line
    own = tmp_path / "agents.yaml"
    line = startup_summary(load_settings(agents_file=own, model_plan="openai:gpt-4.1", reuse="off"))
    assert f"agents {own};" in line
    assert "plan openai:gpt-4.1" in line and line.endswith("reuse off")


async def test_the_cluster_setting_makes_a_cluster_client() -> None:
    single = redis_client("redis://127.0.0.1:1/0")
    cluster = redis_client("redis://127.0.0.1:1/0", cluster=True)  # connects at first use
    assert isinstance(single, Redis) and isinstance(cluster, RedisCluster)
    assert cluster.get_encoder().decode_responses
    await single.aclose()
    await cluster.aclose()


async def test_the_exact_llm_cache_is_refused_on_a_cluster() -> None:
    settings = load_settings(redis_url="redis://127.0.0.1:1/0", redis_cluster=True)
    client = redis_client(settings.redis_url or "", cluster=True)
    await check_llm_cache(client, settings)  # off: nothing to check
    with pytest.raises(ConfigError, match="set AGENTFLOW_LLM_CACHE=off") as refused:
        await check_llm_cache(client, settings.model_copy(update={"llm_cache": "exact"}))
    assert "not a cluster" in str(refused.value)
    await client.aclose()


async def test_kafka_clients_need_the_bootstrap_variable() -> None:
    with pytest.raises(ConfigError, match="AGENTFLOW_KAFKA_BOOTSTRAP"):
        kafka_producer(load_settings(kafka_bootstrap=None))


def test_infra_errors_are_found_through_the_cause_chain() -> None:
    try:
        try:
            raise redis.exceptions.ConnectionError("refused")
        except redis.exceptions.ConnectionError as exc:
            raise RuntimeError("search failed") from exc
    except RuntimeError as wrapped:
        assert is_infra_error(wrapped)
    assert not is_infra_error(ValueError("a bad plan"))


def test_a_lost_search_index_is_setup_lost_not_a_failed_run() -> None:
    try:
        try:
            raise redis.exceptions.ResponseError("checkpoint_write: no such index")
        except redis.exceptions.ResponseError as exc:
            raise RuntimeError("Error while searching") from exc  # as redisvl wraps it
    except RuntimeError as wrapped:
        assert setup_lost(wrapped) is not None
        assert is_infra_error(wrapped)  # retried, not turned into a failed run
        assert infra_cause(wrapped) is None  # but Redis is not "unreachable"
    assert setup_lost(redis.exceptions.ResponseError("Unknown index name")) is not None
    assert setup_lost(redis.exceptions.ResponseError("WRONGTYPE Operation")) is None
    assert not is_infra_error(redis.exceptions.ResponseError("WRONGTYPE Operation"))
