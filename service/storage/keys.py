"""Every Redis key and pub/sub channel agentflow names, in one place.

Users, scripts and tests read these names, so they do not change. The braces around a
session id are literal: they are the key's Redis Cluster hash tag, so every key of one
session lives in one slot and one script may touch them all.

- `agentflow:sessions` (sorted set): session ids by the time of their last update;
- `agentflow:session:{id}` (hash): a session's record;
- `agentflow:event:{id}` (string): an event id, its session and how far it got;
- `agentflow:session:{id}:seq` (string): the counter that numbers its transitions;
- `agentflow:session:{id}:epoch` (string): its fencing epoch, raised by each run a worker
  takes; checkpoint writes and transitions of an older run are refused;
- `agentflow:session:{id}:log` (stream): its transitions, for clients that come late;
- `agentflow:session:{id}:transitions` (channel): its transitions, live;
- `agentflow:transitions` (channel): every session's transitions, live;
- `agentflow:workflow:{id}` (JSON): a workflow of the library; its search index is
  `agentflow:workflows` (and `agentflow:workflows:vec{dims}` with embeddings);
- `agentflow:memory:{ns}:values` (hash), `agentflow:memory:{ns}:created` (hash) and
  `agentflow:memory:{ns}:order` (sorted set): the long-term store's items of one namespace
  `ns` (its labels joined by `.`; subject notes: `agentflow.subjects.<sha256 of subject>`),
  by key, their creation times and their keys by update time; one hash tag per namespace;
- `agentflow:llmcache:*` (strings): the exact LLM cache (langchain-redis `RedisCache`);
- `agentflow:session:{id}:waits` (hash): the remote agents' tasks a session waits for, by
  task id (agent, attempt, since, deadline), while they are out;
- `agentflow:agentwaits:deadlines` (sorted set): those tasks (`<replies topic> <session id>
  <task id>`) by deadline, swept by every worker under `agentflow:agentwaits:sweeper`
  (string, short TTL);
- `agentflow:session:{id}:questions` (hash): the interrupts a session waits on a human
  for, by interrupt id (kind, payload, since, deadline);
- `agentflow:humanwaits:deadlines` (sorted set): those with a deadline
  (`AGENTFLOW_HUMAN_TIMEOUT_S`; `<events topic> <session id> <interrupt id>`) by deadline,
  swept by every worker under `agentflow:humanwaits:sweeper` (string, short TTL);
- `agentflow:worker:{name}` (string, short TTL): a running worker's state (taking events
  or degraded, since when, why), for `agentflow health` and `/healthz`;
- `agentflow:agent-host:{name}` (string, short TTL): a running agent host's heartbeat (the
  agents it serves, since when, tasks running and answered), for `agentflow agents list`;
- `agentflow:agent-reply:{task id}` (string): the reply an agent host gave to a task, sent
  again when the task is delivered again (kept `AGENTFLOW_SESSION_TTL_S`).

- `agentflow:checkpoint:{thread}:i` (sorted set) and `agentflow:checkpoint:{thread}:d`
  (hash): a session's checkpoints, writes and channel values (`RedisSaver`, whose module
  `service.storage.checkpointer` describes them); `agentflow:checkpoint_run:{run id}` (set):
  the threads a LangGraph run id wrote.
"""

from __future__ import annotations

__all__ = [
    "AGENT_HOST_PREFIX",
    "ALL_TRANSITIONS_CHANNEL",
    "CHECKPOINT_PREFIX",
    "DEADLINES_KEY",
    "HUMAN_DEADLINES_KEY",
    "HUMAN_SWEEPER_KEY",
    "INDEX_KEY",
    "LLM_CACHE_PREFIX",
    "MEMORY_PREFIX",
    "SWEEPER_KEY",
    "WORKER_PREFIX",
    "WORKFLOW_PREFIX",
    "agent_host_key",
    "agent_reply_key",
    "epoch_key",
    "event_key",
    "log_key",
    "memory_keys",
    "parked_key",
    "questions_key",
    "seq_key",
    "session_channel",
    "session_key",
    "waits_key",
    "worker_key",
    "workflow_index",
    "workflow_key",
]

INDEX_KEY = "agentflow:sessions"
"""The sorted set of session ids, scored by the time of their last update."""

ALL_TRANSITIONS_CHANNEL = "agentflow:transitions"
"""The pub/sub channel every session's transitions are published on too."""

CHECKPOINT_PREFIX = "agentflow:checkpoint"
"""A session's checkpoints are `{prefix}:{<session id>}:i` and `:d`; runs `{prefix}_run:{<id>}`."""

WORKFLOW_PREFIX = "agentflow:workflow"
"""The workflow library's documents live under `{prefix}:{id}`, its index is `{prefix}s`."""

LLM_CACHE_PREFIX = "agentflow:llmcache"
"""The exact LLM cache's keys start with this."""

MEMORY_PREFIX = "agentflow:memory"
"""The long-term store's keys start with this."""

WORKER_PREFIX = "agentflow:worker"
"""Each running worker keeps its state under `{prefix}:{name}`."""


def worker_key(name: str) -> str:
    """The key of a worker's state."""
    return f"{WORKER_PREFIX}:{name}"


AGENT_HOST_PREFIX = "agentflow:agent-host"
"""Each running agent host keeps its heartbeat under `{prefix}:{name}`."""


def agent_host_key(name: str) -> str:
    """The key of an agent host's heartbeat."""
    return f"{AGENT_HOST_PREFIX}:{name}"


def agent_reply_key(task_id: str) -> str:
    """The key of the reply an agent host gave to a task."""
    return f"agentflow:agent-reply:{task_id}"


def _session(session_id: str) -> str:
    """The prefix of one session's keys, its id the hash tag."""
    return f"agentflow:session:{{{session_id}}}"


def session_key(session_id: str) -> str:
    """Return the hash that holds one session's record."""
    return _session(session_id)


def event_key(event_id: str) -> str:
    """Return the key that remembers one event id and how far it got."""
    return f"agentflow:event:{event_id}"


def session_channel(session_id: str) -> str:
    """Return the pub/sub channel of one session's transitions."""
    return f"{_session(session_id)}:transitions"


def log_key(session_id: str) -> str:
    """Return the stream that keeps one session's transitions for late clients."""
    return f"{_session(session_id)}:log"


def seq_key(session_id: str) -> str:
    """Return the counter that numbers one session's transitions."""
    return f"{_session(session_id)}:seq"


def epoch_key(session_id: str) -> str:
    """Return the counter of one session's fencing epochs: its newest run's is the value."""
    return f"{_session(session_id)}:epoch"


def parked_key(session_id: str) -> str:
    """Return the list of events parked behind a session that waits, oldest first."""
    return f"{_session(session_id)}:parked"


def waits_key(session_id: str) -> str:
    """Return the hash of the remote agents' tasks a session waits for, by task id."""
    return f"{_session(session_id)}:waits"


DEADLINES_KEY = "agentflow:agentwaits:deadlines"
"""The sorted set of the tasks sessions wait for, by deadline (a Unix time)."""

SWEEPER_KEY = "agentflow:agentwaits:sweeper"
"""The lock the worker that sweeps the deadlines holds for a moment."""


def questions_key(session_id: str) -> str:
    """Return the hash of the interrupts a session waits on a human for, by interrupt id."""
    return f"{_session(session_id)}:questions"


HUMAN_DEADLINES_KEY = "agentflow:humanwaits:deadlines"
"""The sorted set of the interrupts waiting for a human that have a deadline, by deadline."""

HUMAN_SWEEPER_KEY = "agentflow:humanwaits:sweeper"
"""The lock the worker that sweeps the humans' deadlines holds for a moment."""


def memory_keys(namespace: tuple[str, ...]) -> tuple[str, str, str]:
    """Return the long-term store's keys of one namespace: values, created, order.

    Labels hold no `.` (LangGraph refuses them), so the joined namespace names one
    namespace only; it is the keys' hash tag, so all three live in one cluster slot.
    """
    tag = ".".join(namespace)
    base = f"{MEMORY_PREFIX}:{{{tag}}}"
    return f"{base}:values", f"{base}:created", f"{base}:order"


def workflow_key(workflow_id: str, prefix: str = WORKFLOW_PREFIX) -> str:
    """Return the JSON document of one workflow of the library."""
    return f"{prefix}:{workflow_id}"


def workflow_index(prefix: str = WORKFLOW_PREFIX, *, dims: int | None = None) -> str:
    """Return the name of the library's search index, or of its vector index of `dims`."""
    return f"{prefix}s" if dims is None else f"{prefix}s:vec{dims}"
