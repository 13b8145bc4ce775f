"""The `agentflow` command line: the Typer app assembled from its command modules."""

from __future__ import annotations

import sys

import typer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from rich.markup import escape

from nodes.errors import AgentConfigError, EventValidationError, ModelConfigError
from service.bootstrap import infra_cause
from service.cli import agents, library, sessions
from service.cli.console import EXIT_BAD_INPUT, err_console
from service.cli.follow import send, watch
from service.cli.inputs import BadInput
from service.cli.run import graph, run
from service.cli.service import dev, gateway, health, worker
from service.errors import AgentflowError, KafkaUnavailable, ServerStartError

__all__ = ["app", "main"]

app = typer.Typer(
    name="agentflow",
    help="Turn events into LangGraph agent workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Markdown joins a docstring's wrapped lines into paragraphs; "rich" keeps the breaks.
    rich_markup_mode="markdown",
)
for command in (run, graph, worker, dev, send, watch, health, gateway):
    app.command()(command)
app.add_typer(sessions.app, name="sessions")
app.add_typer(library.app, name="library")
app.add_typer(agents.app, name="agents")

_BAD_INPUT = (BadInput, AgentflowError, AgentConfigError, ModelConfigError, EventValidationError)
"""What the user typed or configured cannot work: one paragraph, exit code 2."""
_NOT_INPUT = (KafkaUnavailable, ServerStartError)
"""Errors of the service's surroundings, not of what the user typed: exit code 1."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning user-facing errors into one paragraph.

    Bad input (arguments, settings, files, unknown sessions) exits 2; Kafka or Redis
    out of reach exits 1.
    """
    try:
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except _BAD_INPUT as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1 if isinstance(exc, _NOT_INPUT) else EXIT_BAD_INPUT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: the usage line and the problem
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C ends `watch` and the waits: no traceback
        sys.exit(130)
    except Exception as exc:
        unreachable = infra_cause(exc)
        if unreachable is None:
            raise
        if isinstance(unreachable, KafkaError):
            where = "Kafka"
        elif isinstance(unreachable, RedisError):
            where = "Redis"
        else:
            where = "Kafka or Redis"
        err_console.print(
            f"[bold red]error:[/] cannot reach {where}: {escape(str(unreachable))} "
            "(is it running? `agentflow health` checks both)",
            soft_wrap=True,
        )
        sys.exit(1)
