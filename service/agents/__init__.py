"""Agents as services: hosting agents for the worker over Kafka, and seeing where they run.

- `host`: `AgentHost` (`agentflow agents serve`): consumes agents' task topics, answers
  each task once with messages and a reply, honours cancels, dead-letters bad tasks;
- `turns`: one task, one agent turn, as the worker runs a step's (with its retry policy);
- `listing`: each agent, where it runs, its live hosts and its task topic's lag.

The protocol itself (task, reply, cancel, message) is `nodes.protocol`.
"""

from __future__ import annotations

from service.agents.host import AgentHost, agent_group
from service.agents.listing import AgentPlace, agent_places

__all__ = ["AgentHost", "AgentPlace", "agent_group", "agent_places"]
