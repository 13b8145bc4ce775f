"""The agent registry: agents are data, loaded from a YAML file."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Collection
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nodes.errors import AgentConfigError
from nodes.models import format_validation_error
from nodes.protocol import agent_name_problem

__all__ = ["AgentRegistry", "AgentSpec", "ToolRef", "load_agents", "remote_copy"]

logger = logging.getLogger(__name__)


class ToolRef(BaseModel):
    """One tool of an agent: where it is, and whether a human approves each call first."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="Dotted import path, like `module.function`.")
    approval: Literal["required", "none"] = Field(
        default="none",
        description="`required`: each call waits for a human's approve, edit or reject.",
    )


class AgentSpec(BaseModel):
    """One agent: who it is, what it can do, where it runs, how it is prompted and its tools.

    An agent that `runs: kafka` is hosted elsewhere (`agentflow agents serve`, or any
    service that speaks the agents protocol): the orchestrator needs only its name,
    description and capabilities; its system prompt, tools and model are its host's.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field(min_length=1)
    capabilities: list[str] = Field(default_factory=list)
    runs: Literal["local", "kafka"] = Field(
        default="local",
        description="`local`: in the worker's process; `kafka`: by a host, over Kafka.",
    )
    system_prompt: str | None = Field(default=None, min_length=1)
    tools: list[ToolRef] = Field(
        default_factory=list,
        description="Dotted import paths, or `{path: ..., approval: required}` entries.",
    )
    model: str | None = Field(default=None, description="`provider:model` for this agent.")
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a task of a `kafka` agent may take; AGENTFLOW_AGENT_TIMEOUT_S "
        "when unset.",
    )
    max_attempts: int = Field(
        default=2, ge=1, description="How often a `kafka` agent's task is sent before it fails."
    )

    @field_validator("tools", mode="before")
    @classmethod
    def _plain_paths(cls, tools: Any) -> Any:
        """Take a plain dotted path as a tool that needs no approval."""
        if not isinstance(tools, list):
            return tools
        return [{"path": t} if isinstance(t, str) else t for t in tools]

    @model_validator(mode="after")
    def _fits_where_it_runs(self) -> AgentSpec:
        if self.runs == "kafka":
            if (problem := agent_name_problem(self.name)) is not None:
                raise ValueError(f"it runs on Kafka, so its name is in a topic name: {problem}")
            if any(t.approval == "required" for t in self.tools):
                # Its host runs its tools: the worker never sees the calls to ask about.
                raise ValueError(
                    "it runs on Kafka, and `approval: required` is for tools of agents that "
                    "run here (`runs: local`)"
                )
        elif self.system_prompt is None:
            raise ValueError(
                "it runs locally (`runs: local`, the default) and needs a `system_prompt`; "
                "an agent another service hosts says `runs: kafka`"
            )
        return self

    def card(self) -> dict[str, Any]:
        """Return what the assigner sees of the agent."""
        return {
            "name": self.name,
            "description": self.description,
            "capabilities": self.capabilities,
            "tools": [t.path.rsplit(".", 1)[-1] for t in self.tools],
        }


def _import_tool(path: str, tools_dir: Path) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"'{path}' is not a dotted path like 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Tools may live next to the agents file (or in its `tools_dir`), like
        # examples/claims_tools.py.
        if exc.name != module_name.split(".")[0] or str(tools_dir) in sys.path:
            raise
        sys.path.insert(0, str(tools_dir))
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
    """The agents steps can be assigned to, with the tools of those that run here."""

    def __init__(
        self,
        agents: list[AgentSpec],
        tools: dict[str, list[BaseTool]],
        *,
        hosted: Collection[str] = (),
        approval: dict[str, set[str]] | None = None,
    ) -> None:
        self._agents = {agent.name: agent for agent in agents}
        self._tools = tools
        self._approval = approval or {}
        self.hosted = list(hosted)
        """The agents this process hosts for others (`agentflow agents serve`)."""

    def __repr__(self) -> str:
        return f"AgentRegistry({', '.join(self._agents)})"

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    @property
    def names(self) -> list[str]:
        """Agent names in file order."""
        return list(self._agents)

    @property
    def remote_names(self) -> list[str]:
        """Names of the agents that run over Kafka (`runs: kafka`), in file order."""
        return [a.name for a in self._agents.values() if a.runs == "kafka"]

    def get(self, name: str) -> AgentSpec:
        """Return one agent.

        Raises:
            KeyError: no agent has this name.
        """
        return self._agents[name]

    def tools_of(self, name: str) -> list[BaseTool]:
        """Return the callable tools of one agent (none for an agent hosted elsewhere)."""
        return self._tools.get(name, [])

    def approval_of(self, name: str) -> set[str]:
        """Return the names of an agent's tools whose calls a human approves first."""
        return self._approval.get(name, set())

    def catalogue(self) -> list[dict[str, Any]]:
        """Return every agent's card, for prompts."""
        return [agent.card() for agent in self._agents.values()]

    @classmethod
    def from_yaml(cls, path: str | Path, *, hosted: Collection[str] = ()) -> AgentRegistry:
        """Load and check an agents file.

        The file lists its agents under `agents:`. Tools are dotted paths; a module that
        is not importable is looked for in the file's folder, or in `tools_dir:` when the
        file names one (absolute, or relative to the file).

        Args:
            path: the YAML file.
            hosted: agents this process hosts for others (`agentflow agents serve`):
                each must be in the file with a system prompt, and its tools are
                imported like a local agent's. Tools of other `kafka` agents are not.

        Raises:
            AgentConfigError: with one sentence naming the file and what to fix.
        """
        path = Path(path)
        items, tools_dir = _read(path)
        agents: list[AgentSpec] = []
        for index, item in enumerate(items):
            try:
                agent = AgentSpec.model_validate(item)
            except ValidationError as exc:
                raise AgentConfigError(_problem(exc, item, index, path)) from None
            if any(a.name == agent.name for a in agents):
                raise AgentConfigError(
                    f"agent name '{agent.name}' appears twice in {path}; names must be unique"
                )
            agents.append(agent)
        names = [a.name for a in agents]
        for name in hosted:
            if name not in names:
                raise AgentConfigError(
                    f"there is no agent '{name}' to host in {path}; it has {', '.join(names)}"
                )
            if (problem := agent_name_problem(name)) is not None:
                raise AgentConfigError(
                    f"agent '{name}' in {path} cannot be hosted: its name is part of a topic "
                    f"name and {problem}"
                )
        tools: dict[str, list[BaseTool]] = {}
        approval: dict[str, set[str]] = {}
        for agent in agents:
            if agent.runs == "kafka" and agent.name not in hosted:
                continue
            if agent.system_prompt is None:
                raise AgentConfigError(
                    f"agent '{agent.name}' in {path} is hosted here and needs a `system_prompt`"
                )
            tools[agent.name] = []
            for ref in agent.tools:
                try:
                    func = _import_tool(ref.path, tools_dir)
                except (ImportError, AttributeError) as exc:
                    raise AgentConfigError(
                        f"agent '{agent.name}' in {path}: tool '{ref.path}' cannot be "
                        f"imported ({exc}); fix the dotted path"
                    ) from None
                tool = _as_tool(func)
                tools[agent.name].append(tool)
                if ref.approval == "required":
                    approval.setdefault(agent.name, set()).add(tool.name)
        return cls(agents, tools, hosted=hosted, approval=approval)


def _read(path: Path) -> tuple[list[Any], Path]:
    """Read an agents file: its agents' entries, and the folder its tools' modules are in.

    Raises:
        AgentConfigError: the file cannot be read, is not YAML or lists no agents.
    """
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
    return items, _tools_dir(raw, path)


def _tools_dir(raw: Any, path: Path) -> Path:
    """Return the folder whose modules tools may name: the file's own, or its `tools_dir`."""
    folder = raw.get("tools_dir") if isinstance(raw, dict) else None
    if folder is None:
        return path.parent.resolve()
    if not isinstance(folder, str) or not folder:
        raise AgentConfigError(
            f"agents file {path}: `tools_dir` must be a folder (absolute, or relative to the file)"
        )
    return (path.parent / folder).resolve()


def _problem(exc: ValidationError, item: Any, index: int, path: Path) -> str:
    """Say what is wrong with the agent at `index`: its fields, or where it runs."""
    name = item.get("name") if isinstance(item, dict) else None
    who = f"agent '{name}'" if isinstance(name, str) and name else f"agent #{index + 1}"
    rules = [e for e in exc.errors() if not e["loc"] and "error" in e.get("ctx", {})]
    if rules:
        return f"{who} in {path}: {rules[0]['ctx']['error']}"
    return format_validation_error(exc, f"{who} in {path}")


@lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float, hosted: tuple[str, ...]) -> AgentRegistry:
    return AgentRegistry.from_yaml(path, hosted=hosted)


def load_agents(path: str | Path, *, hosted: Collection[str] = ()) -> AgentRegistry:
    """Load an agents file, reusing the parsed registry until the file changes.

    Args:
        path: the agents file.
        hosted: agents this process hosts for others (see `AgentRegistry.from_yaml`).

    Raises:
        AgentConfigError: the file cannot be used.
    """
    resolved = Path(path).resolve()
    try:
        mtime = resolved.stat().st_mtime
    except OSError:
        mtime = -1.0
    return _load_cached(str(resolved), mtime, tuple(hosted))


def remote_copy(path: str | Path, agents: Collection[str]) -> str:
    """Return the text of an agents file like `path` in which `agents` run over Kafka.

    The copy may be written anywhere: it names the original's tools folder as its
    `tools_dir`. Load `path` first: the problems of its agents are found there.

    Args:
        path: the agents file, left as it is.
        agents: the agents that say `runs: kafka` in the copy.

    Raises:
        AgentConfigError: the file cannot be read, is not YAML or lists no agents.
    """
    items, tools_dir = _read(Path(path))
    copy = {
        "tools_dir": str(tools_dir),
        "agents": [
            {**item, "runs": "kafka"}
            if isinstance(item, dict) and item.get("name") in agents
            else item
            for item in items
        ],
    }
    return yaml.safe_dump(copy, sort_keys=False, allow_unicode=True, width=100)
