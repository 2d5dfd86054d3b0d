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

from trainer.kernels import KernelBlocks, token_logprobs
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


def _tpu_kernels(module_text: str) -> list[tuple[dict, str]]:
    """(backend config, Mosaic kernel signature text) of every tpu_custom_call in a StableHLO module."""
    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    configs: list[str] = []
    kernels = []
    with ctx, ir.Location.unknown():

        def collect(op):
            attrs = op.operation.attributes
            if (
                op.operation.name == "stablehlo.custom_call"
                and ir.StringAttr(attrs["call_target_name"]).value == "tpu_custom_call"
            ):
                configs.append(ir.StringAttr(attrs["backend_config"]).value)
            return ir.WalkResult.ADVANCE

        ir.Module.parse(module_text).operation.walk(collect)
        for text in configs:
            config = json.loads(text)
            body = ir.Module.parse(base64.b64decode(config["custom_call_config"]["body"]))
            passmanager.PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(body.operation)
            signature = next(line for line in str(body).splitlines() if "func.func @token_logprobs" in line)
            kernels.append((config, signature))
    return kernels


@pytest.fixture(scope="module")
def pallas_module() -> str:
    blocks = KernelBlocks()  # the defaults the trainer uses
    return _export_for_tpu(lambda h, w, t: token_logprobs_pallas(h, w, t, 1.0, blocks, interpret=False))


def test_pallas_forward_and_backward_lower_for_tpu_at_qwen_3b_shapes(pallas_module):
    blocks = KernelBlocks()
    kernels = _tpu_kernels(pallas_module)
    names = [re.search(r"func.func @(\w+)", sig).group(1) for _, sig in kernels]
    assert sorted(names) == ["token_logprobs_dhidden", "token_logprobs_dlm_head", "token_logprobs_fwd"]
    token_blocks, vocab_blocks = N // blocks.block_tokens, -(-V // blocks.block_vocab)  # 8, 149 (ragged)
    expected_grid = {
        "token_logprobs_fwd": (token_blocks, vocab_blocks),
        "token_logprobs_dhidden": (token_blocks, vocab_blocks),
        "token_logprobs_dlm_head": (vocab_blocks, token_blocks),
    }
    for (config, signature), name in zip(kernels, names, strict=True):
        bounds = re.search(r"iteration_bounds = array<i64: (\d+), (\d+)>", signature).groups()
        assert tuple(map(int, bounds)) == expected_grid[name]
        assert "parallel>, #tpu.dimension_semantics<arbitrary>]" in signature
        assert f"memref<{blocks.block_vocab}x{H}xbf16" in signature  # the lm_head tile, bf16 on the MXU
        (vmem,) = config["scoped_memory_configs"]
        assert vmem["size"] == blocks.vmem_limit_bytes
        assert config["custom_call_config"]["cost_estimate"]["flops"] >= 2 * N * V * H


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
