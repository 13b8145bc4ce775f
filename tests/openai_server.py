"""An OpenAI-compatible chat-completions server on loopback, answered by the offline model.

Tests point `OPENAI_BASE_URL` at it so the real provider path (langchain-openai, the
`openai` client, HTTP) runs end to end without a network or a key. With a `FaultPlan`
it answers a seeded share of the requests with the faults real providers show: rate
limits, 5xx, answers that never come, dropped connections, invalid structured output,
calls of unknown tools, tool arguments that are not JSON, bodies that are not JSON, and
answers with no `choices` (`bench/faults.py` measures the graph against them).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from langchain_core.messages import AIMessage, convert_to_messages, convert_to_openai_messages

from nodes.chat_models import OfflineChatModel

__all__ = ["FAULT_KINDS", "ChatRequest", "FaultPlan", "Hold", "OpenAICompatibleServer"]

logger = logging.getLogger(__name__)

SNAPSHOT = "2025-01-01"
"""Answers name the model `<requested>-<SNAPSHOT>`, as OpenAI names the snapshot that ran."""

_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: ("invalid_request_error", None),
    HTTPStatus.UNAUTHORIZED: ("invalid_request_error", "invalid_api_key"),
    HTTPStatus.NOT_FOUND: ("invalid_request_error", "unknown_url"),
    HTTPStatus.TOO_MANY_REQUESTS: ("requests", "rate_limit_exceeded"),
}


FAULT_KINDS = (
    "rate_limit",
    "server_error",
    "timeout",
    "dropped_connection",
    "invalid_structured_output",
    "unknown_tool",
    "bad_tool_arguments",
    "malformed_json",
    "empty_choices",
)
"""The faults a `FaultPlan` draws from; every one is transient (the next call may pass)."""

_HTTP_FAULTS = frozenset({"rate_limit", "server_error", "timeout", "dropped_connection"})
"""Faults that need no completion to spoil, so they apply to streamed requests too."""


@dataclass(frozen=True)
class FaultPlan:
    """Which share of the requests get a fault, of which kinds, drawn from a seed.

    Each valid request draws once from `random.Random(seed)`: with probability `rate`
    it gets one of `kinds`, chosen uniformly among those that apply to it (invalid
    structured output only to a forced function call; a streamed request only gets the
    HTTP-level faults). The same seed gives the same sequence of draws.
    """

    rate: float
    seed: int = 0
    kinds: tuple[str, ...] = FAULT_KINDS

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"fault rate must be within [0, 1], not {self.rate}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be some of {FAULT_KINDS}, not {self.kinds}")


@dataclass
class ChatRequest:
    """One request the server received, and how it answered."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int = 200
    usage: dict[str, int] | None = None
    """The usage the answer reported; None when the answer was an error."""
    fault: str | None = None
    """The fault the server answered with (one of `FAULT_KINDS`), if any."""
    received_at: float = field(default_factory=time.monotonic)

    @property
    def tool_choice(self) -> Any:
        """The request's `tool_choice`, if any."""
        return self.body.get("tool_choice")

    @property
    def roles(self) -> list[str]:
        """The roles of the request's messages, in order."""
        return [m.get("role", "") for m in self.body.get("messages", [])]


@dataclass
class Hold:
    """Requests held back until the test releases them (`OpenAICompatibleServer.hold_when`).

    A test waits for `held` (a matching request is being held) to know a run is inside a
    model call, then `release()`s it: a run kept busy on purpose, with no timing involved.
    """

    match: Callable[[dict[str, Any]], bool]
    held: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        """Answer the held requests, and every later one that matches, at once."""
        self.released.set()


class OpenAICompatibleServer:
    """`POST /v1/chat/completions` on 127.0.0.1, answered by `OfflineChatModel`.

    Every request is recorded in `requests`; `fail_next` makes the next answers errors,
    `faults` (or `inject`) spoils a seeded share of them. Use it as a context manager: it
    listens on a free port while the block runs.
    """

    def __init__(
        self,
        *,
        api_key: str = "sk-test-agentflow",
        faults: FaultPlan | None = None,
        hang_s: float = 5.0,
    ) -> None:
        """Make a server.

        Args:
            api_key: the bearer token it accepts.
            faults: the share of requests to spoil, and how (none: answer all well).
            hang_s: how long a `timeout` fault holds its answer back; make it longer
                than the client waits.
        """
        self.api_key = api_key
        self.hang_s = hang_s
        self.requests: list[ChatRequest] = []
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._fail_always: int | None = None
        self._faults: FaultPlan | None = None
        self._targeted: list[tuple[str, Callable[[dict[str, Any]], bool], int | None]] = []
        self._rng = random.Random()
        self._holds: list[Hold] = []
        self.inject(faults)
        self._httpd: _LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatibleServer(port={self.port}, requests={len(self.requests)})"

    @property
    def port(self) -> int | None:
        """The port it listens on, while it runs."""
        return self._httpd.server_address[1] if self._httpd is not None else None

    @property
    def base_url(self) -> str:
        """The `OPENAI_BASE_URL` that reaches it."""
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAICompatibleServer:
        """Listen on a free loopback port and serve in a background thread."""
        self._httpd = _LoopbackHTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"openai-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port (held requests are released first)."""
        if self._httpd is None:
            return
        for hold in self._holds:
            hold.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> OpenAICompatibleServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fail_next(self, status: int = 429, count: int | None = 1) -> None:
        """Answer the next `count` requests with an error `status` (None: all of them)."""
        with self._lock:
            if count is None:
                self._fail_always = status
            else:
                self._failures.extend([status] * count)

    def inject(self, faults: FaultPlan | None) -> None:
        """Spoil a seeded share of the next requests (None: answer them all well)."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed if faults is not None else 0)

    def fault_when(
        self, kind: str, match: Callable[[dict[str, Any]], bool], count: int | None = 1
    ) -> None:
        """Answer the next `count` requests whose body `match`es with fault `kind`.

        None for `count`: every such request. Targeted faults come before the plan's.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, not {kind!r}")
        with self._lock:
            self._targeted.append((kind, match, count))

    def hold_when(self, match: Callable[[dict[str, Any]], bool]) -> Hold:
        """Hold back the answers to requests whose body `match`es until `Hold.release()`."""
        hold = Hold(match)
        with self._lock:
            self._holds.append(hold)
        return hold

    def _wait_if_held(self, body: dict[str, Any]) -> None:
        with self._lock:
            holds = [h for h in self._holds if not h.released.is_set() and h.match(body)]
        for hold in holds:
            hold.held.set()
            hold.released.wait(timeout=600)  # a bound for a test that forgot to release

    def faulted(self) -> list[ChatRequest]:
        """The requests that got a fault of the `FaultPlan`."""
        with self._lock:
            return [r for r in self.requests if r.fault is not None]

    def _draw_fault(self, body: dict[str, Any]) -> str | None:
        """Draw the fault this request gets, if any."""
        with self._lock:
            for index, (kind, match, count) in enumerate(self._targeted):
                if match(body):
                    if count is not None:
                        remaining = count - 1
                        if remaining:
                            self._targeted[index] = (kind, match, remaining)
                        else:
                            del self._targeted[index]
                    return kind
            plan = self._faults
            if plan is None or self._rng.random() >= plan.rate:
                return None
            kinds = [
                k
                for k in plan.kinds
                if (k in _HTTP_FAULTS or not body.get("stream"))
                and (k != "invalid_structured_output" or _forced_name(body))
            ]
            return self._rng.choice(kinds) if kinds else None

    def answered(self) -> list[ChatRequest]:
        """The requests that got a completion, not an error."""
        with self._lock:
            return [r for r in self.requests if r.status == 200]

    def _record(self, request: ChatRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_failure(self) -> int | None:
        """Return the error status the current valid request must get, if any."""
        with self._lock:
            if self._fail_always is not None:
                return self._fail_always
            return self._failures.pop(0) if self._failures else None


class _LoopbackHTTPServer(ThreadingHTTPServer):
    def __init__(self, owner: OpenAICompatibleServer) -> None:
        super().__init__(("127.0.0.1", 0), _ChatCompletionsHandler)
        self.owner = owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a `timeout` fault) leaves a broken pipe: not news.
        logger.debug("openai server: request from %s failed", client_address, exc_info=True)


class _ChatCompletionsHandler(BaseHTTPRequestHandler):
    server: _LoopbackHTTPServer
    server_version = "agentflow-openai-test/1.0"

    @property
    def owner(self) -> OpenAICompatibleServer:
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("openai server: " + format, *args)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        request = ChatRequest(
            path=self.path, headers={k.lower(): v for k, v in self.headers.items()}, body=body
        )
        self.owner._record(request)
        self.owner._wait_if_held(body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            request.status = 404
            self._error(request.status, f"no route for POST {self.path}")
        elif request.headers.get("authorization") != f"Bearer {self.owner.api_key}":
            request.status = 401
            self._error(request.status, "Incorrect API key provided.")
        elif not isinstance(body.get("messages"), list) or not body.get("model"):
            request.status = 400
            self._error(request.status, "'model' and 'messages' are required.")
        elif (failure := self.owner._next_failure()) is not None:
            request.status = failure
            self._error(failure, f"the test told the server to answer {failure}.")
        elif (fault := self.owner._draw_fault(body)) is not None:
            request.fault = fault
            self._fault(request, fault)
        else:
            try:
                completion = _complete(body)
            except Exception as exc:  # answer like a failing provider, not a dropped socket
                logger.exception("openai server: cannot answer")
                request.status = 500
                self._error(request.status, f"{type(exc).__name__}: {exc}")
                return
            request.usage = completion["usage"]
            if body.get("stream"):
                self._stream(completion, include_usage=_include_usage(body))
            else:
                self._json(HTTPStatus.OK, completion)

    def _fault(self, request: ChatRequest, fault: str) -> None:
        """Answer with one of `FAULT_KINDS`."""
        body = request.body
        if fault == "rate_limit":
            request.status = 429
            self._error(429, "Rate limit reached (fault injected by the test server).")
        elif fault == "server_error":
            request.status = 500
            self._error(500, "The server had an error (fault injected by the test server).")
        elif fault == "dropped_connection":
            request.status = 0
            self.close_connection = True  # closed with no answer at all
        elif fault == "timeout":
            request.status = 0
            self.close_connection = True
            deadline = time.monotonic() + self.owner.hang_s
            while time.monotonic() < deadline and self.owner.port is not None:
                time.sleep(0.05)  # the client has given up by then; nothing is sent
        else:
            completion = _complete(body)
            choice = completion["choices"][0]
            if fault == "empty_choices":
                completion["choices"] = []
            elif fault == "malformed_json":
                data = json.dumps(completion).encode()[:37]  # cut in the middle of a value
                self._raw(HTTPStatus.OK, data)
                return
            else:
                choice["message"] = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [_spoiled_call(body, fault)],
                }
                choice["finish_reason"] = "tool_calls"
            request.usage = completion["usage"]
            self._json(HTTPStatus.OK, completion)

    def _raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._raw(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str) -> None:
        kind, code = _ERROR_TYPES.get(HTTPStatus(status), ("server_error", None))
        error = {"message": message, "type": kind, "param": None, "code": code}
        self._json(status, {"error": error}, {"retry-after": "0"})

    def _stream(self, completion: dict[str, Any], *, include_usage: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        for chunk in _chunks(completion, include_usage=include_usage):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _forced_name(body: dict[str, Any]) -> str | None:
    """The function a request forces the model to call, if it forces one."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str(choice.get("function", {}).get("name") or "") or None
    return None


def _spoiled_call(body: dict[str, Any], fault: str) -> dict[str, Any]:
    """A tool call that is wrong in the way `fault` says."""
    tools = [t.get("function", {}).get("name") for t in body.get("tools") or []]
    name = _forced_name(body) or (tools[0] if tools else "answer")
    if fault == "unknown_tool":
        name, arguments = "no_such_tool", "{}"
    elif fault == "bad_tool_arguments":
        arguments = '{"intent": "cut off'  # not JSON: the string and the object never end
    else:  # invalid_structured_output: JSON, but every field of the wrong type
        arguments = json.dumps(
            {"intent": 7, "goals": "none", "steps": "none", "assignments": "none", "verdict": 0}
        )
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _readable(message: dict[str, Any]) -> dict[str, Any]:
    """A message the offline model can read: tool arguments that are not JSON become `{}`.

    OpenAI takes such a call back in the history as it was sent (it sent it); LangChain
    would parse the arguments, so they are replaced.
    """
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        try:
            json.loads(call.get("function", {}).get("arguments") or "{}")
        except ValueError:
            call = {**call, "function": {**call["function"], "arguments": "{}"}}
        fixed.append(call)
    return {**message, "tool_calls": fixed}


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    return bool(options.get("include_usage"))


def _bound_tools(body: dict[str, Any]) -> dict[str, Any]:
    """Translate `tools`/`tool_choice` into the kwargs `OfflineChatModel` reads.

    The offline model forces its first tool whenever `tool_choice` is set, so only a
    forcing choice (a named function, `required`) is passed on; `none` drops the tools.
    """
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return {}
    forcing = isinstance(choice, dict) or choice == "required"
    return {"tools": tools, "tool_choice": choice if forcing else None}


def _complete(body: dict[str, Any]) -> dict[str, Any]:
    """Answer a chat-completions request body with a `chat.completion` object."""
    messages = convert_to_messages([_readable(m) for m in body["messages"]])
    kwargs = _bound_tools(body)
    model = OfflineChatModel()
    answer = model.bind(**kwargs).invoke(messages) if kwargs else model.invoke(messages)
    assert isinstance(answer, AIMessage)
    [message] = convert_to_openai_messages([answer])
    message.pop("name", None)
    if answer.tool_calls:
        message["content"] = message.get("content") or None
    meta = answer.usage_metadata or {"input_tokens": 0, "output_tokens": 0}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"{body['model']}-{SNAPSHOT}",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"refusal": None, **message},
                "logprobs": None,
                "finish_reason": "tool_calls" if answer.tool_calls else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": meta["input_tokens"],
            "completion_tokens": meta["output_tokens"],
            "total_tokens": meta["input_tokens"] + meta["output_tokens"],
        },
    }


def _chunks(completion: dict[str, Any], *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """Split a completion into `chat.completion.chunk` objects, as OpenAI streams it."""
    choice = completion["choices"][0]
    message = choice["message"]
    head = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint")}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return {**head, "object": "chat.completion.chunk", "choices": choices}

    yield chunk({"role": "assistant", "content": ""})
    text = message.get("content") or ""
    for start in range(0, len(text), 16):
        yield chunk({"content": text[start : start + 16]})
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": function["name"], "arguments": ""},
                    }
                ]
            }
        )
        arguments = function["arguments"]
        for start in range(0, len(arguments), 32):
            part = {"arguments": arguments[start : start + 32]}
            yield chunk({"tool_calls": [{"index": index, "function": part}]})
    yield chunk({}, choice["finish_reason"])
    if include_usage:
        yield {
            **head,
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": completion["usage"],
        }
