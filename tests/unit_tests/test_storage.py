"""Storage contracts that need no server: the Redis key names, the client mode."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from nodes.models import AgentWait
from service.storage import keys
from service.storage.publisher import follow, read_log
from service.storage.sessions import SessionRecord, SessionStore


def test_key_and_channel_names_stay_as_documented() -> None:
    assert keys.INDEX_KEY == "agentflow:sessions"
    assert keys.ALL_TRANSITIONS_CHANNEL == "agentflow:transitions"
    assert keys.session_key("s1") == "agentflow:session:{s1}"
    assert keys.event_key("e1") == "agentflow:event:e1"
    assert keys.seq_key("s1") == "agentflow:session:{s1}:seq"
    assert keys.epoch_key("s1") == "agentflow:session:{s1}:epoch"
    assert keys.log_key("s1") == "agentflow:session:{s1}:log"
    assert keys.session_channel("s1") == "agentflow:session:{s1}:transitions"
    assert keys.workflow_key("w1") == "agentflow:workflow:w1"
    assert keys.workflow_index() == "agentflow:workflows"
    assert keys.workflow_index(dims=32) == "agentflow:workflows:vec32"
    assert keys.LLM_CACHE_PREFIX == "agentflow:llmcache"
    assert keys.memory_keys(("agentflow", "subjects", "ab12")) == (
        "agentflow:memory:{agentflow.subjects.ab12}:values",
        "agentflow:memory:{agentflow.subjects.ab12}:created",
        "agentflow:memory:{agentflow.subjects.ab12}:order",
    )


async def test_readers_of_text_refuse_a_client_that_answers_bytes() -> None:
    # Making a client does not connect, so no server is needed.
    raw = Redis.from_url("redis://127.0.0.1:1/0")
    text = Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    with pytest.raises(TypeError, match="SessionStore needs a Redis client made with decode"):
        SessionStore(raw, ttl_s=60)
    with pytest.raises(TypeError, match="decode_responses=True"):
        await read_log(raw, "s1")
    with pytest.raises(TypeError, match="decode_responses=True"):
        await anext(follow(raw, "s1"))
    assert SessionStore(text, ttl_s=60).redis is text
    await raw.aclose()
    await text.aclose()


def test_only_a_session_waiting_for_a_human_takes_an_answer() -> None:
    wait = AgentWait(task_id="t1", agent="eligibility_analyst", step_id="s2", timeout_s=300)
    asking = SessionRecord(session_id="s", status="interrupted")
    waiting = SessionRecord(session_id="s", status="waiting", waiting_on=[wait])
    done = SessionRecord(session_id="s", status="completed")
    assert asking.why_not_answerable() is None
    assert waiting.why_not_answerable() == (
        "session s waits for eligibility_analyst, not for a human answer"
    )
    assert done.why_not_answerable() == "session s is completed, not waiting for an answer"
