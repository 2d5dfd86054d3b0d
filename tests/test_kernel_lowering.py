"""The Pallas kernels lower for TPU at the real Qwen2.5-3B loss shape, on a CPU-only host.

`jax.export(..., platforms=["tpu"])` runs the whole Pallas -> Mosaic lowering for TPU: block shapes are
checked against the TPU tiling rules ((8, 128)-divisible or whole-axis), every op in the kernels must have
a Mosaic lowering, and the result is the StableHLO a TPU would compile. What it cannot do here: Mosaic's
own backend passes (layout inference, vector-layout application, VMEM allocation) live in libtpu, which a
CPU host does not have, so this is the strongest check short of a TPU.
"""

from __future__ import annotations

import base64
import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import tpu as tpu_dialect
from jax._src.lib.mlir import ir, passmanager
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from trainer.kernels import KernelBlocks, token_logprobs
from trainer.kernels.mesh import per_device
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
    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    calls: list[tuple[str, list[str]]] = []
    kernels = []
    with ctx, ir.Location.unknown():

        def collect(op):
            attrs = op.operation.attributes
            if (
                op.operation.name == "stablehlo.custom_call"
                and ir.StringAttr(attrs["call_target_name"]).value == "tpu_custom_call"
            ):
                operands = [str(x.type) for x in op.operation.operands]
                calls.append((ir.StringAttr(attrs["backend_config"]).value, operands))
            return ir.WalkResult.ADVANCE

        ir.Module.parse(module_text).operation.walk(collect)
        for text, operands in calls:
            config = json.loads(text)
            body = ir.Module.parse(base64.b64decode(config["custom_call_config"]["body"]))
            passmanager.PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(body.operation)
            signature = next(line for line in str(body).splitlines() if "func.func @token_logprobs" in line)
            kernels.append((config, signature, operands))
    return kernels


@pytest.fixture(scope="module")
def pallas_module() -> str:
    blocks = KernelBlocks()  # the defaults the trainer uses
    return _export_for_tpu(lambda h, w, t: token_logprobs_pallas(h, w, t, 1.0, blocks, interpret=False))


def test_pallas_forward_and_backward_lower_for_tpu_at_qwen_3b_shapes(pallas_module):
    blocks = KernelBlocks()
    kernels = _tpu_kernels(pallas_module)
    names = [re.search(r"func.func @(\w+)", sig).group(1) for _, sig, _ in kernels]
    assert sorted(names) == ["token_logprobs_dhidden", "token_logprobs_dlm_head", "token_logprobs_fwd"]
    token_blocks, vocab_blocks = N // blocks.block_tokens, -(-V // blocks.block_vocab)  # 8, 149 (ragged)
    expected_grid = {
        "token_logprobs_fwd": (token_blocks, vocab_blocks),
        "token_logprobs_dhidden": (token_blocks, vocab_blocks),
        "token_logprobs_dlm_head": (vocab_blocks, token_blocks),
    }
    for (config, signature, _), name in zip(kernels, names, strict=True):
        bounds = re.search(r"iteration_bounds = array<i64: (\d+), (\d+)>", signature).groups()
        assert tuple(map(int, bounds)) == expected_grid[name]
        assert "parallel>, #tpu.dimension_semantics<arbitrary>]" in signature
        assert f"memref<{blocks.block_vocab}x{H}xbf16" in signature  # the lm_head tile, bf16 on the MXU
        (vmem,) = config["scoped_memory_configs"]
        assert vmem["size"] == blocks.vmem_limit_bytes
        assert config["custom_call_config"]["cost_estimate"]["flops"] >= 2 * N * V * H


def _vmem_bytes(signature: str) -> int:
    """VMEM of a kernel's blocks: inputs and outputs double-buffered, scratch once, each padded to the
    (8 x 128) 32-bit tiling (16 rows for bf16)."""
    memrefs = re.findall(r"memref<(\d+)x(\d+)x(\w+), #tpu.memory_space<vmem>>", signature)
    scratch = int(re.search(r"scratch_operands = (\d+)", signature).group(1))
    total = 0
    for k, (rows, cols, dtype) in enumerate(memrefs):
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
    assert len(kernels) == 3
    for _, signature, operands in kernels:
        assert f"tensor<{N // 8}x{H}xbf16>" in operands, (signature[:60], operands)
        assert f"tensor<{V}x{H}xbf16>" in operands
        assert "iteration_bounds = array<i64: 1, 149>" in signature or "array<i64: 149, 1>" in signature
