"""The Pallas kernels lower for TPU at the real Qwen2.5-3B loss shape, on a CPU-only host.

`jax.export(..., platforms=["tpu"])` runs the whole Pallas -> Mosaic lowering for TPU: block shapes are
checked against the TPU tiling rules ((8, 128)-divisible or whole-axis), every op in the kernels must have
a Mosaic lowering, and the result is the StableHLO a TPU would compile. What it cannot do here: Mosaic's
own backend passes (layout inference, vector-layout application, VMEM allocation) live in libtpu, which a
CPU host does not have, so this is the strongest check short of a TPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from trainer.kernels import KernelBlocks, token_logprobs
from trainer.kernels.mesh import per_device
from trainer.kernels.mosaic_text import tpu_kernels
from trainer.kernels.pallas import token_logprobs_pallas

N, H, V = 4096, 2048, 151_936  # Qwen2.5-3B: 8 x 512 tokens, hidden 2048, vocabulary 2^7 x 1187
NV_SHAPE = f"{N}x{V}"


def _loss_and_grad(stats_fn):
    def loss(h, w, t):
        s = stats_fn(h, w, t)
        return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy) + 0.01 * jnp.sum(s.lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _export_for_tpu(stats_fn) -> str:
    args = (
        jax.ShapeDtypeStruct((N, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((V, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((N,), jnp.int32),
    )
    exported = export.export(_loss_and_grad(stats_fn), platforms=["tpu"])(*args)
    assert exported.platforms == ("tpu",)
    return exported.mlir_module()


def _tpu_kernels(module_text: str) -> list[tuple[dict, str, list[str]]]:
    """(backend config, Mosaic kernel signature, operand types) of every tpu_custom_call in a module."""
    return [(k.config, k.signature, k.operands) for k in tpu_kernels(module_text)]


@pytest.fixture(scope="module")
def pallas_module() -> str:
    blocks = KernelBlocks()  # the defaults the trainer uses
    return _export_for_tpu(lambda h, w, t: token_logprobs_pallas(h, w, t, 1.0, blocks, interpret=False))


def test_pallas_forward_and_backward_lower_for_tpu_at_qwen_3b_shapes(pallas_module):
    blocks = KernelBlocks()
    kernels = tpu_kernels(pallas_module)
    assert sorted(k.name for k in kernels) == ["token_logprobs_bwd", "token_logprobs_fwd"]
    token_blocks, vocab_blocks = N // blocks.block_tokens, -(-V // blocks.block_vocab)  # 8, 149 (ragged)
    expected = {  # grid, dimension semantics, matmuls per logits tile
        "token_logprobs_fwd": ((token_blocks, vocab_blocks), "parallel", 1),
        # Both axes sequential: the dhidden accumulator in HBM is revisited along the outer axis.
        "token_logprobs_bwd": ((vocab_blocks, token_blocks), "arbitrary", 3),
    }
    for k in kernels:
        grid, outer, matmuls = expected[k.name]
        bounds = re.search(r"iteration_bounds = array<i64: (\d+), (\d+)>", k.signature).groups()
        assert tuple(map(int, bounds)) == grid
        assert f"[#tpu.dimension_semantics<{outer}>, #tpu.dimension_semantics<arbitrary>]" in k.signature
        assert f"memref<{blocks.block_vocab}x{H}xbf16" in k.signature  # the lm_head tile, bf16 on the MXU
        assert k.mxu_matmuls == matmuls  # each logits tile computed once per kernel: 1 + 3 = 4 in all
        (vmem,) = k.config["scoped_memory_configs"]
        assert vmem["size"] == blocks.vmem_limit_bytes
        assert k.config["custom_call_config"]["cost_estimate"]["flops"] == 2 * matmuls * N * V * H


def _vmem_bytes(signature: str) -> int:
    """VMEM of a kernel's blocks: inputs and outputs double-buffered, scratch once, each padded to the
    (8 x 128) 32-bit tiling (16 rows for bf16). HBM operands (DMA'd by hand) and semaphores take none."""
    memrefs = re.findall(r"memref<([^,]*), #tpu.memory_space<(\w+)>>", signature)
    scratch = int(re.search(r"scratch_operands = (\d+)", signature).group(1))
    total = 0
    for k, (shape, space) in enumerate(memrefs):
        if space != "vmem":
            continue
        rows, cols, dtype = shape.split("x")
        itemsize = {"bf16": 2, "f32": 4, "i32": 4}[dtype]
        sublanes = 8 * 4 // itemsize
        padded = -(-int(rows) // sublanes) * sublanes * -(-int(cols) // 128) * 128
        total += padded * itemsize * (1 if k >= len(memrefs) - scratch else 2)
    return total


def test_default_blocks_fit_in_vmem(pallas_module):
    """Blocks + scratch + six [block_tokens, block_vocab] f32 temporaries (logits, exp, dlogits, ...) of
    each kernel fit under the VMEM limit we ask for, and under v5p's 64 MiB per core (v5e/v6e: 128 MiB)."""
    blocks = KernelBlocks()
    temporaries = 6 * blocks.block_tokens * blocks.block_vocab * 4
    for _, signature, _ in _tpu_kernels(pallas_module):
        need = _vmem_bytes(signature) + temporaries
        assert need <= min(blocks.vmem_limit_bytes, 64 * 1024**2), (signature[:60], need / 1024**2)


def test_no_tokens_by_vocab_buffer_outside_the_kernels(pallas_module):
    """The plain path holds [N, V] logits in HBM; the Pallas path has no such array anywhere in its HLO."""
    assert NV_SHAPE not in pallas_module
    reference = _export_for_tpu(lambda h, w, t: token_logprobs(h, w, t, impl="jax"))
    assert NV_SHAPE in reference  # the check above is able to see such a buffer


def test_illegal_tpu_block_is_rejected_by_the_lowering():
    """The legality check is real: a token block that is neither a multiple of 8 nor the whole axis fails."""
    blocks = KernelBlocks()
    object.__setattr__(blocks, "block_tokens", 500)  # bypass KernelBlocks' own validation on purpose
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _export_for_tpu(lambda h, w, t: token_logprobs_pallas(h, w, t, 1.0, blocks, interpret=False))


def test_under_a_mesh_each_device_runs_the_kernels_on_its_own_tokens():
    """v6e-8 style: 8 devices, tokens split over fsdp. Each kernel sees [N/8, H] hidden and the whole lm_head
    (gathered, as FSDP does for every layer), instead of GSPMD running the full loss on every device."""
    devices = jax.devices()[:8]
    mesh = jax.make_mesh((1, 8, 1), ("dp", "fsdp", "tp"), axis_types=(AxisType.Auto,) * 3, devices=devices)
    split = NamedSharding(mesh, PartitionSpec("fsdp"))
    args = (
        jax.ShapeDtypeStruct((N, H), jnp.bfloat16, sharding=split),
        jax.ShapeDtypeStruct((V, H), jnp.bfloat16, sharding=split),
        jax.ShapeDtypeStruct((N,), jnp.int32, sharding=split),
    )
    blocks = KernelBlocks()
    kernel = lambda h, w, t: token_logprobs_pallas(h, w, t, 1.0, blocks, interpret=False)
    fn = _loss_and_grad(lambda h, w, t: per_device(kernel, h, w, t))  # as token_logprobs does
    exported = export.export(fn, platforms=["tpu"])(*args)  # the mesh comes from the inputs' shardings
    assert exported.nr_devices == 8
    kernels = _tpu_kernels(exported.mlir_module())
    assert len(kernels) == 2  # forward, backward
    for _, signature, operands in kernels:
        assert f"tensor<{N // 8}x{H}xbf16>" in operands, (signature[:60], operands)
        assert f"tensor<{V}x{H}xbf16>" in operands
        assert "iteration_bounds = array<i64: 1, 149>" in signature or "array<i64: 149, 1>" in signature
