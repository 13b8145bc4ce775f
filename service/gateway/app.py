"""`agentflow gateway`: the HTTP API and the live web page.

Events go in over HTTP and out to Kafka (the worker runs them); sessions are read from
Redis (records from `SessionStore`, state and history from the checkpointer) and
followed live over Server-Sent Events (the transition log, then pub/sub).

This module only assembles the app: the routers of `service.gateway.routes`, the error
answers, the middleware (security headers, CORS, the token and body-size gate), the page's
files and the API docs' files (served from a wheel, not a CDN).

Example:
    ```python
    server, task, url = await serve_gateway(settings, host="127.0.0.1", port=8080)
    ...
    server.should_exit = True
    await task
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.bootstrap import log_startup
from service.config import Settings, redact_url
from service.errors import KafkaUnavailable
from service.gateway.auth import RequestGate
from service.gateway.backends import REDIS_ERRORS, Backends
from service.gateway.headers import SecurityHeaders
from service.gateway.routes import events, ops, sessions, stream
from service.gateway.schemas import FieldProblem, Problem, unprocessable

__all__ = ["create_app", "serve_gateway"]

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings, *, keepalive_s: float = 15.0, unknown_hold_s: float = 30.0
) -> FastAPI:
    """Build the gateway app: the API under token auth, the page and `/healthz` open.

    Args:
        settings: Kafka, Redis, topics, tokens and CORS origins.
        keepalive_s: seconds between keep-alive comments on streams.
        unknown_hold_s: how long a stream waits for a session that is not known yet.

    Raises:
        ConfigError: Kafka or Redis is not configured.
    """
    backends = Backends(settings, keepalive_s=keepalive_s, unknown_hold_s=unknown_hold_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_startup(settings, "gateway")
        if not settings.api_tokens:
            logger.warning(
                "AGENTFLOW_API_TOKENS is empty: the gateway API needs no token; "
                "set it before exposing the gateway beyond this machine"
            )
        try:
            await backends.producer()
        except Exception as exc:  # the API answers 503 until Kafka is back
            logger.warning("Kafka at %s unreachable at start: %s", settings.kafka_bootstrap, exc)
        try:
            yield
        finally:
            await backends.close()

    # FastAPIOffline serves Swagger UI's files from this server (they ship in the
    # fastapi-offline wheel), so /docs works offline; FastAPI's own loads them from a CDN.
    # Its /docs page starts Swagger UI with an inline script, which the CSP forbids: the
    # page is ours (routes/ops.py), its script a file. No /redoc: ReDoc fetches its logo
    # from its CDN even so.
    app = FastAPIOffline(
        docs_url=None,
        redoc_url=None,
        title="agentflow gateway",
        version="0.1.0",
        description="Start workflows, follow sessions live, answer escalations.",
        lifespan=lifespan,
    )
    app.state.backends = backends
    # The last added runs first: the security headers go on every answer, and the gate
    # checks the token and the size before a route reads a body.
    app.add_middleware(RequestGate, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    app.add_middleware(SecurityHeaders)
    _answer_errors_as_problems(app, settings)
    for module in (ops, events, sessions, stream):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=ops.STATIC), name="static")
    return app


def _problem(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    body = detail if isinstance(detail, dict) else {"detail": detail}
    return JSONResponse(Problem.model_validate(body).model_dump(), status, headers=headers)


def _answer_errors_as_problems(app: FastAPI, settings: Settings) -> None:
    """Answer every error as a `Problem`: HTTP errors, invalid requests, Kafka or Redis down."""

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, exc.detail, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if loc and loc[0] in ("body", "query", "path", "header"):
                loc = loc[1:]
            errors.append(FieldProblem(field=".".join(loc) or "(body)", reason=err["msg"]))
        return _problem(422, unprocessable("invalid request", errors).detail)

    @app.exception_handler(KafkaUnavailable)
    async def kafka_down(request: Request, exc: KafkaUnavailable) -> JSONResponse:
        return _problem(503, str(exc), {"Retry-After": "5"})

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        where = redact_url(settings.redis_url)
        return _problem(503, f"Redis at {where} is unreachable: {exc}")

    for error in REDIS_ERRORS:
        app.add_exception_handler(error, redis_down)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the program that runs it."""

    def __init__(self, config: uvicorn.Config, backends: Backends) -> None:
        super().__init__(config)
        self.backends = backends

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the open streams first: uvicorn waits for every response to finish."""
        self.backends.stop_streams()
        await super().shutdown(sockets)


async def serve_gateway(
    settings: Settings,
    *,
    host: str,
    port: int,
    keepalive_s: float = 15.0,
    unknown_hold_s: float = 30.0,
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Start the gateway in the running loop; return the server, its task and its URL.

    Stop it with `server.should_exit = True` and await the task. Port 0 picks a free one.

    Raises:
        OSError: the address cannot be bound (with the address in the message).
    """
    # IPPROTO_TCP given explicitly: asyncio sets TCP_NODELAY only on sockets that say so,
    # and without it every response waits ~40 ms for a delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # uvicorn's default: a burst of streams opening at once
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    app = create_app(settings, keepalive_s=keepalive_s, unknown_hold_s=unknown_hold_s)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=3
    )
    server = _EmbeddedServer(config, app.state.backends)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="gateway")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise RuntimeError("the gateway stopped during start-up")
        await asyncio.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}"
    logger.info("gateway on %s", url)
    return server, task, url
