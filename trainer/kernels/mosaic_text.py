"""Read the Mosaic (Pallas TPU) kernels out of a program lowered for TPU (StableHLO text), on any host.

Each Pallas TPU kernel is a `tpu_custom_call` whose backend config carries the kernel's serialized Mosaic
module. Deserialized, it is MLIR text: its signature (grid, dimension semantics, block memrefs) and its
body, where every MXU matmul is one `tpu.matmul` op. Used by the lowering tests and by
benchmarks/bench_kernel_mxu.py (matmuls per logits tile).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, NamedTuple


class MosaicKernel(NamedTuple):
    name: str  # the kernel's func name, e.g. token_logprobs_fwd
    config: dict[str, Any]  # the tpu_custom_call's backend config (JSON)
    signature: str  # the `func.func @name(...)` line: grid, semantics, block memrefs
    operands: list[str]  # the custom call's operand types (one device's shapes)
    body: str  # the whole deserialized Mosaic module

    @property
    def mxu_matmuls(self) -> int:
        """Matmul ops in the kernel body: each runs once per grid step, on one tile."""
        return len(re.findall(r"\btpu\.matmul\b", self.body))


def tpu_kernels(module_text: str) -> list[MosaicKernel]:
    """Every tpu_custom_call of a lowered module (`jax.export(..., platforms=["tpu"]).mlir_module()`)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import tpu as tpu_dialect
    from jax._src.lib.mlir import ir, passmanager

    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    calls: list[tuple[str, list[str]]] = []
    kernels = []
    with ctx, ir.Location.unknown():

        def collect(op: Any) -> Any:
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
            body_text = str(body)
            # The kernel's func carries the grid; the block index maps are funcs of their own.
            lines = body_text.splitlines()
            signature = next(line for line in lines if "func.func @" in line and "iteration_bounds" in line)
            name = re.search(r"func.func @(\w+)", signature).group(1)
            kernels.append(MosaicKernel(name, config, signature, operands, body_text))
    return kernels
