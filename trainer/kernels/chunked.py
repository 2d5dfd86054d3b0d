"""impl="chunked": pure JAX, a loop over vocabulary chunks with an online logsumexp and a custom VJP.

Memory is bounded by one [N, chunk] float32 logits tile instead of [N, V]. The backward pass recomputes each
tile from hidden and lm_head (never stored) and accumulates dhidden in float32; each dlm_head chunk is
complete after one tile (it sums over all tokens at once), so it is written straight into its rows.

No padding copy of lm_head: the last chunk is slid back to end at V (start = min(i * chunk, V - chunk)) and
the columns it shares with the previous chunk are masked, so a vocabulary like 151,936 = 2^7 x 1187 needs
no chunk size that divides it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from trainer.kernels import softmax_math as sm
from trainer.kernels.types import TokenStats


def matmul_precision(dtype: jnp.dtype) -> lax.Precision:
    """Full float32 matmuls for float32 inputs (TPU/GPU would otherwise drop to bf16/tf32 passes)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(lm_head: jax.Array, i: jax.Array, chunk: int):
    """Rows of chunk i, their vocabulary ids [1, chunk], which of them are new to this chunk, the start."""
    vocab = lm_head.shape[0]
    first = i * chunk
    start = jnp.minimum(first, vocab - chunk)
    w = lax.dynamic_slice_in_dim(lm_head, start, chunk, axis=0)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return w, cols, cols >= first, start


def _logits(hidden: jax.Array, w: jax.Array, inv_temp: float) -> jax.Array:
    raw = jnp.dot(hidden, w.T, preferred_element_type=jnp.float32, precision=matmul_precision(hidden.dtype))
    return raw * inv_temp


def _forward(hidden, lm_head, targets, temperature, chunk):
    chunk = min(chunk, lm_head.shape[0])
    inv_temp = 1.0 / temperature
    tgt = targets[:, None]

    def body(i, state):
        w, cols, valid, _ = _tile(lm_head, i, chunk)
        z = jnp.where(valid, _logits(hidden, w, inv_temp), sm.MASKED)
        return sm.online_update(state, z, valid & (cols == tgt))

    num_chunks = _cdiv(lm_head.shape[0], chunk)
    state = lax.fori_loop(0, num_chunks, body, sm.init_state(hidden.shape[0]))
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
    chunk = min(chunk, lm_head.shape[0])
    inv_temp = 1.0 / temperature
    tgt = targets[:, None]
    coef = sm.backward_coefficients(lse, entropy, g.logp, g.lse, g.entropy)
    precision = matmul_precision(hidden.dtype)

    def body(i, carry):
        dh, dw = carry
        w, cols, valid, start = _tile(lm_head, i, chunk)
        z = jnp.where(valid, _logits(hidden, w, inv_temp), sm.MASKED)
        dl = sm.dlogits(z, valid & (cols == tgt), valid, coef, inv_temp).astype(hidden.dtype)
        dh = dh + jnp.dot(dl, w, preferred_element_type=jnp.float32, precision=precision)
        dw_tile = lax.dot_general(
            dl, hidden, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        ).astype(dw.dtype)
        # Rows shared with the previous chunk (only in the slid-back last chunk) keep their finished value.
        kept = lax.dynamic_slice_in_dim(dw, start, chunk, axis=0)
        dw = lax.dynamic_update_slice_in_dim(dw, jnp.where(valid.T, dw_tile, kept), start, axis=0)
        return dh, dw

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(lm_head))
    dh, dw = lax.fori_loop(0, _cdiv(lm_head.shape[0], chunk), body, init)
    return dh.astype(hidden.dtype), dw, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_chunked(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, temperature: float, chunk_vocab: int
) -> TokenStats:
    """hidden [N, H], lm_head [V, H] (same dtype), targets [N] int32 -> TokenStats of [N] float32."""
    return _chunked(hidden, lm_head, targets, temperature, chunk_vocab)
