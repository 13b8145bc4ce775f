"""Calling chat models from nodes: timeout, usage accounting, structured output."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from langchain_core.exceptions import ModelError
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable
from langgraph.runtime import get_runtime
from pydantic import BaseModel, ValidationError

from nodes.chat_models import is_retryable, make_chat_model
from nodes.context import WorkflowContext
from nodes.errors import ModelCallError, StructuredOutputError, WorkflowError
from nodes.models import Usage

__all__ = [
    "bind_tools",
    "chat_model",
    "invoke",
    "invoke_structured",
    "is_cache_hit",
    "model_name",
    "node_attempt",
]

SchemaT = TypeVar("SchemaT", bound=BaseModel)


def chat_model(context: WorkflowContext, node: str, spec: str | None = None) -> BaseChatModel:
    """Return the chat model a node (or an agent with its own `spec`) uses."""
    if context.chat_model is not None:
        return context.chat_model
    return make_chat_model(spec or context.model_for(node), timeout_s=context.model_timeout_s)


def is_cache_hit(message: AIMessage) -> bool:
    """Whether a message came from the LLM cache rather than from the model.

    langchain-core marks a cache hit only by adding `total_cost: 0` to the replayed
    message's `usage_metadata` (no provider reports that key); `cached` in the response
    metadata is honoured too, for caches that say so themselves.
    """
    meta: dict[str, Any] = dict(message.usage_metadata or {})
    return "total_cost" in meta or bool(message.response_metadata.get("cached"))


def _usage(message: AIMessage, node: str) -> Usage:
    if is_cache_hit(message):  # no model call and no tokens spent
        return Usage(cached_calls=1)
    meta: dict[str, Any] = dict(message.usage_metadata or {})
    return Usage(
        llm_calls=1,
        input_tokens=meta.get("input_tokens", 0),
        output_tokens=meta.get("output_tokens", 0),
        by_node={node: 1},
    )


def model_name(model: Any, message: AIMessage) -> str:
    """Name the model that produced a message."""
    name = message.response_metadata.get("model_name") or getattr(model, "model_name", None)
    return str(name or getattr(model, "model", None) or type(model).__name__)


def node_attempt() -> int:
    """Return which attempt of the running node this is (1 outside a graph run)."""
    try:
        info = get_runtime().execution_info
    except (RuntimeError, KeyError):  # not inside a node
        return 1
    return info.node_attempt if info is not None else 1


EMPTY_ANSWER = "the provider returned an empty answer"


def _is_empty_answer(exc: Exception) -> bool:
    """Whether a client error means the answer had no choice in it.

    langchain-openai indexes the first generation of an answer with no `choices`
    (`IndexError`), and says so itself for a `null` or missing `choices`.
    """
    return isinstance(exc, IndexError) or "choices" in str(exc)


def provider_fault(exc: Exception, *, node: str, timeout_s: float) -> ModelCallError:
    """Name what went wrong in a model call, in words a user understands.

    A malformed or empty answer is a transient fault of the provider, like a timeout,
    a rate limit or a 5xx; the provider's own errors say whether they are transient.
    """
    attempt = node_attempt()
    if isinstance(exc, ModelError):
        reason = f"the provider failed: {type(exc).__name__}: {exc}"
        return ModelCallError(node, reason, attempt, bool(exc.is_retryable))
    if isinstance(exc, TimeoutError):
        return ModelCallError(node, f"the model did not answer within {timeout_s:g} s", attempt)
    if _is_empty_answer(exc):
        return ModelCallError(node, EMPTY_ANSWER, attempt)
    if isinstance(exc, ValueError | LookupError | TypeError):  # JSONDecodeError is a ValueError
        reason = f"the provider returned a malformed answer ({type(exc).__name__}: {exc})"
        return ModelCallError(node, reason, attempt)
    reason = f"the model call failed: {type(exc).__name__}: {exc}"
    return ModelCallError(node, reason, attempt, is_retryable(exc))


async def invoke(
    model: Runnable[Any, AIMessage] | BaseChatModel,
    messages: list[BaseMessage],
    *,
    node: str,
    timeout_s: float,
) -> tuple[AIMessage, Usage]:
    """Call a model once, within the timeout.

    Raises:
        ModelCallError: no usable answer: a timeout, a provider error, or an empty or
            malformed answer (see `provider_fault`).
    """
    try:
        async with asyncio.timeout(timeout_s):
            message = await model.ainvoke(messages)
    except WorkflowError:
        raise
    except Exception as exc:
        raise provider_fault(exc, node=node, timeout_s=timeout_s) from exc
    usage = _usage(message, node)
    if usage.cached_calls and message.usage_metadata:
        # Drop the hit marker: a conversation that goes on must replay the same prompts.
        meta: dict[str, Any] = {
            k: v for k, v in message.usage_metadata.items() if k != "total_cost"
        }
        message.usage_metadata = meta  # type: ignore[assignment]
    return message, usage


async def invoke_structured(
    model: BaseChatModel,
    schema: type[SchemaT],
    messages: list[BaseMessage],
    *,
    node: str,
    timeout_s: float,
) -> tuple[SchemaT, AIMessage, Usage]:
    """Call a model for a structured answer.

    Raises:
        StructuredOutputError: the answer does not fit the schema.
        ModelCallError: no usable answer (see `invoke`).
    """
    bound = bind_tools(model, (schema,), tool_choice=schema.__name__)
    raw, usage = await invoke(bound, messages, node=node, timeout_s=timeout_s)
    name = schema.__name__
    calls = [c for c in raw.tool_calls if c["name"] == name]
    if not calls:
        if any(c.get("name") == name for c in raw.invalid_tool_calls):
            reason = f"the model's {name} arguments are not valid JSON"
        elif not raw.tool_calls and not raw.invalid_tool_calls and not raw.text.strip():
            reason = EMPTY_ANSWER
        else:
            called = [c.get("name") for c in [*raw.tool_calls, *raw.invalid_tool_calls]]
            reason = f"the model did not answer with a {name}" + (
                f" (it called {', '.join(map(str, called))})" if called else ""
            )
        raise StructuredOutputError(node, reason, node_attempt())
    try:
        parsed = schema.model_validate(calls[0]["args"])
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise StructuredOutputError(
            node, f"the model's answer is not a valid {name}: {problems}", node_attempt()
        ) from None
    return parsed, raw, usage


_BOUND: dict[tuple[int, tuple[int, ...], str | None], tuple[Any, Runnable[Any, AIMessage]]] = {}
"""Bindings by object ids; each entry keeps its model and tools alive, so ids stay theirs."""


def bind_tools(
    model: BaseChatModel, tools: tuple[Any, ...], *, tool_choice: str | None = None
) -> Runnable[Any, AIMessage]:
    """Bind tools (or a schema) to a model once and reuse the binding.

    Turning tools into JSON schemas costs more than an offline model call; models and
    tools live as long as the process, so the binding is kept.
    """
    key = (id(model), tuple(id(t) for t in tools), tool_choice)
    cached = _BOUND.get(key)
    if cached is None:
        if len(_BOUND) > 4096:
            _BOUND.clear()
        cached = ((model, tools), model.bind_tools(list(tools), tool_choice=tool_choice))
        _BOUND[key] = cached
    return cached[1]
