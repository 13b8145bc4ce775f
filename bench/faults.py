"""Sessions that complete when a share of the model calls fail, against the same without faults.

N sessions run through the workflow graph with `openai:` models (langchain-openai and
the `openai` client over HTTP) against the test suite's OpenAI-compatible server on
loopback, twice in the same run: once with every model call answered well, once with a
seeded share of them faulted (429, 500, answers that never come, dropped connections,
invalid structured output, unknown tools, tool arguments that are not JSON, bodies that
are not JSON, empty `choices`). Printed per run: completed, failed with a reason a user
understands, failed without one (a bare `IndexError`, `JSONDecodeError`, ...), hung
(no result within --bound seconds), tracebacks (exceptions out of the runner, errors
logged with a traceback, task exceptions never retrieved); then the ratio
completed(faulted) / completed(fault-free), the faults injected by kind, and why the
failed sessions failed.

Usage:
    .venv/bin/python bench/faults.py [--sessions 24] [--rate 0.3] [--seed 7]
        [--attempts 5] [--backoff 0.05] [--max-backoff 1] [--kinds rate_limit,...]

The nodes that call models retry under `model_retry(--attempts)` with a short backoff
(--backoff seconds, doubling, at most --max-backoff, plus LangGraph's 0-1 s jitter) so
the run takes well under a minute; `--backoff 0.5 --max-backoff 8` is the service's
policy.
Checkpoints are in memory: this measures the model path, not Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402

from graphs.workflow import build_graph  # noqa: E402
from nodes.chat_models import model_retry  # noqa: E402
from nodes.context import WorkflowContext  # noqa: E402
from nodes.library import InMemoryWorkflowLibrary  # noqa: E402
from nodes.models import CloudEvent, WorkflowResult  # noqa: E402
from service.runtime.runner import SessionRunner  # noqa: E402
from service.storage.checkpoints import checkpoint_serde  # noqa: E402
from tests.openai_server import FAULT_KINDS, FaultPlan, OpenAICompatibleServer  # noqa: E402

EVENTS = ROOT / "examples" / "events"
KINDS = ("claim_submitted", "document_uploaded", "status_requested")
BARE = re.compile(
    r"^(IndexError|KeyError|JSONDecodeError|TypeError|ValueError|AttributeError|"
    r"ValidationError|RuntimeError|AssertionError|Exception)\b"
)
"""A failure that names only a Python exception: no reason a user can act on."""
FALLBACK = "Summary built from the steps"


class _Tracebacks(logging.Handler):
    """Counts log records of WARNING and above that carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "never retrieved" in record.getMessage():
            self.records.append(record)


@dataclass
class Run:
    """What one batch of sessions came to."""

    name: str
    results: list[WorkflowResult] = field(default_factory=list)
    hung: int = 0
    raised: list[BaseException] = field(default_factory=list)
    logged: int = 0
    calls: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        """Sessions that ended with `status`."""
        return sum(1 for r in self.results if r.status == status)

    def failed(self, *, with_reason: bool) -> list[WorkflowResult]:
        """Failed sessions whose error gives (or does not give) a reason."""
        return [
            r
            for r in self.results
            if r.status == "failed" and bool(r.error and not BARE.match(r.error)) == with_reason
        ]

    @property
    def tracebacks(self) -> int:
        """Exceptions out of the runner, and errors logged with a traceback."""
        return len(self.raised) + self.logged

    @property
    def fallbacks(self) -> int:
        """Sessions whose summary was built from the steps."""
        return sum(1 for r in self.results if r.summary.startswith(FALLBACK))


def events(n: int, tag: str) -> list[CloudEvent]:
    """`n` example events of the kinds that end without a human, round robin."""
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        raw = json.loads((EVENTS / f"{kind}.json").read_text())
        raw["id"] = f"faults-{tag}-{i}"
        out.append(CloudEvent.parse(raw))
    return out


async def run_batch(
    name: str, faults: FaultPlan | None, args: argparse.Namespace, counter: _Tracebacks
) -> Run:
    """Run `args.sessions` sessions at once against a server with `faults`."""
    from nodes.chat_models import make_chat_model

    run = Run(name)
    with OpenAICompatibleServer(faults=faults, hang_s=args.timeout + 1) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        os.environ["OPENAI_API_KEY"] = server.api_key
        make_chat_model.cache_clear()
        model = make_chat_model("openai:bench-model", timeout_s=args.timeout)
        context = WorkflowContext(
            model="openai:bench-model",
            chat_model=model,
            model_timeout_s=args.timeout,
            library=InMemoryWorkflowLibrary(),
        )
        retry = model_retry(
            args.attempts, initial_interval=args.backoff, max_interval=args.max_backoff
        )
        graph = build_graph(InMemorySaver(serde=checkpoint_serde()), model_retry=retry)
        runner = SessionRunner(graph, context)
        before = len(counter.records)

        async def one(event: CloudEvent) -> None:
            try:
                async with asyncio.timeout(args.bound):
                    run.results.append(await runner.start(event, f"s-{event.id}"))
            except TimeoutError:
                run.hung += 1
            except Exception as exc:  # a traceback out of the runner
                run.raised.append(exc)

        started = time.monotonic()
        tag = "clean" if faults is None else "faulted"
        await asyncio.gather(*(one(e) for e in events(args.sessions, tag)))
        run.seconds = time.monotonic() - started
        run.logged = len(counter.records) - before
        run.calls = len(server.requests)
        run.faults = Counter(r.fault for r in server.requests if r.fault)
    make_chat_model.cache_clear()
    return run


def report(runs: list[Run], args: argparse.Namespace) -> None:
    head = (
        f"{'run':<12}{'sessions':>9}{'completed':>10}{'failed+reason':>14}{'failed bare':>12}"
        f"{'interrupted':>12}{'hung':>6}{'tracebacks':>11}{'calls':>7}{'faulted':>8}"
        f"{'fallback':>9}{'seconds':>8}"
    )
    print(head)
    for run in runs:
        print(
            f"{run.name:<12}{args.sessions:>9}{run.count('completed'):>10}"
            f"{len(run.failed(with_reason=True)):>14}{len(run.failed(with_reason=False)):>12}"
            f"{run.count('interrupted'):>12}{run.hung:>6}{run.tracebacks:>11}{run.calls:>7}"
            f"{sum(run.faults.values()):>8}{run.fallbacks:>9}{run.seconds:>8.1f}"
        )
    clean, faulted = runs
    base = clean.count("completed")
    ratio = f"{faulted.count('completed') / base:.2f}" if base else "–"
    print(f"\ncompleted(faulted) / completed(fault-free) = {ratio}")
    print(
        "faults injected: "
        + ", ".join(f"{k} {faulted.faults.get(k, 0)}" for k in args.kinds)
        + f" (of {faulted.calls} calls: {sum(faulted.faults.values()) / max(faulted.calls, 1):.0%})"
    )
    for run in runs:
        reasons = Counter(
            re.sub(r"chatcmpl-\w+|req_\w+|call_\w+", "…", r.error or "(no error)")[:150]
            for r in run.results
            if r.status == "failed"
        )
        if reasons:
            print(f"\n{run.name}: why sessions failed")
            for reason, n in reasons.most_common():
                print(f"  {n}× {reason}")
        for exc in run.raised[:3]:
            print(f"  raised: {type(exc).__name__}: {exc}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=24, help="sessions per run")
    parser.add_argument("--rate", type=float, default=0.3, help="share of model calls faulted")
    parser.add_argument("--seed", type=int, default=7, help="seed of the fault draws")
    parser.add_argument("--attempts", type=int, default=5, help="AGENTFLOW_MODEL_MAX_ATTEMPTS")
    parser.add_argument("--backoff", type=float, default=0.05, help="first retry's wait, s")
    parser.add_argument("--max-backoff", type=float, default=1.0, help="longest wait, s")
    parser.add_argument("--timeout", type=float, default=3.0, help="model call timeout, s")
    parser.add_argument("--bound", type=float, default=240.0, help="a session is hung after, s")
    parser.add_argument(
        "--kinds",
        type=lambda v: tuple(k.strip() for k in v.split(",") if k.strip()),
        default=FAULT_KINDS,
        help="comma-separated fault kinds (default: all)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    counter = _Tracebacks()
    logging.getLogger().addHandler(counter)
    plan = FaultPlan(rate=args.rate, seed=args.seed, kinds=args.kinds)
    print(
        f"{args.sessions} sessions per run; {args.rate:.0%} of model calls faulted (seed "
        f"{args.seed}); {args.attempts} attempts per node, backoff {args.backoff:g} s doubling "
        f"to {args.max_backoff:g} s + 0-1 s jitter; model timeout {args.timeout:g} s\n"
    )
    clean = await run_batch("fault-free", None, args, counter)
    faulted = await run_batch(f"{args.rate:.0%} faults", plan, args, counter)
    report([clean, faulted], args)


if __name__ == "__main__":
    asyncio.run(main())
