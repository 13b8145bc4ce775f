"""The workflow library on Redis, and workflow templates written by hand in YAML.

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

A template file holds one workflow, or a list of them under `workflows:`:

```yaml
id: tpl-claim-submitted          # letters, digits, `.`, `_`, `-`
event_type: claim.submitted
intent: Handle a submitted benefit claim
goals: [The claim is recorded, ...]
data_summary: claim_id veteran_id benefit   # words of the event data it fits (optional)
steps:
  - {id: s1, title: Take in the claim, description: ..., agents: [intake]}
  - {id: s2, title: ..., depends_on: [s1], agents: [eligibility_analyst]}
```
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.commands.search.query import Query
from redisvl.index import AsyncSearchIndex
from redisvl.query.filter import Tag
from redisvl.schema import IndexSchema

from nodes.agents import AgentRegistry
from nodes.library import (
    OFFERED_VERDICTS,
    blend_quality,
    event_text,
    record_of,
    similarity,
    terms,
    workflow_text,
)
from nodes.models import (
    CloudEvent,
    PlanDraft,
    SimilarWorkflow,
    Step,
    Workflow,
    format_validation_error,
    utcnow,
)
from nodes.planning import check_plan
from service.errors import CorruptWorkflowError, TemplateError

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings
    from redis.asyncio import Redis


__all__ = [
    "RedisWorkflowLibrary",
    "load_templates",
    "make_embeddings",
    "open_library",
    "seed_library",
]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "agentflow:workflow"
_TYPE_WEIGHT = 10.0
_OFFERED = "@verdict:{" + " | ".join(sorted(OFFERED_VERDICTS)) + "}"
_MAX_QUERY_TERMS = 40


class _TemplateStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    description: str = ""
    depends_on: list[str] = Field(default_factory=list)
    agents: list[str] = Field(min_length=1)


class _Template(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    event_type: str = Field(min_length=1)
    intent: str = Field(min_length=1)
    goals: list[str] = Field(default_factory=list)
    steps: list[_TemplateStep] = Field(min_length=1)
    summary: str = ""
    data_summary: str = ""
    quality: float = Field(default=1.0, ge=0, le=1)


def _template_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise TemplateError(f"{path} holds no workflow templates (*.yaml)")
        return files
    if not path.exists():
        raise TemplateError(f"workflow template {path} does not exist")
    return [path]


def _check_template(template: _Template, where: str, registry: AgentRegistry | None) -> None:
    ids = [s.id for s in template.steps]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise TemplateError(f"{where}: step id(s) {', '.join(dupes)} appear more than once")
    for step in template.steps:
        unknown = [d for d in step.depends_on if d not in ids or d == step.id]
        if unknown:
            raise TemplateError(
                f"{where}: step {step.id} depends on unknown step(s) {', '.join(unknown)}"
            )
        if registry is not None and (missing := [a for a in step.agents if a not in registry]):
            raise TemplateError(
                f"{where}: step {step.id} names agent(s) {', '.join(missing)} that the "
                f"agents file does not define (known: {', '.join(registry.names)})"
            )
    draft = PlanDraft.of(template.intent, template.goals, template.steps)
    _, problems = check_plan(draft)
    if problems:
        raise TemplateError(f"{where}: " + "; ".join(problems))


def load_templates(
    path: str | Path, registry: AgentRegistry | None = None
) -> list[SimilarWorkflow]:
    """Read workflow templates from a YAML file or every YAML file of a folder.

    Args:
        path: a template file, or a folder of them.
        registry: when given, every agent a template names must be in it.

    Raises:
        TemplateError: with a sentence naming the file, the template and the problem.
    """
    found: dict[str, SimilarWorkflow] = {}
    for file in _template_files(Path(path)):
        try:
            raw = yaml.safe_load(file.read_text())
        except OSError as exc:
            raise TemplateError(f"cannot read workflow template {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise TemplateError(f"workflow template {file} is not valid YAML: {exc}") from None
        items = raw.get("workflows", [raw]) if isinstance(raw, dict) else raw
        if not isinstance(items, list) or not items:
            raise TemplateError(
                f"{file} must hold a workflow template, or a list of them under 'workflows:'"
            )
        for number, item in enumerate(items, 1):
            where = f"{file} (workflow #{number})"
            try:
                template = _Template.model_validate(item)
            except ValidationError as exc:
                raise TemplateError(format_validation_error(exc, f"workflow in {where}")) from None
            _check_template(template, f"{file} ({template.id})", registry)
            if template.id in found:
                raise TemplateError(f"{where}: template id {template.id!r} is used twice")
            now = utcnow()
            found[template.id] = SimilarWorkflow(
                id=template.id,
                event_type=template.event_type,
                intent=template.intent,
                goals=template.goals,
                steps=[Step(**s.model_dump()) for s in template.steps],
                summary=template.summary,
                data_summary=template.data_summary,
                verdict="template",
                quality=template.quality,
                source="template",
                created_at=now,
                last_used=now,
            )
    return list(found.values())


async def seed_library(
    library: Any, path: str | Path, registry: AgentRegistry | None = None
) -> list[str]:
    """Put the templates of a file or folder into a library (same id: replaced).

    Raises:
        TemplateError: a template cannot be used; nothing is put then.
    """
    templates = load_templates(path, registry)
    return [await library.put(t) for t in templates]


def make_embeddings(spec: str) -> Embeddings:
    """Make an embeddings model from a `provider:model` string (LangChain's `init_embeddings`).

    Raises:
        ValueError: the provider is unknown, its package is missing or it has no credentials.
    """
    from langchain.embeddings import init_embeddings

    try:
        return init_embeddings(spec)
    except Exception as exc:  # the providers raise many different types
        raise ValueError(
            f"cannot make embeddings {spec!r}: {exc}. Set AGENTFLOW_EMBEDDINGS to a "
            "`provider:model` whose package and credentials are present, or unset it."
        ) from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _type_token(event_type: str) -> str:
    """One search term that stands for an exact event type."""
    return "et" + hashlib.sha1(event_type.encode()).hexdigest()[:16]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _vector_bytes(vector: Sequence[float]) -> bytes:
    import numpy as np

    return np.asarray(vector, dtype=np.float32).tobytes()


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
        prefix: str = DEFAULT_PREFIX,
        candidates: int = 10,
        timeout_s: float = 2.0,
    ) -> None:
        """Make a library on a Redis client.

        Args:
            redis: an async client of a Redis with the query engine and JSON.
            embeddings: makes search hybrid (text + vector) when given.
            prefix: documents live under `{prefix}:{id}`; the index is `{prefix}s`.
            candidates: how many candidates each search query returns at least.
            timeout_s: a search that takes longer raises `TimeoutError`.
        """
        self.redis = redis
        self.embeddings = embeddings
        self.prefix = prefix
        self.index_name = f"{prefix}s"
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
            name = f"{self.index_name}:vec{dims}"
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
        """Create the search index (and the vector index with embeddings) if missing."""
        await self.index.create(overwrite=False)
        if self.embeddings is not None:
            dims = len(await self.embeddings.aembed_query("dimension probe"))
            schema = IndexSchema.from_dict(self._schema_dict(dims))
            self.vector_index = AsyncSearchIndex(schema, redis_client=self.redis)
            await self.vector_index.create(overwrite=False)

    def key(self, workflow_id: str) -> str:
        """Return the Redis key of a workflow."""
        return f"{self.prefix}:{workflow_id}"

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
        """Return the total and a page of workflows, last used first."""
        query = str(Tag("event_type") == event_type) if event_type else "*"
        q = (
            Query(query)
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
        stages = [str(Tag("event_type") == event_type), ""] if event_type else [""]
        found: dict[str, _Candidate] = {}
        best: list[SimilarWorkflow] = []
        for only in stages:
            searches = [self._text_candidates(query_terms, event_type, only, k)]
            if vector is not None:
                searches.append(self._vector_candidates(vector, only, k))
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
            doc_terms = _text(getattr(candidate.doc, "text", "")).split()
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
        self, query_terms: list[str], event_type: str | None, only: str, k: int
    ) -> list[Any]:
        clauses = query_terms[:_MAX_QUERY_TERMS]
        if event_type and not only:
            clauses.append(f"({_type_token(event_type)}) => {{$weight: {_TYPE_WEIGHT}}}")
        query = f"{only} {_OFFERED}"
        if clauses:
            query += f" @text:({' | '.join(clauses)})"
        q = Query(query.strip()).scorer("BM25STD").paging(0, k).dialect(2)
        return list((await self.index.search(_returning(q))).docs)

    async def _vector_candidates(self, vector: list[float], only: str, k: int) -> list[Any]:
        q = (
            Query(f"({only} {_OFFERED})=>[KNN {k} @embedding $vector AS vector_distance]")
            .sort_by("vector_distance")
            .return_field("vector_distance")
            .paging(0, k)
            .dialect(2)
        )
        assert self.vector_index is not None
        params = {"vector": _vector_bytes(vector)}
        return list((await self.vector_index.search(_returning(q), query_params=params)).docs)

    async def _fill_vectors(self, found: dict[str, _Candidate], vector: list[float]) -> None:
        """Compute the vector similarity of text-only candidates from their stored embedding."""
        missing = [key for key, candidate in found.items() if candidate.sim is None]
        if not missing:
            return
        stored = await self.redis.json().mget(missing, "$.embedding")  # type: ignore[misc]
        for key, value in zip(missing, stored, strict=True):
            embedding: Any = value[0] if isinstance(value, list) and value else None
            found[key].sim = _cosine(vector, embedding) if isinstance(embedding, list) else 0.0

    def _parse(self, key: str, raw: Any) -> SimilarWorkflow:
        try:
            if isinstance(raw, str | bytes):
                return SimilarWorkflow.model_validate_json(raw)
            return SimilarWorkflow.model_validate(raw)
        except (ValidationError, ValueError) as exc:
            raise CorruptWorkflowError(
                f"{_text(key)} does not hold a valid workflow: {exc}"
            ) from None

    def _try_parse(self, key: Any, raw: Any) -> SimilarWorkflow | None:
        if raw is None:
            logger.warning("skipping workflow document %s: it has no workflow", _text(key))
            return None
        try:
            return self._parse(_text(key), raw)
        except CorruptWorkflowError as exc:
            logger.warning("skipping corrupted workflow document: %s", exc)
            return None


async def open_library(redis: Redis, *, embeddings: str | None = None) -> RedisWorkflowLibrary:
    """Set up the Redis workflow library on an existing client.

    Args:
        redis: the client.
        embeddings: `provider:model` of embeddings for hybrid search (`AGENTFLOW_EMBEDDINGS`).

    Raises:
        ValueError: `AGENTFLOW_EMBEDDINGS` names embeddings that cannot be made.
    """
    model = make_embeddings(embeddings) if embeddings else None
    library = RedisWorkflowLibrary(redis, embeddings=model)
    await library.setup()
    return library
