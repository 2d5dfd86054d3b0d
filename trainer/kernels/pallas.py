"""impl="pallas": Pallas TPU kernels; the [N, V] logits exist only as one VMEM tile at a time.

Three kernels, each over a 2-D grid of (token block, vocabulary block) tiles of z = hidden @ lm_head.T / T:

  forward   grid (token blocks, vocab blocks), vocab innermost: an online logsumexp / entropy / target-logit
            state per token row lives in VMEM scratch across the vocabulary sweep; the [N] outputs are
            written once, at the last vocabulary block.
  dhidden   same grid: recompute each tile, form dlogits, accumulate dlogits @ W into a float32 [bt, H]
            VMEM accumulator, write dhidden at the last vocabulary block.
  dlm_head  grid (vocab blocks, token blocks), tokens innermost: recompute, accumulate dlogits.T @ hidden
            into a float32 [bv, H] accumulator, write dlm_head at the last token block.

The backward is two kernels because each output block must be finished by one sweep along an "arbitrary"
(sequential) grid axis; no [N, V] buffer ever reaches HBM, only the per-row coefficients [N, 5].

Matmuls take the input dtype (bf16 on the fast path) and accumulate in float32. Ragged tails: V = 151,936
has no block size but 128 that divides it, so the last vocabulary block reads rows past V and the last
token block reads rows past N. Those reads are garbage (NaN under TPU interpret mode), so: logits of
columns past V are replaced by MASKED with `where` (NaN-safe); lm_head rows past V are zeroed before the
dhidden matmul and hidden rows past N before the dlm_head matmul, where 0 x NaN would otherwise leak into
valid outputs. Writes past the end of an output are dropped by Pallas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from trainer.kernels import softmax_math as sm
from trainer.kernels.chunked import matmul_precision
from trainer.kernels.types import KernelBlocks, TokenStats

_NT = (((1,), (1,)), ((), ()))  # a @ b.T: contract the hidden axis of both operands


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _logits_tile(h: jax.Array, w: jax.Array, inv_temp: float) -> jax.Array:
    raw = lax.dot_general(h, w, _NT, preferred_element_type=jnp.float32, precision=matmul_precision(h.dtype))
    return raw * inv_temp


def _vocab_ids(block_vocab: int) -> jax.Array:
    """Offsets 0 .. block_vocab - 1 as a [1, block_vocab] row (2-D: TPU has no 1-D iota)."""
    return lax.broadcasted_iota(jnp.int32, (1, block_vocab), 1)


def _forward_kernel(
    tgt_ref, h_ref, w_ref, logp_ref, lse_ref, ent_ref, m_sc, s_sc, u_sc, zt_sc, *, inv_temp, vocab
):
    j = pl.program_id(1)
    block_vocab = w_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...], s_sc[...], u_sc[...], zt_sc[...] = sm.init_state(m_sc.shape[0])

    cols = j * block_vocab + _vocab_ids(block_vocab)
    # Columns past V come from garbage lm_head rows; `where` discards them whatever they hold (NaN too).
    z = jnp.where(cols < vocab, _logits_tile(h_ref[...], w_ref[...], inv_temp), sm.MASKED)
    state = (m_sc[...], s_sc[...], u_sc[...], zt_sc[...])
    m_sc[...], s_sc[...], u_sc[...], zt_sc[...] = sm.online_update(state, z, cols == tgt_ref[...])

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        logp_ref[...], lse_ref[...], ent_ref[...] = sm.finalize((m_sc[...], s_sc[...], u_sc[...], zt_sc[...]))


def _dhidden_kernel(tgt_ref, coef_ref, h_ref, w_ref, dh_ref, acc_sc, *, inv_temp, vocab):
    j = pl.program_id(1)
    block_vocab = w_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)

    cols = j * block_vocab + _vocab_ids(block_vocab)
    valid = cols < vocab
    w = w_ref[...]
    if vocab % block_vocab:  # static: only a ragged last block reads garbage rows (NaN x 0 = NaN below)
        rows = j * block_vocab + lax.broadcasted_iota(jnp.int32, (block_vocab, 1), 0)
        w = jnp.where(rows < vocab, w, 0)
    z = jnp.where(valid, _logits_tile(h_ref[...], w, inv_temp), sm.MASKED)
    dl = sm.dlogits(z, cols == tgt_ref[...], valid, coef_ref[...], inv_temp)
    acc_sc[...] += jnp.dot(
        dl.astype(w.dtype), w, preferred_element_type=jnp.float32, precision=matmul_precision(w.dtype)
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_sc[...].astype(dh_ref.dtype)


def _dlm_head_kernel(tgt_ref, coef_ref, h_ref, w_ref, dw_ref, acc_sc, *, inv_temp, vocab, tokens):
    v, i = pl.program_id(0), pl.program_id(1)
    block_tokens, block_vocab = h_ref.shape[0], w_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)

    cols = v * block_vocab + _vocab_ids(block_vocab)
    rows = i * block_tokens + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
    valid = (cols < vocab) & (rows < tokens)
    h = h_ref[...]
    if tokens % block_tokens:  # static: only a ragged last block reads garbage rows (NaN x 0 = NaN below)
        h = jnp.where(rows < tokens, h, 0)
    z = jnp.where(valid, _logits_tile(h, w_ref[...], inv_temp), sm.MASKED)
    dl = sm.dlogits(z, cols == tgt_ref[...], valid, coef_ref[...], inv_temp)
    # Transpose in float32, then cast: the dlogits.T @ hidden form Mosaic handles best.
    acc_sc[...] += jnp.dot(
        dl.T.astype(h.dtype), h, preferred_element_type=jnp.float32, precision=matmul_precision(h.dtype)
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_sc[...].astype(dw_ref.dtype)


def _tile_sizes(tokens: int, vocab: int, blocks: KernelBlocks) -> tuple[int, int]:
    """A block no larger than its axis; an axis smaller than the block is taken whole (always legal)."""
    return min(blocks.block_tokens, tokens), min(blocks.block_vocab, vocab)


def _compiler_params(blocks: KernelBlocks) -> pltpu.CompilerParams:
    vmem_limit = blocks.vmem_limit_bytes
    if pltpu.is_tpu_device():  # never ask for more than the chip has (v5p: 64 MiB, v4: 16 MiB per core)
        vmem_limit = min(vmem_limit, pltpu.get_tpu_info().vmem_capacity_bytes)
    # The first grid axis is independent (megacore may split it); the second carries the accumulators.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=vmem_limit)


def _by_platform(call: Callable[[Any], Any], interpret: Any) -> Any:
    """`call(interpret)` -> the pallas_call's outputs, with the mode picked by the platform the computation
    is LOWERED for, not the host's default backend: compiled or exported for a TPU from a CPU host (the
    preflight), the kernels must be Mosaic, and interpret mode would be a silent 100x slowdown there.
    interpret=None: Mosaic on TPU, interpret mode elsewhere (CPU tests); True/False/InterpretParams force one.
    On a GPU host interpret mode would be a silent 100x slowdown too, so it is an error: use "chunked"."""
    if interpret is not None:
        return call(interpret)
    if jax.default_backend() == "gpu":
        raise ValueError('impl="pallas" is a TPU kernel (interpret mode on CPU); on GPU use impl="chunked"')
    # Lowered for one platform, only the matching branch is lowered (the other is never compiled).
    return jax.lax.platform_dependent(tpu=lambda: call(False), default=lambda: call(True))


def _forward(hidden, lm_head, targets, temperature, blocks, interpret):
    (tokens, width), vocab = hidden.shape, lm_head.shape[0]
    bt, bv = _tile_sizes(tokens, vocab, blocks)
    row = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    itemsize = jnp.dtype(hidden.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * tokens * vocab * width,
        transcendentals=tokens * vocab,
        bytes_accessed=itemsize * (tokens * width + _cdiv(tokens, bt) * vocab * width),
    )
    kernel = functools.partial(_forward_kernel, inv_temp=1.0 / temperature, vocab=vocab)
    call = lambda interpret: pl.pallas_call(
        kernel,
        grid=(_cdiv(tokens, bt), _cdiv(vocab, bv)),
        in_specs=[
            row,
            pl.BlockSpec((bt, width), lambda i, j: (i, 0)),
            pl.BlockSpec((bv, width), lambda i, j: (j, 0)),
        ],
        out_specs=[row, row, row],
        out_shape=[jax.ShapeDtypeStruct((tokens, 1), jnp.float32)] * 3,
        scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32)] * 4,
        compiler_params=_compiler_params(blocks),
        cost_estimate=cost,
        interpret=interpret,
        name="token_logprobs_fwd",
    )(targets[:, None], hidden, lm_head)
    logp, lse, entropy = _by_platform(call, interpret)
    return TokenStats(logp[:, 0], lse[:, 0], entropy[:, 0])


def _backward(hidden, lm_head, targets, coef, temperature, blocks, interpret):
    (tokens, width), vocab = hidden.shape, lm_head.shape[0]
    bt, bv = _tile_sizes(tokens, vocab, blocks)
    statics = dict(inv_temp=1.0 / temperature, vocab=vocab)
    itemsize = jnp.dtype(hidden.dtype).itemsize
    flops = 4 * tokens * vocab * width  # recompute the tile + one gradient matmul
    common = dict(compiler_params=_compiler_params(blocks))

    # dhidden: token blocks outer, vocabulary inner (i: token block, j: vocab block).
    dhidden = lambda interpret: pl.pallas_call(
        functools.partial(_dhidden_kernel, **statics),
        grid=(_cdiv(tokens, bt), _cdiv(vocab, bv)),
        in_specs=[
            pl.BlockSpec((bt, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((bt, coef.shape[1]), lambda i, j: (i, 0)),
            pl.BlockSpec((bt, width), lambda i, j: (i, 0)),
            pl.BlockSpec((bv, width), lambda i, j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((bt, width), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
        scratch_shapes=[pltpu.VMEM((bt, width), jnp.float32)],
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=tokens * vocab,
            bytes_accessed=itemsize * (2 * tokens * width + _cdiv(tokens, bt) * vocab * width),
        ),
        name="token_logprobs_dhidden",
        interpret=interpret,
        **common,
    )(targets[:, None], coef, hidden, lm_head)

    # dlm_head: vocabulary blocks outer, tokens inner (v: vocab block, i: token block).
    dlm_head = lambda interpret: pl.pallas_call(
        functools.partial(_dlm_head_kernel, tokens=tokens, **statics),
        grid=(_cdiv(vocab, bv), _cdiv(tokens, bt)),
        in_specs=[
            pl.BlockSpec((bt, 1), lambda v, i: (i, 0)),
            pl.BlockSpec((bt, coef.shape[1]), lambda v, i: (i, 0)),
            pl.BlockSpec((bt, width), lambda v, i: (i, 0)),
            pl.BlockSpec((bv, width), lambda v, i: (v, 0)),
        ],
        out_specs=pl.BlockSpec((bv, width), lambda v, i: (v, 0)),
        out_shape=jax.ShapeDtypeStruct(lm_head.shape, lm_head.dtype),
        scratch_shapes=[pltpu.VMEM((bv, width), jnp.float32)],
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=tokens * vocab,
            bytes_accessed=itemsize * (2 * vocab * width + _cdiv(vocab, bv) * tokens * width),
        ),
        name="token_logprobs_dlm_head",
        interpret=interpret,
        **common,
    )(targets[:, None], coef, hidden, lm_head)
    return _by_platform(lambda interpret: (dhidden(interpret), dlm_head(interpret)), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas(hidden, lm_head, targets, temperature, blocks, interpret):
    return _forward(hidden, lm_head, targets, temperature, blocks, interpret)


def _pallas_fwd(hidden, lm_head, targets, temperature, blocks, interpret):
    stats = _forward(hidden, lm_head, targets, temperature, blocks, interpret)
    return stats, (hidden, lm_head, targets, stats.lse, stats.entropy)


def _pallas_bwd(temperature, blocks, interpret, residuals, g: TokenStats):
    hidden, lm_head, targets, lse, entropy = residuals
    coef = sm.backward_coefficients(lse, entropy, g.logp, g.lse, g.entropy)
    dhidden, dlm_head = _backward(hidden, lm_head, targets, coef, temperature, blocks, interpret)
    return dhidden, dlm_head, None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def token_logprobs_pallas(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    temperature: float,
    blocks: KernelBlocks,
    interpret: Any = None,
) -> TokenStats:
    """hidden [N, H], lm_head [V, H] (same dtype), targets [N] int32 -> TokenStats of [N] float32.

    interpret: None picks Mosaic where lowered for TPU and interpret mode elsewhere; True, False or a
    `pltpu.InterpretParams()` force one (the lowering test uses False to build the TPU kernel on a CPU host).
    On a device mesh, call it through mesh.per_device (token_logprobs does).
    """
    return _pallas(hidden, lm_head, targets, float(temperature), blocks, interpret)
