"""Memory that outlives a session: subject notes, the LLM cache, conversation history.

- Subject memory: `finalize` keeps a `SessionNote` per run under its CloudEvents
  `subject` in LangGraph's long-term store (`AsyncRedisStore` from
  langgraph-checkpoint-redis here); agents read the notes with the `recall_subject` tool.
- LLM cache: `AGENTFLOW_LLM_CACHE=exact` sets langchain-redis's exact `RedisCache` as
  LangChain's process-wide cache; replayed answers count as `usage.cached_calls`.
- Conversation history: what each agent said on each step, read from the checkpointer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AnyMessage

from nodes.models import CloudEvent, SessionNote, Step, subject_namespace
from service.storage._redis import quiet_index_setup
from service.storage.checkpoints import session_states
from service.storage.keys import LLM_CACHE_PREFIX

if TYPE_CHECKING:
    from langchain_core.caches import BaseCache
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.store.redis.aio import AsyncRedisStore
    from redis.asyncio import Redis

    from service.config import Settings

__all__ = [
    "RunConversation",
    "install_llm_cache",
    "open_subject_store",
    "session_history",
    "subject_notes",
]

logger = logging.getLogger(__name__)


async def open_subject_store(redis: Redis) -> AsyncRedisStore:
    """Set up LangGraph's long-term store on an existing Redis client (of either mode)."""
    from langgraph.store.redis.aio import AsyncRedisStore

    try:
        store = AsyncRedisStore(redis_client=redis)
    except TypeError:
        # langgraph-checkpoint-redis 0.5 first builds a throwaway *sync* SearchIndex on the
        # async client, which redisvl 0.28 refuses; the async store replaces it with an
        # AsyncSearchIndex right after, so let the throwaway one be async too.
        import langgraph.store.redis.base as store_base
        from redisvl.index import AsyncSearchIndex

        sync_index = store_base.SearchIndex
        store_base.SearchIndex = AsyncSearchIndex  # type: ignore[misc]
        try:
            store = AsyncRedisStore(redis_client=redis)
        finally:
            store_base.SearchIndex = sync_index  # type: ignore[misc]
    with quiet_index_setup():
        await store.setup()
    return store


async def subject_notes(store: Any, subject: str, limit: int = 50) -> list[SessionNote]:
    """Return the notes kept for a subject, latest first."""
    namespace = subject_namespace(subject)
    items = await store.asearch(namespace, limit=limit)
    # The search is by namespace prefix: keep this subject's own notes only.
    notes = [SessionNote.model_validate(i.value) for i in items if tuple(i.namespace) == namespace]
    return sorted(notes, key=lambda n: n.finished_at, reverse=True)


def install_llm_cache(settings: Settings) -> BaseCache | None:
    """Set LangChain's process-wide LLM cache as `AGENTFLOW_LLM_CACHE` asks.

    `exact` caches each answer in Redis under `agentflow:llmcache:*` for
    `AGENTFLOW_SESSION_TTL_S`; `off` leaves the global cache as it is.

    Returns:
        The cache that was set, or None.
    """
    if settings.llm_cache != "exact":
        return None
    from langchain_core.globals import set_llm_cache
    from langchain_redis import RedisCache

    if not settings.redis_url:
        raise ValueError("AGENTFLOW_LLM_CACHE=exact needs AGENTFLOW_REDIS_URL")
    cache = RedisCache(
        redis_url=settings.redis_url, ttl=settings.session_ttl_s, prefix=LLM_CACHE_PREFIX
    )
    set_llm_cache(cache)
    logger.info("exact LLM cache on in Redis (%s:*)", LLM_CACHE_PREFIX)
    return cache


@dataclass
class RunConversation:
    """One event's run in a session: its steps and each step's conversation."""

    event: CloudEvent
    steps: list[Step]
    conversations: dict[str, list[AnyMessage]] = field(default_factory=dict)


async def session_history(graph: CompiledStateGraph, session_id: str) -> list[RunConversation]:
    """Read a session's conversations from its checkpoints, one entry per event, oldest first.

    A session may handle several events; each run starts from a clean slate, so the
    latest checkpoint of each event holds that run's conversations.
    """
    runs: dict[str, RunConversation] = {}
    async for snapshot in session_states(graph, session_id):  # newest first
        values = snapshot.values or {}
        event = values.get("event")
        if isinstance(event, dict):
            event = CloudEvent.model_validate(event)
        if not isinstance(event, CloudEvent) or event.id in runs:
            continue
        runs[event.id] = RunConversation(
            event=event,
            steps=list(values.get("steps") or []),
            conversations=dict(values.get("conversations") or {}),
        )
    return list(reversed(runs.values()))
