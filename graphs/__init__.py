"""The LangGraph graphs: `graphs.workflow.graph` is the agentflow workflow."""
