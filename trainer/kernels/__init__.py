"""Per-token log-prob providers for the GRPO loss (jax | chunked | pallas)."""
