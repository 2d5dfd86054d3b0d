"""HBM temp of loss + grad of every token_logprobs impl, compiled for ONE abstract v6e chip on this host.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/bench_kernel_v6e_memory.py \
        [--tokens 4096 --width 2048 --vocab 151936] [--pallas-blocks 512x1024 256x512 ...]

libtpu's compiler (the dev extra) builds the real TPU program, Mosaic kernels included, with no TPU:
the table gives per-chip temp / argument / output bytes from memory_analysis() and the number of Mosaic
kernels (pallas must show 2: forward, backward). Compile only: no time is measured.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from trainer.kernels import token_logprobs
from trainer.preflight import mosaic_kernels

MIB = 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    blocks = ["512x1024", "256x512", "1024x1024", "2048x2048"]
    parser.add_argument("--pallas-blocks", nargs="*", default=blocks)
    parser.add_argument("--chunks", nargs="*", type=int, default=[4096])
    args = parser.parse_args()

    chip = topologies.get_topology_desc(platform="tpu", topology_name="v6e:2x2").devices[0]
    one = SingleDeviceSharding(chip)
    shapes = (
        jax.ShapeDtypeStruct((args.tokens, args.width), jnp.bfloat16, sharding=one),
        jax.ShapeDtypeStruct((args.vocab, args.width), jnp.bfloat16, sharding=one),
        jax.ShapeDtypeStruct((args.tokens,), jnp.int32, sharding=one),
    )
    cases: list[tuple[str, dict[str, int]]] = [("jax", {})]
    cases += [("chunked", {"chunk_vocab": c}) for c in args.chunks]
    for b in args.pallas_blocks:
        bt, bv = (int(x) for x in b.split("x"))
        cases.append(("pallas", {"block_tokens": bt, "block_vocab": bv}))

    print(f"loss + grad, N={args.tokens} H={args.width} V={args.vocab} bf16, one {chip.device_kind} chip")
    header = ["temp MiB", "args MiB", "out MiB", "Mosaic", "compile s"]
    print(f"{'impl':8} {'blocks':40} " + " ".join(f"{h:>9}" for h in header))
    for impl, blocks in cases:

        def loss(h, w, t, impl=impl, blocks=blocks):
            s = token_logprobs(h, w, t, 1.0, impl, **blocks)
            return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy) + 0.01 * jnp.sum(s.lse)

        t0 = time.perf_counter()
        try:
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
        except Exception as err:  # e.g. a tile over the scoped-VMEM limit: show why, go on
            print(f"{impl:8} {str(blocks):40} failed: {str(err).splitlines()[0][:90]}")
            continue
        m = compiled.memory_analysis()
        print(
            f"{impl:8} {str(blocks):40} {m.temp_size_in_bytes / MIB:9.1f}"
            f" {m.argument_size_in_bytes / MIB:9.1f} {m.output_size_in_bytes / MIB:9.1f}"
            f" {mosaic_kernels(compiled.as_text()):9d} {time.perf_counter() - t0:9.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
