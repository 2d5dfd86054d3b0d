"""Forward and forward + backward time of every token_logprobs impl on the accelerator at hand.

    python benchmarks/bench_kernels_accel.py [--tokens 4096 --width 2048 --vocab 151936]
        [--pallas-blocks 512x1024 256x512 ...] [--chunks 4096 8192]

TPU: jax, chunked and pallas (one row per --pallas-blocks setting). GPU: jax and chunked (the Pallas kernels
are Mosaic TPU kernels). CPU: prints why there is nothing to time and exits 0; use bench_kernels.py there.
Times are the best of --repeats runs after a warm-up, in bf16, with the compiled temporary memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from trainer.kernels import token_logprobs


def _timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _variants(backend: str, chunks: list[int], pallas_blocks: list[str]) -> dict[str, tuple[str, dict]]:
    variants: dict[str, tuple[str, dict]] = {"jax": ("jax", {})}
    variants.update({f"chunked c={c}": ("chunked", {"chunk_vocab": c}) for c in chunks})
    if backend == "tpu":
        for spec in pallas_blocks:
            bt, bv = (int(x) for x in spec.split("x"))
            variants[f"pallas {bt}x{bv}"] = ("pallas", {"block_tokens": bt, "block_vocab": bv})
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument(
        "--pallas-blocks", nargs="+", default=["512x1024", "256x512", "1024x1024", "512x2048"]
    )
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    backend = jax.default_backend()
    if backend not in ("tpu", "gpu"):
        print(f"no accelerator: JAX backend is {backend!r}; nothing to time (bench_kernels.py covers CPU)")
        return 0

    n, h, v = args.tokens, args.width, args.vocab
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (n, h), jnp.bfloat16)
    lm_head = (jax.random.normal(k[1], (v, h)) / h**0.5).astype(jnp.bfloat16)
    targets = jax.random.randint(k[2], (n,), 0, v)
    weights = jax.random.normal(k[3], (n,))
    inputs = (hidden, lm_head, targets, weights)

    device = jax.devices()[0].device_kind
    print(f"## token_logprobs on {device}, N={n} H={h} V={v} bf16, best of {args.repeats}\n")
    print("| impl | fwd ms | fwd+bwd ms | fwd+bwd vs jax | temp GiB |")
    print("|---|---|---|---|---|")
    reference = None
    for name, (impl, blocks) in _variants(backend, args.chunks, args.pallas_blocks).items():

        def loss(hid, head, tgt, wts, impl=impl, blocks=blocks):
            s = token_logprobs(hid, head, tgt, impl=impl, **blocks)
            return jnp.sum(wts * s.logp) + 0.01 * jnp.mean(s.entropy)

        forward = jax.jit(loss)
        both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        try:
            temp = both.lower(*inputs).compile().memory_analysis().temp_size_in_bytes / 1024**3
            t_fwd, t_both = _timed(forward, inputs, args.repeats), _timed(both, inputs, args.repeats)
        except Exception as err:  # an out-of-memory jax row, or blocks too big for VMEM: report, go on
            print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:80]} | | | |")
            continue
        if impl == "jax":
            reference = t_both
        ratio = f"{t_both / reference:.2f}x" if reference else "n/a"
        print(f"| {name} | {t_fwd * 1e3:.1f} | {t_both * 1e3:.1f} | {ratio} | {temp:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
