"""What the laptop side (orchestrator) and the worker side (trainer, job launcher) must agree on.

Stdlib only and importable without jax, typer or pydantic: the orchestrator imports it, the trainer
imports it, and `envfile.py` also runs as a plain script on a worker that has nothing installed yet.
"""
