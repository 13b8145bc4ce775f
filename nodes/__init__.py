"""The workflow's nodes, state, models, prompts, agents and chat models (no infrastructure)."""
