"""The per-tile math shared by the chunked and Pallas providers (pure jnp on [rows, 1] / [rows, cols] values).

Notation, per token row: z = hidden @ lm_head.T / T (logits at temperature T), p = softmax(z), t the target.

Forward, streamed over vocabulary tiles with an online logsumexp. The running state per row is
    m = max z seen so far,   s = sum exp(z - m),   u = sum exp(z - m) * (z - m),   zt = z[t]
and at the end
    lse = m + log s,   entropy = lse - E_p[z] = log s - u / s,   logp = zt - lse.
Keeping u relative to the running max (instead of sum p z) avoids cancelling two large numbers in entropy.
When the max moves from m to m', every term rescales by a = exp(m - m') and (z - m) = (z - m') + (m' - m):
    s' = a s + sum e',   u' = a (u + s (m - m')) + sum e' (z - m'),   e' = exp(z - m').

Backward. With cotangents (g_logp, g_lse, g_ent) of the three outputs and mu = E_p[z] = lse - entropy:
    d lse / dz_j   = p_j
    d logp / dz_j  = [j = t] - p_j
    d ent / dz_j   = -p_j (z_j - mu)     (ent = lse - sum_k p_k z_k, d(sum p z)/dz_j = p_j + p_j (z_j - mu))
so  dz_j = g_logp [j = t] + p_j (g_lse - g_logp - g_ent (z_j - mu)),
and the cotangent of the raw logits hidden @ lm_head.T is dz / T.

Masked columns (past the end of the vocabulary, in a ragged last block) carry the finite MASKED logit, so
that exp() gives exactly 0 and 0 * (MASKED - m) stays finite; their gradients are zeroed with where.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite "minus infinity": exp(MASKED - m) == 0 and no inf - inf = nan anywhere


def init_state(rows: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(m, s, u, zt), each [rows, 1] float32, before any vocabulary tile is seen."""
    m = jnp.full((rows, 1), MASKED, jnp.float32)
    zero = jnp.zeros((rows, 1), jnp.float32)
    return m, zero, zero, zero


def online_update(
    state: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    z: jax.Array,
    is_target: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fold one tile of logits z [rows, cols] (masked entries already MASKED) into the running state.

    Every tile must hold at least one unmasked column per row (true of every vocabulary tile we visit).
    """
    m, s, u, zt = state
    m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    shifted = z - m_new
    e = jnp.exp(shifted)
    s_new = alpha * s + jnp.sum(e, axis=1, keepdims=True)
    u_new = alpha * (u + s * (m - m_new)) + jnp.sum(e * shifted, axis=1, keepdims=True)
    zt_new = zt + jnp.sum(jnp.where(is_target, z, 0.0), axis=1, keepdims=True)
    return m_new, s_new, u_new, zt_new


def finalize(
    state: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Running state -> (logp, lse, entropy), each [rows, 1] float32."""
    m, s, u, zt = state
    log_s = jnp.log(s)
    lse = m + log_s
    return zt - lse, lse, log_s - u / s


def backward_coefficients(
    lse: jax.Array, entropy: jax.Array, g_logp: jax.Array, g_lse: jax.Array, g_ent: jax.Array
) -> jax.Array:
    """Per-row scalars of the backward tiles, [rows] each -> [rows, 5] float32.

    Columns: lse, mu = E_p[z], g_lse - g_logp, g_ent, g_logp (one array, so a kernel reads one block).
    """
    mu = lse - entropy
    return jnp.stack([lse, mu, g_lse - g_logp, g_ent, g_logp], axis=1).astype(jnp.float32)


def dlogits(
    z: jax.Array, is_target: jax.Array, valid: jax.Array, coef: jax.Array, inv_temp: float
) -> jax.Array:
    """Cotangent of the raw logits tile (hidden @ lm_head.T) from the tempered logits z [rows, cols].

    coef [rows, 5] comes from backward_coefficients; invalid entries (masked columns, padding rows) get 0.
    """
    lse, mu, a, g_ent, g_logp = (coef[:, k : k + 1] for k in range(5))
    p = jnp.exp(z - lse)
    dz = p * (a - g_ent * (z - mu)) + jnp.where(is_target, g_logp, 0.0)
    return jnp.where(valid, dz * inv_temp, 0.0)
