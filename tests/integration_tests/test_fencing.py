"""Fenced writers: when two runs write one session, the older stops at its next write.

The older run is kept inside a model call on purpose (the loopback OpenAI-compatible
server holds its answers, `Hold`) while a newer run takes the session; then the answers
are released. Nothing here waits for time; every step waits for a condition.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from langgraph.checkpoint.base import empty_checkpoint
from redis.asyncio import Redis

from graphs.workflow import build_graph
from nodes.finalize import build_result
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import CloudEvent
from service.config import Settings, load_settings
from service.devtools.servers import LocalServers
from service.errors import EpochLost, StaleWriter
from service.runtime.runner import SessionRunner
from service.storage.checkpointer import EPOCH_CONFIG_KEY, RedisSaver
from service.storage.checkpoints import checkpoint_serde
from service.storage.keys import epoch_key
from service.storage.publisher import BackgroundPublisher, TransitionPublisher, read_log
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition
from tests.integration_tests.conftest import (
    example,
    hold_answers,
    marked_event,
    offsets,
    own_settings,
    read_topic,
    results_by_event,
    send,
    wait_until,
)
from tests.openai_server import OpenAICompatibleServer


@pytest.fixture
async def saver(redis: Redis) -> AsyncIterator[RedisSaver]:
    saver = RedisSaver(redis_client=redis, serde=checkpoint_serde())
    await saver.asetup()
    yield saver


async def _epoch(redis: Redis, session_id: str) -> int:
    return int(await redis.get(epoch_key(session_id)) or 0)


async def _assert_one_chain(saver: RedisSaver, session_id: str) -> int:
    """Every checkpoint's parent is the one before it: no fork. Returns how many there are."""
    newest_first = [t async for t in saver.alist({"configurable": {"thread_id": session_id}})]
    assert newest_first
    for child, parent in zip(newest_first, newest_first[1:], strict=False):
        assert child.parent_config is not None
        assert child.parent_config["configurable"]["checkpoint_id"] == parent.checkpoint["id"]
    assert newest_first[-1].parent_config is None
    for item in newest_first:  # the epoch is the run's, not the checkpoint's
        assert EPOCH_CONFIG_KEY not in item.metadata
    return len(newest_first)


async def _assert_gapless(redis: Redis, session_id: str) -> list[Transition]:
    log = await read_log(redis, session_id)
    assert [t.seq for t in log] == list(range(1, len(log) + 1))
    return log


async def test_the_older_of_two_runners_is_fenced_at_its_next_write(
    servers: LocalServers, openai_server: OpenAICompatibleServer, redis: Redis, saver: RedisSaver
) -> None:
    settings = own_settings(servers, model="openai:test-model")
    store = SessionStore(redis, ttl_s=600)
    graph = build_graph(saver)
    session_id = f"fence-{uuid.uuid4().hex[:6]}"
    raw = marked_event(session_id)
    event = CloudEvent.parse(raw)
    hold = hold_answers(openai_server, raw)
    sent: dict[str, list[Transition]] = {"older": [], "newer": []}
    publishers: list[BackgroundPublisher] = []

    def runner(name: str) -> SessionRunner:
        # Each runner publishes as a worker does: in the background, on its own.
        publisher = BackgroundPublisher(TransitionPublisher(redis, ttl_s=600))
        publishers.append(publisher)

        async def sink(transition: Transition) -> None:
            sent[name].append(transition)
            await publisher.publish(transition)

        context = settings.context(library=InMemoryWorkflowLibrary())
        return SessionRunner(graph, context, sink=sink, sequence=None, take=store.take)

    older = asyncio.create_task(runner("older").start(event, session_id))
    await wait_until(hold.held.is_set, "the older run to be inside a model call")
    first_epoch = await _epoch(redis, session_id)
    # The same event again on another runner, as a new owner of the partition runs it.
    newer = asyncio.create_task(runner("newer").start(event, session_id))
    await wait_until(lambda: sent["newer"], "the newer run to take the session")
    second_epoch = await _epoch(redis, session_id)
    assert second_epoch > first_epoch
    hold.release()

    with pytest.raises(StaleWriter) as fenced:
        await older
    assert (fenced.value.session_id, fenced.value.epoch, fenced.value.current) == (
        session_id,
        first_epoch,
        second_epoch,
    )
    result = await newer
    assert result.status == "completed" and result.event_id == event.id
    for publisher in publishers:  # what the older run queued has gone out (or was refused)
        await publisher.close()

    await _assert_one_chain(saver, session_id)
    log = await _assert_gapless(redis, session_id)
    # The log holds what the older run published before it was fenced, then the newer's:
    # nothing of the older run after the newer took the session, nothing twice.
    older_published = [t for t in sent["older"] if t.seq]
    as_sent = [t.model_dump(mode="json") for t in (*older_published, *sent["newer"])]
    assert [t.model_dump(mode="json") for t in log] == as_sent
    took_over = sent["newer"][0].seq
    assert all(t.seq < took_over for t in older_published)
    # The older run's next write, the held node's, was refused by the checkpointer: it
    # announces a node only once its writes are stored, so it sent nothing after that.
    assert all(t.seq for t in sent["older"])
    held = [t for t in sent["older"] if t.type == "node.started"][-1]
    assert not any(t.type == "node.completed" and t.task_id == held.task_id for t in sent["older"])
    assert {t.epoch for t in sent["older"]} == {first_epoch}
    assert {t.epoch for t in sent["newer"]} == {second_epoch}
    assert log[-1].type == "session.completed"


async def test_writes_without_an_epoch_are_not_fenced(
    redis: Redis, saver: RedisSaver, servers: LocalServers
) -> None:
    store = SessionStore(redis, ttl_s=600)
    session_id = f"fence-{uuid.uuid4().hex[:6]}"
    for _ in range(3):
        await store.take(session_id)
    settings = load_settings(model="offline")
    runner = SessionRunner(build_graph(saver), settings.context(library=InMemoryWorkflowLibrary()))
    event = CloudEvent.parse(example("claim_submitted", sessionid=session_id))
    result = await runner.start(event, session_id)
    assert result.status == "completed"
    assert await _assert_one_chain(saver, session_id) > 3


async def test_a_stale_write_is_refused_and_writes_nothing(redis: Redis, saver: RedisSaver) -> None:
    store = SessionStore(redis, ttl_s=600)
    session_id = f"fence-{uuid.uuid4().hex[:6]}"
    other = f"fence-{uuid.uuid4().hex[:6]}"
    stale = await store.take(session_id)
    current = await store.take(session_id)

    def config(thread_id: str, epoch: int | None, checkpoint_id: str | None = None) -> Any:
        configurable: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ""}
        if epoch is not None:
            configurable[EPOCH_CONFIG_KEY] = epoch
        if checkpoint_id is not None:
            configurable["checkpoint_id"] = checkpoint_id
        return {"configurable": configurable}

    def checkpoint() -> Any:
        made = empty_checkpoint()
        made["channel_values"] = {"a": "x"}
        made["channel_versions"] = {"a": 1}
        return made

    # A stale put and a fresh one in the same pipeline: only the stale one fails.
    refused, kept = await asyncio.gather(
        saver.aput(config(session_id, stale), checkpoint(), {}, {"a": 1}),
        saver.aput(config(other, None), checkpoint(), {}, {"a": 1}),
        return_exceptions=True,
    )
    assert isinstance(refused, StaleWriter) and (refused.epoch, refused.current) == (stale, current)
    assert not isinstance(kept, BaseException)
    assert await saver.aget_tuple(config(session_id, None)) is None

    written = await saver.aput(config(session_id, current), checkpoint(), {}, {"a": 1})
    checkpoint_id = written["configurable"]["checkpoint_id"]
    with pytest.raises(StaleWriter):
        await saver.aput_writes(config(session_id, stale, checkpoint_id), [("a", "y")], "task")
    await saver.aput_writes(config(session_id, current, checkpoint_id), [("a", "z")], "task")
    await saver.aput_writes(config(session_id, None, checkpoint_id), [("b", "w")], "other")
    stored = await saver.aget_tuple(config(session_id, None))
    assert stored is not None
    assert sorted(stored.pending_writes) == [("other", "b", "w"), ("task", "a", "z")]

    # Redis lost the epoch (a restart without persistence): the run cannot prove it still
    # holds the session, and is refused as during an outage.
    await redis.delete(epoch_key(session_id))
    with pytest.raises(EpochLost):
        await saver.aput(config(session_id, current), checkpoint(), {}, {"a": 1})
    assert len([t async for t in saver.alist(config(session_id, None))]) == 1

    # A thread id that is no hash tag would put the epoch key in another slot.
    with pytest.raises(ValueError, match="cannot be fenced"):
        await saver.aput(config("a}b", 1), checkpoint(), {}, {"a": 1})
    for thread_id in (session_id, other):
        await saver.adelete_thread(thread_id)


async def test_a_transition_of_a_run_that_no_longer_holds_the_session_is_not_sent(
    redis: Redis,
) -> None:
    store = SessionStore(redis, ttl_s=600)
    publisher = TransitionPublisher(redis, ttl_s=600)
    session_id = f"fence-{uuid.uuid4().hex[:6]}"

    def started(epoch: int | None) -> Transition:
        return Transition(session_id=session_id, type="node.started", node="plan", epoch=epoch)

    stale = await store.take(session_id)
    current = await store.take(session_id)
    await publisher.publish(started(current))
    await publisher.publish(started(None))  # not fenced
    with pytest.raises(StaleWriter):
        await publisher.publish(started(stale))
    await redis.delete(epoch_key(session_id))
    with pytest.raises(EpochLost):
        await publisher.publish(started(current))
    assert [t.seq for t in await read_log(redis, session_id)] == [1, 2]


async def test_epochs_only_grow_even_when_redis_loses_the_key(redis: Redis) -> None:
    store = SessionStore(redis, ttl_s=600)
    session_id = f"fence-{uuid.uuid4().hex[:6]}"
    await store.open(session_id, event_id=f"e-{session_id}", event_type="test", subject=None)
    taken = [await store.take(session_id) for _ in range(5)]
    assert taken == sorted(set(taken))  # one after the other, within a microsecond too
    await redis.delete(epoch_key(session_id))  # as a restart without persistence loses it
    assert await store.take(session_id) > taken[-1]
    # It lives as long as the session's record: no TTL under a run, the record's after.
    assert await redis.ttl(epoch_key(session_id)) == -1
    await store.close(build_result({}, session_id=session_id, status="completed"))
    assert 0 < await redis.ttl(epoch_key(session_id)) <= 600


async def test_a_fenced_worker_sends_no_result_and_leaves_the_offset(
    servers: LocalServers,
    openai_server: OpenAICompatibleServer,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
    saver: RedisSaver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two workers in two consumer groups both get the event: the one that started later
    # takes the session, as the new owner of a partition does after a rebalance.
    first_settings = own_settings(servers, model="openai:test-model")
    second_settings = first_settings.model_copy(
        update={"consumer_group": f"{first_settings.consumer_group}-second"}
    )
    session_id = f"fence-{uuid.uuid4().hex[:6]}"
    raw = marked_event(session_id)
    hold = hold_answers(openai_server, raw)
    caplog.set_level(logging.WARNING, logger="service.worker.worker")
    first = await start_worker(first_settings, name="first")
    await send(producer, first_settings, raw, session_id)
    await wait_until(hold.held.is_set, "the first worker's run to be inside a model call")
    first_epoch = await _epoch(redis, session_id)
    await start_worker(second_settings, name="second")

    async def taken_over() -> bool:
        return await _epoch(redis, session_id) > first_epoch

    await wait_until(taken_over, "the second worker to take the session")
    hold.release()

    def fenced() -> bool:
        return any("left to the session's new owner" in r.getMessage() for r in caplog.records)

    await wait_until(fenced, "the first worker's run to be fenced")
    records = await read_topic(
        first_settings.kafka_bootstrap or "",
        first_settings.topic_results,
        until=lambda rs: raw["id"] in results_by_event(rs),
    )
    results = results_by_event(records)
    assert [r["status"] for r in results[raw["id"]]] == ["completed"]  # the second's only
    assert first.handler is not None and first.handler.completed == 0
    await _assert_one_chain(saver, session_id)
    await _assert_gapless(redis, session_id)

    # Closed, the first worker commits what is safe: not the event it was fenced off.
    first.stop()
    await wait_until(lambda: first.consumer is None, "the first worker to close")
    assert await offsets(first_settings) == (0, 1)
    await wait_until(
        lambda: _offsets_are(second_settings, (1, 1)), "the second worker to commit the event"
    )


async def _offsets_are(settings: Settings, wanted: tuple[int, int]) -> bool:
    return await offsets(settings) == wanted
