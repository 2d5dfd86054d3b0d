"""The trainer's programs and their inputs: ONE wiring, used by a real run and by the preflight.

train.py builds its mesh, model config, optimizer state, sampler settings and update batch through these
functions with real arrays. trainer/preflight.py calls the same functions for the abstract devices of a
TPU topology, feeds the trainer's own jitted functions `jax.ShapeDtypeStruct`s that carry the run's
shardings, and compiles them ahead of time. So what the preflight sizes is what the run will compile, not
a hand-made copy of it.

The shapes a run compiles are bounded by the config: the sampler's prompt width is the prompt bucket
(`rollout.global_length` rounded up to a power of two, for prompts that fit it), and the update batch's
length is the longest packed row rounded up to `train.seq_bucket`, at most prompt width + max new tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer import grpo, sampler, sharding
from trainer.config import Config, ConfigError, to_dict
from trainer.model import Qwen2Config, init_params
from trainer.sampler import SamplingSettings, bucket_length

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KNOWN_SHAPES = Path(__file__).with_name("model_shapes.json")
STOP_SLOTS = 4  # the sampler pads stop ids to a multiple of 4 (sampler.generate); Qwen has 2 of them


# ---------------------------------------------------------------------------------------------------------
# Mesh and micro-batches.


def make_mesh(mesh_shape: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's mesh over `devices` (default: every device of this job).

    'auto' spans every device (dp over hosts, fsdp over each host's chips); on one host an explicit
    'dp,fsdp,tp' takes the first dp*fsdp*tp devices (e.g. '1,1,1' keeps a tiny CPU run on one device
    even when XLA exposes eight)."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh_shape == "auto" or sharding.process_count(devices) > 1:
        try:
            return sharding.make_mesh(mesh_shape, devices)
        except ValueError as err:
            raise ConfigError("mesh_shape", str(err).removeprefix("mesh_shape: ")) from None
    dp, fsdp, tp = (int(x) for x in mesh_shape.split(","))
    if dp * fsdp * tp > len(devices):
        problem = f"{mesh_shape!r} needs {dp * fsdp * tp} devices, {len(devices)} are present"
        raise ConfigError("mesh_shape", problem)
    return sharding.make_mesh(mesh_shape, devices[: dp * fsdp * tp])


def mesh_processes(mesh: Mesh) -> int:
    return sharding.process_count(list(mesh.devices.flat))


def num_micro_batches(cfg: Config, mesh: Mesh) -> int:
    """Micro-batches per step from micro_batch_size_per_device (wins) or micro_batch_size (global)."""
    rows = cfg.rollout.batch_size * cfg.rollout.n
    divisor = sharding.batch_divisor(mesh)
    if rows % divisor:
        problem = f"batch_size x n = {rows} sequences must split over {divisor} data shards (dp x fsdp)"
        raise ConfigError("rollout.batch_size", problem)
    processes = mesh_processes(mesh)
    if cfg.rollout.batch_size % processes:
        raise ConfigError("rollout.batch_size", f"must be a multiple of the {processes} processes")
    key, micro = "train.micro_batch_size", rows
    if cfg.train.micro_batch_size_per_device is not None:
        key, micro = "train.micro_batch_size_per_device", cfg.train.micro_batch_size_per_device * divisor
    elif cfg.train.micro_batch_size is not None:
        micro = cfg.train.micro_batch_size
    if micro > rows or rows % micro:
        raise ConfigError(key, f"a micro-batch of {micro} sequences does not divide the {rows} of a step")
    return rows // micro


# ---------------------------------------------------------------------------------------------------------
# Model shapes.


def tiny_model_config(cfg: Config, vocab_size: int) -> Qwen2Config:
    """The random-init architecture of `tiny_model` (vocabulary from the tokenizer). Its keys are
    config.json keys, so it goes through the one constructor a pretrained model's config.json goes
    through (Qwen2Config.from_hf): no second mapping of names to keep in step."""
    t = cfg.tiny_model
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError("tiny_model.hidden_size", "must be a multiple of tiny_model.num_attention_heads")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError("tiny_model.num_key_value_heads", "must divide tiny_model.num_attention_heads")
    return Qwen2Config.from_hf({**to_dict(t), "vocab_size": vocab_size})


def known_model_config(model_path: str) -> dict[str, Any] | None:
    """config.json facts of a known hub model (an -Instruct id shares its base model's shapes)."""
    table = json.loads(KNOWN_SHAPES.read_text())
    return table.get(model_path) or table.get(model_path.removesuffix("-Instruct"))


def pretrained_model_config(model_path: str) -> tuple[Qwen2Config, str]:
    """(model config, where it came from) without downloading anything: a local folder's config.json, the
    Hugging Face cache's, or the table of known shapes shipped with the trainer."""
    hf: dict[str, Any] | None = None
    source = ""
    local = Path(model_path).expanduser()
    if (local / "config.json").is_file():
        hf, source = json.loads((local / "config.json").read_text()), str(local / "config.json")
    elif model_path.count("/") == 1 and not local.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # an unusable cache is the same as no cache here
            cached = None
        if isinstance(cached, str):
            hf, source = json.loads(Path(cached).read_text()), "the Hugging Face cache"
    if hf is None:
        hf, source = known_model_config(model_path), f"the known shapes in {KNOWN_SHAPES.name}"
    if hf is None:
        problem = "no config.json in that folder or the Hugging Face cache, and not a known model"
        raise ConfigError("model_path", f"{model_path!r}: {problem}")
    try:
        return Qwen2Config.from_hf(hf), source
    except (KeyError, ValueError) as err:
        raise ConfigError("model_path", f"{model_path!r}: unusable Qwen2 config.json ({err})") from None


def abstract_params(model_cfg: Qwen2Config, mesh: Mesh, dtype: Any) -> Any:
    """The params pytree as ShapeDtypeStructs carrying the run's shardings (no memory allocated)."""
    shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), dtype))
    shardings = sharding.param_shardings(shapes, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# ---------------------------------------------------------------------------------------------------------
# Optimizer state, created sharded.


def optimizer_init(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """`optimizer.init` jitted to create its state already split like the params.

    A plain `jax.jit(optimizer.init)` leaves GSPMD free to place the zeros anywhere: it put the whole Lion
    state (11.5 GiB for 3B) on one chip, and the first update kept both copies alive."""
    state = jax.eval_shape(optimizer.init, params)
    return jax.jit(optimizer.init, out_shardings=sharding.param_shardings(state, mesh))


def abstract_optimizer_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    state = jax.eval_shape(optimizer.init, params)
    shardings = sharding.param_shardings(state, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)


# ---------------------------------------------------------------------------------------------------------
# Sampling settings and shapes.


def rollout_settings(cfg: Config) -> SamplingSettings:
    """Training rollouts and the periodic eval: the one place the config's sampling keys are read."""
    r, dtype = cfg.rollout, DTYPES[cfg.compute_dtype]
    return SamplingSettings(
        max_new_tokens=r.max_length_sample, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        prompt_bucket=r.global_length, dtype=dtype,  # the KV cache follows the compute dtype
    )


def sweep_settings(cfg: Config) -> SamplingSettings:
    """The full greedy sweep (train.sweep runs it; the preflight compiles it)."""
    return rollout_settings(cfg).greedy()


def prompt_width(s: SamplingSettings) -> int:
    """The sampler's prompt width for prompts that fit the bucket (rollout.Sampler.sample pads to it)."""
    return bucket_length(s.prompt_bucket, s.prompt_bucket)


def sampler_rows(prompts: int, n: int, mesh: Mesh) -> int:
    """Rows the sampler runs: prompts x n, padded up to the mesh's batch divisor (Sampler.sample does)."""
    rows = prompts * n
    return rows + (-rows % sharding.batch_divisor(mesh))


def worst_case_seq_len(cfg: Config) -> int:
    """The longest update batch a run can build: prompt width + every new token, rounded up to the bucket."""
    s = rollout_settings(cfg)
    return grpo.round_up(prompt_width(s) + s.max_new_tokens, cfg.train.seq_bucket)


# ---------------------------------------------------------------------------------------------------------
# Abstract inputs of the jitted programs.


def _replicated(mesh: Mesh, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def batch_spec(cfg: Config, rows: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of the update batch train.training_batch builds (a test keeps them equal)."""
    two_d = (rows, seq_len)
    spec: dict[str, tuple[tuple[int, ...], Any]] = {
        "tokens": (two_d, jnp.int32),
        "positions": (two_d, jnp.int32),
        "attn_mask": (two_d, jnp.bool_),
        "targets": (two_d, jnp.int32),
        "loss_mask": (two_d, jnp.float32),
        "rewards": ((rows,), jnp.float32),
        "sample_logp": (two_d, jnp.float32),
    }
    if cfg.train.ppo_epochs > 1:
        spec["old_logp"] = (two_d, jnp.float32)
    return spec


def abstract_batch(cfg: Config, mesh: Mesh, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    rows = cfg.rollout.batch_size * cfg.rollout.n
    split = sharding.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
        for k, (shape, dtype) in batch_spec(cfg, rows, seq_len).items()
    }


def abstract_sampler_args(
    model_cfg: Qwen2Config, mesh: Mesh, params: Any, rows: int, settings: SamplingSettings
) -> tuple[Any, ...]:
    """The positional arguments of sampler._generate for `rows` prompts at the bucket's width."""
    width = prompt_width(settings)
    split = sharding.batch_sharding(mesh)
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    return (
        params,
        model_cfg,
        jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=split),
        jax.ShapeDtypeStruct((rows, width), jnp.bool_, sharding=split),
        _replicated(mesh, (), key_dtype),
        _replicated(mesh, (STOP_SLOTS,), jnp.int32),
        _replicated(mesh, (), jnp.int32),
        settings,
        mesh,
    )


def abstract_lr(mesh: Mesh) -> jax.ShapeDtypeStruct:
    return _replicated(mesh, (), jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# The sampler's two halves, compiled alone: the preflight's decode-step and prefill figures.

# The very functions the sampler's jitted program runs (its prefill, then its while-loop body), jitted
# alone. The decode step donates its state, as the loop updates its carry in place.
SAMPLER_STATIC = ("cfg", "settings", "mesh")
prefill_program = jax.jit(sampler.prefill, static_argnames=SAMPLER_STATIC)
decode_step_program = jax.jit(sampler.decode_step, static_argnames=SAMPLER_STATIC, donate_argnames=("state",))


def abstract_decode_args(
    model_cfg: Qwen2Config, mesh: Mesh, params: Any, rows: int, settings: SamplingSettings
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(prefill args, decode-step args) as the sampler's program passes them: the weights as
    `sampler.decode_params` casts and lays them out, the loop state with the shardings the sampler pins
    it to."""
    s = settings
    p, cfg, tokens, mask, rng, stop, pad, *_ = abstract_sampler_args(model_cfg, mesh, params, rows, settings)
    cast = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, s.dtype, sharding=sh), p,
        sampler.decode_param_shardings(p, mesh),
    )
    state = jax.eval_shape(
        lambda w, *a: sampler.prefill(w, cfg, *a, s, None), cast, tokens, mask, rng, stop, pad
    )
    shardings = sampler.state_shardings(state, mesh)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, shardings)
    return (cast, cfg, tokens, mask, rng, stop, pad, s, mesh), (cast, cfg, state, rng, stop, pad, s, mesh)
