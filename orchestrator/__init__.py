"""grpoctl's laptop side: targets, transports, remote recipes, run records, SOP replay and the CLI."""

__version__ = "0.1.0"
