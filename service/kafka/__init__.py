"""Kafka plumbing the worker and the agent hosts share.

- `consumer`: a consumer-group member that commits only offsets whose earlier records
  all finished, pauses when full and lets go of revoked partitions gracefully;
- `dead_letters`: records that cannot be handled, sent to the dead-letter topic with why.
"""
