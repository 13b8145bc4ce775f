"""Settings: secrets stay out of reprs, logs and messages."""

from __future__ import annotations

import pytest

from service.config import load_settings, redact_url


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
    settings = load_settings(redis_url="redis://:s3cret@db.example:6379/0", api_tokens="tok1")
    assert "s3cret" not in repr(settings) and "tok1" not in repr(settings)
