"""An agent of another team: plain aiokafka and the protocol's JSON Schema files, nothing else.

It imports nothing from agentflow (a test checks its imports). It reads tasks from its
topic, checks each against `agentflow.agent.task.schema.json`, says one
`agentflow.agent.message` and sends one `agentflow.agent.reply` to the task's
`reply_to`, keyed by the session id; both are checked against their schema files before
they go. Records of other types (cancels) are skipped, as the protocol lets a host do
with what it does not take.

    python tests/foreign_agent.py --bootstrap HOST:PORT --topic agentflow.agents.NAME \
        --schemas docs/protocol [--tasks N] [--timeout S]

Exits 0 after answering N tasks, 1 when none came within the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


def cloud_event(kind: str, task_event: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Wrap `data` as a CloudEvent answering `task_event`, in its session."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "team-b/foreign-agent",
        "type": kind,
        "subject": task_event.get("subject"),
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "sessionid": task_event["sessionid"],
        "data": data,
    }


def answer(task: dict[str, Any]) -> str:
    """The agent's work: a finding about the step, from the task's fields."""
    inputs = ", ".join(f"{step} said {text!r}" for step, text in task["inputs"].items())
    return f"{task['step']['title']}: checked by team B ({inputs or 'no inputs'})"


async def serve(args: argparse.Namespace) -> int:
    schemas = {
        kind: json.loads((args.schemas / f"agentflow.agent.{kind}.schema.json").read_text())
        for kind in ("task", "message", "reply")
    }
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=f"team-b-{args.topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    answered = 0
    try:
        async with asyncio.timeout(args.timeout):
            async for record in consumer:
                event = json.loads(record.value)
                if event.get("type") == "agentflow.agent.task":
                    jsonschema.validate(event, schemas["task"])
                    task = event["data"]
                    said = {"task_id": task["task_id"], "agent": task["agent"], "content": "on it"}
                    output = answer(task)
                    reply = {
                        "task_id": task["task_id"],
                        "agent": task["agent"],
                        "status": "done",
                        "output": output,
                        "messages": [{"type": "ai", "content": output, "name": task["agent"]}],
                        "usage": {"llm_calls": 0, "input_tokens": 0, "output_tokens": 0},
                    }
                    for kind, data in (("message", said), ("reply", reply)):
                        sent = cloud_event(f"agentflow.agent.{kind}", event, data)
                        jsonschema.validate(sent, schemas[kind])
                        await producer.send_and_wait(
                            task["reply_to"],
                            json.dumps(sent).encode(),
                            key=event["sessionid"].encode(),
                        )
                    answered += 1
                await consumer.commit()
                if answered >= args.tasks:
                    return 0
    except TimeoutError:
        print(f"answered {answered} of {args.tasks} task(s) in {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        await consumer.stop()
        await producer.stop()
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--schemas", type=Path, required=True)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120)
    sys.exit(asyncio.run(serve(parser.parse_args())))


if __name__ == "__main__":
    main()
