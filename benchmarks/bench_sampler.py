"""Sampler throughput: static KV cache + jitted while-loop decode vs recomputing the full forward per token.

    .venv/bin/python benchmarks/bench_sampler.py [--batch 8 --prompt-len 64 --new-tokens 128 ...]

Three ways to produce the same greedy tokens (checked equal before anything is timed):
  recompute     no cache: every step runs the whole [B, P + T] buffer through the model (one jitted loop)
  cache+python  KV cache, one jitted decode step per token dispatched from a Python loop
  cache+while   KV cache, prefill + `lax.while_loop` decode in one program (trainer.sampler.generate)
Compilation is excluded (one warm-up call each); the table reports the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from trainer.model import (
    Qwen2Config,
    forward,
    hidden_to_logits,
    init_cache,
    init_params,
    positions_from_mask,
)
from trainer.sampler import generate


def recompute_decode(params, cfg, tokens, mask, steps: int, dtype):
    """Greedy decode without a cache: each step re-runs the full fixed-size buffer."""
    batch, prompt_len = tokens.shape
    buf = jnp.concatenate([tokens, jnp.zeros((batch, steps), jnp.int32)], axis=1)
    buf_mask = jnp.concatenate([mask, jnp.zeros((batch, steps), bool)], axis=1)

    def step(i, carry):
        buf, buf_mask = carry
        hidden, _ = forward(params, cfg, buf, positions_from_mask(buf_mask), buf_mask, dtype=dtype)
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_len + i - 1, axis=1, keepdims=False)
        token = jnp.argmax(hidden_to_logits(params, cfg, last), axis=-1).astype(jnp.int32)
        buf = jax.lax.dynamic_update_index_in_dim(buf, token, prompt_len + i, axis=1)
        buf_mask = jax.lax.dynamic_update_index_in_dim(
            buf_mask, jnp.ones((batch,), bool), prompt_len + i, axis=1
        )
        return buf, buf_mask

    buf, _ = jax.lax.fori_loop(0, steps, step, (buf, buf_mask))
    return buf[:, prompt_len:]


def python_loop_decode(params, cfg, tokens, mask, steps: int, dtype, prefill_fn, step_fn):
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1] + steps, dtype)
    positions = positions_from_mask(mask)
    token, cache = prefill_fn(params, tokens, positions, mask, cache)
    position = positions[:, -1] + 1
    out = [token]
    for _ in range(steps - 1):
        token, cache = step_fn(params, token, position, cache)
        position = position + 1
        out.append(token)
    return jnp.stack(out, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    dtype = jnp.dtype(args.dtype)
    heads = args.hidden // 32
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
        num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=32,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0), std=0.2)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=args.batch)
    mask = jnp.asarray(np.arange(args.prompt_len)[None, :] >= (args.prompt_len - lengths)[:, None])
    tokens = jnp.asarray(rng.integers(1, args.vocab, size=(args.batch, args.prompt_len)), jnp.int32) * mask
    steps = args.new_tokens

    recompute = jax.jit(lambda p, t, m: recompute_decode(p, cfg, t, m, steps, dtype))

    @jax.jit
    def prefill_fn(p, t, pos, m, cache):
        hidden, cache = forward(p, cfg, t, pos, m, cache, dtype)
        return jnp.argmax(hidden_to_logits(p, cfg, hidden[:, -1]), -1).astype(jnp.int32), cache

    @jax.jit
    def step_fn(p, token, position, cache):
        ones = jnp.ones((token.shape[0], 1), bool)
        hidden, cache = forward(p, cfg, token[:, None], position[:, None], ones, cache, dtype)
        return jnp.argmax(hidden_to_logits(p, cfg, hidden[:, 0]), -1).astype(jnp.int32), cache

    runners = {
        "recompute": lambda: recompute(params, tokens, mask),
        "cache+python": lambda: python_loop_decode(
            params, cfg, tokens, mask, steps, dtype, prefill_fn, step_fn
        ),
        "cache+while": lambda: generate(
            params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=steps, temperature=0.0,
            dtype=dtype, cache_dtype=dtype, prompt_bucket=args.prompt_len,
        ).completion,
    }  # fmt: skip
    outputs = {name: np.asarray(jax.block_until_ready(run())) for name, run in runners.items()}  # warm-up
    for name, out in outputs.items():
        agree = (out == outputs["cache+while"]).mean()
        assert agree > 0.99, f"{name} disagrees with cache+while on {1 - agree:.1%} of tokens"

    seconds = {}
    for name, run in runners.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)

    print(
        f"device={jax.devices()[0].platform} x{jax.device_count()}  batch={args.batch} "
        f"prompt={args.prompt_len} new_tokens={steps} layers={args.layers} hidden={args.hidden} "
        f"vocab={args.vocab} dtype={args.dtype}"
    )
    print(f"{'method':<14} {'seconds':>9} {'tokens/s':>10} {'speedup vs recompute':>22}")
    for name, s in seconds.items():
        tps = args.batch * steps / s
        print(f"{name:<14} {s:>9.3f} {tps:>10.0f} {seconds['recompute'] / s:>21.1f}x")


if __name__ == "__main__":
    main()
