"""Sampler: greedy == step-by-step argmax of the full forward, per-row stop, top-k/top-p semantics, and the
recorded log-probs equal a recomputation from the completed sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import sampler
from trainer.model import Qwen2Config, init_params, logits
from trainer.sampler import bucket_length, generate, left_pad, sample_token

PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31, 32, 33, 34, 35], [7]]
STEPS = 8
F32 = dict(dtype=jnp.float32, cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def model():
    cfg = Qwen2Config.tiny(vocab_size=128)
    # std 0.3: peaked next-token distributions, so greedy paths vary and top-k truncation really bites.
    return cfg, init_params(cfg, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def prompt():
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def reference_greedy(model):
    """Greedy continuation by recomputing the full forward over the whole sequence at every step."""
    cfg, params = model
    full = jax.jit(lambda t, m: logits(params, cfg, t, m))
    seqs = [list(p) for p in PROMPTS]
    for _ in range(STEPS):
        tokens, mask = left_pad(seqs, pad_id=0, length=len(PROMPTS[1]) + STEPS)
        next_tokens = np.asarray(jnp.argmax(full(jnp.asarray(tokens), jnp.asarray(mask))[:, -1], axis=-1))
        seqs = [seq + [int(t)] for seq, t in zip(seqs, next_tokens, strict=True)]
    return np.array([seq[len(p) :] for seq, p in zip(seqs, PROMPTS, strict=True)])


def _recomputed_logits(model, prompt_tokens, out):
    """Logits at each completion position, from one uncached forward over prompt + completion."""
    cfg, params = model
    tokens = jnp.concatenate([prompt_tokens[0], out.completion], axis=1)
    mask = jnp.concatenate([prompt_tokens[1], out.completion_mask.astype(bool)], axis=1)
    lg = logits(params, cfg, tokens, mask)
    p = prompt_tokens[0].shape[1]
    return np.asarray(lg[:, p - 1 : -1])


def test_greedy_equals_stepwise_argmax(model, prompt, reference_greedy):
    cfg, params = model
    out = generate(params, cfg, *prompt, jax.random.key(0), max_new_tokens=STEPS, temperature=0.0, **F32)
    np.testing.assert_array_equal(np.asarray(out.completion), reference_greedy)
    assert (np.asarray(out.lengths) == STEPS).all() and (np.asarray(out.logprobs) == 0).all()
    assert len({tuple(r) for r in reference_greedy}) == len(PROMPTS)  # rows differ: a meaningful check


def test_per_row_stop(model, prompt, reference_greedy):
    """Stop on a token that row 0 emits at step 2: row 0 ends there (stop token kept, then padding),
    rows that never emit it run to the limit."""
    cfg, params = model
    stop = int(reference_greedy[0, 2])
    out = generate(
        params, cfg, *prompt, jax.random.key(0), max_new_tokens=STEPS, temperature=0.0,
        stop_token_ids=[stop], pad_id=0, **F32,
    )  # fmt: skip
    completion, mask = np.asarray(out.completion), np.asarray(out.completion_mask)
    for row, ref in enumerate(reference_greedy):
        hits = np.flatnonzero(ref == stop)
        n = hits[0] + 1 if hits.size else STEPS
        assert out.lengths[row] == n
        np.testing.assert_array_equal(completion[row, :n], ref[:n])
        assert (completion[row, n:] == 0).all() and mask[row, :n].all() and not mask[row, n:].any()
    assert out.lengths[0] <= 3 and STEPS in np.asarray(out.lengths)


def test_all_rows_stopped_early(model, prompt, reference_greedy):
    cfg, params = model
    stops = [int(r[0]) for r in reference_greedy]  # every row stops on its first token
    out = generate(
        params, cfg, *prompt, jax.random.key(0), max_new_tokens=STEPS, temperature=0.0,
        stop_token_ids=stops, pad_id=0, **F32,
    )  # fmt: skip
    np.testing.assert_array_equal(out.lengths, np.ones(len(PROMPTS)))
    np.testing.assert_array_equal(out.completion[:, 0], reference_greedy[:, 0])


def test_top_k_1_equals_greedy(model, prompt, reference_greedy):
    cfg, params = model
    out = generate(
        params, cfg, *prompt, jax.random.key(3), max_new_tokens=STEPS, temperature=1.0, top_k=1, **F32
    )
    np.testing.assert_array_equal(np.asarray(out.completion), reference_greedy)
    np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)  # one candidate: probability 1


def test_sampling_logprobs_match_recomputation(model, prompt):
    """Temperature + top-k: the full-softmax log-probs equal log_softmax(logits / T) recomputed from the
    finished sequences; the sampling log-probs equal the renormalised top-k distribution; every token
    comes from the top k."""
    cfg, params = model
    temperature, top_k = 0.7, 5
    out = generate(
        params, cfg, *prompt, jax.random.key(7), max_new_tokens=STEPS, temperature=temperature,
        top_k=top_k, **F32,
    )  # fmt: skip
    lg = _recomputed_logits(model, prompt, out) / temperature
    tok = np.asarray(out.completion)[..., None]
    full = jax.nn.log_softmax(lg, axis=-1)
    np.testing.assert_allclose(out.full_logprobs, np.take_along_axis(full, tok, -1)[..., 0], atol=2e-5)
    kth = np.sort(lg, axis=-1)[..., -top_k][..., None]
    truncated = jax.nn.log_softmax(np.where(lg >= kth, lg, -np.inf), axis=-1)
    np.testing.assert_allclose(out.logprobs, np.take_along_axis(truncated, tok, -1)[..., 0], atol=2e-5)
    assert (np.take_along_axis(lg, tok, -1) >= kth).all()
    assert (np.asarray(out.logprobs) > np.asarray(out.full_logprobs)).all()  # truncation raised every prob
    again = generate(
        params, cfg, *prompt, jax.random.key(8), max_new_tokens=STEPS, temperature=temperature,
        top_k=top_k, **F32,
    )  # fmt: skip
    assert (np.asarray(again.completion) != np.asarray(out.completion)).any()  # the rng is really used


def test_sample_token_top_p_distribution():
    """Probabilities 0.5/0.3/0.15/0.05 with top_p=0.7 keep the first two, renormalised to 0.625/0.375;
    the empirical frequencies over many draws agree and the recorded log-probs are exact."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    lg = jnp.tile(jnp.log(jnp.asarray(probs)), (n, 1))
    token, lp, full = jax.jit(lambda x, key: sample_token(x, key, 1.0, 0, 0.7))(lg, jax.random.key(0))
    freq = np.bincount(np.asarray(token), minlength=4) / n
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(np.exp(lp), np.where(np.asarray(token) == 0, 0.625, 0.375), rtol=1e-5)
    np.testing.assert_allclose(np.exp(full), probs[np.asarray(token)], rtol=1e-5)
    # Plain temperature sampling (no truncation): frequencies follow softmax(logits / T).
    token, lp, full = sample_token(lg, jax.random.key(1), 2.0)
    tempered = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(np.asarray(token), minlength=4) / n, tempered, atol=0.015)
    np.testing.assert_array_equal(lp, full)


def test_greedy_token_records_the_temperature_1_full_logprob():
    """Greedy (temperature 0) takes the argmax, records sampling log-prob 0 and the full log-prob at
    temperature 1 (what training recomputes), never a division by the zero temperature."""
    lg = jnp.asarray([[0.5, 2.0, -1.0, 0.0], [3.0, 1.0, 2.5, -2.0]])
    token, lp, full = sample_token(lg, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(token, [1, 0])
    np.testing.assert_array_equal(lp, 0.0)
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(lg, axis=-1)), np.asarray(token)[:, None], -1)
    np.testing.assert_allclose(full, want[:, 0], rtol=1e-6)


def test_prompts_in_one_bucket_share_one_program(model, prompt, reference_greedy):
    """Prompt lengths 7 and 12 both pad to the 16 bucket: same compiled program, same greedy tokens; and
    stop ids are data, so changing them does not recompile either."""
    cfg, params = model
    run = lambda tokens, mask, stops: generate(  # noqa: E731
        params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=STEPS, temperature=0.0,
        stop_token_ids=stops, **F32,
    )  # fmt: skip
    run(*prompt, [])
    compiled = sampler._generate._cache_size()
    longer = [np.pad(a, ((0, 0), (5, 0))) for a in prompt]  # five more columns of left padding
    out = run(*longer, [-2, -3])  # ids no row emits: only the program cache is under test
    assert sampler._generate._cache_size() == compiled
    np.testing.assert_array_equal(np.asarray(out.completion), reference_greedy)


def test_a_prompt_longer_than_the_minimum_bucket_pads_to_the_next_bucket(model, prompt, reference_greedy):
    """A 20-column prompt with minimum bucket 16 goes to the 32 bucket; left padding changes no token."""
    cfg, params = model
    longer = [np.pad(a, ((0, 0), (13, 0))) for a in prompt]  # 7 columns + 13 of left padding
    out = generate(
        params, cfg, *longer, jax.random.key(0), max_new_tokens=STEPS, temperature=0.0, prompt_bucket=16,
        **F32,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.completion), reference_greedy)


def test_bucket_length_and_left_pad():
    assert [bucket_length(n, 16) for n in (1, 16, 17, 100, 512, 513)] == [16, 16, 32, 128, 512, 1024]
    assert bucket_length(300, minimum=512) == 512
    tokens, mask = left_pad([[1, 2], [3]], pad_id=9, length=4)
    np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 9, 9, 3]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([[1, 2, 3]], pad_id=0, length=2)
