"""Per-run options: the graph's `context_schema`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from langchain_core.language_models import BaseChatModel
from pydantic import ConfigDict
from pydantic.json_schema import SkipJsonSchema

from nodes.library import WorkflowLibrary

__all__ = ["NODE_NAMES", "WorkflowContext"]

NODE_NAMES = ("plan", "assign", "execute", "review", "finalize")


@dataclass(kw_only=True)
class WorkflowContext:
    """Options for one run; nodes read them from `runtime.context`.

    `library` and `chat_model` are objects, not options a JSON client can send: they are
    left out of the JSON schema LangGraph's server and Studio show.
    """

    # LangGraph builds the JSON schema with pydantic, which must accept the protocol type.
    __pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)

    model: str = field(
        default="offline",
        metadata={"description": "Default chat model as `provider:model`, or `offline`."},
    )
    node_models: dict[str, str] = field(
        default_factory=dict,
        metadata={"description": "Per-node model overrides, e.g. {'review': 'openai:gpt-4.1'}."},
    )
    agents_file: str = field(
        default="examples/agents.yaml",
        metadata={"description": "YAML file listing the agents steps can be assigned to."},
    )
    max_revise_rounds: int = field(
        default=2,
        metadata={"description": "How many times review may send steps back or ask a human."},
    )
    max_tool_iterations: int = field(
        default=4,
        metadata={"description": "Model turns per agent per step in the tool-calling loop."},
    )
    model_timeout_s: float = field(
        default=60.0, metadata={"description": "Timeout of one model call, in seconds."}
    )
    agent_timeout_s: float = field(
        default=300.0,
        metadata={
            "description": "How long a task of a `runs: kafka` agent may take when the "
            "agents file does not say (its `timeout_s`), in seconds."
        },
    )
    max_similar: int = field(
        default=3, metadata={"description": "How many similar workflows discovery keeps."}
    )
    min_similarity: float = field(
        default=0.0,
        metadata={"description": "Similar workflows scoring below this are not used."},
    )
    reuse: Literal["adapt", "direct", "off"] = field(
        default="off",
        metadata={
            "description": "When the best match is close enough: `adapt` it (one plan call), "
            "take it `direct` (no plan or assign call), or plan from scratch (`off`). "
            "The service's settings default to `adapt` (AGENTFLOW_REUSE)."
        },
    )
    reuse_score: float = field(
        default=0.75,
        metadata={"description": "A same-type workflow scoring at least this is reused."},
    )
    library: SkipJsonSchema[WorkflowLibrary | None] = field(
        default=None,
        metadata={"description": "The `WorkflowLibrary`; the process-wide in-memory one if unset."},
    )
    chat_model: SkipJsonSchema[BaseChatModel | None] = field(
        default=None,
        metadata={"description": "A ready chat model used for every node (tests, notebooks)."},
    )

    def model_for(self, node: str) -> str:
        """Return the model spec a node uses."""
        return self.node_models.get(node) or self.model
