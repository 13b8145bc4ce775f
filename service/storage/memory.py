"""Memory that outlives a session: subject notes, the LLM cache, conversation history.

- Subject memory: `finalize` keeps a `SessionNote` per run under its CloudEvents
  `subject` in LangGraph's long-term store; agents read the notes with the
  `recall_subject` tool. On Redis that store is `RedisNoteStore`: plain Redis (no
  modules), each namespace a bounded, time-ordered list of items.
- LLM cache: `AGENTFLOW_LLM_CACHE=exact` sets langchain-redis's exact `RedisCache` as
  LangChain's process-wide cache; replayed answers count as `usage.cached_calls`.
- Conversation history: what each agent said on each step, read from the checkpointer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AnyMessage
from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    validate_op_namespace,
)

from nodes.models import CloudEvent, HumanAnswer, SessionNote, Step, subject_namespace
from service.config import redact_url
from service.errors import ConfigError
from service.storage._redis import RedisClient, require_text_client
from service.storage.checkpoints import session_states
from service.storage.keys import LLM_CACHE_PREFIX, memory_keys

if TYPE_CHECKING:
    from langchain_core.caches import BaseCache
    from langgraph.graph.state import CompiledStateGraph

    from service.config import Settings

__all__ = [
    "RedisNoteStore",
    "RunConversation",
    "check_llm_cache",
    "install_llm_cache",
    "open_subject_store",
    "session_history",
    "subject_notes",
]

logger = logging.getLogger(__name__)

SUBJECT_NOTES_MAX = 100
"""Items a namespace keeps by default (`AGENTFLOW_SUBJECT_NOTES_MAX`)."""
SUBJECT_TTL_S = 30 * 24 * 3600
"""How long a namespace is kept after its last write, by default (`AGENTFLOW_SUBJECT_TTL_S`)."""

# Each script is passed every key it touches (one namespace's three keys, one hash tag).
# Times are Redis's own clock in microseconds, written as digits: exact in a score.
_PUT = """
local now = redis.call('TIME')
now = now[1] .. string.format('%06d', tonumber(now[2]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSETNX', KEYS[2], ARGV[1], now)
redis.call('ZADD', KEYS[3], now, ARGV[1])
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[3])
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[3], excess)
  for i = 1, #oldest, 2 do
    redis.call('HDEL', KEYS[1], oldest[i])
    redis.call('HDEL', KEYS[2], oldest[i])
  end
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return math.max(excess, 0)
"""

_DELETE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[3], ARGV[1])
"""

# Newest first: key, updated, created, value for each item from rank ARGV[1] to ARGV[2].
_RANGE = """
local ranked = redis.call('ZREVRANGE', KEYS[3], ARGV[1], ARGV[2], 'WITHSCORES')
if #ranked == 0 then return {} end
local names = {}
for i = 1, #ranked, 2 do names[#names + 1] = ranked[i] end
local values = redis.call('HMGET', KEYS[1], unpack(names))
local created = redis.call('HMGET', KEYS[2], unpack(names))
local out = {}
for i, name in ipairs(names) do
  out[#out + 1] = name
  out[#out + 1] = ranked[2 * i]
  out[#out + 1] = created[i] or ranked[2 * i]
  out[#out + 1] = values[i] or ''
end
return out
"""

_GET = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
local updated = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not value or not updated then return false end
return {updated, redis.call('HGET', KEYS[2], ARGV[1]) or updated, value}
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time(micros: str) -> datetime:
    return _EPOCH + timedelta(microseconds=int(float(micros)))


class RedisNoteStore(BaseStore):
    """LangGraph's long-term store on plain Redis: per namespace, a bounded list of items.

    Made for subject memory (`finalize` puts a note, `recall_subject` lists them) and
    needing no Redis module. A namespace keeps at most `max_items` items: a put beyond
    that drops the least recently updated ones. Its keys expire `ttl_s` after its last
    put, so memory cannot grow without end. An item's key is matched exactly.

    What it does not do (it raises `NotImplementedError`): `search` with a `query` or a
    `filter`, listing namespaces, per-item TTLs, and the synchronous methods. `search`
    lists the items of exactly the namespace it is given (not of deeper ones), most
    recently updated first.

    Args:
        redis: a client made with `decode_responses=True`.
        max_items: how many items a namespace keeps.
        ttl_s: seconds a namespace is kept after its last put.

    Raises:
        TypeError: the client answers bytes.
    """

    def __init__(
        self, redis: RedisClient, *, max_items: int = SUBJECT_NOTES_MAX, ttl_s: int = SUBJECT_TTL_S
    ) -> None:
        self.redis = require_text_client(redis, "RedisNoteStore")
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._put_script = self.redis.register_script(_PUT)
        self._delete_script = self.redis.register_script(_DELETE)
        self._range_script = self.redis.register_script(_RANGE)
        self._get_script = self.redis.register_script(_GET)

    def __repr__(self) -> str:
        return f"RedisNoteStore(max_items={self.max_items}, ttl_s={self.ttl_s})"

    async def setup(self) -> None:
        """Load the store's scripts into Redis (done again by itself after NOSCRIPT)."""
        for source in (_PUT, _DELETE, _RANGE, _GET):
            await self.redis.script_load(source)

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Refuse: the store is asynchronous (`aget`, `aput`, `asearch`, `adelete`)."""
        raise NotImplementedError("RedisNoteStore is asynchronous: use aget, aput, asearch")

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the operations one after another, in order."""
        results: list[Result] = []
        for op in ops:
            validate_op_namespace(op)
            if isinstance(op, GetOp):
                results.append(await self._get(op))
            elif isinstance(op, PutOp):
                await self._put(op)
                results.append(None)
            elif isinstance(op, SearchOp):
                results.append(await self._search(op))
            elif isinstance(op, ListNamespacesOp):
                raise NotImplementedError("RedisNoteStore does not list namespaces")
            else:
                raise TypeError(f"unknown store operation {op!r}")
        return results

    async def _get(self, op: GetOp) -> Item | None:
        found = await self._get_script(keys=memory_keys(op.namespace), args=[op.key])
        if not found:
            return None
        updated, created, value = found
        return Item(
            value=json.loads(value),
            key=op.key,
            namespace=op.namespace,
            created_at=_time(created),
            updated_at=_time(updated),
        )

    async def _put(self, op: PutOp) -> None:
        keys = memory_keys(op.namespace)
        if op.value is None:
            await self._delete_script(keys=keys, args=[op.key])
            return
        if op.ttl is not None:
            raise NotImplementedError("RedisNoteStore keeps no per-item TTL; ttl_s is per store")
        value = json.dumps(op.value, ensure_ascii=False, separators=(",", ":"))
        await self._put_script(keys=keys, args=[op.key, value, self.max_items, self.ttl_s])

    async def _search(self, op: SearchOp) -> list[SearchItem]:
        if op.query or op.filter:
            raise NotImplementedError("RedisNoteStore lists a namespace: no query, no filter")
        if not op.namespace_prefix or op.limit <= 0:
            return []
        start = max(op.offset, 0)
        flat = await self._range_script(
            keys=memory_keys(op.namespace_prefix), args=[start, start + op.limit - 1]
        )
        items = []
        for i in range(0, len(flat), 4):
            key, updated, created, value = flat[i : i + 4]
            if not value:  # its value was deleted by hand: the order names it still
                continue
            items.append(
                SearchItem(
                    namespace=op.namespace_prefix,
                    key=key,
                    value=json.loads(value),
                    created_at=_time(created),
                    updated_at=_time(updated),
                )
            )
        return items


async def open_subject_store(
    redis: RedisClient, *, max_notes: int = SUBJECT_NOTES_MAX, ttl_s: int = SUBJECT_TTL_S
) -> RedisNoteStore:
    """Open subject memory (LangGraph's long-term store) on an existing text client.

    Args:
        redis: a client made with `decode_responses=True`.
        max_notes: notes kept per subject (`AGENTFLOW_SUBJECT_NOTES_MAX`).
        ttl_s: a subject's notes are dropped this long after its last one
            (`AGENTFLOW_SUBJECT_TTL_S`).
    """
    store = RedisNoteStore(redis, max_items=max_notes, ttl_s=ttl_s)
    await store.setup()
    return store


async def subject_notes(store: Any, subject: str, limit: int = 50) -> list[SessionNote]:
    """Return the notes kept for a subject, latest first."""
    namespace = subject_namespace(subject)
    items = await store.asearch(namespace, limit=limit)
    # A store may search by namespace prefix: keep this subject's own notes only.
    notes = [SessionNote.model_validate(i.value) for i in items if tuple(i.namespace) == namespace]
    return sorted(notes, key=lambda n: n.finished_at, reverse=True)


async def check_llm_cache(redis: RedisClient, settings: Settings) -> None:
    """Check that the Redis can hold the LLM cache `AGENTFLOW_LLM_CACHE` asks for.

    The exact cache (langchain-redis `RedisCache`) keeps each answer as a JSON document,
    through a client of one Redis.

    Raises:
        ConfigError: the cache is on and the Redis is a cluster or has no JSON module.
    """
    if settings.llm_cache != "exact":
        return
    if settings.redis_cluster:
        raise ConfigError(
            "AGENTFLOW_LLM_CACHE=exact keeps model answers through langchain-redis, which "
            "connects to one Redis, not a cluster: set AGENTFLOW_LLM_CACHE=off with "
            "AGENTFLOW_REDIS_CLUSTER=true"
        )
    from redis.exceptions import ResponseError

    try:
        await redis.execute_command("JSON.TYPE", f"{LLM_CACHE_PREFIX}:probe")
    except ResponseError as exc:
        if "unknown command" not in str(exc).lower():
            raise
        raise ConfigError(
            "AGENTFLOW_LLM_CACHE=exact keeps model answers as JSON documents, and the Redis "
            f"at {redact_url(settings.redis_url)} has no JSON module: set "
            "AGENTFLOW_LLM_CACHE=off, or use a Redis with the JSON module"
        ) from None


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
    """One event's run in a session: its steps, each step's conversation, the humans' answers."""

    event: CloudEvent
    steps: list[Step]
    conversations: dict[str, list[AnyMessage]] = field(default_factory=dict)
    answers: list[HumanAnswer] = field(default_factory=list)


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
            answers=list(values.get("answers") or []),
        )
    return list(reversed(runs.values()))
