"""The gateway's routes, one router per file: events, sessions, stream, ops."""
