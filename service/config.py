"""Service settings, read from `AGENTFLOW_*` environment variables.

Settings only: nothing here reads files or connects. What start-up opens and checks
is in `service.bootstrap`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from langgraph.types import RetryPolicy
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from nodes.chat_models import MODEL_MAX_ATTEMPTS, default_model_spec, model_retry
from nodes.context import WorkflowContext
from nodes.models import EventLimits, MultitaskStrategy
from service.errors import ConfigError

_TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]+")

__all__ = ["Settings", "load_settings", "redact_url"]


class Settings(BaseSettings):
    """Everything the service and the CLI read from the environment."""

    model_config = SettingsConfigDict(env_prefix="AGENTFLOW_", extra="ignore")

    model: str = Field(default_factory=default_model_spec, description="Default chat model.")
    model_plan: str | None = None
    model_assign: str | None = None
    model_execute: str | None = None
    model_review: str | None = None
    model_finalize: str | None = None
    agents_file: Path = Path("examples/agents.yaml")
    max_revise_rounds: int = Field(default=2, ge=0)
    max_tool_iterations: int = Field(default=4, ge=1)
    model_timeout_s: float = Field(default=60.0, gt=0)
    agent_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a task of a `runs: kafka` agent may take, unless the agent says.",
    )
    human_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a question for a human waits before it ends as rejected "
        "(`no answer within N s`); unset: it waits until answered or cancelled.",
    )
    model_max_attempts: int = Field(
        default=MODEL_MAX_ATTEMPTS,
        ge=1,
        le=20,
        description="Attempts of a model-calling node on transient provider faults.",
    )
    embeddings: str | None = Field(
        default=None, description="`provider:model` of the library's embeddings: hybrid search."
    )
    discovery_min_score: float = Field(default=0.3, ge=0, le=1)
    reuse_score: float = Field(default=0.75, ge=0, le=1)
    reuse: Literal["adapt", "direct", "off"] = "adapt"
    llm_cache: Literal["exact", "off"] = "off"
    library_seed: Path | None = Field(
        default=None, description="YAML template file or folder seeding `agentflow run`'s library."
    )
    data_dir: Path = Path(".agentflow")

    kafka_bootstrap: str | None = None
    redis_url: str | None = Field(default=None, repr=False)
    redis_cluster: bool = Field(
        default=False,
        description="`AGENTFLOW_REDIS_URL` names a node of a Redis Cluster: connect with "
        "redis-py's cluster client.",
    )
    library_redis_url: str | None = Field(
        default=None,
        repr=False,
        description="Redis of the workflow library (query engine needed, no cluster); default: "
        "the main one unless that is a cluster.",
    )
    consumer_group: str = "agentflow-workers"
    topic_events: str = "agentflow.events"
    topic_results: str = "agentflow.results"
    topic_sessions: str = "agentflow.sessions"
    topic_dlq: str = "agentflow.events.dlq"
    topic_agents_prefix: str = Field(
        default="agentflow.agents.",
        pattern=r"^[A-Za-z0-9._-]{0,49}$",
        description="An agent's tasks go to this prefix and its name.",
    )
    topic_agent_replies: str = Field(
        default="agentflow.agents.replies",
        description="Where agent hosts send their messages and replies.",
    )
    topic_partitions: int = Field(default=6, ge=1)
    create_topics: bool = True
    max_in_flight: int = Field(default=100, ge=1)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    session_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    checkpoint_retention: Literal["all", "latest"] = Field(
        default="all",
        description="What a finished session keeps until its TTL: every checkpoint, or the "
        "latest only (its agent conversations stay whole).",
    )
    multitask: MultitaskStrategy = Field(
        default="enqueue",
        description=(
            "What a new event does to a busy session when it does not say (its `multitask` "
            "attribute): reject, enqueue, interrupt or rollback."
        ),
    )
    transition_log_maxlen: int = Field(default=10_000, ge=100)
    subject_notes_max: int = Field(
        default=100, ge=1, description="Notes kept per subject; the oldest go first."
    )
    subject_ttl_s: int = Field(
        default=30 * 24 * 3600,
        ge=60,
        description="A subject's notes are dropped this long after its last note.",
    )
    max_event_bytes: int = Field(default=1024 * 1024, ge=1024)
    # At most 100: a checkpoint holds the event a few levels down, and msgpack (ormsgpack,
    # which writes the checkpoints) stops at 255 levels, Redis JSON (the stores) at 128.
    max_json_depth: int = Field(
        default=64,
        ge=2,
        le=100,
        description="JSON nesting of an event (the event is level 1); deeper is refused.",
    )
    max_id_bytes: int = Field(
        default=256, ge=36, description="Longest event id, in bytes of UTF-8 (a UUID is 36)."
    )
    producer_acks: Literal["0", "1", "all"] = "all"
    producer_idempotence: bool = Field(
        default=False, description="Enable on real Kafka; Tansu's memory storage lacks it."
    )
    kafka_transactions: bool = Field(
        default=False,
        description=(
            "Send each result with the offsets it makes safe in one Kafka transaction "
            "(brokers with transactions; Tansu's memory storage has none)."
        ),
    )
    metrics_port: int | None = None
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the worker's metrics listen on; `0.0.0.0` for remote scrapers.",
    )
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description=(
            "Bearer tokens of the HTTP API, comma-separated; empty: no auth. `name:token` "
            "names a token: answers given with it are recorded as that name's."
        ),
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    def named_tokens(self) -> list[tuple[str | None, str]]:
        """Return each API token with its name (None for a token given without one).

        An entry is `name:token` when what comes before its first `:` is a name (letters,
        digits, `.`, `_`, `-`); otherwise the whole entry is the token.
        """
        named: list[tuple[str | None, str]] = []
        for entry in self.api_tokens:
            name, colon, token = entry.partition(":")
            if colon and token and _TOKEN_NAME.fullmatch(name):
                named.append((name, token))
            else:
                named.append((None, entry))
        return named

    @field_validator("api_tokens", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("kafka_transactions")
    @classmethod
    def _transactions_need_acks_all(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("producer_acks", "all") != "all":
            raise ValueError("Kafka transactions need AGENTFLOW_PRODUCER_ACKS=all")
        return value

    @field_validator("model")
    @classmethod
    def _model_has_provider(cls, value: str) -> str:
        if value != "offline" and ":" not in value:
            raise ValueError("use `provider:model`, e.g. `openai:gpt-4.1-mini`, or `offline`")
        return value

    @field_validator("embeddings")
    @classmethod
    def _embeddings_have_provider(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("use `provider:model`, e.g. `openai:text-embedding-3-small`")
        return value or None

    def node_models(self) -> dict[str, str]:
        """Return the per-node model overrides that are set."""
        nodes = ("plan", "assign", "execute", "review", "finalize")
        return {n: m for n in nodes if (m := getattr(self, f"model_{n}"))}

    def agent_topic(self, agent: str) -> str:
        """Return the topic of an agent's tasks (and their cancellations)."""
        return f"{self.topic_agents_prefix}{agent}"

    def library_url(self) -> str | None:
        """Return the URL of the workflow library's Redis: its own, else the main one.

        None on a cluster without a library Redis of its own: the library's search index
        cannot live on a cluster.
        """
        if self.library_redis_url or self.redis_cluster:
            return self.library_redis_url
        return self.redis_url

    def event_limits(self) -> EventLimits:
        """Return what `CloudEvent.parse` allows of an incoming event."""
        return EventLimits(max_json_depth=self.max_json_depth, max_id_bytes=self.max_id_bytes)

    def model_retry(self) -> RetryPolicy:
        """Return the retry policy of the nodes that call models (`build_graph` takes it)."""
        return model_retry(self.model_max_attempts)

    def context(self, **overrides: object) -> WorkflowContext:
        """Build the per-run options the graph reads."""
        values: dict[str, object] = {
            "model": self.model,
            "node_models": self.node_models(),
            "agents_file": str(self.agents_file),
            "max_revise_rounds": self.max_revise_rounds,
            "max_tool_iterations": self.max_tool_iterations,
            "model_timeout_s": self.model_timeout_s,
            "agent_timeout_s": self.agent_timeout_s,
            "min_similarity": self.discovery_min_score,
            "reuse": self.reuse,
            "reuse_score": self.reuse_score,
        }
        values.update(overrides)
        return WorkflowContext(**values)  # type: ignore[arg-type]


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment.

    Raises:
        ConfigError: a variable has a value that cannot be used.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "AGENTFLOW_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def redact_url(url: str | None) -> str:
    """Return a URL fit for logs and messages: its password replaced by `***`."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
