"""Trainer config: YAML + overrides + env flags, errors that name the key, and the shipped configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import config as C

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_every_key_as_written(path):
    cfg = C.load(path, environ={})
    raw = C.read_yaml(path)
    loaded = C.to_dict(cfg)
    for dotted, value in _leaves(raw):
        got = loaded
        for part in dotted.split("."):
            assert isinstance(got, dict) and part in got, f"{path.name}: {dotted} is not a config key"
            got = got[part]
        if isinstance(value, list | tuple):
            value, got = list(value), list(got)
        assert got == value, f"{path.name}: {dotted} is {got!r} after loading, {value!r} in the file"
    assert C.from_dict(loaded) == cfg  # the effective config round-trips and validates
    assert C.config_hash(C.from_dict(loaded)) == C.config_hash(cfg)


def _leaves(data: dict, prefix: str = ""):  # type: ignore[no-untyped-def]
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


PALLAS_PAIRS = [p for p in CONFIGS if p.stem.endswith("_pallas")]


@pytest.mark.parametrize("pallas", PALLAS_PAIRS, ids=[p.name for p in PALLAS_PAIRS])
def test_each_pallas_config_differs_from_its_baseline_only_in_the_loss_impl_and_its_parity_shadow(pallas):
    """The shadow provider only watches (tests/test_parity.py: the update is the same with or without it)."""
    base = C.load(pallas.with_name(pallas.name.replace("_pallas", "")), environ={})
    other = C.load(pallas, environ={})
    assert base.train.policy_loss_impl == "jax" and other.train.policy_loss_impl == "pallas"
    assert base.train.shadow_policy_loss_impl == "none" and other.train.shadow_policy_loss_impl == "jax"
    assert C.replace(other, "train.policy_loss_impl=jax", "train.shadow_policy_loss_impl=none") == base


def test_reference_configs_hold_the_reference_recipe_and_differ_only_in_the_loss_impl():
    jax_cfg = C.load(ROOT / "configs/grpo_gsm8k_qwen25_3b_bs128_steps100.yaml", environ={})
    pallas_cfg = C.load(ROOT / "configs/grpo_gsm8k_qwen25_3b_bs128_steps100_pallas.yaml", environ={})
    assert jax_cfg.model_path == "Qwen/Qwen2.5-3B-Instruct" and jax_cfg.steps == 100
    assert (jax_cfg.rollout.batch_size, jax_cfg.rollout.n, jax_cfg.rollout.top_k) == (16, 8, 50)
    assert jax_cfg.train.micro_batch_size_per_device == 4 and jax_cfg.train.beta == 0.0
    o = jax_cfg.optimizer
    got = (o.name, o.lr, o.warmup_frac, o.end_lr, o.weight_decay, o.clip_norm)
    assert got == ("lion", 1e-6, 0.05, 0.0, 1e-8, 1.0)
    assert (jax_cfg.train.clip_eps_low, jax_cfg.train.clip_eps_high) == (0.2, 0.3)
    assert jax_cfg.reward_weights == [1.0, 0.5, 0.5]
    assert jax_cfg.train.policy_loss_impl == "jax" and pallas_cfg.train.policy_loss_impl == "pallas"
    as_jax = C.replace(pallas_cfg, "train.policy_loss_impl=jax", "train.shadow_policy_loss_impl=none")
    assert as_jax == jax_cfg


def test_overrides_are_yaml_scalars_on_dotted_keys():
    overrides = [
        "optimizer.lr=1e-6", "train.beta=0.04", "wandb_name=null", "steps=7", "reward_weights=[1, 0, 0]",
        "eval_full_sweep=true", "train.kernel_blocks={block_tokens: 256}",
    ]
    cfg = C.load(None, overrides, environ={})
    assert cfg.optimizer.lr == 1e-6 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.beta == 0.04 and cfg.wandb_name is None and cfg.steps == 7
    assert cfg.reward_weights == [1.0, 0.0, 0.0] and cfg.eval_full_sweep is True
    assert cfg.train.kernel_blocks == {"block_tokens": 256}


def test_env_flags_switch_on_their_config_fields():
    cfg = C.load(None, environ={"EVAL_FULL_SWEEP": "1", "PRINT_TRAIN_TIME_BREAKDOWN": "1"})
    assert cfg.eval_full_sweep and cfg.print_time_breakdown
    assert not C.load(None, environ={"EVAL_FULL_SWEEP": "0"}).eval_full_sweep


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.betta=0.1"], "train.betta"),
        (["nonsense=1"], "nonsense"),
        (["train.beta=abc"], "train.beta"),
        (["steps=1.5"], "steps"),
        (["steps=0"], "steps"),
        (["train.policy_loss_impl=triton"], "train.policy_loss_impl"),
        (["rollout.top_p=1.5"], "rollout.top_p"),
        (["mesh_shape=8"], "mesh_shape"),
        (["eval_full_sweep=maybe"], "eval_full_sweep"),
        (["reward_weights=[1, 2]"], "reward_weights"),
        (["reward_weights=[1, x, 2]"], "reward_weights[1]"),
        (["rollout=3"], "rollout"),
        (["steps.x=3"], "steps"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, overrides, environ={})
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"config error: {key}:") and "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="file not found"):
        C.load(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad, environ={})
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  micro_batch_size: big\n")
    with pytest.raises(C.ConfigError, match=r"^config error: train\.micro_batch_size: expected an integer"):
        C.load(nested, environ={})


def test_config_hash_is_stable_and_sensitive():
    a, b = C.load(None, environ={}), C.load(None, environ={})
    assert C.config_hash(a) == C.config_hash(b)
    assert C.config_hash(C.replace(a, "seed=1")) != C.config_hash(a)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "configs/tiny_cpu.yaml", "--run-dir", "X", "--set", "train.nope=1"], "train.nope"),
        (["--config", "configs/tiny_cpu.yaml", "--run-dir", "X", "--set", "train.beta=high"], "train.beta"),
        (["--config", "missing.yaml", "--run-dir", "X"], "--config"),
    ],
)
def test_cli_rejects_bad_config_with_one_line_and_exit_2(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (ROOT / "X").exists()


def _leaf_keys(cls: type[C.Section], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        tp = field.annotation
        nested = isinstance(tp, type) and issubclass(tp, C.Section)
        out += _leaf_keys(tp, f"{prefix}{name}.") if nested else [prefix + name]
    return out


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "trainer-config.md").read_text()
    missing = [k for k in _leaf_keys(C.Config) if f"`{k}`" not in doc and f"`{k.split('.')[-1]}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"


def test_the_rollout_keys_reach_the_sampler_as_one_settings_object():
    """Config -> programs.rollout_settings -> the SamplingSettings the sampler runs, each key with its own
    value; the sweep differs only by greedy decoding; and the sampler's defaults are the config's."""
    import jax.numpy as jnp

    from trainer import programs
    from trainer.sampler import SamplingSettings

    sets = ["rollout.max_length_sample=33", "rollout.global_length=65", "rollout.temperature=0.5",
            "rollout.top_k=7", "rollout.top_p=0.9", "compute_dtype=float32"]
    s = programs.rollout_settings(C.load(None, sets, environ={}))
    assert (s.max_new_tokens, s.prompt_bucket, s.temperature, s.top_k, s.top_p) == (33, 65, 0.5, 7, 0.9)
    assert s.dtype == s.cache_dtype == jnp.float32
    greedy = programs.sweep_settings(C.load(None, sets, environ={}))
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, 0, 1.0)
    assert (greedy.max_new_tokens, greedy.prompt_bucket, greedy.dtype) == (33, 65, jnp.float32)
    assert programs.rollout_settings(C.load(None, environ={})) == SamplingSettings()
