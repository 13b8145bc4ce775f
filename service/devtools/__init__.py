"""Local development: Tansu and Redis servers from wheels, `agentflow dev`, the demo."""
