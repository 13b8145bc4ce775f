"""`make demo`: the main job end to end on local servers.

Starts the local Kafka-protocol broker and Redis, a worker, the gateway and an agent host
for the eligibility analyst (another department's service, reached over Kafka), sends the
example events, shows their live transitions and results, and answers the escalated one.
Then, on a terminal, the web page stays up until Ctrl-C; run non-interactively (no
terminal on stdin, or `CI` set) or with `--exit`, the demo ends at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from rich.console import Console

from nodes.models import CloudEvent, HumanDecision
from service.bootstrap import check_startup
from service.client import resume_event, send_and_follow, session_id_for
from service.config import load_settings, redact_url
from service.devtools.hosting import host_agents, started_with_host
from service.devtools.servers import LocalServers
from service.gateway.app import serve_gateway
from service.observe.terminal import print_result, print_transition
from service.storage.transitions import Transition
from service.worker import Worker

__all__ = ["main", "run_demo"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "events"
DEMO_EVENTS = ("claim_submitted", "document_uploaded", "status_requested", "claim_needs_review")
REMOTE_AGENT = "eligibility_analyst"
"""The agent of the example domain that runs as its own service, hosted over Kafka."""
RESULT_TIMEOUT_S = 120.0
"""How long the demo waits for the result of one example event."""


async def run_demo(console: Console, *, keep_open: bool = False) -> int:
    """Run the demo; return the number of example events that did not complete.

    Args:
        console: where the transitions and results are printed.
        keep_open: after the examples, keep the worker and the web page up until
            Ctrl-C (SIGINT) or SIGTERM.
    """
    servers = LocalServers.from_env()
    await servers.astart()
    try:
        settings = load_settings(
            kafka_bootstrap=servers.kafka_bootstrap, redis_url=servers.redis_url
        )
        check_startup(settings)
        hosted = host_agents(settings, [REMOTE_AGENT])
        settings = hosted.settings_for(settings)
        worker = Worker(settings, name="demo-worker")
        async with started_with_host(worker, hosted, host_name="eligibility-service") as host:
            failures = await _run_examples(console, worker, servers, keep_open=keep_open)
            console.print(repr(host))
        return failures
    finally:
        await servers.astop()


async def _run_examples(
    console: Console, worker: Worker, servers: LocalServers, *, keep_open: bool
) -> int:
    """Run the example events through a started worker and the gateway; return the failures."""
    settings = worker.settings
    running = asyncio.create_task(worker.run())
    # Port 0: a free port, so the demo never collides with a running `agentflow dev`.
    server, serving, url = await serve_gateway(settings, host="127.0.0.1", port=0)
    console.print(
        f"[bold]agentflow demo[/]  Kafka {servers.kafka_bootstrap}  "
        f"Redis {redact_url(servers.redis_url)}"
        f"  model {settings.model}\n  gateway and web page: {url}\n"
        f"  [bold]{REMOTE_AGENT}[/] runs as its own service (another department's): an "
        f"agent host answers its tasks on {settings.agent_topic(REMOTE_AGENT)}, and a "
        "session waits for it (session.waiting) without holding the worker\n",
        soft_wrap=True,
    )

    def show(transition: Transition) -> None:
        print_transition(console, transition)

    failures = 0
    for name in DEMO_EVENTS:
        event = CloudEvent.parse((EXAMPLES / f"{name}.json").read_bytes())
        console.rule(f"{name}: {event.type} ({event.subject})")
        result = await send_and_follow(
            settings, event, timeout_s=RESULT_TIMEOUT_S, on_transition=show
        )
        print_result(console, result)
        if result.status == "interrupted":
            answer = HumanDecision(
                decision="approve",
                feedback="discharge status confirmed with the veteran by phone",
            )
            console.print(f"\n[bold]answering the review[/]: approve: {answer.feedback}\n")
            resume = resume_event(session_id_for(event), answer, source="demo")
            result = await send_and_follow(
                settings, resume, timeout_s=RESULT_TIMEOUT_S, on_transition=show
            )
            print_result(console, result)
        failures += result.status != "completed"
    console.rule()
    console.print(repr(worker))
    if keep_open:
        stopped = _stop_on_signals()
        console.print(f"sessions stay browsable at {url}; Ctrl-C ends the demo", soft_wrap=True)
        await stopped.wait()
    server.should_exit = True
    await serving
    worker.stop()
    await running
    return failures


def _stop_on_signals() -> asyncio.Event:
    """Return an event that Ctrl-C (SIGINT) or SIGTERM sets from now on."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def interactive() -> bool:
    """Whether a person runs the demo: a terminal on stdin and no `CI` variable."""
    return sys.stdin.isatty() and not os.environ.get("CI")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m service.devtools.demo [--exit]`."""
    parser = argparse.ArgumentParser(
        prog="python -m service.devtools.demo", description="The main job end to end."
    )
    parser.add_argument(
        "--exit",
        action="store_true",
        help="end after the examples, even on a terminal (without it the web page stays up "
        "until Ctrl-C when stdin is a terminal and CI is unset)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(highlight=False)
    failures = asyncio.run(run_demo(console, keep_open=interactive() and not args.exit))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
