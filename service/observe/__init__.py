"""Seeing what sessions do: metrics, the path a session took, graph drawings, terminal output."""
