r"""`RedisSaver`: LangGraph's checkpointer on plain Redis (core commands and Lua, no modules).

Every key of a thread shares one hash tag, so a thread lives in one cluster slot and every
script is given every key it touches:

- `agentflow:checkpoint:{thread}:i` (sorted set, score 0, ordered by member): the index.
  `c\0<ns>\0<checkpoint id>` for each checkpoint, `w\0<ns>\0<checkpoint id>\0<task id>\0<idx>`
  for each pending write, `r\0<run id>` for each run that wrote the thread. Checkpoint ids
  sort by time, so the latest of a namespace is the last member of its range.
- `agentflow:checkpoint:{thread}:d` (hash): the data. The index's `c` and `w` members are its
  fields, and `b\0<ns>\0<channel>\0<version>` holds a channel value (a blob) once per
  version: a checkpoint stores only the channels that changed, as LangGraph's own savers do.
- `agentflow:checkpoint_run:{run id}` (set): the threads a run wrote, for
  `adelete_for_runs`; written once per run and thread, before the run's first checkpoint.

A checkpoint and its blobs are written by one script, so a reader (or a crash) sees the
old or the new checkpoint, never half of one. Thread ids that would break the hash tag
(empty, or with a `}`) are keyed by their SHA-1 instead, under `agentflow:checkpoint#`.

Fenced writes: a write whose config carries a run's epoch (`configurable[EPOCH_CONFIG_KEY]`,
which the worker's runs set) is refused, inside its script, unless the session's epoch key
(`agentflow:session:{thread}:epoch`, `service.storage.keys.epoch_key`) still holds that
epoch: the caller gets `StaleWriter` when a newer run took the session (so a run that lost
its session to another worker cannot fork the thread's checkpoints), `EpochLost` when Redis
lost the key. The epoch key is the session's, with the thread id as its hash
tag: the same slot as the thread's keys, so the script may be given it on Redis Cluster.
A SHA-1 keyed thread id would put the two in different slots, so such a thread cannot be
fenced (a ValueError; session ids never are one). Writes without an epoch (library use)
are not fenced.

Saved writes: a run that puts a `SavedWrites` in its config (`SAVED_WRITES_CONFIG_KEY`) is
told of each task whose writes are stored, so it announces a task as finished only then.

Values are serialised by the saver's `serde` (LangGraph's msgpack `JsonPlusSerializer`
by default); the records around them are msgpack. The asynchronous methods are the
interface; the synchronous ones run them on the saver's event loop from another thread,
as langgraph-checkpoint-redis's `AsyncRedisSaver` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import ormsgpack
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from service.errors import fence_refusal
from service.storage._redis import RedisClient
from service.storage.keys import CHECKPOINT_PREFIX, epoch_key

__all__ = [
    "EPOCH_CONFIG_KEY",
    "RUN_KEY_PREFIX",
    "SAVED_WRITES_CONFIG_KEY",
    "THREAD_KEY_PREFIX",
    "RedisSaver",
    "SavedWrites",
]

logger = logging.getLogger(__name__)

THREAD_KEY_PREFIX = CHECKPOINT_PREFIX
"""A thread's keys are `{prefix}:{thread}:i` (index) and `{prefix}:{thread}:d` (data)."""

RUN_KEY_PREFIX = f"{CHECKPOINT_PREFIX}_run"
"""`{prefix}:{run id}` is the set of threads a run wrote."""

EPOCH_CONFIG_KEY = "__agentflow_epoch"
"""The `configurable` key of a run's fencing epoch. LangGraph copies no `__` key into a
checkpoint's metadata, so the epoch stays out of it."""

SAVED_WRITES_CONFIG_KEY = "__agentflow_saved_writes"
"""The `configurable` key of a run's `SavedWrites`: told of every task whose writes the
saver stored (or failed to store)."""

_PAGE = 64  # checkpoints read per round trip when listing
_CHUNK = 500  # arguments per command inside scripts (Lua's unpack has a stack limit)

# --- the scripts ------------------------------------------------------------------------
# Every script gets the thread's index and data keys as KEYS[1] and KEYS[2], a fenced write
# its session's epoch key as KEYS[3]. A checkpoint's record starts with a 4-byte length and
# a msgpack header the scripts read (run id, blob fields); the rest is for Python only.

_LIB = """
local idx, data = KEYS[1], KEYS[2]
local function header(rec)
  local n = struct.unpack('>I4', rec)
  return cmsgpack.unpack(string.sub(rec, 5, 4 + n))
end
local function call_chunked(cmd, key, items, step)
  for i = 1, #items, step do
    redis.call(cmd, key, unpack(items, i, math.min(i + step - 1, #items)))
  end
end
local function range(lo, hi)
  return redis.call('ZRANGEBYLEX', idx, '[' .. lo, '[' .. hi)
end
local function writes_of(member)
  local prefix = 'w' .. string.sub(member, 2) .. '\\0'
  return range(prefix, prefix .. '\\255')
end
local function load(member)
  local rec = redis.call('HGET', data, member)
  if not rec then return false end
  local fields = header(rec)[2]
  local blobs = {}
  if #fields > 0 then blobs = redis.call('HMGET', data, unpack(fields)) end
  local wf = writes_of(member)
  local wv = {}
  if #wf > 0 then wv = redis.call('HMGET', data, unpack(wf)) end
  return {member, rec, blobs, wf, wv}
end
local function drop(members)
  if #members == 0 then return end
  call_chunked('HDEL', data, members, _CHUNK)
  call_chunked('ZREM', idx, members, _CHUNK)
end
-- Drop blobs no remaining checkpoint refers to, and the runs none of them belongs to.
-- Returns the run ids dropped.
local function collect()
  local keep_blobs, keep_runs = {}, {}
  for _, member in ipairs(range('c\\0', 'c\\0\\255')) do
    local h = header(redis.call('HGET', data, member))
    keep_runs[h[1]] = true
    for _, f in ipairs(h[2]) do keep_blobs[f] = true end
  end
  local doomed = {}
  for _, f in ipairs(redis.call('HKEYS', data)) do
    if string.sub(f, 1, 2) == 'b\\0' and not keep_blobs[f] then doomed[#doomed + 1] = f end
  end
  if #doomed > 0 then call_chunked('HDEL', data, doomed, _CHUNK) end
  local runs, gone = range('r\\0', 'r\\0\\255'), {}
  for _, member in ipairs(runs) do
    local run = string.sub(member, 3)
    if not keep_runs[run] then
      gone[#gone + 1] = run
      redis.call('ZREM', idx, member)
    end
  end
  return gone
end
-- A write with a run's epoch ('' for none) is refused unless the run still holds the
-- session (a newer run took it, or Redis lost the key: 0): returns the refusal, or false.
local function stale(epoch)
  if epoch == '' then return false end
  local current = tonumber(redis.call('GET', KEYS[3]) or '0')
  if current ~= tonumber(epoch) then return {'stale', current} end
  return false
end
local function set_ttl(ttl)
  if ttl == '' then
    redis.call('PERSIST', idx)
    redis.call('PERSIST', data)
  else
    redis.call('EXPIRE', idx, ttl)
    redis.call('EXPIRE', data, ttl)
  end
end
""".replace("_CHUNK", str(_CHUNK))

# ARGV: epoch or '', checkpoint member, record, run member or '', ttl or '' (no TTL), blob
# field/value...
_PUT = """
local refused = stale(ARGV[1])
if refused then return refused end
if ARGV[4] ~= '' then
  redis.call('ZADD', idx, 0, ARGV[2], 0, ARGV[4])
else
  redis.call('ZADD', idx, 0, ARGV[2])
end
local pairs_ = {ARGV[2], ARGV[3]}
for i = 6, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
call_chunked('HSET', data, pairs_, _CHUNK * 2)
set_ttl(ARGV[5])
return 1
""".replace("_CHUNK", str(_CHUNK))

# ARGV: epoch or '', ttl or '' (leave it), then (write member, value, '1' to overwrite | '0')
# triples. A task's regular writes are kept as first written (a retried task writes them
# again); its special ones (error, interrupt, resume, scheduled) replace the earlier ones.
_PUT_WRITES = """
local refused = stale(ARGV[1])
if refused then return refused end
for i = 3, #ARGV, 3 do
  if ARGV[i + 2] == '1' then
    redis.call('HSET', data, ARGV[i], ARGV[i + 1])
  else
    redis.call('HSETNX', data, ARGV[i], ARGV[i + 1])
  end
  redis.call('ZADD', idx, 0, ARGV[i])
end
if ARGV[2] ~= '' then set_ttl(ARGV[2]) end
return 1
"""

# ARGV: 'member', checkpoint member | 'latest', namespace prefix ('c\\0<ns>\\0').
_GET = """
local member = ARGV[2]
if ARGV[1] == 'latest' then
  local last = redis.call(
    'ZREVRANGEBYLEX', idx, '[' .. member .. '\\255', '[' .. member, 'LIMIT', 0, 1)
  if #last == 0 then return false end
  member = last[1]
end
return load(member)
"""

# ARGV: highest member (a lex bound, '(' or '['), lowest member (the same), count.
_LIST = """
local out = {}
local page = redis.call('ZREVRANGEBYLEX', idx, ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(page) do
  local loaded = load(member)
  if loaded then out[#out + 1] = loaded end
end
return {page, out}
"""

# Returns the thread's run ids, and deletes it.
_DELETE_THREAD = """
local runs = {}
for _, member in ipairs(range('r\\0', 'r\\0\\255')) do runs[#runs + 1] = string.sub(member, 3) end
redis.call('DEL', idx, data)
return runs
"""

# ARGV: run ids. Deletes their checkpoints and those checkpoints' writes; returns the run
# ids that no longer have a checkpoint here.
_DELETE_RUNS = """
local doomed_runs = {}
for _, run in ipairs(ARGV) do doomed_runs[run] = true end
local doomed = {}
for _, member in ipairs(range('c\\0', 'c\\0\\255')) do
  if doomed_runs[header(redis.call('HGET', data, member))[1]] then
    doomed[#doomed + 1] = member
    for _, w in ipairs(writes_of(member)) do doomed[#doomed + 1] = w end
  end
end
drop(doomed)
return collect()
"""

# ARGV: (kept checkpoint member, its new record or '') pairs: the latest of each namespace,
# as the caller read them. Deletes every other checkpoint and write of the thread; refuses
# ('stale') when the thread moved on since the caller read it.
_PRUNE = """
local kept = {}
for i = 1, #ARGV, 2 do kept[ARGV[i]] = ARGV[i + 1] end
local latest, members = {}, range('c\\0', 'c\\0\\255')
for _, member in ipairs(members) do
  latest[string.match(member, '^(c%z.*%z)[^%z]*$')] = member
end
local heads = 0
for _, member in pairs(latest) do
  if kept[member] == nil then return 'stale' end
  heads = heads + 1
end
if heads * 2 ~= #ARGV then return 'stale' end
local doomed = {}
for _, member in ipairs(members) do
  if kept[member] == nil then doomed[#doomed + 1] = member end
end
local own = {}
for member, _ in pairs(kept) do own['w' .. string.sub(member, 2)] = true end
for _, w in ipairs(range('w\\0', 'w\\0\\255')) do
  if not own[string.match(w, '^(w%z.*%z[^%z]*)%z[^%z]*%z[^%z]*$')] then
    doomed[#doomed + 1] = w
  end
end
drop(doomed)
for member, record in pairs(kept) do
  if record ~= '' then redis.call('HSET', data, member, record) end
end
return collect()
"""

# ARGV: ttl. Gives the thread's keys the TTL; returns its run ids.
_EXPIRE = """
set_ttl(ARGV[1])
local runs = {}
for _, member in ipairs(range('r\\0', 'r\\0\\255')) do runs[#runs + 1] = string.sub(member, 3) end
return runs
"""

_DUMP = """
return {redis.call('ZRANGE', idx, 0, -1), redis.call('HGETALL', data)}
"""

# ARGV: n index members, the members, then field/value pairs. Refuses an existing thread.
_RESTORE = """
if redis.call('EXISTS', idx, data) > 0 then return 'exists' end
local n = tonumber(ARGV[1])
local scored, pairs_ = {}, {}
for i = 2, n + 1 do
  scored[#scored + 1] = 0
  scored[#scored + 1] = ARGV[i]
end
for i = n + 2, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
if #scored > 0 then call_chunked('ZADD', idx, scored, _CHUNK * 2) end
if #pairs_ > 0 then call_chunked('HSET', data, pairs_, _CHUNK * 2) end
return 'ok'
""".replace("_CHUNK", str(_CHUNK))


class _Script:
    """A Lua script run by its SHA-1, loaded again when Redis answers NOSCRIPT."""

    def __init__(self, body: str) -> None:
        self.text = _LIB + body
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    async def __call__(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # NEVER_DECODE: replies hold serialised values, also on a client made with
        # decode_responses=True.
        try:
            return await redis.execute_command(
                "EVALSHA", self.sha, len(keys), *keys, *args, NEVER_DECODE=[]
            )
        except NoScriptError:
            return await redis.execute_command(
                "EVAL", self.text, len(keys), *keys, *args, NEVER_DECODE=[]
            )


class _ScriptBatcher:
    """Sends the script calls of concurrent sessions together, one pipeline at a time.

    The calls made while a pipeline is out wait for it and go in the next one: with many
    sessions in flight, each call costs a share of one round trip and of one pooled
    connection's handling instead of its own (most of a put's cost in the client). Every
    script stays atomic on its own; calls were never ordered across connections anyway.
    A call alone in its turn is sent as it is. On a cluster client the pipeline sends each
    node the calls of its slots, to all nodes at once.
    """

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self.pending: list[tuple[_Script, Sequence[str], Sequence[Any], asyncio.Future[Any]]] = []
        self.sending: asyncio.Task[None] | None = None

    async def call(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((script, keys, args, future))
        if self.sending is None:
            self.sending = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    replies = await self._send_batch(batch)
                except Exception as exc:  # the connection failed: every call fails with it
                    replies = [exc] * len(batch)
                except BaseException:
                    for *_, future in batch:
                        future.cancel()
                    raise
                for (*_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self.sending = None

    async def _send_batch(
        self, batch: list[tuple[_Script, Sequence[str], Sequence[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        """Run the calls; return each one's reply, or the error it got."""
        if len(batch) == 1:
            script, keys, args, _ = batch[0]
            try:
                return [await script(self.redis, keys, args)]
            except Exception as exc:
                return [exc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.execute_command(
                    "EVALSHA", script.sha, len(keys), *keys, *args, NEVER_DECODE=[]
                )
            replies = list(await pipe.execute(raise_on_error=False))
        for i, (script, keys, args, _) in enumerate(batch):
            if isinstance(replies[i], NoScriptError):  # Redis lost its scripts (a restart)
                try:
                    replies[i] = await script(self.redis, keys, args)
                except Exception as exc:
                    replies[i] = exc
        return replies


_SCRIPTS = {
    name: _Script(body)
    for name, body in {
        "put": _PUT,
        "put_writes": _PUT_WRITES,
        "get": _GET,
        "list": _LIST,
        "delete_thread": _DELETE_THREAD,
        "delete_runs": _DELETE_RUNS,
        "prune": _PRUNE,
        "expire": _EXPIRE,
        "dump": _DUMP,
        "restore": _RESTORE,
    }.items()
}


# --- keys and records --------------------------------------------------------------------


def _tagged(prefix: str, name: str) -> str:
    """`prefix:{name}`, or `prefix#{sha1}` for a name that would not make a hash tag."""
    if name and "}" not in name:
        return f"{prefix}:{{{name}}}"
    return f"{prefix}#{{{hashlib.sha1(name.encode()).hexdigest()}}}"


def _thread_keys(prefix: str, thread_id: str) -> list[str]:
    base = _tagged(prefix, thread_id)
    return [f"{base}:i", f"{base}:d"]


def _checkpoint_member(ns: str, checkpoint_id: str) -> str:
    return f"c\0{ns}\0{checkpoint_id}"


def _blob_field(ns: str, channel: str, version: Any) -> str:
    return f"b\0{ns}\0{channel}\0{version}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Record(NamedTuple):
    """A stored checkpoint, its values still serialised."""

    ns: str
    checkpoint_id: str
    parent_id: str | None
    run_id: str
    blob_fields: list[str]
    checkpoint: tuple[str, bytes]
    metadata: tuple[str, bytes]
    delta_base: dict[str, Any] | None
    """Delta channel histories kept by `aprune` for the ancestors it deleted."""


def _pack_record(
    *,
    parent_id: str | None,
    run_id: str,
    blob_fields: list[str],
    checkpoint: tuple[str, bytes],
    metadata: tuple[str, bytes],
    delta_base: dict[str, Any] | None = None,
) -> bytes:
    header = ormsgpack.packb([run_id, blob_fields])
    body = ormsgpack.packb([parent_id, *checkpoint, *metadata, delta_base])
    return len(header).to_bytes(4, "big") + header + body


def _unpack_record(member: str, raw: bytes) -> _Record:
    size = int.from_bytes(raw[:4], "big")
    run_id, blob_fields = ormsgpack.unpackb(raw[4 : 4 + size])
    parent_id, cp_type, cp_bytes, md_type, md_bytes, delta_base = ormsgpack.unpackb(raw[4 + size :])
    _, ns, checkpoint_id = member.split("\0")
    return _Record(
        ns=ns,
        checkpoint_id=checkpoint_id,
        parent_id=parent_id,
        run_id=run_id,
        blob_fields=blob_fields,
        checkpoint=(cp_type, cp_bytes),
        metadata=(md_type, md_bytes),
        delta_base=delta_base,
    )


@dataclass
class _Loaded:
    """A checkpoint as a script read it: its record, blobs and pending writes."""

    record: _Record
    blobs: dict[str, tuple[str, bytes]]
    """Channel -> its serialised value at this checkpoint (channels with a value only)."""
    writes: list[tuple[str, str, tuple[str, bytes], str, int]] = field(default_factory=list)
    """(task id, channel, serialised value, task path, idx), in `writes_sort_key` order."""


def _parse_loaded(reply: list[Any]) -> _Loaded:
    member, raw, blob_values, write_fields, write_values = reply
    record = _unpack_record(_text(member), raw)
    blobs: dict[str, tuple[str, bytes]] = {}
    for name, value in zip(record.blob_fields, blob_values, strict=True):
        if value is not None:
            blobs[name.split("\0", 3)[2]] = _unpack_typed(value)
    writes = []
    for name, value in zip(write_fields, write_values, strict=True):
        if value is None:
            continue
        _, _, _, task_id, idx = _text(name).split("\0")
        channel, kind, data, task_path = ormsgpack.unpackb(value)
        writes.append((task_id, channel, (kind, data), task_path, int(idx)))
    writes.sort(key=lambda w: writes_sort_key(w[3], w[0], w[4]))
    return _Loaded(record, blobs, writes)


def _pack_typed(typed: tuple[str, bytes]) -> bytes:
    return ormsgpack.packb(list(typed))


def _unpack_typed(raw: bytes) -> tuple[str, bytes]:
    kind, data = ormsgpack.unpackb(raw)
    return kind, data


class SavedWrites:
    """The tasks of one run whose writes the saver stored.

    A run announces a task as finished only once its writes would survive a crash:
    LangGraph saves a task's writes in the background and streams the task's end at
    once; a worker killed in between has announced a task it will run again. A run puts
    one `SavedWrites` in its config under `SAVED_WRITES_CONFIG_KEY`; `aput_writes` calls
    it with each task id and whether the writes were stored, and the run awaits `saved`.
    """

    def __init__(self) -> None:
        self._reported: dict[str, bool] = {}
        self._waiting: dict[str, asyncio.Future[bool]] = {}

    def __call__(self, task_id: str, saved: bool) -> None:
        """Report a task's writes: stored (True) or not (False)."""
        waiter = self._waiting.pop(task_id, None)
        if waiter is None:
            self._reported[task_id] = saved
        elif not waiter.done():
            waiter.set_result(saved)

    async def saved(self, task_id: str) -> bool:
        """Wait for the report of a task's writes: whether they were stored."""
        if task_id in self._reported:
            return self._reported.pop(task_id)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = waiter
        return await waiter


class RedisSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpointer on plain Redis: core commands and Lua, cluster-safe keys.

    Args:
        redis_url: where Redis is, when no client is given (the saver then owns and closes
            its client).
        redis_client: a redis-py asyncio client (text or bytes replies), of one Redis or
            a cluster (`RedisCluster`).
        connection_args: extra arguments for the client made from `redis_url`.
        ttl: as langgraph-checkpoint-redis takes it: `{"default_ttl": minutes}` gives a
            thread's keys that TTL, renewed by every write (`refresh_on_read` renews it on
            reads too). Without it keys do not expire; `aexpire` gives a thread its TTL.
        serde: the serializer of checkpoints, metadata and writes.
        key_prefix: the prefix of thread keys (run keys get `{key_prefix}_run`).

    Example:
        ```python
        async with RedisSaver.from_conn_string("redis://localhost:6379") as saver:
            graph = builder.compile(checkpointer=saver)
        ```
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis_client: RedisClient | None = None,
        connection_args: Mapping[str, Any] | None = None,
        ttl: Mapping[str, Any] | None = None,
        serde: SerializerProtocol | None = None,
        key_prefix: str = THREAD_KEY_PREFIX,
    ) -> None:
        super().__init__(serde=serde)
        if redis_client is None:
            if not redis_url:
                raise ValueError("RedisSaver needs redis_client or redis_url")
            redis_client = Redis.from_url(redis_url, **dict(connection_args or {}))
            self._owns_client = True
        else:
            self._owns_client = False
        self._redis = redis_client
        self.key_prefix = key_prefix
        self.run_prefix = f"{key_prefix}_run"
        minutes = (ttl or {}).get("default_ttl")
        self._ttl = "" if minutes is None else str(max(1, round(float(minutes) * 60)))
        self._refresh_on_read = bool((ttl or {}).get("refresh_on_read")) and minutes is not None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._batcher = _ScriptBatcher(redis_client)
        # (thread, run) pairs whose run key names the thread already: one SADD per pair.
        self._indexed_runs: dict[tuple[str, str], None] = {}

    @classmethod
    @asynccontextmanager
    async def from_conn_string(
        cls,
        redis_url: str | None = None,
        *,
        redis_client: RedisClient | None = None,
        connection_args: Mapping[str, Any] | None = None,
        ttl: Mapping[str, Any] | None = None,
        serde: SerializerProtocol | None = None,
        key_prefix: str = THREAD_KEY_PREFIX,
    ) -> AsyncIterator[RedisSaver]:
        """Open a saver on a Redis URL (or client), set up, and close its own client after."""
        saver = cls(
            redis_url,
            redis_client=redis_client,
            connection_args=connection_args,
            ttl=ttl,
            serde=serde,
            key_prefix=key_prefix,
        )
        async with saver:
            yield saver

    async def __aenter__(self) -> RedisSaver:
        await self.asetup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client if the saver made it."""
        if self._owns_client:
            await self._redis.aclose()

    async def asetup(self) -> None:
        """Load the scripts into Redis (there are no indexes to create)."""
        self.loop = asyncio.get_running_loop()
        for script in _SCRIPTS.values():
            await self._redis.script_load(script.text)

    async def setup(self) -> None:  # type: ignore[override]
        """The same as `asetup` (langgraph-checkpoint-redis names it both ways)."""
        await self.asetup()

    # --- reading -------------------------------------------------------------------------

    async def _run(
        self, name: str, thread_id: str, args: Sequence[Any], *, fence: str | None = None
    ) -> Any:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        keys = _thread_keys(self.key_prefix, thread_id)
        if fence is not None:
            keys.append(fence)
        return await self._batcher.call(_SCRIPTS[name], keys, args)

    async def _load(self, thread_id: str, ns: str, checkpoint_id: str | None) -> _Loaded | None:
        if checkpoint_id:
            args = ["member", _checkpoint_member(ns, checkpoint_id)]
        else:
            args = ["latest", f"c\0{ns}\0"]
        reply = await self._run("get", thread_id, args)
        if self._refresh_on_read and reply:
            await self._run("expire", thread_id, [self._ttl])
        return _parse_loaded(reply) if reply else None

    def _tuple(self, thread_id: str, loaded: _Loaded) -> CheckpointTuple:
        record = loaded.record
        checkpoint = cast(Checkpoint, self.serde.loads_typed(record.checkpoint))
        checkpoint["channel_values"] = {
            channel: self.serde.loads_typed(value) for channel, value in loaded.blobs.items()
        }
        return CheckpointTuple(
            config=self._config(thread_id, record.ns, record.checkpoint_id),
            checkpoint=checkpoint,
            metadata=cast(CheckpointMetadata, self.serde.loads_typed(record.metadata)),
            parent_config=(
                self._config(thread_id, record.ns, record.parent_id) if record.parent_id else None
            ),
            pending_writes=[
                (task_id, channel, self.serde.loads_typed(value))
                for task_id, channel, value, _, _ in loaded.writes
            ],
        )

    @staticmethod
    def _config(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
            }
        }

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Return a checkpoint of a thread: the one `config` names, else its latest."""
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        loaded = await self._load(
            thread_id, configurable.get("checkpoint_ns", ""), get_checkpoint_id(config)
        )
        return self._tuple(thread_id, loaded) if loaded else None

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """List checkpoints newest first: of a thread (and namespace) or, without config, all.

        Args:
            config: `thread_id`, and optionally `checkpoint_ns` and `checkpoint_id`.
            filter: metadata keys and the values they must equal.
            before: only checkpoints older than this one (by id).
            limit: at most this many.
        """
        if limit is not None and limit <= 0:
            return
        if config is None:
            threads: AsyncIterator[str] = self._threads()
            ns: str | None = None
            only_id = None
        else:
            threads = _one(str(config["configurable"]["thread_id"]))
            ns = config["configurable"].get("checkpoint_ns")
            only_id = get_checkpoint_id(config)
        before_id = get_checkpoint_id(before) if before else None
        left = limit
        async for thread_id in threads:
            async for loaded in self._pages(thread_id, ns, before_id, only_id):
                metadata = cast(CheckpointMetadata, self.serde.loads_typed(loaded.record.metadata))
                if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                    continue
                yield self._tuple(thread_id, loaded)
                if left is not None:
                    left -= 1
                    if left <= 0:
                        return

    async def _pages(
        self, thread_id: str, ns: str | None, before_id: str | None, only_id: str | None
    ) -> AsyncIterator[_Loaded]:
        if only_id is not None:
            loaded = await self._load(thread_id, ns or "", only_id)
            if loaded and (before_id is None or loaded.record.checkpoint_id < before_id):
                yield loaded
            return
        prefix = ("c\0" if ns is None else f"c\0{ns}\0").encode()
        # Bytes: 0xff sorts after every member of the range (no UTF-8 byte is 0xff).
        high = (
            b"(" + prefix + before_id.encode()
            if before_id and ns is not None
            else b"[" + prefix + b"\xff"
        )
        low = b"[" + prefix
        while True:
            page, loads = await self._run("list", thread_id, [high, low, _PAGE])
            for reply in loads:
                loaded = _parse_loaded(reply)
                if before_id is None or loaded.record.checkpoint_id < before_id:
                    yield loaded
            if len(page) < _PAGE:
                return
            high = b"(" + page[-1]

    async def _threads(self) -> AsyncIterator[str]:
        """Every thread with checkpoints (a SCAN: for `alist(None)` only)."""
        plain = f"{self.key_prefix}:{{"
        async for key in self._redis.scan_iter(match=f"{self.key_prefix}[:#]{{*}}:i"):
            name = _text(key)
            if name.startswith(plain):
                yield name[len(plain) : -3]
                continue
            data = name[:-1] + "d"
            thread = await self._redis.hget(data, "t")
            if thread is not None:
                yield _text(thread)

    # --- writing -------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint and the values of the channels it changed, in one script."""
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        parent_id = configurable.get("checkpoint_id")
        stored: dict[str, Any] = dict(checkpoint)
        values: dict[str, Any] = stored.pop("channel_values")
        meta = get_serializable_checkpoint_metadata(config, metadata)
        run_id = str(meta.get("run_id") or "")
        blobs: list[Any] = []
        for channel, version in new_versions.items():
            if channel in values:
                blobs += [
                    _blob_field(ns, channel, version),
                    _pack_typed(self.serde.dumps_typed(values[channel])),
                ]
        record = _pack_record(
            parent_id=parent_id,
            run_id=run_id,
            blob_fields=[_blob_field(ns, c, v) for c, v in checkpoint["channel_versions"].items()],
            checkpoint=self.serde.dumps_typed(stored),
            metadata=self.serde.dumps_typed(meta),
        )
        run_member = ""
        if run_id:
            run_member = f"r\0{run_id}"
            await self._index_run(thread_id, run_id)
        member = _checkpoint_member(ns, checkpoint["id"])
        if not thread_id or "}" in thread_id:
            blobs += ["t", thread_id]
        await self._write(
            "put", thread_id, configurable, [member, record, run_member, self._ttl, *blobs]
        )
        return self._config(thread_id, ns, checkpoint["id"])

    async def _write(
        self, name: str, thread_id: str, configurable: Mapping[str, Any], args: list[Any]
    ) -> None:
        """Run a write script, fenced when the config carries a run's epoch.

        Raises:
            StaleWriter: a newer run took the session; nothing was written.
            EpochLost: Redis lost the session's epoch; nothing was written.
            ValueError: an epoch for a thread id that is no hash tag (empty, or with a
                `}`): its epoch key would be in another cluster slot.
        """
        epoch = configurable.get(EPOCH_CONFIG_KEY)
        if epoch is None:
            await self._run(name, thread_id, ["", *args])
            return
        if not thread_id or "}" in thread_id:
            raise ValueError(
                f"thread id {thread_id!r} cannot be fenced: an epoch needs a thread id that "
                "is a session id (no '}', not empty)"
            )
        reply = await self._run(name, thread_id, [int(epoch), *args], fence=epoch_key(thread_id))
        if isinstance(reply, list):  # ['stale', the session's epoch]
            raise fence_refusal(thread_id, int(epoch), int(reply[1]))

    async def _index_run(self, thread_id: str, run_id: str) -> None:
        """Name the thread in the run's key, before the run's first checkpoint there."""
        pair = (thread_id, run_id)
        if pair in self._indexed_runs:
            return
        key = _tagged(self.run_prefix, run_id)
        await self._redis.sadd(key, thread_id)
        if self._ttl:
            await self._redis.expire(key, int(self._ttl))
        self._indexed_runs[pair] = None
        if len(self._indexed_runs) > 10_000:  # forget the oldest half
            for old in list(self._indexed_runs)[:5_000]:
                del self._indexed_runs[old]

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes to a checkpoint; idempotent per (task id, index)."""
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        checkpoint_id = configurable["checkpoint_id"]
        args: list[Any] = [self._ttl]
        for i, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, i)
            args += [
                f"w\0{ns}\0{checkpoint_id}\0{task_id}\0{idx}",
                ormsgpack.packb([channel, *self.serde.dumps_typed(value), task_path]),
                "1" if idx < 0 else "0",
            ]
        if len(args) == 1:
            return
        saved = False
        try:
            await self._write("put_writes", thread_id, configurable, args)
            saved = True
        finally:
            report = configurable.get(SAVED_WRITES_CONFIG_KEY)
            if report is not None:
                report(task_id, saved)

    def get_next_version(self, current: str | int | float | None, channel: None) -> str:
        """Return the next version of a channel: a counter, then a random tiebreak.

        The tiebreak keeps the blobs of two branches of one thread apart (both write
        version n + 1 of a channel after a fork).
        """
        if current is None:
            number = 0
        elif isinstance(current, (int, float)):
            number = int(current)
        else:
            number = int(current.split(".")[0])
        return f"{number + 1:010d}.{random.getrandbits(32):08x}"

    # --- deleting, copying, pruning ---------------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete a thread's checkpoints and writes, and its name from its runs' keys."""
        runs = await self._run("delete_thread", str(thread_id), [])
        await self._forget_runs(str(thread_id), runs)

    async def _forget_runs(self, thread_id: str, runs: Sequence[bytes | str]) -> None:
        for run in runs:
            run_id = _text(run)
            await self._redis.srem(_tagged(self.run_prefix, run_id), thread_id)
            self._indexed_runs.pop((thread_id, run_id), None)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) of runs, in every thread they wrote.

        The threads come from each run's key; a thread's checkpoints of those runs go in
        one script per thread. Deleting a run that later checkpoints build on breaks the
        delta channels of those checkpoints (see LangGraph's `delete_for_runs`); rolling
        back a thread's latest runs is safe.
        """
        wanted = [str(r) for r in run_ids]
        threads: set[str] = set()
        for run_id in wanted:
            members = await self._redis.smembers(_tagged(self.run_prefix, run_id))  # type: ignore[misc]
            threads |= {_text(m) for m in members}
        for thread_id in sorted(threads):
            gone = await self._run("delete_runs", thread_id, wanted)
            await self._forget_runs(thread_id, gone)
        for run_id in wanted:
            for pair in [p for p in self._indexed_runs if p[1] == run_id]:
                del self._indexed_runs[pair]

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of a thread (its whole history) to a new thread.

        Raises:
            ValueError: the target thread has checkpoints already.
        """
        source, target = str(source_thread_id), str(target_thread_id)
        members, flat = await self._run("dump", source, [])
        if not members:
            return
        pairs: list[Any] = []
        runs: list[str] = []
        for i in range(0, len(flat), 2):
            name = _text(flat[i])
            if name != "t":
                pairs += [name, flat[i + 1]]
        for member in members:
            name = _text(member)
            if name.startswith("r\0"):
                runs.append(name[2:])
        if not target or "}" in target:
            pairs += ["t", target]
        for run_id in runs:
            await self._index_run(target, run_id)
        answer = await self._run("restore", target, [len(members), *members, *pairs])
        if _text(answer) == "exists":
            raise ValueError(f"cannot copy thread {source!r}: thread {target!r} already exists")

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Prune threads: `keep_latest` keeps each namespace's latest checkpoint, `delete` all.

        A kept checkpoint whose delta channels (LangGraph's `DeltaChannel`) have no value of
        their own is given the history its deleted ancestors held (seed and writes), so
        those channels read back whole.

        Raises:
            ValueError: an unknown strategy.
        """
        if strategy == "delete":
            for thread_id in thread_ids:
                await self.adelete_thread(thread_id)
            return
        if strategy != "keep_latest":
            raise ValueError(f"unknown prune strategy {strategy!r}: use keep_latest or delete")
        for thread_id in thread_ids:
            for _attempt in range(10):
                if await self._prune_thread(str(thread_id)):
                    break
            else:
                raise RuntimeError(f"thread {thread_id!r} kept changing while it was pruned")

    async def _prune_thread(self, thread_id: str) -> bool:
        namespaces = await self._namespaces(thread_id)
        args: list[Any] = []
        for ns in namespaces:
            head = await self._load(thread_id, ns, None)
            if head is None:
                return False
            member = _checkpoint_member(ns, head.record.checkpoint_id)
            args += [member, await self._based(thread_id, head)]
        if not args:
            return True
        gone = await self._run("prune", thread_id, args)
        if isinstance(gone, bytes | str):  # 'stale': written to since it was read
            return False
        await self._forget_runs(thread_id, gone)
        return True

    async def _namespaces(self, thread_id: str) -> list[str]:
        keys = _thread_keys(self.key_prefix, thread_id)
        members = await self._redis.zrangebylex(keys[0], b"[c\0", b"[c\0\xff")
        return sorted({_text(m).split("\0")[1] for m in members})

    async def _based(self, thread_id: str, head: _Loaded) -> bytes | str:
        """The head's record with the delta histories its ancestors held, or '' if none."""
        record = head.record
        metadata = self.serde.loads_typed(record.metadata)
        counted = set((metadata or {}).get("counters_since_delta_snapshot") or ())
        versions = self.serde.loads_typed(record.checkpoint).get("channel_versions", {})
        missing = [c for c in versions if c in counted and c not in head.blobs]
        if not missing:
            return ""
        histories = await self._raw_history(thread_id, head, missing)
        return _pack_record(
            parent_id=record.parent_id,
            run_id=record.run_id,
            blob_fields=record.blob_fields,
            checkpoint=record.checkpoint,
            metadata=record.metadata,
            delta_base=histories,
        )

    # --- delta channels --------------------------------------------------------------------

    async def _raw_history(
        self, thread_id: str, target: _Loaded, channels: Sequence[str]
    ) -> dict[str, Any]:
        """Per channel: [seed (serialised) or None, [[task id, kind, bytes], ...] oldest first].

        Walks the parent chain as `BaseCheckpointSaver.get_delta_channel_history` does,
        and stops at a checkpoint that `aprune` gave the history of its deleted ancestors.
        """
        remaining = set(channels)
        newest_first: dict[str, list[list[Any]]] = {c: [] for c in channels}
        found: dict[str, Any] = {}

        def take_base(loaded: _Loaded) -> None:
            base = loaded.record.delta_base or {}
            for channel in [c for c in remaining if c in base]:
                seed, older = base[channel]
                found[channel] = [seed, [*older, *reversed(newest_first[channel])]]
                remaining.discard(channel)

        take_base(target)
        ns, cursor = target.record.ns, target.record.parent_id
        while cursor and remaining:
            loaded = await self._load(thread_id, ns, cursor)
            if loaded is None:
                break
            for task_id, channel, value, _, _ in reversed(loaded.writes):
                if channel in remaining:
                    newest_first[channel].append([task_id, *value])
            for channel in [c for c in remaining if c in loaded.blobs]:
                found[channel] = [list(loaded.blobs[channel]), newest_first[channel][::-1]]
                remaining.discard(channel)
            take_base(loaded)
            cursor = loaded.record.parent_id
        for channel in remaining:
            found[channel] = [None, newest_first[channel][::-1]]
        return found

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Return each delta channel's seed and writes on the path to a checkpoint."""
        if not channels:
            return {}
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        target = await self._load(
            thread_id, configurable.get("checkpoint_ns", ""), get_checkpoint_id(config)
        )
        if target is None:
            return {c: {"writes": []} for c in channels}
        raw = await self._raw_history(thread_id, target, channels)
        out: dict[str, DeltaChannelHistory] = {}
        for channel in channels:
            seed, writes = raw[channel]
            entry: DeltaChannelHistory = {
                "writes": [
                    (task_id, channel, self.serde.loads_typed((kind, data)))
                    for task_id, kind, data in writes
                ]
            }
            if seed is not None:
                entry["seed"] = self.serde.loads_typed(tuple(seed))
            out[channel] = entry
        return out

    # --- retention -----------------------------------------------------------------------

    async def aexpire(self, thread_id: str, ttl_s: int) -> int:
        """Give every key of a thread, and of the runs that wrote it, a TTL.

        Returns:
            How many keys got it.
        """
        runs = await self._run("expire", str(thread_id), [int(ttl_s)])
        for run in runs:
            await self._redis.expire(_tagged(self.run_prefix, _text(run)), int(ttl_s))
        return 2 + len(runs)

    # --- the synchronous interface -----------------------------------------------------

    def _sync(self, coro: Any) -> Any:
        if self.loop is None:
            coro.close()
            raise RuntimeError(
                "RedisSaver's synchronous methods need its event loop: call "
                "`await saver.asetup()` (or use `async with saver:`) first"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise asyncio.InvalidStateError(
                "RedisSaver is asynchronous: from its event loop's thread use the async "
                "methods (aget_tuple, aput, ... or graph.ainvoke); synchronous calls work "
                "from other threads only"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Run `aget_tuple` on the saver's event loop (from another thread)."""
        return cast(CheckpointTuple | None, self._sync(self.aget_tuple(config)))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Run `alist` on the saver's event loop (from another thread)."""

        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

        yield from self._sync(collect())

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Run `aput` on the saver's event loop (from another thread)."""
        return cast(
            RunnableConfig, self._sync(self.aput(config, checkpoint, metadata, new_versions))
        )

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Run `aput_writes` on the saver's event loop (from another thread)."""
        self._sync(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        """Run `adelete_thread` on the saver's event loop (from another thread)."""
        self._sync(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Run `adelete_for_runs` on the saver's event loop (from another thread)."""
        self._sync(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Run `acopy_thread` on the saver's event loop (from another thread)."""
        self._sync(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Run `aprune` on the saver's event loop (from another thread)."""
        self._sync(self.aprune(thread_ids, strategy=strategy))

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Run `aget_delta_channel_history` on the saver's event loop (from another thread)."""
        return cast(
            Mapping[str, DeltaChannelHistory],
            self._sync(self.aget_delta_channel_history(config=config, channels=channels)),
        )


async def _one(value: str) -> AsyncIterator[str]:
    yield value
