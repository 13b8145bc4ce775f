"""Model calls per session with a cold and a warm workflow library, by reuse mode.

The same sequence of events of known types (claim.submitted, document.uploaded,
claim.status_requested) runs twice for each reuse mode: first from an empty library
with reuse off (cold: every session plans and assigns from scratch, as a plain
LangGraph planner would), then again on the library the cold pass filled, with
different event data and the mode's reuse (warm). Each session runs the worker's graph
on the Redis checkpointer, the Redis workflow library and the subject store. Printed
per mode and pass: model calls and tokens per session, by node, and the review's
approval rate; then warm/cold ratios.

Usage:
    .venv/bin/python bench/llm_calls.py [--rounds 3]

Starts the local servers itself unless AGENTFLOW_REDIS_URL is set. The model is the
configured one (`AGENTFLOW_MODEL`; the offline model without credentials).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.workflow import build_graph  # noqa: E402
from nodes.context import NODE_NAMES  # noqa: E402
from nodes.models import CloudEvent, WorkflowResult  # noqa: E402
from service.bootstrap import redis_client  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.devtools.servers import LocalServers  # noqa: E402
from service.runtime.runner import SessionRunner  # noqa: E402
from service.storage.checkpoints import open_checkpointer  # noqa: E402
from service.storage.library import RedisWorkflowLibrary  # noqa: E402
from service.storage.memory import open_subject_store  # noqa: E402

EVENTS = ROOT / "examples" / "events"
KINDS = ("claim_submitted", "document_uploaded", "status_requested")


def events(phase: str, rounds: int, tag: str) -> list[CloudEvent]:
    """The example events of every kind, `rounds` times, with data of this phase.

    Subjects carry `tag`, so each mode's sessions recall only their own earlier ones,
    and each round has its own, so both passes recall alike.
    """
    out = []
    for r in range(rounds):
        for kind in KINDS:
            raw = json.loads((EVENTS / f"{kind}.json").read_text())
            raw["id"] = f"bench-{phase}-{kind}-{r}-{uuid.uuid4().hex[:6]}"
            raw["subject"] = f"{phase}-{r}-{tag}"  # both passes: 3 sessions per subject
            if phase == "warm":
                # other details and subjects; the same claim, so that the example tools
                # answer alike and the tokens compare (unknown claims answer shorter)
                details = {
                    "benefit": "education",
                    "document": "enrollment_letter",
                    "pages": 1,
                    "channel": "sms",
                }
                raw["data"] = {
                    **raw["data"],
                    **{k: v for k, v in details.items() if k in raw["data"]},
                }
            out.append(CloudEvent.parse(raw))
    return out


def summarise(results: list[WorkflowResult]) -> dict[str, Any]:
    n = len(results)
    return {
        "sessions": n,
        "calls": sum(r.usage.llm_calls for r in results) / n,
        "tokens": sum(r.usage.input_tokens + r.usage.output_tokens for r in results) / n,
        "by_node": {
            node: sum(r.usage.by_node.get(node, 0) for r in results) / n for node in NODE_NAMES
        },
        "approved": sum(1 for r in results if r.review.verdict == "approve") / n,
        "based_on": sum(1 for r in results if r.based_on) / n,
    }


def ratio(warm: float, cold: float) -> str:
    return f"{warm / cold:.2f}" if cold else "–"


async def run_mode(redis_url: str, mode: str, rounds: int) -> dict[str, dict[str, Any]]:
    settings = load_settings(redis_url=redis_url, reuse=mode)
    async with AsyncExitStack() as stack:
        redis = redis_client(redis_url, max_connections=40)
        stack.push_async_callback(redis.aclose)
        tag = uuid.uuid4().hex[:6]
        library = RedisWorkflowLibrary(redis, prefix=f"bench-{tag}:workflow")
        await library.setup()
        stack.push_async_callback(library.index.delete, True)
        graph = build_graph(await open_checkpointer(redis), store=await open_subject_store(redis))
        phases = {}
        for phase in ("cold", "warm"):
            # cold: nothing is reused, so every session plans and assigns as without memory
            reuse = "off" if phase == "cold" else mode
            runner = SessionRunner(graph, settings.context(library=library, reuse=reuse))
            results = []
            for event in events(phase, rounds, tag):
                results.append(await runner.start(event, f"bench-{event.id}"))
            failed = [r for r in results if r.status == "failed"]
            if failed:
                print(f"  {len(failed)} {phase} session(s) failed: {failed[0].error}")
            phases[phase] = summarise(results)
        return phases


def report(mode: str, phases: dict[str, dict[str, Any]]) -> None:
    cold, warm = phases["cold"], phases["warm"]
    nodes = "  ".join(f"{n:>8}" for n in NODE_NAMES)
    print(f"\nreuse={mode}: per session, {cold['sessions']} sessions per pass")
    print(f"  {'pass':<10}{'calls':>7}{'tokens':>9}  {nodes}  {'approved':>8}  {'reused':>6}")
    for name, p in (("cold", cold), ("warm", warm)):
        by_node = "  ".join(f"{p['by_node'][n]:>8.2f}" for n in NODE_NAMES)
        print(
            f"  {name:<10}{p['calls']:>7.2f}{p['tokens']:>9.0f}  {by_node}  "
            f"{p['approved']:>8.0%}  {p['based_on']:>6.0%}"
        )
    by_node = "  ".join(f"{ratio(warm['by_node'][n], cold['by_node'][n]):>8}" for n in NODE_NAMES)
    print(
        f"  {'warm/cold':<10}{ratio(warm['calls'], cold['calls']):>7}"
        f"{ratio(warm['tokens'], cold['tokens']):>9}  {by_node}  "
        f"{ratio(warm['approved'], cold['approved']):>8}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="events of each kind per pass")
    args = parser.parse_args()
    async with LocalServers.from_env() as servers:
        model = load_settings().model
        print(f"model {model}; cold = empty library, no reuse; warm = after it, with reuse")
        for mode in ("direct", "adapt"):
            report(mode, await run_mode(servers.redis_url, mode, args.rounds))


if __name__ == "__main__":
    asyncio.run(main())
