"""The Kafka worker: `Worker` runs events from Kafka as graph runs and sends their results.

- `worker`: the lifecycle (start, run loop, stop, graceful close, signals);
- `consumer`: polling, per-partition offsets and the commits, flow control, rebalances;
- `handler`: process, resume or cancel one event and finish the session's run;
- `outbox`: results, session lifecycle messages and dead letters sent to Kafka.
"""

from __future__ import annotations

from service.worker.worker import Worker

__all__ = ["Worker"]
