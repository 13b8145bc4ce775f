"""An OpenAI-compatible chat-completions server on loopback, answered by the offline model.

Tests point `OPENAI_BASE_URL` at it so the real provider path (langchain-openai, the
`openai` client, HTTP) runs end to end without a network or a key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from langchain_core.messages import AIMessage, convert_to_messages, convert_to_openai_messages

from nodes.chat_models import OfflineChatModel

__all__ = ["ChatRequest", "OpenAICompatibleServer"]

logger = logging.getLogger(__name__)

SNAPSHOT = "2025-01-01"
"""Answers name the model `<requested>-<SNAPSHOT>`, as OpenAI names the snapshot that ran."""

_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: ("invalid_request_error", None),
    HTTPStatus.UNAUTHORIZED: ("invalid_request_error", "invalid_api_key"),
    HTTPStatus.NOT_FOUND: ("invalid_request_error", "unknown_url"),
    HTTPStatus.TOO_MANY_REQUESTS: ("requests", "rate_limit_exceeded"),
}


@dataclass
class ChatRequest:
    """One request the server received, and how it answered."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int = 200
    usage: dict[str, int] | None = None
    """The usage the answer reported; None when the answer was an error."""
    received_at: float = field(default_factory=time.monotonic)

    @property
    def tool_choice(self) -> Any:
        """The request's `tool_choice`, if any."""
        return self.body.get("tool_choice")

    @property
    def roles(self) -> list[str]:
        """The roles of the request's messages, in order."""
        return [m.get("role", "") for m in self.body.get("messages", [])]


class OpenAICompatibleServer:
    """`POST /v1/chat/completions` on 127.0.0.1, answered by `OfflineChatModel`.

    Every request is recorded in `requests`; `fail_next` makes the next answers errors.
    Use it as a context manager: it listens on a free port while the block runs.
    """

    def __init__(self, *, api_key: str = "sk-test-agentflow") -> None:
        """Make a server that accepts `api_key` as its bearer token."""
        self.api_key = api_key
        self.requests: list[ChatRequest] = []
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._fail_always: int | None = None
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
        """Stop serving and free the port."""
        if self._httpd is None:
            return
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

    def _json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

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
    messages = convert_to_messages(body["messages"])
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
