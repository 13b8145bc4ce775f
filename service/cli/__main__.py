"""`python -m service.cli`: the same as the `agentflow` command."""

from service.cli.app import main

main()
