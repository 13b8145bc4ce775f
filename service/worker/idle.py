"""An idle worker gives its memory back: the free heap a burst of runs left returns to the OS.

A run's working set (its state, messages, model replies) is freed when the run ends or
parks, but CPython and glibc keep freed heap for reuse. A worker with nothing in flight
for `IDLE_AFTER_S` collects garbage and asks glibc to return free pages (`malloc_trim`), at
most once per `AT_MOST_EVERY_S`, and logs its RSS before and after. What stays is heap
that fragmentation pins (CPython frees an arena only when all of it is free). On a C
library without `malloc_trim` only the collection runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["IDLE_AFTER_S", "IdleTrim", "give_back_memory", "rss_mib"]

logger = logging.getLogger(__name__)

IDLE_AFTER_S = 2.0
"""How long a worker has nothing in flight before it gives memory back."""
AT_MOST_EVERY_S = 30.0
"""The least time between two give-backs: a worker that goes idle often pays rarely."""


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


def rss_mib() -> float | None:
    """This process's resident memory in MiB, or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def give_back_memory() -> tuple[float | None, float | None]:
    """Collect garbage and return free heap pages to the OS; the RSS before and after."""
    before = rss_mib()
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
    return before, rss_mib()


class IdleTrim:
    """Gives memory back once the worker has been idle a while (`idle()` after each run)."""

    def __init__(
        self,
        is_idle: Callable[[], bool],
        *,
        after_s: float = IDLE_AFTER_S,
        at_most_every_s: float = AT_MOST_EVERY_S,
    ) -> None:
        """Make the trimmer.

        Args:
            is_idle: whether nothing is in flight now.
            after_s: how long the worker stays idle before memory is given back.
            at_most_every_s: the least time between two give-backs.
        """
        self.is_idle = is_idle
        self.after_s = after_s
        self.at_most_every_s = at_most_every_s
        self.given_back = 0
        self._last = -at_most_every_s
        self._handle: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        """Whether a give-back is scheduled."""
        return self._handle is not None

    def idle(self) -> None:
        """Say a run ended: memory is given back if the worker stays idle."""
        if self.pending or not self.is_idle():
            return
        now = time.monotonic()
        delay = max(self.after_s, self._last + self.at_most_every_s - now)
        self._handle = asyncio.get_running_loop().call_later(delay, self._give_back)

    def _give_back(self) -> None:
        self._handle = None
        if not self.is_idle():
            return  # busy again: the next run's end asks again
        before, after = give_back_memory()
        self._last = time.monotonic()
        self.given_back += 1
        if before is not None and after is not None:
            logger.info("idle: gave memory back, RSS %.1f -> %.1f MiB", before, after)

    def close(self) -> None:
        """Forget a pending give-back."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
