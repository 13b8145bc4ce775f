"""What the storage classes ask of the Redis client they are given, and of the libraries on it.

Redis replies come as text: session records, the transition log and pub/sub messages are
read from a client made with `decode_responses=True`, not decoded by hand. The Redis
library agentflow builds on (redisvl, under the workflow library) and its own checkpointer
work on such a client as well as on one that answers bytes, so one
text client can serve a whole process.

The session path (checkpoints, transitions, session records, subject memory) takes either
client of redis-py, `Redis` or `RedisCluster` (`RedisClient`): every command or script it
sends names keys of one slot, and what spans slots is sent as several commands.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TypeAlias, TypeVar

from redis.asyncio import Redis, RedisCluster

__all__ = ["RedisClient", "quiet_index_setup", "require_text_client"]

RedisClient: TypeAlias = Redis | RedisCluster
"""A redis-py asyncio client of one Redis, or of a Redis Cluster."""

_ClientT = TypeVar("_ClientT", bound=RedisClient)

# Setting up an index that exists logs "Index already exists, not overwriting." (redisvl):
# lines at every start that say
# nothing a user can act on. Their warnings and errors still come through.
_SETUP_LOGGERS = ("redisvl.index.index",)


def require_text_client(redis: _ClientT, user: str) -> _ClientT:
    """Return the client if it answers text; otherwise say how to make one.

    Raises:
        TypeError: the client was made without `decode_responses=True`.
    """
    encoder = getattr(redis, "get_encoder", None)
    if encoder is not None and not encoder().decode_responses:
        raise TypeError(
            f"{user} needs a Redis client made with decode_responses=True "
            "(e.g. Redis.from_url(url, decode_responses=True)); this one answers bytes"
        )
    return redis


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO


@contextlib.contextmanager
def quiet_index_setup() -> Iterator[None]:
    """Drop the INFO lines of the Redis libraries while they set up their indexes."""
    loggers = [logging.getLogger(name) for name in _SETUP_LOGGERS]
    quiet = _DropInfo()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
