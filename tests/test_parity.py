"""Lockstep parity of the loss provider (train.shadow_policy_loss_impl): every GRPO step also runs a shadow
provider on the same micro-batches and parameters and reports how far it is from the main one.

The unit tests call grpo.step_gradients on a tiny model and a packed batch whose loss really depends on the
provider's log-probs (old log-probs from a perturbed policy, so ratio != 1, and a KL term against a
reference). Then one short trainer run checks the metrics land in metrics.jsonl and their maxima in
summary.json, and that the shadow never changes the run it watches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpoctl_contract import rundir
from trainer import config as C
from trainer import grpo
from trainer.kernels import chunked as chunked_module
from trainer.model import Qwen2Config, init_params
from trainer.train import run, worst

ROOT = Path(__file__).resolve().parents[1]
# vocab 300 with 128-wide Pallas blocks and 64-wide chunks: several vocabulary tiles and a ragged last one.
MODEL = Qwen2Config.tiny(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8)
BLOCKS = (("block_tokens", 8), ("block_vocab", 128), ("chunk_vocab", 64))
LOSS = grpo.LossConfig(group_size=4, compute_dtype=jnp.float32, max_completion_len=8, beta=0.1,
                       kernel_blocks=BLOCKS)
NUM_MICRO = 2
PARITY = ("parity/logp_max_abs_diff", "parity/logp_mean_abs_diff", "parity/grad_rel_diff",
          "parity/loss_abs_diff")


def _perturbed(params, scale: float, seed: int):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


@pytest.fixture(scope="module")
def setup():
    """(params, reference params, batch with old log-probs of another policy)."""
    rng = np.random.default_rng(0)
    b, p, g = 8, 5, 8
    prompt = rng.integers(3, MODEL.vocab_size, size=(b, p)).astype(np.int32)
    comp = rng.integers(3, MODEL.vocab_size, size=(b, g)).astype(np.int32)
    cmask = np.arange(g)[None, :] < rng.integers(1, g + 1, size=b)[:, None]
    packed = grpo.pack_sequences(prompt, np.ones((b, p), bool), comp, cmask, seq_bucket=8)
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    batch["rewards"] = jnp.asarray(rng.uniform(0, 2, size=b).astype(np.float32))
    params = init_params(MODEL, jax.random.key(0))
    # The behaviour policy differs from the current one: ratio != 1, so the loss VALUE depends on logp.
    batch["old_logp"] = grpo.sequence_logprobs(_perturbed(params, 0.05, 1), MODEL, batch, LOSS).logp
    return params, _perturbed(params, 0.05, 2), batch


_step = jax.jit(grpo.step_gradients, static_argnums=(2, 4, 5))


def step(setup, shadow: str | None, **changes):
    params, ref, batch = setup
    loss_cfg = dataclasses.replace(LOSS, shadow_impl=shadow, **changes)
    grads, metrics = _step(params, ref, MODEL, batch, loss_cfg, NUM_MICRO)
    return grads, {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("shadow", ["chunked", "pallas"])
def test_a_memory_efficient_shadow_tracks_the_jax_provider_to_float_rounding(setup, shadow):
    _, m = step(setup, shadow)
    assert set(PARITY) <= set(m)
    assert m["parity/logp_max_abs_diff"] < 1e-5
    assert m["parity/logp_mean_abs_diff"] <= m["parity/logp_max_abs_diff"]
    assert m["parity/grad_rel_diff"] < 1e-5
    assert m["parity/loss_abs_diff"] < 1e-6
    # Not a degenerate comparison: the loss is not the ratio-1 constant and KL is in it.
    assert abs(m["ratio_mean"] - 1.0) > 1e-3 and m["kl"] > 0


def test_the_pallas_main_against_a_jax_shadow_is_the_same_comparison_mirrored(setup):
    _, m = step(setup, "jax", impl="pallas")
    assert m["parity/logp_max_abs_diff"] < 1e-5 and m["parity/grad_rel_diff"] < 1e-5


def test_a_shadow_equal_to_the_main_provider_reads_exactly_zero(setup):
    _, m = step(setup, "jax")
    assert [m[k] for k in PARITY] == [0.0, 0.0, 0.0, 0.0]


def test_the_shadow_never_changes_the_gradient_or_the_step_metrics(setup):
    g_off, m_off = step(setup, None)
    g_on, m_on = step(setup, "pallas")
    assert not any(k.startswith("parity/") for k in m_off)
    assert {k: v for k, v in m_on.items() if not k.startswith("parity/")} == m_off
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_planted_difference_in_the_shadow_shows_in_every_parity_metric(setup, monkeypatch):
    """The metric can fail: a chunked provider that reads its hidden states 1% too large."""
    real = chunked_module.token_logprobs_chunked
    monkeypatch.setattr(chunked_module, "token_logprobs_chunked",
                        lambda h, w, t, *a, **k: real(h * 1.01, w, t, *a, **k))
    # chunk_vocab 32 (not 64): another static config, so this traces anew instead of reusing a compile
    blocks = (("block_tokens", 8), ("block_vocab", 128), ("chunk_vocab", 32))
    _, m = step(setup, "chunked", kernel_blocks=blocks)
    assert m["parity/logp_max_abs_diff"] > 1e-3
    assert m["parity/logp_mean_abs_diff"] > 1e-4
    assert m["parity/grad_rel_diff"] > 1e-3
    assert m["parity/loss_abs_diff"] > 1e-6


def test_the_run_maximum_is_nan_when_any_step_was():
    assert worst([1e-7, 3e-7]) == 3e-7
    assert math.isnan(worst([1e-7, float("nan")])) and math.isnan(worst([None, 0.0]))


def test_the_shadow_key_is_validated_and_recorded_and_the_pallas_configs_turn_it_on():
    assert C.load(None, [], {}).train.shadow_policy_loss_impl == "none"
    with pytest.raises(C.ConfigError, match=r"train\.shadow_policy_loss_impl: expected one of"):
        C.load(None, ["train.shadow_policy_loss_impl=triton"], {})
    for name in ("tiny_cpu_pallas.yaml", "grpo_gsm8k_qwen25_3b_bs128_steps100_pallas.yaml"):
        cfg = C.load(ROOT / "configs" / name, [], {})
        assert (cfg.train.policy_loss_impl, cfg.train.shadow_policy_loss_impl) == ("pallas", "jax"), name
    for name in ("tiny_cpu.yaml", "grpo_gsm8k_qwen25_3b_bs128_steps100.yaml"):
        assert C.load(ROOT / "configs" / name, [], {}).train.shadow_policy_loss_impl == "none", name


# ---------------------------------------------------------------------------------------------------------
# Through the trainer.

QUIET = ("eval_every_steps=0", "eval_full_sweep=false", "wandb_mode=disabled", "checkpoint.every_steps=0",
         "warm_start.steps=0", "baseline_every_steps=0", "rollout.batch_size=4", "rollout.n=4",
         "train.micro_batch_size=8", "steps=3")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]


@pytest.mark.slow
def test_a_run_with_a_shadow_logs_parity_every_step_keeps_maxima_and_trains_as_without(tmp_path):
    tiny = ROOT / "configs" / "tiny_cpu.yaml"
    run(C.load(tiny, QUIET, {}), tmp_path / "plain")
    summary = run(C.load(tiny, [*QUIET, "train.shadow_policy_loss_impl=pallas"], {}), tmp_path / "shadow")
    plain, shadow = _rows(tmp_path / "plain"), _rows(tmp_path / "shadow")
    assert len(shadow) == 3
    for key in rundir.PARITY_KEYS:
        values = [row[key] for row in shadow]
        assert all(0.0 <= v < 1e-5 for v in values), (key, values)
        assert summary[rundir.parity_max(key)] == max(values)
        assert all(key not in row for row in plain)
    assert max(row["train/parity/logp_max_abs_diff"] for row in shadow) > 0  # pallas is not bit-equal jax
    saved = json.loads((tmp_path / "shadow" / rundir.SUMMARY).read_text())
    assert saved[rundir.parity_max("train/parity/grad_rel_diff")] == max(
        row["train/parity/grad_rel_diff"] for row in shadow)
    config = json.loads((tmp_path / "shadow" / rundir.CONFIG).read_text())
    assert config["train"]["shadow_policy_loss_impl"] == "pallas"
    # The shadow only watches: the run it rides on is the run without it, to the bit.
    for key in ("loss", "train/grad_norm", "train/entropy", "train/reward/total/mean"):
        assert [row[key] for row in shadow] == [row[key] for row in plain], key
