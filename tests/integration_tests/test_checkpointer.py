"""`RedisSaver` beyond the conformance suite.

One script per write, one slot per thread, delta channels through a prune, odd thread ids,
the run index, TTLs, the synchronous interface.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.graph import END, START, StateGraph
from redis.asyncio import Redis
from redis.crc import key_slot

from graphs.workflow import build_graph
from nodes.context import WorkflowContext
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import CloudEvent
from service.devtools.servers import LocalServers
from service.runtime.runner import SessionRunner
from service.storage.checkpointer import RedisSaver
from service.storage.checkpoints import checkpoint_serde
from service.storage.keys import epoch_key
from service.storage.sessions import SessionStore


@pytest.fixture
async def saver(redis: Redis) -> AsyncIterator[RedisSaver]:
    """A saver with a key prefix of the test's own, its keys deleted after."""
    prefix = f"saver-test-{uuid.uuid4().hex[:8]}:checkpoint"
    saver = RedisSaver(redis_client=redis, serde=checkpoint_serde(), key_prefix=prefix)
    await saver.asetup()
    yield saver
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        await redis.delete(key)


def _config(thread_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    configurable = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


_HANDSHAKE = {"HELLO", "CLIENT", "AUTH", "SELECT"}  # a pooled connection's set-up


async def _commands(redis: Redis, action: Any) -> list[str]:
    """The commands clients sent Redis while `action` ran (not those scripts ran)."""
    marker = f"end-{uuid.uuid4().hex}"
    seen: list[str] = []
    async with redis.monitor() as monitor:
        await action()
        await redis.echo(marker)
        while True:
            info = await monitor.next_command()
            if marker in info["command"]:
                return seen
            name = info["command"].split()[0].upper()
            if info.get("client_type") != "lua" and name not in _HANDSHAKE:
                seen.append(name)


async def test_a_checkpoint_and_its_blobs_are_one_script_call(
    saver: RedisSaver, servers: LocalServers
) -> None:
    # MONITOR on a connection of its own: it takes the connection over.
    watcher = Redis.from_url(servers.redis_url, decode_responses=True)
    try:
        thread = f"t-{uuid.uuid4().hex[:6]}"
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"a": "x" * 1000, "b": [1, 2, 3]}
        checkpoint["channel_versions"] = {"a": 1, "b": 1}
        stored: dict[str, Any] = {}

        async def put() -> None:
            stored["config"] = await saver.aput(
                _config(thread), checkpoint, {"source": "loop", "step": 0}, {"a": 1, "b": 1}
            )

        async def put_writes() -> None:
            await saver.aput_writes(stored["config"], [("a", "y"), ("b", [4])], "task-1")

        assert await _commands(watcher, put) == ["EVALSHA"]
        assert await _commands(watcher, put_writes) == ["EVALSHA"]
    finally:
        await watcher.aclose()
    found = await saver.aget_tuple(stored["config"])
    assert found is not None
    assert found.checkpoint["channel_values"] == {"a": "x" * 1000, "b": [1, 2, 3]}
    assert [(w[1], w[2]) for w in found.pending_writes or []] == [("a", "y"), ("b", [4])]


async def test_every_key_of_a_session_is_in_one_slot(saver: RedisSaver, redis: Redis) -> None:
    graph = build_graph(saver)
    store = SessionStore(redis, ttl_s=600)  # fenced, as the worker runs it
    context = WorkflowContext(library=InMemoryWorkflowLibrary())
    runner = SessionRunner(graph, context, take=store.take)
    session_id = f"slot-{uuid.uuid4().hex[:6]}"
    event = CloudEvent.wrap("claim.submitted", {"claim_id": "C-1"}, source="test")
    assert (await runner.start(event, session_id)).status == "completed"
    keys = [k async for k in redis.scan_iter(match=f"{saver.key_prefix}:*", count=1000)]
    assert sorted(keys) == sorted(
        f"{saver.key_prefix}:{{{session_id}}}:{part}" for part in ("d", "i")
    )
    # The fencing epoch is checked in the thread's scripts: it shares their slot.
    assert len({key_slot(k.encode()) for k in [*keys, epoch_key(session_id)]}) == 1
    # The run's key (runs carry their run id) is the run index, one per run: its own slot.
    runs = [k async for k in redis.scan_iter(match=f"{saver.run_prefix}:*", count=1000)]
    assert len(runs) == 1 and await redis.smembers(runs[0]) == {session_id}  # type: ignore[misc]
    assert len([t async for t in saver.alist(_config(session_id))]) > 10


class _Items(TypedDict):
    items: Annotated[list[int], DeltaChannel(lambda cur, ups: [*cur, *sum(ups, [])])]
    """Snapshotted every 100 updates only: read back from the writes before that."""
    n: int


async def _count(state: _Items) -> dict[str, Any]:
    return {"items": [state["n"]], "n": state["n"] + 1}


def _delta_graph(saver: RedisSaver) -> Any:
    builder = StateGraph(_Items)
    builder.add_node("count", _count)
    builder.add_edge(START, "count")
    builder.add_conditional_edges("count", lambda s: END if s["n"] % 5 == 0 else "count")
    return builder.compile(checkpointer=saver)


async def test_keep_latest_keeps_delta_channels_whole(saver: RedisSaver) -> None:
    graph = _delta_graph(saver)
    config = _config(f"delta-{uuid.uuid4().hex[:6]}")
    await graph.ainvoke({"n": 0}, config, durability="sync")
    await graph.ainvoke({"n": 5}, config, durability="sync")
    whole = list(range(10))
    assert (await graph.aget_state(config)).values["items"] == whole

    await saver.aprune([config["configurable"]["thread_id"]], strategy="keep_latest")

    assert len([s async for s in graph.aget_state_history(config)]) == 1
    # The kept checkpoint is no snapshot of `items`: a prune that dropped its ancestors'
    # writes would read it back empty.
    assert (await graph.aget_state(config)).values["items"] == whole
    # The thread goes on from the pruned checkpoint, and prunes again.
    await graph.ainvoke({"n": 10}, config, durability="sync")
    await saver.aprune([config["configurable"]["thread_id"]])
    assert (await graph.aget_state(config)).values["items"] == [*whole, *range(10, 15)]
    copy = _config(f"copy-{uuid.uuid4().hex[:6]}")
    await saver.acopy_thread(config["configurable"]["thread_id"], copy["configurable"]["thread_id"])
    assert (await graph.aget_state(copy)).values["items"] == [*whole, *range(10, 15)]


@pytest.mark.parametrize("thread_id", ["", "a}b", "{x}", "x,Y", "Case-é", "}"])
async def test_any_thread_id_round_trips_and_is_listed(saver: RedisSaver, thread_id: str) -> None:
    checkpoint = empty_checkpoint()
    stored = await saver.aput(_config(thread_id), checkpoint, {"source": "input", "step": -1}, {})
    found = await saver.aget_tuple(_config(thread_id))
    assert found is not None and found.config == stored
    listed = [t.config["configurable"]["thread_id"] async for t in saver.alist(None)]
    assert listed.count(thread_id) == 1
    await saver.acopy_thread(thread_id, f"copy-of-{thread_id}")
    assert await saver.aget_tuple(_config(f"copy-of-{thread_id}")) is not None
    with pytest.raises(ValueError, match="already exists"):
        await saver.acopy_thread(thread_id, f"copy-of-{thread_id}")
    await saver.adelete_thread(thread_id)
    assert await saver.aget_tuple(_config(thread_id)) is None


async def test_runs_are_found_by_their_index_and_deleted(saver: RedisSaver, redis: Redis) -> None:
    threads = [f"runs-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    run = str(uuid.uuid4())
    other = str(uuid.uuid4())
    for thread in threads:
        parent = await saver.aput(
            _config(thread), empty_checkpoint(), {"source": "input", "run_id": other}, {}
        )
        await saver.aput(parent, empty_checkpoint(), {"source": "loop", "run_id": run}, {})
    run_key = f"{saver.run_prefix}:{{{run}}}"
    assert await redis.smembers(run_key) == set(threads)  # type: ignore[misc]

    await saver.adelete_for_runs([run])

    for thread in threads:
        left = [t.metadata["run_id"] async for t in saver.alist(_config(thread))]
        assert left == [other]
    assert await redis.exists(run_key) == 0


async def test_the_ttl_option_and_expire_give_every_key_a_ttl(
    saver: RedisSaver, redis: Redis
) -> None:
    timed = RedisSaver(
        redis_client=redis, key_prefix=saver.key_prefix, ttl={"default_ttl": 2}
    )  # minutes, as langgraph-checkpoint-redis takes it
    thread, run = f"ttl-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    await timed.aput(_config(thread), empty_checkpoint(), {"run_id": run}, {})
    keys = [k async for k in redis.scan_iter(match=f"{saver.key_prefix}*{thread}*")]
    keys.append(f"{saver.run_prefix}:{{{run}}}")
    assert {0 < await redis.ttl(k) <= 120 for k in keys} == {True}
    # A write without the option makes the thread live again; expiring it settles it.
    await saver.aput(_config(thread), empty_checkpoint(), {"run_id": run}, {})
    assert [await redis.ttl(k) for k in keys[:2]] == [-1, -1]
    assert await saver.aexpire(thread, 30) == 3
    assert {0 < await redis.ttl(k) <= 30 for k in keys} == {True}


async def test_a_bytes_client_and_the_synchronous_interface(
    servers: LocalServers, saver: RedisSaver
) -> None:
    async with RedisSaver.from_conn_string(
        servers.redis_url, key_prefix=saver.key_prefix
    ) as raw:  # a client of its own, answering bytes
        thread = f"sync-{uuid.uuid4().hex[:6]}"
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"x": b"\x00\xff bytes"}
        checkpoint["channel_versions"] = {"x": 1}
        with pytest.raises(asyncio.InvalidStateError, match="use the async"):
            raw.put(_config(thread), checkpoint, {}, {"x": 1})

        def from_a_thread() -> Sequence[Any]:
            stored = raw.put(_config(thread), checkpoint, {}, {"x": 1})
            return [raw.get_tuple(stored), list(raw.list(_config(thread)))]

        found, listed = await asyncio.to_thread(from_a_thread)
        assert found.checkpoint["channel_values"] == {"x": b"\x00\xff bytes"}
        assert [t.checkpoint["id"] for t in listed] == [checkpoint["id"]]
    # ... and the text client of the service reads what it wrote.
    again = await saver.aget_tuple(_config(thread))
    assert again is not None and again.checkpoint["channel_values"] == {"x": b"\x00\xff bytes"}
