"""The tiny demo's step time under this tree's model vs an earlier commit's (e.g. before the NNX port).

Times two jitted programs at the shapes `configs/tiny_cpu.yaml` runs (2-layer Qwen2, hidden 64, GQA 4:2,
tied head, vocab ~350, f32): the GRPO update (grpo.step_gradients over 16 x 8 = 128 rows of 128 tokens in
4 micro-batches of 32, then an AdamW update) and a rollout (sampler.generate: 128 left-padded prompts of
~80 tokens in a 128 bucket, 16 new tokens, temperature 0.7). The baseline is `git archive REV trainer`
put in front of sys.path in a subprocess; the two trees run alternately (rounds) so load on the shared
machine hits both alike. Each worker compiles, then reports the median of `--reps` calls.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_model_port.py --baseline ed7c9f7   # ~2-4 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, SEQ, MICRO, PROMPT, NEW, VOCAB = 128, 128, 32, 80, 16, 352


def worker(reps: int) -> dict[str, float | str]:
    """Runs in the tree first on sys.path; prints which model file it used."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from trainer import grpo, model, sampler

    cfg = model.Qwen2Config.tiny(vocab_size=VOCAB)
    params = model.init_params(cfg, jax.random.key(0))
    opt = optax.adamw(3e-4, b2=0.99, weight_decay=0.0)
    loss_cfg = grpo.LossConfig(group_size=8, compute_dtype=jnp.float32, max_completion_len=NEW)
    rng = np.random.default_rng(0)
    lengths = rng.integers(SEQ // 2, SEQ + 1, ROWS)
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    tokens = np.where(mask, rng.integers(4, VOCAB, (ROWS, SEQ)), 0).astype(np.int32)
    batch = {
        "tokens": jnp.asarray(tokens),
        "positions": jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)),
        "attn_mask": jnp.asarray(mask),
        "targets": jnp.asarray(np.roll(tokens, -1, 1)),
        "loss_mask": jnp.asarray(mask & (np.arange(SEQ)[None, :] >= PROMPT)),
        "rewards": jnp.asarray(rng.random(ROWS).astype(np.float32)),
    }

    @jax.jit
    def update(params, opt_state, batch):  # noqa: ANN001, ANN202 (pytrees)
        grads, metrics = grpo.step_gradients(params, params, cfg, batch, loss_cfg, ROWS // MICRO)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics["loss"]

    opt_state = opt.init(params)
    prompt_len = rng.integers(PROMPT // 2, PROMPT + 1, ROWS)
    pmask = np.arange(PROMPT)[None, :] >= (PROMPT - prompt_len)[:, None]  # left-padded
    prompts = np.where(pmask, rng.integers(4, VOCAB, (ROWS, PROMPT)), 0).astype(np.int32)

    def rollout(i: int) -> object:
        return sampler.generate(
            params, cfg, prompts, pmask, jax.random.key(i), max_new_tokens=NEW, temperature=0.7,
            dtype=jnp.float32, prompt_bucket_min=SEQ,
        ).completion

    def timed(fn) -> float:  # noqa: ANN001
        jax.block_until_ready(fn(0))  # compile
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(i + 1))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def cost(compiled) -> tuple[float, float]:  # noqa: ANN001
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, list) else c
        return float(c["flops"]), float(c["bytes accessed"])

    # Load-independent: XLA's count of the compiled programs' work (same program -> same figures).
    cache = model.init_cache(cfg, ROWS, SEQ, jnp.float32)
    one = jnp.ones((ROWS, 1), jnp.int32)

    def decode_step(params, cache):  # noqa: ANN001, ANN202
        return model.forward(params, cfg, one, one, one.astype(bool), cache, dtype=jnp.float32)

    out: dict[str, float | str] = {"model": model.__file__}
    out["update_flops"], out["update_bytes"] = cost(update.lower(params, opt.init(params), batch).compile())
    out["decode_flops"], out["decode_bytes"] = cost(jax.jit(decode_step).lower(params, cache).compile())
    out["update_s"] = timed(lambda i: update(params, opt_state, batch)[2])
    out["rollout_s"] = timed(rollout)
    return out


def export(rev: str, dest: Path) -> Path:
    """The `trainer` package as of `rev`, unpacked under `dest`."""
    git = ["git", "-C", str(ROOT), "archive", rev, "trainer"]
    data = subprocess.run(git, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(data.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_worker(tree: Path, reps: int) -> dict[str, float | str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "--reps", str(reps)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"worker in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="ed7c9f7", help="git revision to compare against (default: the "
                    "last commit with the functional model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.reps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": export(args.baseline, Path(tmp)), "this tree": ROOT}
        results: dict[str, list[dict[str, float | str]]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                res = run_worker(tree, args.reps)
                results[name].append(res)
                print(f"round {r + 1} {name:9}: update {res['update_s'] * 1e3:7.1f} ms  "
                      f"rollout {res['rollout_s'] * 1e3:7.1f} ms  ({res['model']})", flush=True)

    print(f"\nmedian of {args.rounds} rounds x median of {args.reps} calls; baseline = {args.baseline}")
    print(f"{'program':>8} | {'baseline ms':>11} | {'this tree ms':>12} | {'ratio':>6}")
    for key, label in (("update_s", "update"), ("rollout_s", "rollout")):
        base = statistics.median(float(x[key]) for x in results["baseline"])
        this = statistics.median(float(x[key]) for x in results["this tree"])
        print(f"{label:>8} | {base * 1e3:>11.1f} | {this * 1e3:>12.1f} | {this / base:>6.3f}")
        pairs = zip(results["baseline"], results["this tree"], strict=True)
        rounds = [float(t[key]) / float(b[key]) for b, t in pairs]
        print(f"{'':>8}   per-round ratios: " + " ".join(f"{r:.3f}" for r in rounds))
    print("\nXLA cost analysis of the compiled programs (the same in every round)")
    print(f"{'program':>22} | {'baseline':>14} | {'this tree':>14} | {'ratio':>6}")
    for key, label in (("update_flops", "update flops"), ("update_bytes", "update bytes accessed"),
                       ("decode_flops", "decode-step flops"), ("decode_bytes", "decode-step bytes")):
        base, this = float(results["baseline"][0][key]), float(results["this tree"][0][key])
        print(f"{label:>22} | {base:>14.4g} | {this:>14.4g} | {this / base:>6.3f}")


if __name__ == "__main__":
    main()
