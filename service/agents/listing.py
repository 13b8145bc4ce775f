"""Where agents run: `agentflow agents list`."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from nodes.agents import AgentRegistry
from service.agents.host import agent_group
from service.bootstrap import kafka_admin, kafka_consumer, redis_client, require_services
from service.config import Settings
from service.storage.hosts import read_host_states

__all__ = ["AgentPlace", "agent_places"]


@dataclass(frozen=True)
class AgentPlace:
    """One agent: where it runs, who hosts it, how many of its tasks wait."""

    name: str
    runs: str
    """`local` (in the workers) or `kafka` (by hosts), as the agents file says; `kafka`
    for an agent a host serves that the file does not list."""
    hosts: list[str]
    """The live hosts that serve it (their heartbeats), from its task topic."""
    topic: str | None
    """Its task topic, when it has one."""
    lag: int | None
    """Tasks on its topic its hosts' group has not committed; None without a topic."""


async def agent_places(settings: Settings, registry: AgentRegistry) -> list[AgentPlace]:
    """Return every agent of the file and of the live hosts, in file order.

    Raises:
        ConfigError: Kafka or Redis is not configured.
    """
    require_services(settings)
    redis = redis_client(settings.redis_url or "", socket_connect_timeout=5)
    try:
        hosts = await read_host_states(redis)
    finally:
        await redis.aclose()
    # Hosts of other topic names (another deployment on this Redis) are not ours.
    ours = [h for h in hosts if any(settings.agent_topic(a) in h.topics for a in h.agents)]
    names = list(dict.fromkeys([*registry.names, *(a for h in ours for a in h.agents)]))
    served = {n: [h.name for h in ours if settings.agent_topic(n) in h.topics] for n in names}
    runs = {name: registry.get(name).runs if name in registry else "kafka" for name in names}
    over_kafka = [n for n in names if runs[n] == "kafka" or served[n]]
    lags = await _lags(settings, over_kafka)
    return [
        AgentPlace(
            name=name,
            runs=runs[name],
            hosts=served[name],
            topic=settings.agent_topic(name) if name in over_kafka else None,
            lag=lags.get(name),
        )
        for name in names
    ]


async def _lags(settings: Settings, agents: list[str]) -> dict[str, int]:
    """Return, per agent whose task topic exists, the tasks its group has not committed."""
    if not agents:
        return {}
    admin = kafka_admin(settings)
    ends_reader = kafka_consumer(settings)
    try:  # stopped even when they could not start: they hold a client all the same
        await admin.start()
        await ends_reader.start()
        existing = set(await admin.list_topics())
        topics = [settings.agent_topic(a) for a in agents if settings.agent_topic(a) in existing]
        partitions = {
            t["topic"]: [TopicPartition(t["topic"], p["partition"]) for p in t["partitions"]]
            for t in (await admin.describe_topics(topics) if topics else [])
        }
        lags = {}
        for agent in agents:
            tps = partitions.get(settings.agent_topic(agent))
            if not tps:
                continue
            ends = await ends_reader.end_offsets(tps)
            committed = await admin.list_consumer_group_offsets(agent_group(agent), partitions=tps)
            lags[agent] = sum(
                max(0, ends[tp] - max(0, committed[tp].offset if tp in committed else 0))
                for tp in tps
            )
        return lags
    finally:
        await ends_reader.stop()
        await admin.close()
