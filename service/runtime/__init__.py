"""Running sessions: the runner, graph stream to transitions, embedded runs, replay."""
