"""Loss + gradient memory and CPU time of token_logprobs: impl=jax (full logits) vs impl=chunked.

    .venv/bin/python benchmarks/bench_kernels.py [--tokens 4096 --width 2048 --vocab 151936]

Part 1 compiles (does not run) loss + grad at the Qwen2.5-3B loss shape in bf16 and prints XLA's
memory_analysis() temporary bytes: the scratch a step needs beyond its inputs and outputs.
Part 2 runs both at a CPU-sized shape and prints the best-of-k wall time of loss + grad.
Pallas needs a TPU: see bench_kernels_accel.py.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trainer.kernels import token_logprobs  # noqa: E402


def loss_and_grad(impl: str, **blocks: int):
    """A GRPO-shaped scalar of all three outputs, differentiated w.r.t. hidden and lm_head."""

    def loss(hidden, lm_head, targets, weights):
        s = token_logprobs(hidden, lm_head, targets, impl=impl, **blocks)
        return jnp.sum(weights * s.logp) + 0.01 * jnp.mean(s.entropy) + 1e-4 * jnp.mean(s.lse**2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def shapes(tokens: int, width: int, vocab: int, dtype) -> tuple[jax.ShapeDtypeStruct, ...]:
    return (
        jax.ShapeDtypeStruct((tokens, width), dtype),
        jax.ShapeDtypeStruct((vocab, width), dtype),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.float32),
    )


def compiled_temp_bytes(impl: str, args, **blocks: int) -> int:
    return loss_and_grad(impl, **blocks).lower(*args).compile().memory_analysis().temp_size_in_bytes


def wall_times_s(fns: dict[str, object], args, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per function, interleaved round-robin so that load from other processes
    on a shared machine hits every function alike (the minimum is the least disturbed run)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def random_inputs(tokens: int, width: int, vocab: int, dtype):
    k = jax.random.split(jax.random.key(0), 4)
    return (
        jax.random.normal(k[0], (tokens, width), dtype),
        (jax.random.normal(k[1], (vocab, width)) / width**0.5).astype(dtype),
        jax.random.randint(k[2], (tokens,), 0, vocab),
        jax.random.normal(k[3], (tokens,)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument(
        "--cpu-shape", type=int, nargs=3, default=[1024, 512, 32_000], metavar=("N", "H", "V")
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    n, h, v = args.tokens, args.width, args.vocab
    gib = 1024**3
    print(f"## Compiled temporary memory of loss + grad, N={n} H={h} V={v} ({jax.default_backend()} XLA)\n")
    print("| dtype | impl | chunk_vocab | temp GiB | jax / this |")
    print("|---|---|---|---|---|")
    for dtype in (jnp.bfloat16, jnp.float32):
        big = shapes(n, h, v, dtype)
        name = jnp.dtype(dtype).name
        ref = compiled_temp_bytes("jax", big)
        print(f"| {name} | jax | - | {ref / gib:.3f} | 1.0x |")
        for chunk in args.chunks:
            temp = compiled_temp_bytes("chunked", big, chunk_vocab=chunk)
            print(f"| {name} | chunked | {chunk} | {temp / gib:.3f} | {ref / temp:.1f}x |")
    print(f"\n(for scale: lm_head in bf16 is {v * h * 2 / gib:.3f} GiB, one f32 [N, V] array "
          f"{n * v * 4 / gib:.3f} GiB; XLA:CPU has no bf16 matmul and keeps an f32 copy of lm_head)\n")

    n, h, v = args.cpu_shape
    inputs = random_inputs(n, h, v, jnp.float32)
    fns = {"jax": loss_and_grad("jax")}
    fns.update({f"chunked {c}": loss_and_grad("chunked", chunk_vocab=c) for c in args.chunks})
    best = wall_times_s(fns, inputs, args.repeats)
    print(f"## CPU wall time of loss + grad, N={n} H={h} V={v} f32, best of {args.repeats} (interleaved)\n")
    print("| impl | chunk_vocab | ms | this / jax |")
    print("|---|---|---|---|")
    for name, t in best.items():
        impl, _, chunk = name.partition(" ")
        print(f"| {impl} | {chunk or '-'} | {t * 1e3:.0f} | {t / best['jax']:.2f}x |")

if __name__ == "__main__":
    main()
