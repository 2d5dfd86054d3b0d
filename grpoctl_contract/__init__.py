"""What the laptop side and the trainer share: stdlib only, importable without jax or typer."""
