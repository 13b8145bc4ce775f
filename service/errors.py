"""The service's errors: one base class, each error a subclass of the closest built-in.

Every message says what went wrong and what to do about it, so the CLI and the gateway
can show it as it is.
"""

from __future__ import annotations

__all__ = [
    "AgentflowError",
    "ConfigError",
    "CorruptWorkflowError",
    "EpochLost",
    "KafkaUnavailable",
    "NoQueryEngineError",
    "ReplayError",
    "ServerStartError",
    "StaleWriter",
    "TemplateError",
    "UnknownSessionError",
    "fence_refusal",
]


class AgentflowError(Exception):
    """Base of the errors agentflow's service raises on purpose."""


class ConfigError(AgentflowError, ValueError):
    """The configuration cannot start the service; the message says what to fix."""


class TemplateError(AgentflowError, ValueError):
    """A workflow template file cannot be read or holds an invalid workflow."""


class CorruptWorkflowError(AgentflowError, ValueError):
    """A stored workflow document does not hold a valid workflow."""


class UnknownSessionError(AgentflowError, LookupError):
    """A resume names a session that has no checkpoint to resume from."""


class ReplayError(AgentflowError, ValueError):
    """A replay cannot start; the message says why and what to pick instead."""


class KafkaUnavailable(AgentflowError, ConnectionError):
    """Kafka did not acknowledge an event in time."""


class ServerStartError(AgentflowError, RuntimeError):
    """A local dev server cannot be found, started or reached."""


class NoQueryEngineError(AgentflowError, RuntimeError):
    """A Redis lacks the query engine (search and JSON) the workflow library needs."""

    def __init__(self, address: str, answer: str) -> None:
        self.address = address
        """Where that Redis is (host:port/db, no credentials)."""
        self.answer = answer
        """What it answered to the first search command."""
        super().__init__(
            f"the Redis at {address} has no query engine ({answer}); the workflow library "
            "needs one: set AGENTFLOW_LIBRARY_REDIS_URL to a Redis 8 with the search and "
            "JSON modules loaded, or a Redis Stack"
        )


class StaleWriter(AgentflowError, RuntimeError):
    """A run's write was refused: a newer run of its session took over (a higher epoch)."""

    def __init__(self, session_id: str, epoch: int, current: int) -> None:
        self.session_id = session_id
        """The session both runs write."""
        self.epoch = epoch
        """The epoch of the run that was refused."""
        self.current = current
        """The session's epoch when it was refused: the newer run's."""
        super().__init__(
            f"session {session_id}: this run (epoch {epoch}) was fenced off by a newer run "
            f"(epoch {current}); it stops and writes nothing more, the newer run goes on"
        )


class EpochLost(AgentflowError, ConnectionError):
    """Redis no longer holds a session's fencing epoch: it lost data (restarted empty, evicted).

    A run's write is refused then, as it can no longer be told from a stale one; it is an
    outage of Redis like any other: the run is retried, and takes the session again.
    """

    def __init__(self, session_id: str, epoch: int) -> None:
        self.session_id = session_id
        """The session the run writes."""
        self.epoch = epoch
        """The epoch the run took, which Redis no longer holds."""
        super().__init__(
            f"session {session_id}: Redis no longer holds the fencing epoch this run took "
            f"(epoch {epoch}): it lost data; the run is retried and takes the session again"
        )


def fence_refusal(session_id: str, epoch: int, current: int) -> StaleWriter | EpochLost:
    """Return the error of a run's write refused where its session's epoch is `current`.

    `current` is 0 when Redis holds no epoch for the session any more.
    """
    if current == 0:
        return EpochLost(session_id, epoch)
    return StaleWriter(session_id, epoch, current)
