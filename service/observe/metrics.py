"""Prometheus metrics of the gateway and the worker.

Both record into the default registry, so a process that runs both (`agentflow dev`)
shows one set; a worker on its own serves them on `AGENTFLOW_METRICS_PORT`, on
`AGENTFLOW_METRICS_HOST` (127.0.0.1 unless set).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from service.storage.transitions import Transition

__all__ = [
    "CONTENT_TYPE_LATEST",
    "DLQ_EVENTS",
    "EVENTS_RECEIVED",
    "NODE_DURATION",
    "RUNS_IN_FLIGHT",
    "RUN_DURATION",
    "SESSIONS",
    "RunTimer",
    "latest",
    "observe_transition",
    "serve_metrics",
    "timed_run",
]

logger = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

EVENTS_RECEIVED = Counter(
    "agentflow_events_received",
    "Events received, by the component that received them (gateway or worker).",
    ["component"],
)
RUNS_IN_FLIGHT = Gauge("agentflow_runs_in_flight", "Graph runs executing in this process.")
RUN_DURATION = Histogram(
    "agentflow_run_duration_seconds",
    "Wall time of one graph run (an event or a resume), by how it ended.",
    ["status"],
    buckets=_DURATION_BUCKETS,
)
NODE_DURATION = Histogram(
    "agentflow_node_duration_seconds",
    "Wall time of one node task, by node.",
    ["node"],
    buckets=_DURATION_BUCKETS,
)
DLQ_EVENTS = Counter("agentflow_dlq_events", "Events sent to the dead-letter topic.")
SESSIONS = Gauge(
    "agentflow_sessions",
    "Sessions known to Redis, by status (set by the gateway when scraped).",
    ["status"],
)


@dataclass
class RunTimer:
    """What a timed run reports: set `status` once the run has a result."""

    status: str = "error"


@contextmanager
def timed_run() -> Iterator[RunTimer]:
    """Count a run as in flight while the block runs, then observe its duration."""
    timer = RunTimer()
    started = time.perf_counter()
    RUNS_IN_FLIGHT.inc()
    try:
        yield timer
    except asyncio.CancelledError:
        timer.status = "cancelled"
        raise
    finally:
        RUNS_IN_FLIGHT.dec()
        RUN_DURATION.labels(timer.status).observe(time.perf_counter() - started)


def observe_transition(transition: Transition) -> None:
    """Record a node's duration when it completes."""
    if transition.type in ("node.completed", "node.failed") and transition.node:
        NODE_DURATION.labels(transition.node).observe((transition.duration_ms or 0) / 1000)


def latest() -> bytes:
    """Return the metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)


def serve_metrics(port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve `/metrics` on a port from a background thread; return its stop function.

    Args:
        port: The port; 0 picks a free one.
        host: The address to listen on: this machine only unless told otherwise (the
            listener has no auth); `AGENTFLOW_METRICS_HOST` sets it for the worker.
    """
    server, thread = start_http_server(port, addr=host)
    logger.info("metrics on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
