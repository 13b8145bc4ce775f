"""What agent hosts keep in Redis: their heartbeats, and the replies they gave.

A host writes its heartbeat every few seconds with a short TTL, so a host that is gone
leaves nothing behind; `agentflow agents list` reads them. The reply to each task is
kept by task id, so a task delivered again (a crash, a rebalance) gets the same reply
without its tools running again.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from redis.asyncio import Redis

from service.storage.keys import AGENT_HOST_PREFIX, agent_host_key, agent_reply_key
from service.storage.workers import read_reports

__all__ = ["AnsweredTasks", "HostState", "RecordedReply", "read_host_states", "write_host_state"]


class HostState(BaseModel):
    """One agent host as it last reported itself."""

    name: str
    agents: list[str]
    """The agents it serves."""
    topics: list[str]
    """Their task topics, in the same order (hosts with other topic names, sharing this
    Redis, serve someone else)."""
    since: datetime
    """When it started."""
    running: int = 0
    """Tasks it is working on."""
    answered: int = 0
    """Tasks it replied to since it started."""


async def write_host_state(redis: Redis, state: HostState, *, ttl_s: int) -> None:
    """Record a host's heartbeat for `ttl_s` seconds."""
    await redis.set(agent_host_key(state.name), state.model_dump_json(), ex=ttl_s)


async def read_host_states(redis: Redis) -> list[HostState]:
    """Return the hosts that reported lately, by name."""
    return await read_reports(redis, AGENT_HOST_PREFIX, HostState)


class RecordedReply(BaseModel):
    """A reply as it was sent: where, with which key, the event's JSON."""

    topic: str
    key: str
    value: str


class AnsweredTasks:
    """The replies a host gave, by task id, kept `ttl_s` seconds."""

    def __init__(self, redis: Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def get(self, task_id: str) -> RecordedReply | None:
        """Return the reply given to a task, if one was."""
        raw = await self.redis.get(agent_reply_key(task_id))
        return RecordedReply.model_validate_json(raw) if raw else None

    async def put(self, task_id: str, reply: RecordedReply) -> None:
        """Record the reply to a task before it is sent."""
        await self.redis.set(agent_reply_key(task_id), reply.model_dump_json(), ex=self.ttl_s)
