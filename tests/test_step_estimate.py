"""The whole-step roofline (trainer/preflight.grpo_step) and the matmul flop count behind it.

The arithmetic tests use made-up program entries (no compile); the flop count is checked on a program
compiled by libtpu for one abstract v6e chip whose matmuls are known exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from grpoctl_contract.accelerators import CHIPS
from trainer import config as C
from trainer import hlo_stats, preflight

V6E = CHIPS["v6e"]


def _entry(name: str, flops: float, hbm: float, coll: float, loop: tuple[float, float, float] | None = None):
    est = V6E.estimate_s(flops, hbm, coll)
    keys = ("flops", "hbm_bytes", "collective_bytes")
    data_loop = None if loop is None else dict(zip(keys, loop, strict=True))
    return dict(name=name, flops=flops, hbm_bytes=hbm, collective_bytes=coll, estimated_s=est,
                data_loop=data_loop)


def _functions():
    # A sampler whose decode loop iteration is memory-bound: 1 GB of HBM, 1 MB of collectives.
    sampler = _entry("sampler", 5e12, 3e9, 2e9, loop=(1e10, 1e9, 1e6))
    return [
        sampler, {**sampler, "name": "eval"}, {**sampler, "name": "eval_full"},
        _entry("update_step", 4e14, 5e10, 6e10),
        _entry("behaviour_logprobs", 1e14, 1e10, 1e10),
    ]


def test_parts_add_up_and_each_program_takes_the_formula():
    plan = dict(steps=100, max_new_tokens=1024, ppo_epochs=1, evals_per_step=0.0, baselines_per_step=0.0,
                sweep_batches_per_step=0.0, sweep_max_new_tokens=1024)
    g = preflight.grpo_step(V6E, _functions(), plan)
    outside = V6E.estimate_s(5e12 - 1e10, 3e9 - 1e9, 2e9 - 1e6)
    assert g["rollout_s"] == pytest.approx(outside + 1024 * V6E.estimate_s(1e10, 1e9, 1e6))
    assert g["rollout_s"] == pytest.approx(outside + 1024 * 1e9 / V6E.hbm_bytes_per_s + 1024 * 1e6 / 448e9)
    assert g["flops"] == pytest.approx(5e12 - 1e10 + 1024 * 1e10 + 4e14)
    assert g["update_s"] == pytest.approx(4e14 / 918e12 + 6e10 / 448e9)
    assert g["logprob_s"] == 0.0 and g["eval_s"] == 0.0
    parts = ("rollout_s", "logprob_s", "update_s", "eval_s")
    assert g["estimated_s"] == pytest.approx(sum(g[k] for k in parts))


def test_epochs_logprobs_eval_and_sweeps_are_counted_and_amortised():
    plan = dict(steps=100, max_new_tokens=1024, ppo_epochs=2, evals_per_step=0.1, baselines_per_step=0.2,
                sweep_batches_per_step=0.25, sweep_max_new_tokens=512)
    fns = _functions()
    g = preflight.grpo_step(V6E, fns, plan)
    base = preflight.grpo_step(V6E, fns, {**plan, "ppo_epochs": 1, "evals_per_step": 0.0,
                                          "baselines_per_step": 0.0, "sweep_batches_per_step": 0.0})
    assert g["update_s"] == pytest.approx(2 * base["update_s"])
    assert g["logprob_s"] == pytest.approx(fns[-1]["estimated_s"]) and g["logprob_s"] > 0
    sweep = preflight.grpo_step(V6E, fns, {**plan, "max_new_tokens": 512})["rollout_s"]
    assert g["eval_s"] == pytest.approx((0.1 + 0.2) * base["rollout_s"] + 0.25 * sweep)
    # A program the step needs was not compiled (--only): no estimate rather than a wrong one.
    assert preflight.grpo_step(V6E, [f for f in fns if f["name"] != "eval"], plan) is None


def test_step_plan_amortises_over_the_run():
    cfg = C.load(None, ["steps=100", "eval_every_steps=10", "eval_batches_per_process=2",
                        "baseline_every_steps=5", "eval_full_sweep=true", "eval_full_limit=256",
                        "eval_full_batch_size=128", "train.ppo_epochs=2"], environ={})
    plan = preflight.step_plan(cfg, 1024, 512)
    assert plan["evals_per_step"] == pytest.approx(10 * 2 / 100)  # steps 10, 20, ..., 100
    assert plan["baselines_per_step"] == pytest.approx(0.2)
    assert plan["sweep_batches_per_step"] == pytest.approx(2 * 2 / 100)  # start + end, 2 batches each
    assert plan["ppo_epochs"] == 2 and plan["sweep_max_new_tokens"] == 512


def test_matmul_flops_count_every_layer_and_micro_batch_on_a_v6e_chip():
    """A scan over 3 layers inside a loop over 4 micro-batches: XLA's cost analysis counts one layer of
    one micro-batch; the compiled text's count has all 12 (and the scan body's matmul exactly)."""
    pytest.importorskip("libtpu", reason="libtpu (the dev extra) compiles for TPU on this host")
    from jax.sharding import SingleDeviceSharding

    layers, micro, rows, width = 3, 4, 256, 512
    chip = preflight.tpu_devices(preflight.parse_accelerator("v6e-8"))[0]
    one = SingleDeviceSharding(chip)

    def step(w, x):
        def micro_batch(acc, xb):
            h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), xb, w)
            return acc + h.sum(), None

        return jax.lax.scan(micro_batch, jnp.float32(0), x)[0]

    args = (jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=one),
            jax.ShapeDtypeStruct((micro, rows, width), jnp.bfloat16, sharding=one))
    compiled = jax.jit(step).lower(*args).compile()
    one_matmul = 2 * rows * width * width
    assert hlo_stats.matmul_flops(compiled.as_text()) == layers * micro * one_matmul
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list | tuple) else xla
    assert xla["flops"] < 2 * one_matmul  # loop bodies once: the reason for counting ourselves


def test_matmul_flops_of_a_batched_matmul_are_its_multiply_adds_not_its_convolution_window():
    """TPU HLO writes a batched matmul (attention's scores) as a convolution with a dilated, strided window
    over the batch dims whose taps mostly land on holes: only the taps that hit an input element count."""
    pytest.importorskip("libtpu", reason="libtpu (the dev extra) compiles for TPU on this host")
    from jax.sharding import SingleDeviceSharding

    b, heads, q, k, d = 4, 2, 256, 384, 128
    one = SingleDeviceSharding(preflight.tpu_devices(preflight.parse_accelerator("v6e-8"))[0])
    args = (jax.ShapeDtypeStruct((b, heads, q, d), jnp.bfloat16, sharding=one),
            jax.ShapeDtypeStruct((b, heads, k, d), jnp.bfloat16, sharding=one))
    text = jax.jit(lambda x, y: jnp.einsum("bhqd,bhkd->bhqk", x, y)).lower(*args).compile().as_text()
    assert "lhs_dilate" in text  # the windowed convolution this test is about
    assert hlo_stats.matmul_flops(text) == 2 * b * heads * q * k * d
