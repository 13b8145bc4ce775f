"""The `agentflow` command line: thin commands over the library."""
