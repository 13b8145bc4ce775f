"""`make demo`: the main job end to end on local servers.

Starts the local Kafka-protocol broker and Redis, a worker, sends the example events,
shows their live transitions and results, answers the escalated one, and stops.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from rich.console import Console

from nodes.models import CloudEvent, WorkflowResult
from service.bootstrap import check_startup
from service.cli.console import print_result, print_transition
from service.client import last_seq, produce_event, session_id_for, wait_for_result, watch_session
from service.config import Settings, load_settings
from service.devtools.servers import LocalServers
from service.gateway.app import serve_gateway
from service.worker import Worker

__all__ = ["main", "run_demo"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "events"
DEMO_EVENTS = ("claim_submitted", "document_uploaded", "status_requested", "claim_needs_review")


async def _send_and_follow(
    settings: Settings, console: Console, event: CloudEvent
) -> WorkflowResult:
    after = await last_seq(settings, session_id_for(event))
    session_id = await produce_event(settings, event)
    result = asyncio.create_task(wait_for_result(settings, session_id, event.id, 120))
    async for transition in watch_session(settings, session_id, after):
        print_transition(console, transition)
        if (
            transition.terminal
            and (transition.data or {}).get("result", {}).get("event_id") == event.id
        ):
            break
    return await result


async def run_demo(console: Console) -> int:
    """Run the demo; return the number of example events that did not complete."""
    servers = LocalServers.from_env()
    await servers.astart()
    try:
        settings = load_settings(
            kafka_bootstrap=servers.kafka_bootstrap, redis_url=servers.redis_url
        )
        check_startup(settings)
        worker = Worker(settings, name="demo-worker")
        await worker.start()
        running = asyncio.create_task(worker.run())
        # Port 0: a free port, so the demo never collides with a running `agentflow dev`.
        server, serving, url = await serve_gateway(settings, host="127.0.0.1", port=0)
        console.print(
            f"[bold]agentflow demo[/]  Kafka {servers.kafka_bootstrap}  Redis {servers.redis_url}"
            f"  model {settings.model}\n  gateway and web page: {url}\n",
            soft_wrap=True,
        )
        failures = 0
        for name in DEMO_EVENTS:
            event = CloudEvent.parse((EXAMPLES / f"{name}.json").read_bytes())
            console.rule(f"{name}: {event.type} ({event.subject})")
            result = await _send_and_follow(settings, console, event)
            print_result(console, result)
            if result.status == "interrupted":
                answer = "approve: discharge status confirmed with the veteran by phone"
                console.print(f"\n[bold]answering the review[/]: {answer}\n")
                resume = CloudEvent.wrap(
                    "agentflow.resume",
                    {"answer": answer},
                    session_id=session_id_for(event),
                    source="demo",
                )
                result = await _send_and_follow(settings, console, resume)
                print_result(console, result)
            failures += result.status != "completed"
        console.rule()
        console.print(repr(worker))
        console.print(f"sessions stay browsable at {url} until the demo exits")
        server.should_exit = True
        await serving
        worker.stop()
        await running
        return failures
    finally:
        await servers.astop()


def main() -> None:
    """Entry point of `python -m service.devtools.demo`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(highlight=False)
    failures = asyncio.run(run_demo(console))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
