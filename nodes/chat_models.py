"""The chat-model factory, the deterministic offline model, and the retry policy of model calls."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.exceptions import ModelError
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.types import RetryPolicy, default_retry_on

from nodes.errors import (
    AgentConfigError,
    ModelCallError,
    ModelConfigError,
    PlanError,
)

__all__ = [
    "ESCALATE_PHRASE",
    "MODEL_MAX_ATTEMPTS",
    "MODEL_RETRY",
    "OFFLINE",
    "OfflineChatModel",
    "default_model_spec",
    "is_retryable",
    "make_chat_model",
    "model_retry",
]

logger = logging.getLogger(__name__)


def is_retryable(exc: Exception) -> bool:
    """Whether a node that failed with `exc` may succeed if it runs again.

    Configuration and plan errors never do; a failed model call says so itself (an
    empty, malformed or unparseable answer, a timeout, a rate limit or a 5xx may pass,
    a rejected key does not); anything else is LangGraph's call.
    """
    if isinstance(exc, AgentConfigError | ModelConfigError | PlanError):
        return False
    if isinstance(exc, ModelCallError):
        return exc.retryable
    if isinstance(exc, TimeoutError):
        return True
    if isinstance(exc, ModelError):  # providers say whether a retry can help (401 cannot)
        return bool(exc.is_retryable)
    return default_retry_on(exc)


MODEL_MAX_ATTEMPTS = 5
"""Attempts of a model-calling node, the first included (`AGENTFLOW_MODEL_MAX_ATTEMPTS`)."""


def model_retry(
    max_attempts: int = MODEL_MAX_ATTEMPTS,
    *,
    initial_interval: float = 0.5,
    max_interval: float = 8.0,
    jitter: bool = True,
) -> RetryPolicy:
    """Return the retry policy of the nodes that call models.

    Exponential backoff: the first retry waits `initial_interval` seconds, each next
    one twice as long, at most `max_interval`; with `jitter` LangGraph adds a random
    0-1 s to each wait, so sessions that failed together do not retry together.

    Raises:
        ModelConfigError: `max_attempts` is below 1.
    """
    if max_attempts < 1:
        raise ModelConfigError(
            f"model max attempts must be at least 1, not {max_attempts} "
            "(AGENTFLOW_MODEL_MAX_ATTEMPTS)"
        )
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_interval=initial_interval,
        backoff_factor=2.0,
        max_interval=max_interval,
        jitter=jitter,
        retry_on=is_retryable,
    )


MODEL_RETRY = model_retry()
"""The default retry policy of model-calling nodes: transient faults and unusable answers."""

OFFLINE = "offline"
_TAG = re.compile(r"<(?P<tag>[a-z_-]+)>(?P<body>.*?)</(?P=tag)>", re.S)
_WORD = re.compile(r"[a-z]{3,}")
_STOPWORDS = frozenset(
    (
        "the and for with from that this into their they them are was were has have its "
        "any all can will each step steps event what when which who"
    ).split()
)


def default_model_spec() -> str:
    """Return `AGENTFLOW_MODEL`, else OpenAI when a key is set, else `offline`."""
    if spec := os.environ.get("AGENTFLOW_MODEL"):
        return spec
    if os.environ.get("OPENAI_API_KEY"):
        return "openai:gpt-4.1-mini"
    return OFFLINE


@lru_cache(maxsize=64)
def make_chat_model(spec: str, *, timeout_s: float = 60.0) -> BaseChatModel:
    """Make a chat model from a `provider:model` string.

    `offline` gives the deterministic offline model. Anything else goes through
    LangChain's `init_chat_model`; OpenAI honours `OPENAI_BASE_URL`. Retries are left
    to the graph's node retry policy, so the client itself does not retry.

    Raises:
        ModelConfigError: the provider is unknown, its package is missing, or it has
            no credentials.
    """
    if spec == OFFLINE or spec.startswith(OFFLINE + ":"):
        latency = 0.0
        option = spec.partition(":")[2]
        if option.startswith("latency="):  # `offline:latency=0.2` acts like a slow provider
            try:
                latency = float(option.removeprefix("latency="))
            except ValueError:
                raise ModelConfigError(f"{spec!r}: latency must be seconds, e.g. 0.2") from None
        elif option:
            raise ModelConfigError(f"{spec!r}: the offline model takes only `latency=SECONDS`")
        logger.info("using the deterministic OFFLINE model (no LLM is called)")
        return OfflineChatModel(latency_s=latency)
    from langchain.chat_models import init_chat_model

    kwargs: dict[str, Any] = {"timeout": timeout_s, "max_retries": 0}
    if spec.startswith("openai:"):
        kwargs["stream_usage"] = True  # token counts also when Studio streams messages
        if base_url := os.environ.get("OPENAI_BASE_URL"):
            kwargs["base_url"] = base_url
    try:
        return init_chat_model(spec, **kwargs)
    except Exception as exc:  # the providers raise many different types
        raise ModelConfigError(
            f"cannot make chat model {spec!r}: {exc}. Set AGENTFLOW_MODEL to a "
            "`provider:model` whose package and credentials are present, or to `offline`."
        ) from exc


def _tags(text: str) -> dict[str, str]:
    return {m["tag"]: m["body"].strip() for m in _TAG.finditer(text)}


def _json_tag(tags: dict[str, str], name: str, default: Any) -> Any:
    try:
        return json.loads(tags[name])
    except (KeyError, ValueError):
        return default


def _words(text: str) -> set[str]:
    return {w.rstrip("s") for w in _WORD.findall(text.lower())} - _STOPWORDS


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)


class OfflineChatModel(BaseChatModel):
    """A deterministic stand-in for an LLM, for demos and tests.

    It reads the `<tag>...</tag>` blocks agentflow's prompts carry and answers
    structured-output and tool-calling requests with plausible, repeatable content.
    It never calls a network and is labelled `offline` wherever a model name shows.
    """

    model_name: str = OFFLINE
    latency_s: float = 0.0
    """Seconds each call waits, to stand in for a provider's latency in benchmarks."""

    @property
    def _llm_type(self) -> str:
        return OFFLINE

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The answer is cheap to compute: no thread hop, only the configured latency.
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self._generate(messages, stop, None, **kwargs)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools the way provider models do."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        tools: list[dict[str, Any]] = kwargs.get("tools") or []
        text = "\n".join(_text(m) for m in messages)
        tags = _tags(text)
        if tools and kwargs.get("tool_choice"):
            schema = tools[0]["function"]
            args = self._structured(schema["name"], tags, schema.get("parameters", {}))
            message = AIMessage(content="", tool_calls=[_call(schema["name"], args)])
        elif tools and not isinstance(messages[-1], ToolMessage) and not _called_tools(messages):
            calls = [_call(t["function"]["name"], _tool_args(t["function"], tags)) for t in tools]
            message = AIMessage(content="", tool_calls=calls)
        else:
            message = AIMessage(content=self._answer(messages, tags))
        out_tokens = max(1, len(json.dumps(message.tool_calls) + _text(message)) // 4)
        message.usage_metadata = {
            "input_tokens": max(1, len(text) // 4),
            "output_tokens": out_tokens,
            "total_tokens": max(1, len(text) // 4) + out_tokens,
        }
        message.response_metadata = {"model_name": OFFLINE}
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _structured(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> Any:
        if name == "PlanDraft":
            return _offline_plan(tags)
        if name == "AssignmentDraft":
            return _offline_assignment(tags)
        if name == "ReviewDecision":
            return _offline_review(tags)
        return {k: v.get("default", "") for k, v in params.get("properties", {}).items()}

    def _answer(self, messages: list[BaseMessage], tags: dict[str, str]) -> str:
        if "summary-request" in tags:
            steps = _json_tag(tags, "steps", [])
            done = [s for s in steps if s.get("status") == "done"]
            parts = [str(s.get("output", ""))[:160] for s in done]
            return (
                f"{tags.get('intent', 'The workflow')} — {len(done)} of {len(steps)} steps "
                "done. " + " | ".join(parts)
            )
        results = [_text(m) for m in messages if isinstance(m, ToolMessage)]
        step = _json_tag(tags, "step", {})
        title = step.get("title", "the task")
        if results:
            return f"{title}: " + "; ".join(r[:200] for r in results[-3:])
        inputs = _json_tag(tags, "inputs", {})
        if inputs:
            return f"{title}: " + " ".join(str(v)[:200] for v in inputs.values())
        return f"{title}: done from the event data ({tags.get('event', '')[:160]})."


def _call(name: str, args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}


def _called_tools(messages: list[BaseMessage]) -> bool:
    """Whether the current agent already used its tools since the step prompt."""
    for message in reversed(messages):
        if isinstance(message, AIMessage) and message.tool_calls:
            return True
        if message.type == "human":
            return False
    return False


def _tool_args(function: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    event = _json_tag(tags, "event", {})
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    params = function.get("parameters", {})
    args: dict[str, Any] = {}
    for name in params.get("properties", {}):
        if name in data:
            args[name] = data[name]
        elif name in event:
            args[name] = event[name]
        elif name in params.get("required", []):
            args[name] = event.get("subject") or event.get("id") or ""
    return args


def _offline_plan(tags: dict[str, str]) -> dict[str, Any]:
    event = _json_tag(tags, "event", {})
    etype = event.get("type", "event")
    subject = event.get("subject") or "the requester"
    examples = _json_tag(tags, "examples", [])
    same_type = [e for e in examples if e.get("event_type") == etype and e.get("steps")]
    if same_type:
        best = same_type[0]
        return {
            "intent": f"Handle the {etype} event for {subject} (as in a known workflow)",
            "goals": best.get("goals") or [f"{etype} handled"],
            "steps": [
                {k: s[k] for k in ("id", "title", "description", "depends_on") if k in s}
                for s in best["steps"]
            ],
        }
    noun = etype.split(".")[0].replace("_", " ")
    return {
        "intent": f"Handle the {etype} event for {subject}",
        "goals": [
            f"The {noun} is recorded and validated",
            f"The {noun} is checked and assessed",
            "The requester is told the outcome",
        ],
        "steps": [
            {
                "id": "s1",
                "title": f"Take in the {noun}",
                "description": f"Validate and record the incoming {etype} data.",
                "depends_on": [],
            },
            {
                "id": "s2",
                "title": f"Review the {noun} records and documents",
                "description": f"Check the documents and records that belong to the {noun}.",
                "depends_on": ["s1"],
            },
            {
                "id": "s3",
                "title": f"Assess the {noun} eligibility and rules",
                "description": f"Assess the {noun} against the rules and decide eligibility.",
                "depends_on": ["s1"],
            },
            {
                "id": "s4",
                "title": "Report the outcome to the requester",
                "description": "Write a clear message to the requester about the outcome.",
                "depends_on": ["s2", "s3"],
            },
        ],
    }


def _offline_assignment(tags: dict[str, str]) -> dict[str, Any]:
    agents = _json_tag(tags, "agents", [])
    steps = _json_tag(tags, "steps", [])
    assignments = []
    for step in steps:
        want = _words(f"{step.get('title', '')} {step.get('description', '')}")
        scored = []
        for agent in agents:
            have = _words(
                f"{agent.get('description', '')} {' '.join(agent.get('capabilities', []))}"
            )
            scored.append((len(want & have), agent["name"]))
        scored.sort(key=lambda pair: -pair[0])
        chosen = [scored[0][1]] if scored else []
        if len(scored) > 1 and scored[0][0] > 0 and scored[1][0] >= max(2, scored[0][0]):
            chosen.append(scored[1][1])
        assignments.append(
            {"step_id": step.get("id"), "agents": chosen, "reason": "best capability overlap"}
        )
    return {"assignments": assignments}


ESCALATE_PHRASE = "human review"
"""What makes the offline reviewer ask a human: a done step's output that says it (any case)."""


def _offline_review(tags: dict[str, str]) -> dict[str, Any]:
    """Review as the offline model does, by rules a domain can trigger.

    Failed steps: `revise` them. Else a step whose output contains `ESCALATE_PHRASE`
    (a tool or agent of the domain says the case needs human review): `escalate`, asking
    whether to approve or reject. Else `approve`. It never reads a human's answer: the
    graph applies the human's decision itself (`nodes.review.escalate`).
    """
    steps = _json_tag(tags, "steps", [])
    failed = [s["id"] for s in steps if s.get("status") == "failed"]
    if failed:
        return {
            "verdict": "revise",
            "feedback": "Some steps failed; run them again.",
            "steps_to_redo": failed,
        }
    flagged = [s for s in steps if ESCALATE_PHRASE in str(s.get("output", "")).lower()]
    if flagged:
        return {
            "verdict": "escalate",
            "feedback": "A step asks for a human decision.",
            "question": f"Step {flagged[0]['id']} ({flagged[0]['title']}) needs a human "
            "decision: approve, reject or revise?",
        }
    return {"verdict": "approve", "feedback": "All steps done."}
