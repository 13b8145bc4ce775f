"""Fenced runs without servers: the epoch a run carries, and where a refusal goes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from graphs.workflow import build_graph
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import CloudEvent
from service.config import load_settings
from service.errors import StaleWriter
from service.runtime.runner import SessionRunner
from service.storage.checkpointer import EPOCH_CONFIG_KEY, SavedWrites
from service.storage.checkpoints import checkpoint_serde
from service.storage.publisher import BackgroundPublisher
from service.storage.transitions import Transition
from tests.unit_tests.helpers import FAST_RETRY

EVENT = {
    "specversion": "1.0",
    "id": "evt-fence-1",
    "source": "tests",
    "type": "claim.submitted",
    "data": {"claim": "a broken window"},
}


class FencingSaver(InMemorySaver):
    """An in-memory saver that records the epochs it is given and refuses from a put on."""

    def __init__(self, refuse_from_put: int | None = None) -> None:
        super().__init__(serde=checkpoint_serde())
        self.refuse_from_put = refuse_from_put
        self.epochs: list[Any] = []
        self.puts = 0

    def _fence(self, config: RunnableConfig) -> None:
        epoch = config["configurable"].get(EPOCH_CONFIG_KEY)
        self.epochs.append(epoch)
        if self.refuse_from_put is not None and self.puts >= self.refuse_from_put:
            raise StaleWriter(config["configurable"]["thread_id"], epoch, epoch + 1)

    async def aput(self, config: RunnableConfig, *args: Any, **kwargs: Any) -> RunnableConfig:
        self._fence(config)
        self.puts += 1
        return await super().aput(config, *args, **kwargs)

    async def aput_writes(self, config: RunnableConfig, *args: Any, **kwargs: Any) -> None:
        self._fence(config)
        await super().aput_writes(config, *args, **kwargs)


def _runner(saver: FencingSaver) -> tuple[SessionRunner, list[Transition], list[str]]:
    seen: list[Transition] = []
    taken: list[str] = []

    async def sink(transition: Transition) -> None:
        seen.append(transition)

    async def take(session_id: str) -> int:
        taken.append(session_id)
        return 7

    context = load_settings(model="offline").context(library=InMemoryWorkflowLibrary())
    graph = build_graph(saver, model_retry=FAST_RETRY)
    return SessionRunner(graph, context, sink=sink, take=take), seen, taken


async def test_a_run_carries_its_epoch_to_every_write_and_transition() -> None:
    saver = FencingSaver()
    runner, seen, taken = _runner(saver)
    result = await runner.start(CloudEvent.parse(EVENT), "s-fence")
    assert result.status == "completed"
    assert taken == ["s-fence"]  # one take per run
    assert saver.epochs and set(saver.epochs) == {7}
    assert {t.epoch for t in seen} == {7}
    assert all("epoch" not in json.loads(t.model_dump_json()) for t in seen)
    async for item in saver.alist({"configurable": {"thread_id": "s-fence"}}):
        assert not any("epoch" in key for key in item.metadata)


async def test_a_fenced_run_raises_and_ends_nothing() -> None:
    saver = FencingSaver(refuse_from_put=3)
    runner, seen, _ = _runner(saver)
    with pytest.raises(StaleWriter):
        await runner.start(CloudEvent.parse(EVENT), "s-fence")
    assert saver.puts == 3
    # No failed result, no session.failed: the run just stops. What it emitted while the
    # refusal was on its way carries its epoch, so the publisher refuses that too.
    assert seen and not any(t.terminal for t in seen)
    assert {t.epoch for t in seen} == {7}


class _Refusing:
    """A publisher that refuses the transitions of epoch 1 of session `s1`."""

    def __init__(self) -> None:
        self.sent: list[Transition] = []

    async def publish_batch(self, batch: dict[str, Sequence[Transition]]) -> list[StaleWriter]:
        refused = []
        for session_id, transitions in batch.items():
            for t in transitions:
                if (session_id, t.epoch) == ("s1", 1):
                    refused.append(StaleWriter(session_id, 1, 2))
                else:
                    self.sent.append(t)
        return refused[:1]


async def test_a_refusal_goes_to_the_stale_run_only(caplog: pytest.LogCaptureFixture) -> None:
    inner = _Refusing()
    publisher = BackgroundPublisher(inner)  # type: ignore[arg-type]

    def started(session_id: str, epoch: int | None) -> Transition:
        return Transition(session_id=session_id, type="node.started", node="plan", epoch=epoch)

    def ended(session_id: str, epoch: int | None) -> Transition:
        return Transition(session_id=session_id, type="session.completed", epoch=epoch)

    await publisher.publish(started("s1", 1))
    await publisher.publish(started("s1", 2))
    await publisher.publish(started("s2", 1))
    await publisher.publish(ended("s1", 2))  # waits for the batch: the newer run goes on
    await publisher.publish(ended("s2", 1))
    with pytest.raises(StaleWriter) as refused:
        await publisher.publish(started("s1", 1))
    assert (refused.value.session_id, refused.value.epoch) == ("s1", 1)
    # Refused again, and that run stops: a newer run's transition forgets what it left.
    await publisher.publish(started("s1", 1))
    await publisher.drain("s1", 2)
    await publisher.publish(started("s1", 2))
    await publisher.close()
    assert "not published" not in caplog.text
    sent = [(t.session_id, t.epoch, t.type) for t in inner.sent]
    assert [t for t in sent if t[0] == "s1"] == [
        ("s1", 2, "node.started"),
        ("s1", 2, "session.completed"),
        ("s1", 2, "node.started"),
    ]
    assert [t for t in sent if t[0] == "s2"] == [
        ("s2", 1, "node.started"),
        ("s2", 1, "session.completed"),
    ]


async def test_saved_writes_answers_a_report_made_before_or_after_the_wait() -> None:
    saved = SavedWrites()
    saved("early", True)  # stored before the run asked
    assert await saved.saved("early") is True
    waiting = asyncio.ensure_future(saved.saved("late"))
    await asyncio.sleep(0)
    assert not waiting.done()
    saved("late", False)  # the saver's write failed
    assert await waiting is False
