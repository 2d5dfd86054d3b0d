"""Types shared by every provider: the three per-token outputs and the tile sizes."""

from __future__ import annotations

from typing import NamedTuple

import jax

# jax-free (trainer/config.py checks train.kernel_blocks with it on a laptop without jax)
from trainer.kernel_blocks import KernelBlocks


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(hidden @ lm_head.T / temperature), each [N] float32."""

    logp: jax.Array  # log-probability of the target token
    lse: jax.Array  # logsumexp over the vocabulary (log partition function)
    entropy: jax.Array  # entropy of the token distribution, in nats


__all__ = ["KernelBlocks", "TokenStats"]
