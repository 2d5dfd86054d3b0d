"""`python -m orchestrator` is `grpoctl`."""

from orchestrator.cli import main

main()
