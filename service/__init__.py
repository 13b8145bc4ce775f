"""Everything that talks to the outside: Kafka, Redis, HTTP, the CLI (see README, Layout)."""
