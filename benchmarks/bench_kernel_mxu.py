"""MXU matmuls per logits tile of the Pallas loss kernels (forward + backward), read off the TPU lowering.

    python benchmarks/bench_kernel_mxu.py [--tokens 4096 --width 2048 --vocab 151936] [--blocks 512x1024]
        [--rev main] [--compile]

Exports loss + grad of `token_logprobs_pallas` for TPU on this host (`jax.export`, no TPU, no libtpu) and
counts the `tpu.matmul` ops in each Mosaic kernel's body: every kernel visits every [block_tokens,
block_vocab] logits tile once, so the sum over kernels is the matmul-equivalents spent per tile (the
unfused loss needs 3: logits, dhidden, dlm_head). `--rev REV` prints the same rows for the kernels of a
git revision first (its trainer/ tree, run in a subprocess). `--compile` also compiles the program with
libtpu for one abstract v6e chip and prints the compiler's flop count (for a Pallas call it is the kernel's
CostEstimate, so it checks the estimate the preflight adds up, not the kernel) -- minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows(tokens: int, width: int, vocab: int, block_tokens: int, block_vocab: int, compile_: bool) -> None:
    import jax
    import jax.numpy as jnp
    from jax import export

    from trainer.kernels import KernelBlocks
    from trainer.kernels.pallas import token_logprobs_pallas

    # This checkout's reader, whichever revision's kernels are imported (older ones have none).
    spec = importlib.util.spec_from_file_location("mosaic_text", ROOT / "trainer/kernels/mosaic_text.py")
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    tpu_kernels = reader.tpu_kernels

    blocks = KernelBlocks(block_tokens=block_tokens, block_vocab=block_vocab)

    def loss(h, w, t):
        s = token_logprobs_pallas(h, w, t, 1.0, blocks, interpret=False)
        return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy) + 0.01 * jnp.sum(s.lse)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    shapes = [((tokens, width), jnp.bfloat16), ((vocab, width), jnp.bfloat16), ((tokens,), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    kernels = tpu_kernels(export.export(fn, platforms=["tpu"])(*args).mlir_module())
    total = 0
    for k in kernels:
        flops = k.config["custom_call_config"].get("cost_estimate", {}).get("flops", 0)
        print(f"  {k.name:28} matmuls per tile {k.mxu_matmuls}   CostEstimate {flops / 1e12:.2f} TFLOP")
        total += k.mxu_matmuls
    nvh = 2 * tokens * vocab * width
    print(f"  matmul-equivalents per logits tile: {total} ({len(kernels)} kernels; one is 2NVH ="
          f" {nvh / 1e12:.2f} TFLOP here)")
    if compile_:
        from jax.experimental import topologies
        from jax.sharding import SingleDeviceSharding

        chip = topologies.get_topology_desc(platform="tpu", topology_name="v6e:2x2").devices[0]
        one = SingleDeviceSharding(chip)
        on_chip = [jax.ShapeDtypeStruct(s, d, sharding=one) for s, d in shapes]
        cost = fn.lower(*on_chip).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        print(f"  libtpu cost_analysis, one v6e chip: {cost['flops'] / 1e12:.2f} TFLOP"
              f" = {cost['flops'] / nvh:.2f} x 2NVH, {cost['bytes accessed'] / 1e9:.2f} GB accessed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--blocks", default="512x1024", help="block_tokens x block_vocab")
    parser.add_argument("--rev", default=None, help="also print the kernels of this git revision, first")
    parser.add_argument("--compile", action="store_true", help="also libtpu's flop count (minutes)")
    parser.add_argument("--only-here", action="store_true", help=argparse.SUPPRESS)  # the --rev subprocess
    args = parser.parse_args()
    bt, bv = (int(x) for x in args.blocks.split("x"))
    shape = f"N={args.tokens} H={args.width} V={args.vocab} bf16, blocks {bt}x{bv}"
    if args.rev and not args.only_here:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.rev, "trainer"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            print(f"{args.rev} ({shape}):", flush=True)
            argv = [*sys.argv[1:], "--only-here"]
            env = {**os.environ, "PYTHONPATH": tmp}
            subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
    if args.only_here:
        rows(args.tokens, args.width, args.vocab, bt, bv, args.compile)
        return 0
    print(f"this checkout ({shape}):", flush=True)
    rows(args.tokens, args.width, args.vocab, bt, bv, args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
