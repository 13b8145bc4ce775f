"""Settings: secrets stay out of reprs, logs and messages."""

from __future__ import annotations

import pytest

from service.config import load_settings, redact_url
from service.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@db.example:6380/2", "redis://:***@db.example:6380/2"),
        ("rediss://app:s3cret@db.example/0", "rediss://app:***@db.example/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (None, ""),
    ],
)
def test_redact_url_hides_only_the_password(url: str | None, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_repr_shows_no_redis_password() -> None:
    settings = load_settings(
        redis_url="redis://:s3cret@db.example:6379/0",
        library_redis_url="redis://:s3cret2@search.example:6379/0",
        api_tokens="tok1",
    )
    assert "s3cret" not in repr(settings) and "tok1" not in repr(settings)


def test_the_library_is_on_the_main_redis_unless_it_has_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", "redis://main:6379/0")
    assert load_settings().library_url() == "redis://main:6379/0"
    monkeypatch.setenv("AGENTFLOW_LIBRARY_REDIS_URL", "redis://search:6379/0")
    assert load_settings().library_url() == "redis://search:6379/0"


def test_on_a_cluster_the_library_is_only_on_a_redis_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTFLOW_REDIS_URL", "redis://node-1:6379/0")
    monkeypatch.setenv("AGENTFLOW_REDIS_CLUSTER", "true")
    assert load_settings().redis_cluster
    assert load_settings().library_url() is None
    monkeypatch.setenv("AGENTFLOW_LIBRARY_REDIS_URL", "redis://search:6379/0")
    assert load_settings().library_url() == "redis://search:6379/0"


def test_subject_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.subject_notes_max, settings.subject_ttl_s) == (100, 30 * 24 * 3600)
    monkeypatch.setenv("AGENTFLOW_SUBJECT_NOTES_MAX", "0")
    with pytest.raises(ConfigError, match="AGENTFLOW_SUBJECT_NOTES_MAX"):
        load_settings()


def test_model_max_attempts_sets_the_retry_policy_of_model_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().model_retry().max_attempts == 5  # the default
    monkeypatch.setenv("AGENTFLOW_MODEL_MAX_ATTEMPTS", "7")
    policy = load_settings().model_retry()
    assert policy.max_attempts == 7
    assert policy.jitter and policy.backoff_factor == 2  # exponential, with jitter


def test_model_max_attempts_below_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_MODEL_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="AGENTFLOW_MODEL_MAX_ATTEMPTS"):
        load_settings()
