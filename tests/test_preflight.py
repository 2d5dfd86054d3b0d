"""The TPU preflight on this CPU-only host: libtpu compiles the trainer's programs for abstract v6e devices.

Tiny shapes only (the 3B figures are in BENCHMARKS.md). Every compile here is a real libtpu compile, Mosaic
included; nothing touches the network or a TPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

from trainer import config as C
from trainer import grpo, preflight, programs, train
from trainer.kernels import token_logprobs
from trainer.optim import optimizer_for

pytest.importorskip("libtpu", reason="libtpu (the dev extra) compiles for TPU on this host")

ROOT = Path(__file__).resolve().parents[1]
TINY_PALLAS = ROOT / "configs" / "tiny_cpu_pallas.yaml"
# A run small enough to compile in seconds, sharded over the 8 chips of a v6e-8 (mesh auto: fsdp=8).
SMALL = [
    "rollout.batch_size=2", "rollout.n=4", "rollout.global_length=16", "rollout.max_length_sample=16",
    "train.seq_bucket=16", "train.micro_batch_size=8", "tiny_model.num_hidden_layers=1", "mesh_shape=auto",
]


@pytest.fixture(scope="module")
def v6e_8() -> list:
    return preflight.tpu_devices(preflight.parse_accelerator("v6e-8"))


def test_pallas_loss_gradient_compiles_to_mosaic_for_a_v6e_chip_from_a_cpu_host(v6e_8):
    """Decided by the lowering platform: compiled for TPU the kernels are Mosaic (2: forward, backward)
    with no HBM temp; lowered for this CPU host the same function is the interpreter."""

    def loss(h, w, t):
        s = token_logprobs(h, w, t, impl="pallas")
        return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    n, h, v = 256, 256, 1000  # a ragged vocabulary, like Qwen's
    one_chip = SingleDeviceSharding(v6e_8[0])
    args = [
        jax.ShapeDtypeStruct((n, h), jnp.bfloat16, sharding=one_chip),
        jax.ShapeDtypeStruct((v, h), jnp.bfloat16, sharding=one_chip),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=one_chip),
    ]
    compiled = fn.lower(*args).compile()
    assert preflight.mosaic_kernels(compiled.as_text()) >= 2
    assert compiled.memory_analysis().temp_size_in_bytes < 1024**2
    cpu_args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    assert "tpu_custom_call" not in fn.lower(*cpu_args).as_text()


@pytest.mark.slow
def test_tiny_pallas_run_fits_a_v6e_8_with_mosaic_kernels_in_its_update_step():
    cfg = C.load(TINY_PALLAS, SMALL, environ={})
    result = preflight.run(cfg, "v6e-8", only=("update_step", "optimizer_init"))
    assert result["fits"] and result["reason"] is None
    assert (result["accelerator"], result["topology"], result["num_devices"]) == ("v6e-8", "v6e:2x4", 8)
    assert result["mesh"] == {"dp": 1, "fsdp": 8, "tp": 1}
    by_name = {f["name"]: f for f in result["functions"]}
    update = by_name["update_step"]
    assert update["mosaic_kernels"] >= 2
    assert update["seq_len"] == programs.worst_case_seq_len(cfg) == 32  # 16-token bucket + 16 new tokens
    for f in result["functions"]:
        parts = f["argument_bytes"] + f["temp_bytes"] + f["output_bytes"] - f["alias_bytes"]
        assert f["peak_bytes"] == parts > 0
        assert f["capacity_bytes"] == int(31.25 * 1024**3 * 0.9)
    # The update donates params and optimizer state: XLA aliases them, so the peak counts them once.
    assert update["alias_bytes"] > 0
    json.dumps(result)  # the --json object is plain data


@pytest.mark.slow
def test_impossible_micro_batch_exits_2_naming_the_update_step():
    """128 rows of 8192 tokens in one micro-batch: attention alone needs far more than a chip."""
    args = [
        sys.executable, "-m", "trainer.preflight", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
        "--accelerator", "v6e-8", "--json", "--only", "update_step",
        "--set", "rollout.batch_size=16", "--set", "train.micro_batch_size=128",
        "--set", "rollout.global_length=4096", "--set", "rollout.max_length_sample=4096",
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["fits"] is False and [f["name"] for f in result["functions"]] == ["update_step"]
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"preflight: update_step does not fit a v6e-8 chip at T=8192: [\d.]+ GiB needed,"
        r" 28\.1 GiB usable with 10% headroom", line
    ), line
    assert "Traceback" not in proc.stderr


def test_bad_accelerator_and_bad_config_exit_2_with_one_line(capsys):
    assert preflight.main(["--config", str(TINY_PALLAS), "--accelerator", "v7x-9000"]) == 2
    assert capsys.readouterr().err.strip() == (
        "preflight: unknown accelerator 'v7x-9000' (expected e.g. v6e-8, v5litepod-16, v5p-8, v4-8)"
    )
    assert preflight.main(["--config", str(TINY_PALLAS), "--set", "train.remat=maybe"]) == 2
    assert capsys.readouterr().err.strip().startswith("config error: train.remat:")


def test_without_libtpu_the_preflight_says_so_and_exits_4(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # what `import libtpu` sees on macOS / ARM
    assert preflight.main(["--config", str(TINY_PALLAS)]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("preflight: cannot run on this host: libtpu is not installed") and "\n" not in err


def test_accelerator_names_map_to_topologies():
    assert preflight.parse_accelerator("v6e-8").topology == "v6e:2x4"
    assert preflight.parse_accelerator("v6e-8").chips_per_host == (2, 4, 1)
    assert preflight.parse_accelerator("v6e-16").topology == "v6e:4x4"
    assert preflight.parse_accelerator("v5litepod-8").chip.kind == "v5e"
    assert preflight.parse_accelerator("v5p-8").topology == "v5p:2x2x1"  # 8 TensorCores = 4 chips
    with pytest.raises(preflight.PreflightError, match="no v6e slice has 12 chips"):
        preflight.parse_accelerator("v6e-12")


def test_optimizer_state_is_created_split_like_the_params():
    """jax.jit(optimizer.init) put the whole Lion state on one device; programs.optimizer_init splits it."""
    cfg = C.load(TINY_PALLAS, ["mesh_shape=1,8,1"], environ={})
    mesh = programs.make_mesh(cfg.mesh_shape)
    model_cfg = programs.tiny_model_config(cfg, vocab_size=512)
    params = programs.abstract_params(model_cfg, mesh, jnp.float32)
    optimizer = optimizer_for(cfg.optimizer)
    state = jax.eval_shape(programs.optimizer_init(optimizer, params, mesh), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mu), strict=True):
        assert m.sharding.spec == p.sharding.spec
    assert any("fsdp" in m.sharding.spec for m in jax.tree.leaves(mu))


def test_the_preflight_batch_is_the_batch_training_builds():
    cfg = C.load(TINY_PALLAS, [], environ={})
    rng = np.random.default_rng(0)
    rows, p, g = 4, 8, 6
    rollout = train.Rollout(
        problems=[None] * rows, prompt_tokens=rng.integers(1, 50, (rows, p)).astype(np.int32),
        prompt_mask=np.ones((rows, p), bool), completion=rng.integers(1, 50, (rows, g)).astype(np.int32),
        completion_mask=np.ones((rows, g), np.int32), sample_logp=np.zeros((rows, g), np.float32), texts=[],
    )
    batch = train.training_batch(rollout, np.zeros(rows), cfg.train.seq_bucket, pad_id=0)
    seq_len = grpo.round_up(p + g, cfg.train.seq_bucket)
    spec = programs.batch_spec(cfg, rows, seq_len)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == {
        k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()
    }


def test_the_sampler_pins_its_kv_cache_to_the_mesh(monkeypatch):
    """Sampler.sample hands its mesh to generate() (the KV-cache sharding constraint applies only then),
    with the same static settings the preflight compiles."""
    from trainer import rollout
    from trainer.data import Problem
    from trainer.tokenizer import TINY, load_tokenizer

    seen: dict = {}

    class Seen(Exception):
        pass

    def fake_generate(*args, **kwargs):
        seen.update(kwargs)
        raise Seen

    monkeypatch.setattr(rollout, "generate", fake_generate)
    cfg = C.load(TINY_PALLAS, [], environ={})
    mesh = programs.make_mesh("1,8,1")
    sampler = rollout.Sampler(programs.tiny_model_config(cfg, 512), load_tokenizer(TINY), mesh)
    problem = Problem(id="0", question="1 + 1?", solution="#### 2", answer="2")
    with pytest.raises(Seen):
        sampler.sample(None, [problem], 8, jax.random.key(0), programs.rollout_settings(cfg))
    assert seen["mesh"] is mesh
    assert seen["settings"] == programs.rollout_settings(cfg)


@pytest.mark.slow
def test_the_update_step_is_compiled_with_the_lockstep_parity_shadow_when_the_config_has_one():
    """The shadow's memory and work are in the preflight's figures: the same update step with and without
    train.shadow_policy_loss_impl (tiny_cpu_pallas.yaml ships with a jax shadow), at 1 and 2 layers."""
    results = {}
    for shadow in ("jax", "none"):
        for layers in (1, 2):
            sets = [*SMALL, f"tiny_model.num_hidden_layers={layers}",
                    f"train.shadow_policy_loss_impl={shadow}"]
            result = preflight.run(C.load(TINY_PALLAS, sets, environ={}), "v6e-8", only=("update_step",))
            assert result["shadow_policy_loss_impl"] == shadow and result["policy_loss_impl"] == "pallas"
            (results[shadow, layers],) = result["functions"]
    on, off = results["jax", 1], results["none", 1]
    # The shadow's head (loss and head-input gradient) is compiled in; temp bytes are not compared: at these
    # shapes XLA's schedule moves them by a few % either way.
    assert on["flops"] > off["flops"]
    # It reuses the main pass's head inputs and head: no second forward pass through the model (the extra
    # work does not grow with depth), no second run of the main provider's kernels.
    extra = {layers: results["jax", layers]["flops"] - results["none", layers]["flops"] for layers in (1, 2)}
    assert extra[2] == extra[1], extra
    assert on["mosaic_kernels"] == off["mosaic_kernels"] >= 2  # main provider: the kernels (fwd, bwd)
