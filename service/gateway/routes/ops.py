"""Operations and the pages: /graph, /metrics (token needed), /healthz, / and /docs (open)."""

from __future__ import annotations

import asyncio
import contextlib
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, JSONResponse, Response

from service.gateway.auth import AUTH_ERRORS, require_token
from service.gateway.backends import REDIS_ERRORS, BackendsDep, known_session
from service.gateway.schemas import Health, Problem
from service.observe import metrics
from service.observe.drawing import render_graph, session_path
from service.storage.publisher import read_log

__all__ = ["STATIC", "router"]

STATIC = Path(__file__).parents[1] / "static"
"""The pages' files: index.html at `/`, docs.html at `/docs`, the others under `/static/`."""

_TOKEN = [Depends(require_token)]


@cache
def _drawing(fmt: Literal["svg", "mermaid"]) -> str:
    return render_graph(fmt)


router = APIRouter()


@router.get(
    "/graph",
    dependencies=_TOKEN,
    responses={
        **AUTH_ERRORS,
        200: {
            "description": "The workflow graph.",
            "content": {"image/svg+xml": {}, "text/plain": {}},
        },
        404: {"model": Problem},
        422: {"model": Problem},
    },
)
async def get_graph(
    backends: BackendsDep,
    format: Annotated[Literal["svg", "mermaid"], Query()] = "svg",
    session: Annotated[
        str | None, Query(description="Highlight the path this session took.")
    ] = None,
) -> Response:
    """Draw the workflow graph as SVG or Mermaid text."""
    media = "image/svg+xml" if format == "svg" else "text/plain; charset=utf-8"
    if session is None:
        return Response(_drawing(format), media_type=media)
    transitions = await read_log(backends.redis, session)
    if not transitions:
        await known_session(backends, session)
    return Response(render_graph(format, session_path(transitions)), media_type=media)


@router.get(
    "/metrics",
    dependencies=_TOKEN,
    response_class=Response,
    responses={
        **AUTH_ERRORS,
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
    },
)
async def get_metrics(backends: BackendsDep) -> Response:
    """Prometheus metrics: events received, runs in flight, durations, DLQ count."""
    with contextlib.suppress(*REDIS_ERRORS):
        for status, count in (await backends.count_by_status()).items():
            metrics.SESSIONS.labels(status).set(count)
    return Response(metrics.latest(), media_type=metrics.CONTENT_TYPE_LATEST)


@router.get(
    "/healthz",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": "Kafka or Redis is unreachable, or a worker is degraded.",
        }
    },
)
async def healthz(backends: BackendsDep) -> JSONResponse:
    """Say whether Kafka and Redis answer and the workers take events (no token needed)."""
    kafka, redis_ = await asyncio.gather(backends.kafka_health(), backends.redis_health())
    workers = await backends.worker_states() if redis_.ok else []
    status: Literal["ok", "unavailable", "degraded"] = "ok"
    if not (kafka.ok and redis_.ok):
        status = "unavailable"
    elif any(w.state != "running" for w in workers):
        status = "degraded"
    health = Health(status=status, kafka=kafka, redis=redis_, workers=workers)
    return JSONResponse(health.model_dump(mode="json"), status_code=200 if status == "ok" else 503)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """Serve the web page (no token needed: it asks for one)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/docs", include_in_schema=False)
async def api_docs() -> FileResponse:
    """Serve Swagger UI on the OpenAPI document (its files come from this gateway)."""
    return FileResponse(STATIC / "docs.html", headers={"Cache-Control": "no-cache"})
