"""The training forward's attention and remat options: the TPU flash-attention path against the dense one
(Pallas TPU interpret mode on this CPU host), and every remat policy the config accepts.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from trainer import config as C
from trainer import model as M


def test_flash_attention_matches_the_dense_mask_at_every_real_token():
    """Left and right padding, GQA 2:1: outputs at real tokens and gradients of a loss that reads only real
    tokens agree with the dense path (the kernels run in TPU interpret mode here)."""
    b, t, hq, hkv, d = 2, 256, 2, 1, 128  # two 128-token blocks each way
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    valid = (jnp.arange(t)[None] < jnp.array([[200], [256]])).at[0, :10].set(False)
    w = jax.random.normal(ks[3], (b, t, hq * d)) * valid[..., None]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, valid) * w)

    dense = lambda q, k, v, valid: M.attention(q, k, v, M.CausalMask(valid).dense())
    want, want_grads = jax.value_and_grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        got, grads = jax.value_and_grad(lambda *a: loss(M.flash_attention, *a), argnums=(0, 1, 2))(q, k, v)
    assert abs(float(got - want)) <= 1e-5 * abs(float(want))
    for g, ref in zip(grads, want_grads, strict=True):
        assert float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref))) < 1e-5
    assert float(jnp.max(jnp.abs(want_grads[0]))) > 0  # the check above can fail


@pytest.mark.parametrize("t, d", [(16, 16), (M.FLASH_BLOCK, 128)], ids=["untileable", "tileable"])
def test_causal_mask_on_cpu_is_the_dense_path_exactly(t, d):
    """Lowered for CPU (or at shapes the kernels cannot tile) a CausalMask is the dense mask."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 4 if i == 0 else 2, d)) for i in range(3))
    valid = jnp.arange(t)[None] < jnp.array([[t - 4], [t]])
    np.testing.assert_array_equal(
        M.attention(q, k, v, M.CausalMask(valid)), M.attention(q, k, v, M.CausalMask(valid).dense())
    )


def test_the_flash_kernels_are_chosen_by_the_lowering_platform_not_the_default_backend():
    """Exported for TPU from this CPU host (where jax.default_backend() stays "cpu", as in the preflight)
    the training attention and its gradient are the flash kernels; lowered for the host, none."""
    from jax import export

    from trainer.kernels.mosaic_text import tpu_kernels

    b, t, hq, hkv, d = 2, 2 * M.FLASH_BLOCK, 2, 1, 128
    shapes = [(b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)]
    args = [*(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes), jax.ShapeDtypeStruct((b, t), bool)]

    def loss(q, k, v, valid):
        return jnp.sum(M.attention(q, k, v, M.CausalMask(valid)).astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    assert jax.default_backend() == "cpu"
    names = sorted(k.name for k in tpu_kernels(export.export(grad, platforms=["tpu"])(*args).mlir_module()))
    assert names == ["_flash_attention_dkv_kernel", "_flash_attention_dq_kernel", "_flash_attention_kernel"]
    assert "tpu_custom_call" not in grad.lower(*args).as_text()


def test_every_config_remat_policy_is_a_model_policy_with_the_same_gradients():
    names = typing.get_args(C.RematPolicy)
    assert set(names) == set(M.REMAT_POLICIES)
    cfg = M.Qwen2Config.tiny()
    params = M.init_params(cfg, jax.random.key(0), jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = jnp.ones((2, 8), bool).at[0, 6:].set(False)

    def grads(remat):
        def loss(p):
            h, _ = M.forward(p, cfg, tokens, positions, mask, None, jnp.float32, remat=remat)
            return jnp.sum(h * mask[..., None])

        return jax.grad(loss)(params)

    want = grads(False)
    for name in names:
        if name == "offload_dots_to_host" and jax.default_backend() == "cpu":
            continue  # host offload needs a device with a separate host memory space
        for a, b in zip(jax.tree.leaves(grads(name)), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)  # recompute order
    with pytest.raises(KeyError):
        M.remat_policy("everything_saveable")


def test_remat_policy_is_a_config_key_with_a_clear_error():
    cfg = C.load(None, ["train.remat=true", "train.remat_policy=save_attention"], environ={})
    assert cfg.train.remat_policy == "save_attention"
    with pytest.raises(C.ConfigError) as err:
        C.load(None, ["train.remat_policy=save_everything"], environ={})
    assert err.value.exit_code == 2 and "remat_policy" in str(err.value)


def test_fsdp_update_step_gathers_weights_not_activations():
    """Compiled for a v6e-8 (fsdp=8): every floating all-gather of the update step is a weight (no array
    with the sequence length T = 48 in it). GSPMD left alone gathered the micro-batch's activations."""
    pytest.importorskip("libtpu", reason="libtpu (the dev extra) compiles for TPU on this host")
    import re

    from trainer import preflight

    sets = ["rollout.batch_size=2", "rollout.n=4", "rollout.global_length=16", "rollout.max_length_sample=32",
            "train.seq_bucket=16", "train.micro_batch_size=8", "tiny_model.num_hidden_layers=1",
            "mesh_shape=auto", "train.remat=true"]
    cfg = C.load(None, ["model_init=random", "tokenizer_path=tiny", *sets], environ={})
    devices = preflight.tpu_devices(preflight.parse_accelerator("v6e-8"))
    (update,) = [p for p in preflight.programs_for(cfg, devices)[0] if p.name == "update_step"]
    assert update.seq_len == 48
    text = update.fn.lower(*update.args, **update.kwargs).compile().as_text()
    gathered = re.findall(r"= ((?:bf16|f32)\[[\d,]*\])\S* all-gather(?:-start)?\(", text)
    assert gathered  # the weights are gathered (fsdp)
    assert not [g for g in gathered if "48" in re.findall(r"\d+", g)], gathered


def test_the_3b_configs_name_the_fastest_remat_policy_that_benchmarks_md_says_fits():
    """BENCHMARKS.md "Remat policies" table -> the fastest row that fits; both 3B configs name it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "BENCHMARKS.md").read_text()
    section = text.split("## Remat policies", 1)[1].split("\n## ", 1)[0]
    row = r"^\| (\w+) \| [\d.]+ \| [\d.]+ \| (yes|NO) \|(?: [^|]* \|){3} ([\d.]+) \|"
    rows = re.findall(row, section, re.M)
    assert len(rows) >= 3, section[:300]
    best = min((float(est), name) for name, fits, est in rows if fits == "yes")[1]
    for name in ("steps100.yaml", "steps100_pallas.yaml"):
        cfg = C.load(root / "configs" / f"grpo_gsm8k_qwen25_3b_bs128_{name}", environ={})
        assert cfg.train.remat and cfg.train.remat_policy == best, name
