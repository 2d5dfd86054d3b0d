"""impl="chunked": pure JAX, a loop over vocabulary chunks with an online logsumexp and a custom VJP.

Memory is bounded by one [N, chunk] float32 logits tile instead of [N, V]. The backward pass recomputes each
tile from hidden and lm_head (never stored) and accumulates dhidden in float32; each dlm_head chunk is
complete after one tile (it sums over all tokens at once), so it is written straight into its rows.

A vocabulary like 151,936 = 2^7 x 1187 has no convenient divisor, so the loop covers the V // chunk full
chunks and one statically shaped tail chunk follows it: no padded copy of lm_head, no masked columns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from trainer.kernels import softmax_math as sm
from trainer.kernels.types import TokenStats


def matmul_precision(dtype: jnp.dtype) -> lax.Precision:
    """Full float32 matmuls for float32 inputs (TPU/GPU would otherwise drop to bf16/tf32 passes)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _over_chunks(vocab: int, chunk: int, step: Callable, carry):
    """carry = step(carry, start, size) for every chunk [start, start + size) of range(vocab), in order."""
    chunk = min(chunk, vocab)
    full, tail = divmod(vocab, chunk)
    carry = lax.fori_loop(0, full, lambda i, c: step(c, i * chunk, chunk), carry)
    return step(carry, full * chunk, tail) if tail else carry


def _tile(hidden, lm_head, targets, start, size: int, inv_temp: float):
    """The lm_head rows of one chunk, its tempered logits [N, size] and where the targets fall in it."""
    w = lax.dynamic_slice_in_dim(lm_head, start, size, axis=0)
    raw = jnp.dot(hidden, w.T, preferred_element_type=jnp.float32, precision=matmul_precision(hidden.dtype))
    cols = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return w, raw * inv_temp, cols == targets[:, None]


def _forward(hidden, lm_head, targets, temperature, chunk):
    inv_temp = 1.0 / temperature

    def step(state, start, size):
        _, z, is_target = _tile(hidden, lm_head, targets, start, size, inv_temp)
        return sm.online_update(state, z, is_target)

    state = _over_chunks(lm_head.shape[0], chunk, step, sm.init_state(hidden.shape[0]))
    logp, lse, entropy = (x[:, 0] for x in sm.finalize(state))
    return TokenStats(logp, lse, entropy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(hidden, lm_head, targets, temperature, chunk):
    return _forward(hidden, lm_head, targets, temperature, chunk)


def _chunked_fwd(hidden, lm_head, targets, temperature, chunk):
    stats = _forward(hidden, lm_head, targets, temperature, chunk)
    return stats, (hidden, lm_head, targets, stats.lse, stats.entropy)


def _chunked_bwd(temperature, chunk, residuals, g: TokenStats):
    hidden, lm_head, targets, lse, entropy = residuals
    inv_temp = 1.0 / temperature
    coef = sm.backward_coefficients(lse, entropy, g.logp, g.lse, g.entropy)
    precision = matmul_precision(hidden.dtype)
    all_valid = jnp.ones((1, 1), bool)

    def step(carry, start, size):
        dh, dw = carry
        w, z, is_target = _tile(hidden, lm_head, targets, start, size, inv_temp)
        dl = sm.dlogits(z, is_target, all_valid, coef, inv_temp).astype(hidden.dtype)
        dh = dh + jnp.dot(dl, w, preferred_element_type=jnp.float32, precision=precision)
        dw_rows = jnp.dot(dl.T, hidden, preferred_element_type=jnp.float32, precision=precision)
        return dh, lax.dynamic_update_slice_in_dim(dw, dw_rows.astype(dw.dtype), start, axis=0)

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(lm_head))
    dh, dw = _over_chunks(lm_head.shape[0], chunk, step, init)
    return dh.astype(hidden.dtype), dw, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_chunked(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, temperature: float, chunk_vocab: int
) -> TokenStats:
    """hidden [N, H], lm_head [V, H] (same dtype), targets [N] int32 -> TokenStats of [N] float32."""
    return _chunked(hidden, lm_head, targets, temperature, chunk_vocab)
