"""The workflow library on Redis: the search index and its queries.

`RedisWorkflowLibrary` keeps each workflow as a JSON document under
`agentflow:workflow:{id}` and finds them through a redisvl search index:

- full text: Redis ranks candidates with BM25 (`SCORER BM25STD`) over the workflow's
  event type, data summary, intent, goals, steps and agents, with the event's exact type
  weighted up; no model is needed;
- hybrid, when an embeddings model is given: a KNN query over the embeddings adds its
  candidates, and each candidate's cosine similarity enters the score.

The candidates are then scored in [0, 1] exactly as every library scores them
(`nodes.library.similarity`, formula in its module docstring), so thresholds mean the
same with the in-memory library of `agentflow run` and with this one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from redis.commands.search.query import Query
from redis.exceptions import ResponseError
from redisvl.index import AsyncSearchIndex
from redisvl.query.filter import Tag
from redisvl.schema import IndexSchema

from nodes.library import (
    OFFERED_VERDICTS,
    blend_quality,
    event_text,
    record_of,
    similarity,
    terms,
    workflow_text,
)
from nodes.models import CloudEvent, SimilarWorkflow, Workflow, utcnow
from service.errors import CorruptWorkflowError, NoQueryEngineError
from service.storage.keys import WORKFLOW_PREFIX, workflow_index, workflow_key
from service.storage.library.embeddings import cosine, make_embeddings, vector_bytes

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings
    from redis.asyncio import Redis

__all__ = ["RedisWorkflowLibrary", "UnavailableLibrary", "open_library"]

logger = logging.getLogger(__name__)

_TYPE_WEIGHT = 10.0
_OFFERED = "@verdict:{" + " | ".join(sorted(OFFERED_VERDICTS)) + "}"
_MAX_QUERY_TERMS = 40


def _unknown_module_command(exc: BaseException) -> str | None:
    """Return Redis's answer when `exc` comes from a search or JSON command it does not know."""
    current: BaseException | None = exc
    seen: list[BaseException] = []
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        text = str(current)
        if isinstance(current, ResponseError) and text.lower().startswith(
            ("unknown command 'ft.", "unknown command 'json.")
        ):
            return text.split(", with args")[0]
        current = current.__cause__ or current.__context__
    return None


def _address(redis: Redis) -> str:
    """Where a client connects, without credentials: `host:port/db` or a socket path."""
    pool = getattr(redis, "connection_pool", None)
    kwargs: dict[str, Any] = getattr(pool, "connection_kwargs", {}) or {}
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _type_token(event_type: str) -> str:
    """One search term that stands for an exact event type."""
    return "et" + hashlib.sha1(event_type.encode()).hexdigest()[:16]


def _exact_type(event_type: str) -> str:
    """A query clause for one event type, byte for byte.

    The `event_type` TAG field matches case-insensitively and splits stored types at
    commas; the type's own term (a digest, see `_type_token`) matches that type only and
    holds no character a query could misread. Run it `VERBATIM` (no stemming).
    """
    return f"@text:({_type_token(event_type)})"


@dataclass
class _Candidate:
    """A search hit: its returned fields and, in hybrid search, its vector similarity."""

    doc: Any
    sim: float | None = None


def _returning(query: Query) -> Query:
    """Ask a search for the workflow and its terms (by path: the same on either index)."""
    return query.return_field("$.workflow", as_field="workflow").return_field(
        "$.text", as_field="text"
    )


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class RedisWorkflowLibrary:
    """Finished workflows and templates in Redis, found by BM25 or hybrid search.

    Implements `nodes.library.WorkflowLibrary`. Call `setup()` once before use.
    A stored document that does not hold a valid workflow is skipped and logged.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        embeddings: Embeddings | None = None,
        prefix: str = WORKFLOW_PREFIX,
        candidates: int = 10,
        timeout_s: float = 2.0,
    ) -> None:
        """Make a library on a Redis client.

        Args:
            redis: an async client of a Redis with the query engine and JSON, in either
                mode (redis-py decodes search replies itself).
            embeddings: makes search hybrid (text + vector) when given.
            prefix: documents live under `{prefix}:{id}`; the index is `{prefix}s`.
            candidates: how many candidates each search query returns at least.
            timeout_s: a search that takes longer raises `TimeoutError`.
        """
        self.redis = redis
        self.embeddings = embeddings
        self.prefix = prefix
        self.index_name = workflow_index(prefix)
        self.candidates = candidates
        self.timeout_s = timeout_s
        self.index = AsyncSearchIndex(
            IndexSchema.from_dict(self._schema_dict()), redis_client=redis
        )
        self.vector_index: AsyncSearchIndex | None = None

    def __repr__(self) -> str:
        mode = "hybrid" if self.embeddings is not None else "text"
        return f"RedisWorkflowLibrary(index={self.index_name!r}, search={mode})"

    def _schema_dict(self, dims: int | None = None) -> dict[str, Any]:
        fields: list[dict[str, Any]] = [
            {"name": "event_type", "type": "tag", "path": "$.workflow.event_type"},
            {"name": "verdict", "type": "tag", "path": "$.workflow.verdict"},
            {"name": "source", "type": "tag", "path": "$.workflow.source"},
            {"name": "text", "type": "text", "path": "$.text"},
            {"name": "quality", "type": "numeric", "path": "$.workflow.quality"},
            {"name": "reuse_count", "type": "numeric", "path": "$.workflow.reuse_count"},
            {
                "name": "last_used",
                "type": "numeric",
                "path": "$.last_used_ts",
                "attrs": {"sortable": True},
            },
        ]
        name = self.index_name
        if dims is not None:  # the vector index needs only what its KNN queries filter on
            name = workflow_index(self.prefix, dims=dims)
            fields = [f for f in fields if f["name"] in ("event_type", "verdict")]
            fields.append(
                {
                    "name": "embedding",
                    "type": "vector",
                    "path": "$.embedding",
                    "attrs": {
                        "dims": dims,
                        "algorithm": "flat",
                        "distance_metric": "cosine",
                        "datatype": "float32",
                    },
                }
            )
        return {
            "index": {
                "name": name,
                "prefix": f"{self.prefix}:",
                "storage_type": "json",
                "stopwords": [],  # our own terms: index every one of them
            },
            "fields": fields,
        }

    async def setup(self) -> None:
        """Create the search index (and the vector index with embeddings) if missing.

        Raises:
            NoQueryEngineError: the Redis has no search module (plain Redis).
        """
        try:
            # Asked first: redisvl's create() logs at INFO when the index exists.
            if not await self.index.exists():
                await self.index.create()
        except Exception as exc:
            answer = _unknown_module_command(exc)
            if answer is None:
                raise
            raise NoQueryEngineError(_address(self.redis), answer) from exc
        if self.embeddings is not None:
            dims = len(await self.embeddings.aembed_query("dimension probe"))
            schema = IndexSchema.from_dict(self._schema_dict(dims))
            self.vector_index = AsyncSearchIndex(schema, redis_client=self.redis)
            if not await self.vector_index.exists():
                await self.vector_index.create()

    def key(self, workflow_id: str) -> str:
        """Return the Redis key of a workflow."""
        return workflow_key(workflow_id, self.prefix)

    async def add(self, workflow: Workflow, *, summary: str = "") -> str:
        """Keep a finished workflow and return its id."""
        return await self.put(record_of(workflow, summary=summary))

    async def put(self, item: SimilarWorkflow) -> str:
        """Keep a workflow record as it is (a template, say), replacing one with its id."""
        text = workflow_text(item)
        document: dict[str, Any] = {
            "workflow": item.model_dump(mode="json", exclude={"score", "reuse"}),
            "text": " ".join([*terms(text), _type_token(item.event_type)]),
            "last_used_ts": (item.last_used or utcnow()).timestamp(),
        }
        if self.embeddings is not None:
            document["embedding"] = list((await self.embeddings.aembed_documents([text]))[0])
        await self.redis.json().set(self.key(item.id), "$", document)  # type: ignore[misc]
        return item.id

    async def get(self, workflow_id: str) -> SimilarWorkflow | None:
        """Return a kept workflow, or None.

        Raises:
            CorruptWorkflowError: the document does not hold a valid workflow.
        """
        raw = await self.redis.json().get(self.key(workflow_id), "$.workflow")  # type: ignore[misc]
        if not raw:
            return None
        return self._parse(self.key(workflow_id), raw[0] if isinstance(raw, list) else raw)

    async def delete(self, workflow_id: str) -> bool:
        """Forget a workflow; return whether it existed."""
        return bool(await self.redis.delete(self.key(workflow_id)))

    async def count(self) -> int:
        """Return how many documents the index holds."""
        result = await self.index.search(Query("*").paging(0, 0).dialect(2))
        return int(result.total)

    async def recent(
        self, *, event_type: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[SimilarWorkflow]]:
        """Return the total and a page of workflows (of exactly one event type), last used first."""
        query = _exact_type(event_type) if event_type else "*"
        q = (
            Query(query)
            .verbatim()
            .sort_by("last_used", asc=False)
            .return_field("$.workflow", as_field="workflow")
            .paging(offset, limit)
            .dialect(2)
        )
        result = await self.index.search(q)
        items = [self._try_parse(doc.id, getattr(doc, "workflow", None)) for doc in result.docs]
        return int(result.total), [i for i in items if i is not None]

    async def mark_used(self, workflow_id: str, *, quality: float | None = None) -> None:
        """Count one more run based on a workflow, blending that run's quality in."""
        key = self.key(workflow_id)
        paths = ("$.workflow.quality", "$.workflow.reuse_count")
        current: Any = await self.redis.json().get(key, *paths)  # type: ignore[misc]
        if not current:
            return
        now = utcnow()
        pipe = self.redis.pipeline(transaction=True)
        pipe.json().numincrby(key, "$.workflow.reuse_count", 1)
        pipe.json().set(key, "$.workflow.last_used", now.isoformat())
        pipe.json().set(key, "$.last_used_ts", now.timestamp())
        try:
            old = float(current["$.workflow.quality"][0])
            uses = int(current["$.workflow.reuse_count"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            logger.warning("workflow %s has no usable quality or reuse count", workflow_id)
        else:
            if quality is not None:
                pipe.json().set(key, "$.workflow.quality", blend_quality(old, uses, quality))
        await pipe.execute()

    async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
        """Return workflows similar to the event, best first, with scores in [0, 1].

        Raises:
            TimeoutError: Redis did not answer within `timeout_s`.
            redis.exceptions.RedisError: Redis cannot be reached or refused the query.
        """
        return await self.search_text(event_text(event), event_type=event.type, limit=limit)

    async def search_text(
        self, text: str, *, event_type: str | None = None, limit: int = 3
    ) -> list[SimilarWorkflow]:
        """Return workflows matching free text (and, when given, an event type), best first."""
        async with asyncio.timeout(self.timeout_s):
            return await self._search(text, event_type, limit)

    async def _search(self, text: str, event_type: str | None, limit: int) -> list[SimilarWorkflow]:
        query_terms = list(dict.fromkeys(terms(text)))
        k = max(self.candidates, limit * 5)
        vector: list[float] | None = None
        if self.embeddings is not None and self.vector_index is not None:
            vector = list(await self.embeddings.aembed_query(text))
        # Same-type workflows score at least 0.5 and others at most 0.5: look among the
        # event's own type first (a small, fast query) and widen only if too few match.
        stages = [True, False] if event_type else [False]
        found: dict[str, _Candidate] = {}
        best: list[SimilarWorkflow] = []
        for same_type in stages:
            searches = [self._text_candidates(query_terms, event_type, same_type, k)]
            if vector is not None:
                searches.append(self._vector_candidates(vector, event_type, same_type, k))
            for docs in await asyncio.gather(*searches):
                for doc in docs:
                    distance = getattr(doc, "vector_distance", None)
                    known = found.get(doc.id)
                    if known is None or (distance is not None and known.sim is None):
                        sim = None if distance is None else 1.0 - float(distance)
                        found[doc.id] = _Candidate(doc, sim)
            if vector is not None:
                await self._fill_vectors(found, vector)
            best = self._best(found, query_terms, event_type, limit)
            if len(best) >= limit:
                break
        return best

    def _best(
        self,
        found: dict[str, _Candidate],
        query_terms: list[str],
        event_type: str | None,
        limit: int,
    ) -> list[SimilarWorkflow]:
        """Score the candidates from their raw JSON; validate only the best ones."""
        ranked: list[tuple[float, float, float, str, dict[str, Any]]] = []
        for key, candidate in found.items():
            raw = getattr(candidate.doc, "workflow", None)
            try:
                data = json.loads(raw) if raw is not None else None
            except ValueError:
                data = None
            if not isinstance(data, dict):
                logger.warning("skipping corrupted workflow document %s: not a workflow", key)
                continue
            if data.get("verdict") not in OFFERED_VERDICTS:
                continue
            doc_terms = str(getattr(candidate.doc, "text", "")).split()
            kind = str(data.get("event_type", ""))
            score = similarity(query_terms, event_type, kind, doc_terms, candidate.sim)
            if score > 0:
                quality, reuse = _number(data.get("quality")), _number(data.get("reuse_count"))
                ranked.append((score, quality, reuse, key, data))
        ranked.sort(key=lambda r: r[:3], reverse=True)
        best: list[SimilarWorkflow] = []
        for score, _, _, key, data in ranked:
            item = self._try_parse(key, data)
            if item is not None:
                best.append(item.model_copy(update={"score": score}))
                if len(best) == limit:
                    break
        return best

    async def _text_candidates(
        self, query_terms: list[str], event_type: str | None, same_type: bool, k: int
    ) -> list[Any]:
        clauses = query_terms[:_MAX_QUERY_TERMS]
        if event_type and not same_type:
            clauses.append(f"({_type_token(event_type)}) => {{$weight: {_TYPE_WEIGHT}}}")
        only = _exact_type(event_type) if event_type and same_type else ""
        query = f"{only} {_OFFERED}"
        if clauses:
            query += f" @text:({' | '.join(clauses)})"
        q = Query(query.strip()).scorer("BM25STD").paging(0, k).dialect(2)
        return list((await self.index.search(_returning(q))).docs)

    async def _vector_candidates(
        self, vector: list[float], event_type: str | None, same_type: bool, k: int
    ) -> list[Any]:
        # The vector index has no type term: its TAG field narrows the candidates (case-
        # insensitively, a superset that scoring sorts out), but a type a query cannot
        # hold (control characters) searches them all.
        only = ""
        if event_type and same_type and event_type.isprintable():
            only = str(Tag("event_type") == event_type)
        q = (
            Query(f"({only} {_OFFERED})=>[KNN {k} @embedding $vector AS vector_distance]")
            .sort_by("vector_distance")
            .return_field("vector_distance")
            .paging(0, k)
            .dialect(2)
        )
        assert self.vector_index is not None
        params = {"vector": vector_bytes(vector)}
        return list((await self.vector_index.search(_returning(q), query_params=params)).docs)

    async def _fill_vectors(self, found: dict[str, _Candidate], vector: list[float]) -> None:
        """Compute the vector similarity of text-only candidates from their stored embedding."""
        missing = [key for key, candidate in found.items() if candidate.sim is None]
        if not missing:
            return
        stored = await self.redis.json().mget(missing, "$.embedding")  # type: ignore[misc]
        for key, value in zip(missing, stored, strict=True):
            embedding: Any = value[0] if isinstance(value, list) and value else None
            found[key].sim = cosine(vector, embedding) if isinstance(embedding, list) else 0.0

    def _parse(self, key: str, raw: Any) -> SimilarWorkflow:
        try:
            if isinstance(raw, str | bytes):
                return SimilarWorkflow.model_validate_json(raw)
            return SimilarWorkflow.model_validate(raw)
        except (ValidationError, ValueError) as exc:
            raise CorruptWorkflowError(f"{key} does not hold a valid workflow: {exc}") from None

    def _try_parse(self, key: str, raw: Any) -> SimilarWorkflow | None:
        if raw is None:
            logger.warning("skipping workflow document %s: it has no workflow", key)
            return None
        try:
            return self._parse(key, raw)
        except CorruptWorkflowError as exc:
            logger.warning("skipping corrupted workflow document: %s", exc)
            return None


class UnavailableLibrary:
    """The workflow library when its Redis has no query engine: nothing found, nothing kept.

    Implements `nodes.library.WorkflowLibrary`. Searching raises, so discovery goes on
    without examples exactly as when the library is unreachable (its `discovery_note`
    says why); keeping and counting do nothing, since start-up already warned once.
    """

    def __init__(self, reason: str) -> None:
        """Make a library that is off for `reason` (a short clause, e.g. from the error)."""
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnavailableLibrary({self.reason!r})"

    async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
        """Raise: there is nothing to search.

        Raises:
            RuntimeError: saying why the library is off.
        """
        raise RuntimeError(self.reason)

    async def add(self, workflow: Workflow, *, summary: str = "") -> str:
        """Keep nothing; return the id the workflow would have had."""
        return record_of(workflow, summary=summary).id

    async def mark_used(self, workflow_id: str, *, quality: float | None = None) -> None:
        """Count nothing."""


async def open_library(redis: Redis, *, embeddings: str | None = None) -> RedisWorkflowLibrary:
    """Set up the Redis workflow library on an existing client.

    Args:
        redis: the client.
        embeddings: `provider:model` of embeddings for hybrid search (`AGENTFLOW_EMBEDDINGS`).

    Raises:
        ValueError: `AGENTFLOW_EMBEDDINGS` names embeddings that cannot be made.
        NoQueryEngineError: the Redis has no search module (plain Redis).
    """
    model = make_embeddings(embeddings) if embeddings else None
    library = RedisWorkflowLibrary(redis, embeddings=model)
    await library.setup()
    return library
