"""impl="jax": the plain reference. Materialises the full [N, V] float32 logits; obviously right."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainer.kernels.types import TokenStats


def token_logprobs_reference(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, temperature: float = 1.0
) -> TokenStats:
    """hidden [N, H], lm_head [V, H], targets [N] int32 -> TokenStats of [N] float32 arrays."""
    logits = jnp.dot(hidden, lm_head.T, preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - lse[:, None]
    logp = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return TokenStats(logp=logp, lse=lse, entropy=entropy)
