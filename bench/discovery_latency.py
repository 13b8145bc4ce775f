"""Latency of one discovery search with 10,000 workflows in the Redis library.

Fills a library of its own with N generated workflows (event types, data, intents and
steps drawn from a vocabulary), waits for the index, then times `library.search(event)`
for fresh events: p50 and p99. The reference, measured in the same run, is one plain
LangGraph `graph.ainvoke` of a trivial one-node graph (median).

Usage:
    .venv/bin/python bench/discovery_latency.py [--workflows 10000] [--searches 2000] [--hybrid]

`--hybrid` adds a deterministic 64-dimension hashing embedding (no model, no download),
so the search runs the BM25 and the KNN query. Starts the local servers itself unless
AGENTFLOW_REDIS_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langchain_core.embeddings import Embeddings  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

from nodes.models import CloudEvent, SimilarWorkflow, Step  # noqa: E402
from service.bootstrap import redis_client  # noqa: E402
from service.devtools.servers import LocalServers  # noqa: E402
from service.storage.library import RedisWorkflowLibrary  # noqa: E402

DOMAINS = "claim document payment invoice order shipment account customer ticket refund".split()
VERBS = "submitted uploaded requested approved rejected updated cancelled opened closed".split()
FIELDS = "id amount currency status channel reason priority region owner benefit".split()
WORDS = (
    "check validate record review assess decide notify report collect verify approve "
    "reconcile escalate archive schedule contact summarise compute match enrich"
).split()
AGENTS = "intake document_reviewer eligibility_analyst customer_communicator".split()


class HashingEmbeddings(Embeddings):
    """Words hashed into 64 dimensions, normalised: deterministic and free."""

    def embed_query(self, text: str) -> list[float]:  # noqa: D102
        vector = [0.0] * 64
        for word in re.findall(r"[a-z]+", text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:  # noqa: D102
        return [self.embed_query(t) for t in texts]


def event(rng: random.Random) -> CloudEvent:
    domain, verb = rng.choice(DOMAINS), rng.choice(VERBS)
    data = {
        f"{domain}_{f}": f"{rng.choice(WORDS)}-{rng.randint(1, 9999)}"
        for f in rng.sample(FIELDS, 3)
    }
    return CloudEvent.wrap(f"{domain}.{verb}", data, subject=f"S-{rng.randint(1, 999)}")


def workflow(rng: random.Random, i: int) -> SimilarWorkflow:
    source = event(rng)
    noun = source.type.split(".")[0]
    steps = [
        Step(
            id=f"s{n}",
            title=f"{rng.choice(WORDS).capitalize()} the {noun}",
            description=" ".join(rng.choices(WORDS, k=8)),
            depends_on=[f"s{n - 1}"] if n > 1 else [],
            agents=[rng.choice(AGENTS)],
        )
        for n in range(1, rng.randint(3, 6) + 1)
    ]
    return SimilarWorkflow(
        id=f"w{i}",
        event_type=source.type,
        intent=f"Handle the {source.type} event: {' '.join(rng.choices(WORDS, k=4))}",
        goals=[f"The {noun} is {w}ed" for w in rng.sample(WORDS, 2)],
        steps=steps,
        summary=" ".join(rng.choices(WORDS, k=12)),
        data_summary=source.data_summary(limit=200),
        quality=round(rng.random(), 2),
    )


async def fill(library: RedisWorkflowLibrary, n: int) -> None:
    rng = random.Random(7)
    items = [workflow(rng, i) for i in range(n)]
    for start in range(0, n, 500):
        await asyncio.gather(*(library.put(item) for item in items[start : start + 500]))
    while True:  # the index catches up in the background
        info = await library.index.info()
        if int(info["num_docs"]) >= n and int(info.get("indexing", 0)) == 0:
            return
        await asyncio.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def plain_langgraph_ms(runs: int) -> float:
    """Median time of one `ainvoke` of a trivial one-node LangGraph graph."""

    class State(TypedDict):
        n: int

    async def bump(state: State) -> dict[str, Any]:
        return {"n": state["n"] + 1}

    builder = StateGraph(State)
    builder.add_node("bump", bump)
    builder.add_edge(START, "bump")
    builder.add_edge("bump", END)
    graph = builder.compile()
    times = []
    for i in range(runs):
        started = time.perf_counter()
        await graph.ainvoke({"n": i})
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[runs // 10 :])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--searches", type=int, default=2_000)
    parser.add_argument("--hybrid", action="store_true", help="add a hashing embedding")
    args = parser.parse_args()
    async with LocalServers.from_env() as servers:
        redis = redis_client(servers.redis_url, max_connections=40)
        embeddings = HashingEmbeddings() if args.hybrid else None
        library = RedisWorkflowLibrary(
            redis, prefix=f"bench-{uuid.uuid4().hex[:6]}:workflow", embeddings=embeddings
        )
        await library.setup()
        try:
            started = time.perf_counter()
            await fill(library, args.workflows)
            print(
                f"{args.workflows} workflows indexed in {time.perf_counter() - started:.1f} s "
                f"({'hybrid: BM25 + KNN' if args.hybrid else 'BM25'} search, limit 3)"
            )
            rng = random.Random(11)
            queries = [event(rng) for _ in range(args.searches + 100)]
            times, found = [], 0
            for i, query in enumerate(queries):
                t0 = time.perf_counter()
                result = await library.search(query, limit=3)
                if i >= 100:  # the first ones warm up connections and caches
                    times.append((time.perf_counter() - t0) * 1000)
                    found += bool(result and result[0].event_type == query.type)
            reference = await plain_langgraph_ms(2_000)
            p50, p99 = percentile(times, 0.50), percentile(times, 0.99)
            print(f"search p50 {p50:.2f} ms   p99 {p99:.2f} ms   ({len(times)} searches)")
            print(f"best match of the event's type: {found / len(times):.0%} of searches")
            print(f"plain LangGraph ainvoke, one trivial node: {reference:.3f} ms (median)")
            print(f"ratio to it: p50 {p50 / reference:.1f}x   p99 {p99 / reference:.1f}x")
            print(f"target p99 < 20 ms: {'met' if p99 < 20 else 'NOT met'}")
        finally:
            await library.index.delete(drop=True)
            if library.vector_index is not None:
                await library.vector_index.delete(drop=False)
            await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
