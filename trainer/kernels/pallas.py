"""impl="pallas": Pallas TPU kernels; the [N, V] logits exist only as one VMEM tile at a time.

Two kernels, each over a 2-D grid of (token block, vocabulary block) tiles of z = hidden @ lm_head.T / T,
each computing every logits tile once (1 + 3 = 4 matmuls per tile in all; the unfused loss needs 3):

  forward   grid (token blocks, vocab blocks), vocab innermost: an online logsumexp / entropy / target-logit
            state per token row lives in VMEM scratch across the vocabulary sweep; the [N] outputs are
            written once, at the last vocabulary block. 1 matmul per tile.
  backward  grid (vocab blocks, token blocks), tokens innermost: recompute the tile, form dlogits, then
            dlm_head[v] += dlogits.T @ hidden in a float32 [bv, H] VMEM accumulator (written once, at the
            last token block) and dhidden[i] += dlogits @ W in a float32 [N, H] HBM buffer that the kernel
            reads back and writes by hand-issued DMAs (each dhidden block is revisited once per vocabulary
            block, so it cannot live in VMEM). 3 matmuls per tile.

No [N, V] buffer ever reaches HBM, only the per-row coefficients [N, 5] and the [N, H] float32 dhidden.
The backward's grid is sequential on both axes: two cores splitting it would race on that buffer.

Matmuls take the input dtype (bf16 on the fast path) and accumulate in float32. Ragged tails: V = 151,936
has no block size but 128 that divides it, so the last vocabulary block reads rows past V and the last
token block reads rows past N. Those reads are garbage (NaN under TPU interpret mode), so: logits of
columns past V are replaced by MASKED with `where` (NaN-safe); lm_head rows past V are zeroed before the
dhidden matmul and hidden rows past N before the dlm_head matmul, where 0 x NaN would otherwise leak into
valid outputs. Writes past the end of an output are dropped by Pallas.
"""

from __future__ import annotations

import dataclasses
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


def _backward_kernel(
    tgt_ref, coef_ref, h_ref, w_ref, dw_ref, dh_hbm, dw_acc, dh_buf, sems, *, inv_temp, vocab, tokens
):
    """One (vocab block v, token block i) tile: recompute the logits once, then both gradient matmuls.

    dlm_head[v] accumulates in VMEM over the inner token sweep and is written once, at the last token
    block. dhidden[i] is revisited once per vocabulary block, so it accumulates in a float32 HBM buffer:
    read back (v > 0), add, write back. The write-back of step s is waited for at the start of step s + 1,
    before dh_buf is reused; a block written at (v - 1, i) is read back at (v, i), one step or more later,
    so every read sees the previous write."""
    v, i = pl.program_id(0), pl.program_id(1)
    last_v, last_i = pl.num_programs(0) - 1, pl.num_programs(1) - 1
    block_tokens, block_vocab = h_ref.shape[0], w_ref.shape[0]
    rows_hbm = dh_hbm.at[pl.ds(pl.multiple_of(i * block_tokens, block_tokens), block_tokens)]
    write = pltpu.make_async_copy(dh_buf, rows_hbm, sems.at[0])
    read = pltpu.make_async_copy(rows_hbm, dh_buf, sems.at[1])

    @pl.when((v > 0) | (i > 0))
    def _previous_write_landed():
        write.wait()  # same size as the previous step's write: waits for exactly that copy

    @pl.when(v > 0)
    def _read_back():
        read.start()  # overlaps the matmuls below

    @pl.when(i == 0)
    def _init():
        dw_acc[...] = jnp.zeros_like(dw_acc)

    cols = v * block_vocab + _vocab_ids(block_vocab)
    rows = i * block_tokens + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
    valid = (cols < vocab) & (rows < tokens)
    h, w = h_ref[...], w_ref[...]
    # Static: only a ragged last block reads garbage rows, and 0 x NaN = NaN in the gradient matmuls.
    if tokens % block_tokens:
        h = jnp.where(rows < tokens, h, 0)
    if vocab % block_vocab:
        w_rows = v * block_vocab + lax.broadcasted_iota(jnp.int32, (block_vocab, 1), 0)
        w = jnp.where(w_rows < vocab, w, 0)
    z = jnp.where(valid, _logits_tile(h, w, inv_temp), sm.MASKED)
    dl = sm.dlogits(z, cols == tgt_ref[...], valid, coef_ref[...], inv_temp)
    precision = matmul_precision(h.dtype)
    # Transpose in float32, then cast: the dlogits.T @ hidden form Mosaic handles best.
    dw_acc[...] += jnp.dot(dl.T.astype(h.dtype), h, preferred_element_type=jnp.float32, precision=precision)
    dh = jnp.dot(dl.astype(w.dtype), w, preferred_element_type=jnp.float32, precision=precision)

    @pl.when(v == 0)
    def _first():
        dh_buf[...] = dh

    @pl.when(v > 0)
    def _accumulate():
        read.wait()
        dh_buf[...] += dh

    write.start()

    @pl.when((v == last_v) & (i == last_i))
    def _drain():
        write.wait()

    @pl.when(i == last_i)
    def _finish():
        dw_ref[...] = dw_acc[...].astype(dw_ref.dtype)


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
    token_blocks, vocab_blocks = _cdiv(tokens, bt), _cdiv(vocab, bv)
    itemsize = jnp.dtype(hidden.dtype).itemsize
    kernel = functools.partial(_backward_kernel, inv_temp=1.0 / temperature, vocab=vocab, tokens=tokens)
    rows = lambda v, i: (i, 0)
    # Both axes "arbitrary": two cores splitting either axis would race on the dhidden buffer (v6e has one).
    params = dataclasses.replace(_compiler_params(blocks), dimension_semantics=("arbitrary", "arbitrary"))
    # HBM: hidden once per vocab block, dhidden f32 read + written per tile (not read at v = 0), lm_head
    # read and dlm_head written once.
    dh_traffic = 4 * tokens * width * (2 * vocab_blocks - 1)
    call = lambda interpret: pl.pallas_call(
        kernel,
        grid=(vocab_blocks, token_blocks),
        in_specs=[
            pl.BlockSpec((bt, 1), rows),
            pl.BlockSpec((bt, coef.shape[1]), rows),
            pl.BlockSpec((bt, width), rows),
            pl.BlockSpec((bv, width), lambda v, i: (v, 0)),
        ],
        out_specs=[
            pl.BlockSpec((bv, width), lambda v, i: (v, 0)),
            pl.BlockSpec(memory_space=pltpu.MemorySpace.HBM),  # DMA'd by hand, padded to whole blocks
        ],
        out_shape=[
            jax.ShapeDtypeStruct(lm_head.shape, lm_head.dtype),
            jax.ShapeDtypeStruct((token_blocks * bt, width), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bv, width), jnp.float32),
            pltpu.VMEM((bt, width), jnp.float32),
            pltpu.SemaphoreType.DMA((2,)),
        ],
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=6 * tokens * vocab * width,  # recompute the tile + the dhidden and dlm_head matmuls
            transcendentals=tokens * vocab,
            bytes_accessed=itemsize * (vocab_blocks * tokens * width + 2 * vocab * width) + dh_traffic,
        ),
        name="token_logprobs_bwd",
        interpret=interpret,
    )(targets[:, None], coef, hidden, lm_head)
    dlm_head, dhidden = _by_platform(call, interpret)
    return dhidden[:tokens].astype(hidden.dtype), dlm_head


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
