"""The agent registry: agents are data, loaded from a YAML file."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field, ValidationError

from nodes.errors import AgentConfigError
from nodes.models import format_validation_error

__all__ = ["AgentRegistry", "AgentSpec", "load_agents"]

logger = logging.getLogger(__name__)


class AgentSpec(BaseModel):
    """One agent: who it is, what it can do, how it is prompted and its tools."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field(min_length=1)
    capabilities: list[str] = Field(default_factory=list)
    system_prompt: str = Field(min_length=1)
    tools: list[str] = Field(default_factory=list, description="Dotted import paths.")
    model: str | None = Field(default=None, description="`provider:model` for this agent.")
    runs: Literal["local", "kafka"] = "local"
    timeout_s: float = 300.0
    max_attempts: int = 2

    def card(self) -> dict[str, Any]:
        """Return what the assigner sees of the agent."""
        return {
            "name": self.name,
            "description": self.description,
            "capabilities": self.capabilities,
            "tools": [path.rsplit(".", 1)[-1] for path in self.tools],
        }


def _import_tool(path: str, base_dir: Path) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"'{path}' is not a dotted path like 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Tools may live next to the agents file, like examples/claims_tools.py.
        if exc.name != module_name.split(".")[0] or str(base_dir) in sys.path:
            raise
        sys.path.insert(0, str(base_dir))
        module = importlib.import_module(module_name)
    obj = getattr(module, attr)
    if not callable(obj):
        raise ImportError(f"'{path}' is not callable")
    return obj  # type: ignore[no-any-return]


def _as_tool(func: Callable[..., Any]) -> BaseTool:
    if isinstance(func, BaseTool):
        return func
    if inspect.iscoroutinefunction(func):
        return StructuredTool.from_function(coroutine=func, handle_tool_error=True)
    return StructuredTool.from_function(func, handle_tool_error=True)


class AgentRegistry:
    """The agents steps can be assigned to, with their tools ready to call."""

    def __init__(self, agents: list[AgentSpec], tools: dict[str, list[BaseTool]]) -> None:
        self._agents = {agent.name: agent for agent in agents}
        self._tools = tools

    def __repr__(self) -> str:
        return f"AgentRegistry({', '.join(self._agents)})"

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    @property
    def names(self) -> list[str]:
        """Agent names in file order."""
        return list(self._agents)

    def get(self, name: str) -> AgentSpec:
        """Return one agent.

        Raises:
            KeyError: no agent has this name.
        """
        return self._agents[name]

    def tools_of(self, name: str) -> list[BaseTool]:
        """Return the callable tools of one agent."""
        return self._tools.get(name, [])

    def catalogue(self) -> list[dict[str, Any]]:
        """Return every agent's card, for prompts."""
        return [agent.card() for agent in self._agents.values()]

    @classmethod
    def from_yaml(cls, path: str | Path) -> AgentRegistry:
        """Load and check an agents file.

        Raises:
            AgentConfigError: with one sentence naming the file and what to fix.
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise AgentConfigError(
                f"agents file {path} cannot be read ({exc.strerror}); set "
                "AGENTFLOW_AGENTS_FILE to an existing YAML file"
            ) from None
        except yaml.YAMLError as exc:
            raise AgentConfigError(f"agents file {path} is not valid YAML: {exc}") from None
        items = raw.get("agents") if isinstance(raw, dict) else raw
        if not isinstance(items, list) or not items:
            raise AgentConfigError(f"agents file {path} must hold a non-empty list under 'agents:'")
        agents: list[AgentSpec] = []
        for index, item in enumerate(items):
            try:
                agent = AgentSpec.model_validate(item)
            except ValidationError as exc:
                what = f"agent #{index + 1} in {path}"
                raise AgentConfigError(format_validation_error(exc, what)) from None
            if any(a.name == agent.name for a in agents):
                raise AgentConfigError(
                    f"agent name '{agent.name}' appears twice in {path}; names must be unique"
                )
            agents.append(agent)
        tools: dict[str, list[BaseTool]] = {}
        for agent in agents:
            tools[agent.name] = []
            for tool_path in agent.tools:
                try:
                    func = _import_tool(tool_path, path.parent.resolve())
                except (ImportError, AttributeError) as exc:
                    raise AgentConfigError(
                        f"agent '{agent.name}' in {path}: tool '{tool_path}' cannot be "
                        f"imported ({exc}); fix the dotted path"
                    ) from None
                tools[agent.name].append(_as_tool(func))
        return cls(agents, tools)


@lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float) -> AgentRegistry:
    return AgentRegistry.from_yaml(path)


def load_agents(path: str | Path) -> AgentRegistry:
    """Load an agents file, reusing the parsed registry until the file changes.

    Raises:
        AgentConfigError: the file cannot be used.
    """
    resolved = Path(path).resolve()
    try:
        mtime = resolved.stat().st_mtime
    except OSError:
        mtime = -1.0
    return _load_cached(str(resolved), mtime)
