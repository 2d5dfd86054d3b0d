"""Padding in the GRPO update: the reference's full buffer vs our packing trimmed to the longest sequence.

The reference trained every step on [128, prompt bucket 512 + decode bucket 1024 = 1536] tensors. We pack
each row as prompt + completion and trim the batch to its longest row rounded up to `train.seq_bucket`
(trainer/grpo.py: pack_sequences). This script draws realistic GSM8K lengths for Qwen2.5 (prompt = chat
template + system prompt + question; completion = <think> reasoning + <answer>, long tail up to the cap),
packs 200 steps of 128 rows with the real packing code, and prints padding fractions and the ratio of
tokens the update has to process (compute of the update scales with it; attention superlinearly).

    .venv/bin/python benchmarks/bench_padding.py
"""

from __future__ import annotations

import argparse

import numpy as np

from trainer.grpo import pack_sequences

PROMPT_BUCKET, DECODE_BUCKET = 512, 1024  # the reference's buffer: 1536 tokens per row


def draw_lengths(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and completion lengths in Qwen2.5 tokens.

    Prompt: ~75 tokens of chat template + system prompt, plus a GSM8K question (~60 tokens, 20-200).
    Completion: lognormal around 200 tokens (GRPO-trained 3B models write ~150-350 with a tail), capped
    at the decode budget (a few rows always hit the cap: the longest row sets the trimmed width)."""
    prompts = 75 + np.clip(rng.lognormal(np.log(60), 0.35, rows), 20, 200).astype(int)
    completions = np.minimum(rng.lognormal(np.log(200), 0.45, rows).astype(int) + 8, DECODE_BUCKET)
    return prompts, completions


def rows_of(lengths: np.ndarray, width: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    cols = np.arange(width)[None, :]
    mask = cols >= (width - lengths)[:, None] if left else cols < lengths[:, None]
    return np.where(mask, 7, 0).astype(np.int32), mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    buffer = PROMPT_BUCKET + DECODE_BUCKET
    print(f"{args.steps} steps x {args.rows} rows; reference buffer {buffer} tokens/row")
    print(f"{'seq_bucket':>10} | {'width mean':>10} | {'width max':>9} | {'pad before':>10} | "
          f"{'pad after':>9} | {'tokens before/after':>19}")
    for bucket in (64, 128, 256):
        real = widths = 0.0
        w_max = 0
        rng = np.random.default_rng(args.seed)  # the same lengths for every bucket size
        for _ in range(args.steps):
            p_len, c_len = draw_lengths(rng, args.rows)
            prompt, pmask = rows_of(p_len, PROMPT_BUCKET, left=True)
            comp, cmask = rows_of(c_len, DECODE_BUCKET, left=False)
            packed = pack_sequences(prompt, pmask, comp, cmask, seq_bucket=bucket)
            real += packed["attn_mask"].sum()
            widths += packed["tokens"].shape[1]
            w_max = max(w_max, packed["tokens"].shape[1])
        before, after = args.steps * args.rows * buffer, widths * args.rows
        print(f"{bucket:>10} | {widths / args.steps:>10.0f} | {w_max:>9} | {1 - real / before:>10.1%} | "
              f"{1 - real / after:>9.1%} | {before / after:>18.2f}x")


if __name__ == "__main__":
    main()
