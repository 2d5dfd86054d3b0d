"""Per-token log-prob providers for the GRPO loss.

    token_logprobs(hidden [N, H], lm_head [V, H], targets [N] int32, temperature, impl) -> TokenStats

with logp = log_softmax(hidden @ lm_head.T / temperature)[targets], its logsumexp and its entropy, all [N]
float32 and differentiable w.r.t. hidden and lm_head. Three interchangeable providers:

  jax      full logits + log_softmax (reference.py): [N, V] float32 in memory, plus its gradient.
  chunked  pure JAX, scan over vocabulary chunks with an online logsumexp and a custom VJP that recomputes
           each chunk in the backward pass (chunked.py): the portable memory-efficient path (GPU, CPU).
  pallas   Pallas TPU kernels over [token block x vocab block] tiles; no [N, V] buffer ever reaches HBM
           (pallas.py). Runs in interpret mode on a CPU backend.

On a device mesh (FSDP under jit), chunked and pallas run per device on that device's tokens (mesh.py).

Leading batch dimensions are allowed: hidden [..., H] with targets [...] give outputs of shape [...].
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from trainer.kernels.mesh import per_device
from trainer.kernels.reference import token_logprobs_reference
from trainer.kernels.types import KernelBlocks, TokenStats

Impl = Literal["jax", "chunked", "pallas"]
IMPLS: tuple[str, ...] = ("jax", "chunked", "pallas")

__all__ = ["IMPLS", "Impl", "KernelBlocks", "TokenStats", "token_logprobs"]


def token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    impl: Impl = "jax",
    **blocks: int,
) -> TokenStats:
    """Per-token log-prob, logsumexp and entropy of softmax(hidden @ lm_head.T / temperature).

    `blocks` are KernelBlocks fields (block_tokens, block_vocab, chunk_vocab, vmem_limit_bytes); providers
    ignore the ones they do not use. hidden and lm_head are cast to their common dtype: pass both in
    bfloat16 for the fast path (accumulation is always float32).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown token_logprobs impl {impl!r}; expected one of {', '.join(IMPLS)}")
    tiles = KernelBlocks(**blocks)
    temperature = float(temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if hidden.ndim < 2 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[-1]:
        raise ValueError(f"expected hidden [..., H] and lm_head [V, H]; got {hidden.shape}, {lm_head.shape}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {targets.shape} must match hidden's leading dims {hidden.shape[:-1]}")

    batch_shape = targets.shape
    dtype = jnp.promote_types(hidden.dtype, lm_head.dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
    w = lm_head.astype(dtype)
    t = targets.reshape(-1).astype(jnp.int32)

    if impl == "jax":
        stats = token_logprobs_reference(h, w, t, temperature)
    elif impl == "chunked":
        from trainer.kernels.chunked import token_logprobs_chunked

        provider = lambda h, w, t: token_logprobs_chunked(h, w, t, temperature, tiles.chunk_vocab)
        stats = per_device(provider, h, w, t)
    else:
        from trainer.kernels.pallas import token_logprobs_pallas

        stats = per_device(lambda h, w, t: token_logprobs_pallas(h, w, t, temperature, tiles), h, w, t)
    return TokenStats(*(x.reshape(batch_shape) for x in stats))
