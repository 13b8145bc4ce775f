"""What start-up opens and checks: the Redis and Kafka clients, the graph's stores, the config.

One factory per client, so every caller connects the same way: `redis_client`,
`kafka_producer`, `kafka_consumer`, and `ensure_topics` for the topics. `open_graph` opens
what a graph run needs on Redis (checkpointer, workflow library, subject memory, LLM cache).
`check_startup` checks what the configuration names (agents file and tools, models,
library seed) before anything connects, and `log_startup` says what a component runs with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, TopicAlreadyExistsError
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

from graphs.workflow import build_graph
from nodes.agents import AgentRegistry, load_agents
from nodes.chat_models import OFFLINE, make_chat_model
from nodes.errors import AgentConfigError, ModelConfigError
from service.config import Settings, redact_url
from service.errors import ConfigError, NoQueryEngineError, TemplateError
from service.storage._redis import RedisClient, quiet_index_setup
from service.storage.checkpoints import checkpoint_serde, open_checkpointer
from service.storage.library import (
    RedisWorkflowLibrary,
    UnavailableLibrary,
    load_templates,
    open_library,
)
from service.storage.memory import check_llm_cache, install_llm_cache, open_subject_store

if TYPE_CHECKING:
    from langgraph.graph.state import CompiledStateGraph

    from nodes.context import WorkflowContext

__all__ = [
    "INFRA_ERRORS",
    "RedisClient",
    "LongRunning",
    "SessionCheckpoints",
    "check_hosting",
    "check_startup",
    "ensure_topics",
    "is_infra_error",
    "infra_cause",
    "kafka_admin",
    "kafka_consumer",
    "kafka_producer",
    "log_startup",
    "max_request_bytes",
    "open_graph",
    "open_session_checkpointer",
    "redis_client",
    "require_services",
    "restore_setup",
    "serve_until_signal",
    "setup_lost",
    "startup_summary",
]

logger = logging.getLogger(__name__)

INFRA_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    KafkaConnectionError,
    KafkaTimeoutError,
    ConnectionError,
)
"""Errors that mean Redis or Kafka is away: retried with backoff, never a failed run."""


# What RediSearch answers for an index that is not there: Redis 8 says "<name>: no such
# index", older RediSearch "Unknown index name".
_NO_INDEX = ("no such index", "unknown index name")


def _causes(exc: BaseException) -> list[BaseException]:
    """Return `exc` and the errors it was raised from (libraries wrap Redis errors)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def infra_cause(exc: BaseException) -> BaseException | None:
    """Return the error behind `exc` that means Redis or Kafka is away, if there is one.

    Libraries wrap connection errors (redisvl raises `RedisVLError` from them), so the
    whole cause chain counts.
    """
    return next((e for e in _causes(exc) if isinstance(e, INFRA_ERRORS)), None)


def setup_lost(exc: BaseException) -> BaseException | None:
    """Return the error behind `exc` that says Redis lost what start-up set up, if any.

    A Redis that restarts without persistence comes back without the search indexes
    `open_graph` made, and RediSearch answers "checkpoint: no such index". That is
    cured by `restore_setup`, then the same work again; it is not a failed run.
    """
    for error in _causes(exc):
        text = str(error).lower()
        if isinstance(error, redis.exceptions.ResponseError) and any(
            marker in text for marker in _NO_INDEX
        ):
            return error
    return None


def is_infra_error(exc: BaseException) -> bool:
    """Whether an error means Redis or Kafka is away or lost its setup: retry, never fail.

    True when the error, or one it was raised from, is a connection error
    (`infra_cause`) or a missing search index (`setup_lost`).
    """
    return infra_cause(exc) is not None or setup_lost(exc) is not None


# --- clients ---------------------------------------------------------------------------


@overload
def redis_client(
    url: str,
    *,
    cluster: Literal[False] = False,
    max_connections: int = 64,
    decode_responses: bool = True,
    socket_connect_timeout: float | None = None,
) -> Redis: ...


@overload
def redis_client(
    url: str,
    *,
    cluster: bool,
    max_connections: int = 64,
    decode_responses: bool = True,
    socket_connect_timeout: float | None = None,
) -> RedisClient: ...


def redis_client(
    url: str,
    *,
    cluster: bool = False,
    max_connections: int = 64,
    decode_responses: bool = True,
    socket_connect_timeout: float | None = None,
) -> RedisClient:
    """Make a Redis client: of one Redis, whose pool waits for a free connection, or a cluster's.

    Replies come as text by default. The checkpointer reads its binary records undecoded,
    so it works on either; redisvl keeps JSON documents and decodes what it gets when it
    is bytes; the subject store needs text.

    Args:
        url: `redis://` or `rediss://` (TLS); credentials and database go in the URL. For
            a cluster, any one node (`AGENTFLOW_REDIS_CLUSTER`): the client finds the others.
        cluster: make redis-py's `RedisCluster`, which sends each command to the node of
            its keys' slot. Its pools do not wait: a node's pool that is full fails a
            command with `MaxConnectionsError` (a `ConnectionError`).
        max_connections: pool size (per node of a cluster); a worker needs one per run in
            flight and a few more.
        decode_responses: replies as `str` (True) or `bytes`.
        socket_connect_timeout: seconds to wait for a connection; None waits as long as
            the operating system does.
    """
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            health_check_interval=10,
            decode_responses=decode_responses,
            socket_connect_timeout=socket_connect_timeout,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=30,
        health_check_interval=10,
        decode_responses=decode_responses,
        socket_connect_timeout=socket_connect_timeout,
    )
    return Redis(connection_pool=pool)


def require_services(settings: Settings, *, kafka: bool = True, redis: bool = True) -> None:
    """Check that the settings name the Kafka and Redis a component needs.

    Raises:
        ConfigError: naming the variables to set.
    """
    missing = [
        name
        for name, needed, value in (
            ("AGENTFLOW_KAFKA_BOOTSTRAP", kafka, settings.kafka_bootstrap),
            ("AGENTFLOW_REDIS_URL", redis, settings.redis_url),
        )
        if needed and not value
    ]
    if missing:
        raise ConfigError(
            f"set {' and '.join(missing)} to reach "
            f"{' and '.join(n.split('_')[1].title() for n in missing)} "
            "(`agentflow dev` starts local servers and prints their addresses)"
        )


def _bootstrap_servers(settings: Settings) -> str:
    require_services(settings, redis=False)
    assert settings.kafka_bootstrap is not None
    return settings.kafka_bootstrap


def max_request_bytes(settings: Settings) -> int:
    """Return the largest record a producer of `kafka_producer` sends.

    Results carry the whole workflow: room for twice the largest event.
    """
    return max(settings.max_event_bytes * 2, 1024 * 1024)


def kafka_producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """Make (not start) a producer as the settings ask: acks, idempotence, request size.

    Args:
        settings: `AGENTFLOW_KAFKA_BOOTSTRAP`, `_PRODUCER_ACKS`, `_PRODUCER_IDEMPOTENCE`
            and `_MAX_EVENT_BYTES` are read.
        **options: further `AIOKafkaProducer` options, e.g. `request_timeout_ms`.

    Raises:
        ConfigError: `AGENTFLOW_KAFKA_BOOTSTRAP` is not set.
    """
    return AIOKafkaProducer(
        bootstrap_servers=_bootstrap_servers(settings),
        acks="all" if settings.producer_acks == "all" else int(settings.producer_acks),
        enable_idempotence=settings.producer_idempotence,
        max_request_size=max_request_bytes(settings),
        **options,
    )


def kafka_consumer(
    settings: Settings, *topics: str, group_id: str | None = None, **options: Any
) -> AIOKafkaConsumer:
    """Make (not start) a consumer that commits only by hand and starts at the earliest.

    Fetch sizes leave room for the largest event `AGENTFLOW_MAX_EVENT_BYTES` allows. With
    `AGENTFLOW_KAFKA_TRANSACTIONS` it reads committed records only.

    Args:
        settings: `AGENTFLOW_KAFKA_BOOTSTRAP`, `_MAX_EVENT_BYTES` and `_KAFKA_TRANSACTIONS`
            are read.
        *topics: topics to subscribe to now (or call `subscribe` later).
        group_id: the consumer group; None reads without one.
        **options: further `AIOKafkaConsumer` options, e.g. `client_id`.

    Raises:
        ConfigError: `AGENTFLOW_KAFKA_BOOTSTRAP` is not set.
    """
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=_bootstrap_servers(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # With transactions, records of aborted or open transactions are not results yet.
        isolation_level="read_committed" if settings.kafka_transactions else "read_uncommitted",
        max_partition_fetch_bytes=max(settings.max_event_bytes * 2, 1024 * 1024),
        fetch_max_bytes=max(settings.max_event_bytes * 4, 8 * 1024 * 1024),
        **options,
    )


def kafka_admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    """Make (not start) an admin client for the settings' Kafka.

    Raises:
        ConfigError: `AGENTFLOW_KAFKA_BOOTSTRAP` is not set.
    """
    return AIOKafkaAdminClient(bootstrap_servers=_bootstrap_servers(settings), **options)


async def ensure_topics(settings: Settings, *, agents: Collection[str] = ()) -> None:
    """Create the service's topics that do not exist yet.

    Those are the events, results, sessions, dead-letter and agent replies topics, and
    the task topic of each of `agents`. The replies topic gets the events topic's
    partition count, so a session's replies land in the partition number its events do
    (same key, same default partitioner).

    Args:
        settings: the topic names and `AGENTFLOW_TOPIC_PARTITIONS`.
        agents: names of agents that run over Kafka (`runs: kafka`, or hosted here).

    Raises:
        ConfigError: `AGENTFLOW_KAFKA_BOOTSTRAP` is not set.
    """
    admin = kafka_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        partitions = dict.fromkeys(
            [
                settings.topic_events,
                settings.topic_results,
                settings.topic_sessions,
                settings.topic_dlq,
                *(settings.agent_topic(name) for name in agents),
            ],
            settings.topic_partitions,
        )
        if settings.topic_events in existing:
            (described,) = await admin.describe_topics([settings.topic_events])
            partitions[settings.topic_agent_replies] = len(described["partitions"])
        else:
            partitions[settings.topic_agent_replies] = settings.topic_partitions
        missing = [
            NewTopic(topic, num_partitions=count, replication_factor=1)
            for topic, count in partitions.items()
            if topic not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(missing)
            logger.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()


async def open_graph(
    redis: RedisClient, settings: Settings, *, library_redis: Redis | None = None
) -> tuple[CompiledStateGraph[Any, Any, Any, Any], WorkflowContext]:
    """Open what a graph run needs on Redis and return the graph and its run options.

    The graph gets the Redis checkpointer and the subject memory store; the options get
    the workflow library (with `AGENTFLOW_EMBEDDINGS`, if set). `AGENTFLOW_LLM_CACHE` is
    installed as LangChain's process-wide cache. Everything but the library needs plain
    Redis only, on one Redis or a cluster; a library Redis without the query engine, or
    none on a cluster, leaves the library off, with one warning: discovery then goes
    without examples, as when the library is away.

    Args:
        redis: the client of `AGENTFLOW_REDIS_URL`.
        settings: the service's settings.
        library_redis: the client of `AGENTFLOW_LIBRARY_REDIS_URL` when the library lives
            on a Redis of its own; None: on `redis`, unless that is a cluster.

    Raises:
        ValueError: `AGENTFLOW_EMBEDDINGS` or `AGENTFLOW_LLM_CACHE` cannot be used.
        ConfigError: `AGENTFLOW_LLM_CACHE` asks for what the Redis cannot hold.
    """
    await check_llm_cache(redis, settings)
    checkpointer = await open_checkpointer(redis)
    library = await _open_library_or_off(library_redis or redis, settings)
    subject_store = await open_subject_store(
        redis, max_notes=settings.subject_notes_max, ttl_s=settings.subject_ttl_s
    )
    install_llm_cache(settings)
    graph = build_graph(checkpointer, store=subject_store, model_retry=settings.model_retry())
    return graph, settings.context(library=library)


async def _open_library_or_off(
    redis: RedisClient, settings: Settings
) -> RedisWorkflowLibrary | UnavailableLibrary:
    """Open the workflow library; on a cluster or a Redis without the query engine, warn: off."""
    if isinstance(redis, RedisCluster):
        logger.warning(
            "workflow library off, sessions plan without examples: its search index cannot "
            "live on the Redis Cluster of AGENTFLOW_REDIS_URL; set AGENTFLOW_LIBRARY_REDIS_URL "
            "to a Redis (not a cluster) with the query engine"
        )
        return UnavailableLibrary("AGENTFLOW_LIBRARY_REDIS_URL is not set on a Redis Cluster")
    try:
        return await open_library(redis, embeddings=settings.embeddings)
    except NoQueryEngineError as exc:
        logger.warning("workflow library off, sessions plan without examples: %s", exc)
        return UnavailableLibrary(f"the Redis at {exc.address} has no query engine")


async def restore_setup(
    graph: CompiledStateGraph[Any, Any, Any, Any], context: Any, *, with_library: bool = True
) -> None:
    """Set up again on Redis what `open_graph` set up: the indexes of its stores.

    For a Redis that came back empty (restarted without persistence). Each setup
    creates only what is missing, so running it on an intact Redis changes nothing. The
    transition publisher needs nothing here: it loads its script again when Redis
    answers NOSCRIPT.

    Args:
        graph: the graph `open_graph` returned (its checkpointer and subject store).
        context: the run options `open_graph` returned (its workflow library).
        with_library: set the library up too; False when it lives on a Redis of its
            own, whose outages only make discovery go without examples.
    """
    # Typed as LangGraph's bases, which have no setup: these are the Redis saver and store.
    checkpointer: Any = graph.checkpointer
    store: Any = graph.store
    with quiet_index_setup():
        await checkpointer.asetup()
        if store is not None:
            await store.setup()
    library = getattr(context, "library", None)
    if with_library and isinstance(library, RedisWorkflowLibrary):
        await library.setup()


# --- start-up checks -------------------------------------------------------------------


def check_startup(settings: Settings) -> None:
    """Check what start-up needs: the agents file and its tools, the models, the library seed.

    Models of agents that run over Kafka are their hosts' to check.

    Raises:
        ConfigError: with a sentence naming the variable or file and what to fix.
    """
    try:
        registry = load_agents(settings.agents_file)
    except AgentConfigError as exc:
        raise ConfigError(str(exc)) from None
    local = [n for n in registry.names if registry.get(n).runs == "local"]
    _check_models(settings, registry, local)
    if settings.library_seed is not None:
        try:
            load_templates(settings.library_seed, registry)
        except TemplateError as exc:
            raise ConfigError(f"AGENTFLOW_LIBRARY_SEED: {exc}") from None


def check_hosting(settings: Settings, agents: Sequence[str] = ()) -> AgentRegistry:
    """Check what an agent host needs: the agents it serves, their tools and models.

    Args:
        settings: `AGENTFLOW_AGENTS_FILE` names the file with the agents' full specs.
        agents: the agents to serve; none: every `runs: kafka` agent of the file.

    Returns:
        The registry, with the served agents' tools ready; its `hosted` names them.

    Raises:
        ConfigError: with a sentence naming the file or agent and what to fix.
    """
    try:
        names = list(agents) or load_agents(settings.agents_file).remote_names
        if not names:
            raise ConfigError(
                f"agents file {settings.agents_file} has no agent with `runs: kafka` to host; "
                "mark the agents this host serves so, or name them with --agent"
            )
        registry = load_agents(settings.agents_file, hosted=names)
    except AgentConfigError as exc:
        raise ConfigError(str(exc)) from None
    _check_models(settings, registry, names)
    return registry


def _check_models(settings: Settings, registry: AgentRegistry, agents: Sequence[str]) -> None:
    """Make every model the runs will use, so a model that cannot work stops start-up."""
    specs: list[tuple[str, str, str]] = [("AGENTFLOW_MODEL", settings.model, "")]
    specs += [
        (f"AGENTFLOW_MODEL_{node.upper()}", spec, "")
        for node, spec in settings.node_models().items()
    ]
    for name in agents:
        if spec := registry.get(name).model:
            where = f"the model of agent '{name}' in {settings.agents_file}"
            specs.append((where, spec, "remove its `model:` line"))
    for where, spec, other_fix in specs:
        fix = other_fix or f"set {where}=offline to run without an LLM"
        if spec.startswith("openai:") and not os.environ.get("OPENAI_API_KEY"):
            # The OpenAI client refuses to start without a key, even for a local server.
            raise ConfigError(
                f"{_named(where, spec)} needs OPENAI_API_KEY: export OPENAI_API_KEY=... (any "
                "value will do for a local OpenAI-compatible server named by OPENAI_BASE_URL), "
                f"or {fix}"
            )
        try:
            make_chat_model(spec, timeout_s=settings.model_timeout_s)
        except ModelConfigError as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(
                f"{_named(where, spec)} cannot be used ({cause}); install the provider's "
                f"package and set its credentials, or {fix}"
            ) from None


def _named(where: str, spec: str) -> str:
    return f"{where}={spec}" if where.startswith("AGENTFLOW_") else f"{where} ({spec})"


def startup_summary(settings: Settings) -> str:
    """Say what the service runs with: the agents file, the models and the reuse mode."""
    agents = str(settings.agents_file)
    if "agents_file" not in settings.model_fields_set:
        agents += " (the example; AGENTFLOW_AGENTS_FILE names your own)"
    model = settings.model
    if model == OFFLINE:
        model += " (deterministic, no LLM is called)"
    overrides = settings.node_models()
    if overrides:
        model += ", " + ", ".join(f"{node} {spec}" for node, spec in overrides.items())
    reuse: str = settings.reuse
    if reuse != "off":
        reuse += f" at score {settings.reuse_score}"
    return f"agents {agents}; model {model}; reuse {reuse}"


def log_startup(settings: Settings, component: str) -> None:
    """Log one line saying what a component (worker, gateway, dev) runs with."""
    logger.info("%s: %s", component, startup_summary(settings))


class LongRunning(Protocol):
    """A component with the worker's lifecycle: the worker, an agent host."""

    name: str

    async def start(self) -> None:
        """Connect and set up."""

    def stop(self) -> None:
        """Ask `run` to stop taking work."""

    async def run(self) -> None:
        """Work until `stop()`, then `close()`."""

    async def close(self) -> None:
        """Drain within the grace period, commit, disconnect."""


async def serve_until_signal(component: LongRunning) -> None:
    """Start, run until SIGTERM or SIGINT, then drain and close: a component's whole life.

    A signal while connecting stops the start-up (which may wait on an unreachable
    server) and closes what it opened; a signal later stops the run loop gracefully.
    """
    starting = asyncio.ensure_future(component.start())
    signalled = False

    def on_signal() -> None:
        nonlocal signalled
        signalled = True
        if not starting.done():
            starting.cancel()
        component.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await starting
    except asyncio.CancelledError:
        if not signalled:
            raise  # cancelled from outside, not by a signal
        logger.info("%s stopped while starting", component.name)
        await component.close()
        return
    await component.run()


@dataclass
class SessionCheckpoints:
    """The checkpointer that holds the sessions, and where it is."""

    saver: Any
    """The checkpointer: Redis (the worker's) or SQLite (`agentflow run`'s)."""
    redis: RedisClient | None
    """The Redis client when sessions live in Redis (for their logs and records)."""
    where: str
    """Where the checkpoints are, for messages."""


@contextlib.asynccontextmanager
async def open_session_checkpointer(settings: Settings) -> AsyncIterator[SessionCheckpoints]:
    """Open the checkpointer sessions live in: Redis when configured, else `agentflow run`'s.

    Raises:
        FileNotFoundError: no Redis is configured and `agentflow run` kept no checkpoints;
            its argument is the missing file.
    """
    if settings.redis_url:
        client = redis_client(
            settings.redis_url, cluster=settings.redis_cluster, socket_connect_timeout=5
        )
        try:
            saver = await open_checkpointer(client)
            yield SessionCheckpoints(saver, client, f"Redis at {redact_url(settings.redis_url)}")
        finally:
            await client.aclose()
        return
    path = settings.data_dir / "checkpoints.sqlite"
    if not path.exists():
        raise FileNotFoundError(path)
    async with AsyncSqliteSaver.from_conn_string(str(path)) as sqlite:
        sqlite.serde = checkpoint_serde()
        yield SessionCheckpoints(sqlite, None, str(path))
