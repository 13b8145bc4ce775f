"""What the worker makes of a record: its session, its event, or its dead letter."""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord
from langgraph.checkpoint.memory import InMemorySaver

from graphs.workflow import build_graph
from nodes.context import WorkflowContext
from service.bootstrap import max_request_bytes
from service.config import Settings, load_settings
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.transitions import Transition
from service.worker.handler import EventHandler
from service.worker.outbox import Outbox

EVENT = {"specversion": "1.0", "id": "e-1", "source": "test", "type": "claim.submitted"}


def record(value: bytes, key: bytes | None = None, **kw: Any) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="agentflow.events",
        partition=kw.get("partition", 0),
        offset=kw.get("offset", 7),
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        headers=kw.get("headers", []),
    )


def handler(settings: Settings | None = None) -> EventHandler:
    """A handler for `parse`, which reads only the settings."""
    none = cast(Any, None)
    return EventHandler(none, none, none, settings or load_settings())


def parse(value: dict[str, Any] | bytes, key: bytes | None = None) -> tuple[Any, ...]:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return handler().parse(record(raw, key))


def test_the_session_is_the_attribute_else_the_key_else_derived_from_the_id() -> None:
    session_id, event, problem = parse(EVENT | {"sessionid": "s-attr"}, b"s-key")
    assert (session_id, problem) == ("s-attr", None) and event.id == "e-1"
    assert parse(EVENT, b"s-key")[0] == "s-key"
    assert parse(EVENT)[0] == "session-e-1"
    assert parse(EVENT, b"")[0] == "session-e-1"  # an empty key is no key
    odd = EVENT | {"id": "claim 7/2026"}
    digest = hashlib.sha256(b"claim 7/2026").hexdigest()[:32]
    assert parse(odd)[0] == f"session-{digest}"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (b"has space", "key is not a session id: must be 1 to 200 characters"),
        (b"a/b", "'/' (at 1)"),
        (b"k" * 100_000, "not 100000 characters"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"ok\xc3", "not valid UTF-8"),  # a cut multi-byte character
    ],
)
def test_a_key_that_is_not_a_session_id_is_a_dead_letter(key: bytes, reason: str) -> None:
    session_id, event, problem = parse(EVENT | {"sessionid": "fine"}, key)
    assert event is None and reason in problem
    assert session_id == ""  # not chained after any real session


def test_invalid_utf8_keys_never_share_a_session() -> None:
    # patched with U+FFFD, both keys would be "\ufffd": one session for two producers
    assert parse(EVENT, b"\xff")[1] is None and parse(EVENT, b"\xfe")[1] is None


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (EVENT | {"sessionid": "a/b"}, "field 'sessionid'"),
        (EVENT | {"id": "x" * 257}, "AGENTFLOW_MAX_ID_BYTES (256)"),
        (EVENT | {"id": "bell\x07"}, "control characters"),
        (EVENT | {"data": json.loads("[" * 150 + "]" * 150)}, "AGENTFLOW_MAX_JSON_DEPTH (64"),
    ],
)
def test_events_that_break_the_rules_are_dead_letters(event: dict[str, Any], reason: str) -> None:
    session_id, parsed, problem = parse(event, b"s-1")
    assert parsed is None and reason in problem and session_id == "s-1"


def test_the_limits_come_from_the_settings() -> None:
    settings = load_settings(max_json_depth=100, max_id_bytes=512)
    event = EVENT | {"id": "x" * 512, "data": json.loads("[" * 98 + "]" * 98)}
    _, parsed, problem = handler(settings).parse(record(json.dumps(event).encode()))
    assert problem is None and parsed is not None


# --- dead letters that fit ------------------------------------------------------------------


class Broker:
    """A producer that takes records up to `limit` bytes, as a broker with that limit would."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[dict[str, Any]] = []
        self.refused = 0

    async def send_and_wait(
        self, topic: str, value: bytes | None, *, key: bytes | None, headers: list[Any]
    ) -> None:
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.limit:
            self.refused += 1
            raise MessageSizeTooLargeError(f"{size} bytes")
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": dict(headers)})


def outbox(broker: Broker, settings: Settings) -> Outbox:
    return Outbox(cast(Any, broker), cast(Any, None), settings)


async def test_a_dead_letter_that_fits_carries_the_record_as_it_came() -> None:
    settings = load_settings(max_event_bytes=4096)
    broker = Broker(max_request_bytes(settings))
    await outbox(broker, settings).dead_letter(
        record(b"\xff not json", b"k1", headers=[("trace", b"t-1")]), "event is not valid JSON"
    )
    [sent] = broker.sent
    assert sent["value"] == b"\xff not json" and sent["key"] == b"k1"
    assert sent["headers"]["trace"] == b"t-1" and "truncated" not in sent["headers"]
    assert sent["headers"]["reason"] == b"event is not valid JSON"
    assert sent["headers"]["offset"] == b"7" and sent["topic"] == settings.topic_dlq


async def test_a_dead_letter_too_large_to_send_carries_a_prefix_its_size_and_digest() -> None:
    settings = load_settings(max_event_bytes=4096)
    limit = max_request_bytes(settings)  # what the worker's producer sends at most
    broker = Broker(limit)
    value = bytes(range(256)) * (3 * limit // 256)  # 3 times the largest request
    await outbox(broker, settings).dead_letter(
        record(value, b"s-1", headers=[("trace", b"t-1")]), "event of 3 MiB exceeds ..."
    )
    [sent] = broker.sent
    headers = sent["headers"]
    assert broker.refused == 0
    assert headers["truncated"] == b"true" and int(headers["original_size"]) == len(value)
    assert headers["original_sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert headers["reason"] == b"event of 3 MiB exceeds ..." and headers["trace"] == b"t-1"
    assert value.startswith(sent["value"]) and len(sent["value"]) > limit - 1024
    assert sent["key"] == b"s-1"


async def test_a_broker_that_refuses_the_size_gets_a_smaller_dead_letter_at_last_none() -> None:
    settings = load_settings(max_event_bytes=4096)
    value = b"x" * (max_request_bytes(settings) + 10)
    broker = Broker(100 * 1024)  # lower than the producer's limit: refuses the first cut
    await outbox(broker, settings).dead_letter(record(value, b"s-1"), "too big")
    [sent] = broker.sent
    assert broker.refused == 1 and 60 * 1024 < len(sent["value"]) < 64 * 1024
    assert int(sent["headers"]["original_size"]) == len(value)

    tiny = Broker(2048)  # takes little more than our headers: value and own headers go
    big_key = b"k" * 5000
    await outbox(tiny, settings).dead_letter(
        record(value, big_key, headers=[("blob", b"b" * 10_000)]), "too big"
    )
    [sent] = tiny.sent
    assert tiny.refused == 2 and sent["value"] == b"" and "blob" not in sent["headers"]
    assert sent["headers"]["reason"] == b"too big" and sent["key"] == big_key[:1024]
    assert sent["headers"]["original_key_sha256"] == hashlib.sha256(big_key).hexdigest().encode()
    assert int(sent["headers"]["original_size"]) == len(value)


# --- a result always names its event --------------------------------------------------------


class RefusingSaver(InMemorySaver):
    """Refuses to store the checkpoints of one thread from a step on, as a store that cannot."""

    refuse_from_step: int | None = None

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        step = metadata.get("step")
        if self.refuse_from_step is not None and step >= self.refuse_from_step:
            raise ValueError("the store cannot take this checkpoint")
        return await super().aput(config, checkpoint, metadata, new_versions)


async def test_a_run_whose_checkpoints_cannot_be_written_still_names_its_event(
    make_event: Any,
) -> None:
    saver = RefusingSaver(serde=checkpoint_serde())
    sent: list[Transition] = []

    async def sink(transition: Transition) -> None:
        sent.append(transition)

    runner = SessionRunner(build_graph(saver), WorkflowContext(), sink=sink)
    first = make_event(id="e-first")
    assert (await runner.start(first, "s-1")).event_id == "e-first"

    saver.refuse_from_step = -1  # not even the input checkpoint of the next event is stored
    second = make_event(id="e-second")
    result = await runner.start(second, "s-1")
    assert result.status == "failed" and "cannot take" in (result.error or "")
    assert result.event_id == "e-second"  # not "" nor the session's previous event

    fresh = await runner.start(make_event(id="e-third"), "s-2")  # a session with no state
    assert fresh.status == "failed" and fresh.event_id == "e-third"
    ended = [t for t in sent if t.type == "session.failed"]
    assert [t.data["result"]["event_id"] for t in ended] == ["e-second", "e-third"]
