"""The trainer's configuration: every key declared once here, typed, defaulted and validated.

A run's config is: defaults <- YAML file <- `--set key=value` overrides <- the seed's env flags
(`EVAL_FULL_SWEEP=1`, `PRINT_TRAIN_TIME_BREAKDOWN=1`). Unknown keys and bad values raise `ConfigError`
naming the dotted key; `python -m trainer` turns that into one line on stderr and exit code 2.
docs/trainer-config.md documents every key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from grpoctl_contract.envflags import ENV_FLAGS  # the seed's env flags -> the config keys they set

PolicyLossImpl = Literal["jax", "chunked", "pallas"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]
AdvantageScaling = Literal["group", "batch", "none"]
DType = Literal["float32", "bfloat16"]


class ConfigError(Exception):
    """A bad config: `str(err)` is one line that names the offending key. Exit code 2."""

    exit_code = 2

    def __init__(self, key: str, problem: str):
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["naive"] = "naive"  # the jitted KV-cache sampler (trainer/sampler.py)
    batch_size: int = 16  # prompts per step, global (all processes)
    n: int = 8  # completions per prompt (the GRPO group)
    global_length: int = 512  # prompt bucket: prompts are left-padded to a multiple of this
    max_length_sample: int = 1024  # decode budget (new tokens per completion)
    temperature: float = 1.0
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1.0 = off


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int | None = None  # sequences per micro-batch, global
    micro_batch_size_per_device: int | None = None  # wins over micro_batch_size when set
    ppo_epochs: int = 1  # optimizer steps per rollout; old log-probs are kept across them
    beta: float = 0.0  # KL (k3) weight against the frozen initial policy; 0 loads no reference model
    policy_loss_impl: PolicyLossImpl = "jax"  # per-token log-prob provider (trainer/kernels)
    kernel_blocks: dict[str, int] = field(default_factory=dict)  # passed to token_logprobs(**blocks)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.3
    loss_aggregation: LossAggregation = "token_mean"
    advantage_scaling: AdvantageScaling = "group"
    seq_bucket: int = 128  # training tensors are trimmed to a multiple of this above the longest sequence
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["lion", "adamw"] = "lion"
    lr: float = 1e-6  # peak learning rate
    warmup_frac: float = 0.05  # linear warmup over this fraction of the optimizer steps
    end_lr: float = 0.0  # cosine decay ends here
    weight_decay: float = 1e-8
    clip_norm: float = 1.0  # clip by global norm; 0 = off
    b1: float = 0.9
    b2: float = 0.99  # lion's default; AdamW users usually want 0.999


@dataclass(frozen=True)
class DataConfig:
    # "openai/gsm8k" (hub, config main), "builtin" (offline generator), or a local .jsonl/.parquet file,
    # a folder holding <split>.jsonl, or a path containing "{split}" (see trainer/data.py).
    source: str = "openai/gsm8k"
    train_split: str = "train"
    train_size: int | None = None  # truncate the train split (builtin: how many to generate)
    difficulty: int = 1  # builtin generator level, 1 (one single-digit + or -) to 4


@dataclass(frozen=True)
class TinyModelConfig:
    """The architecture used when `model_init: random` (vocab size comes from the tokenizer)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 1e6


@dataclass(frozen=True)
class WarmStartConfig:
    """Supervised steps on ideal completions before GRPO (random init only; trainer/warm_start.py)."""

    steps: int = 0  # 0 = off
    lr: float = 3e-3  # peak AdamW learning rate, cosine decay to 0
    batch_size: int = 32  # examples per step, global


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # local folder or gs://...; default <run_dir>/checkpoints
    every_steps: int = 0  # also save every N steps (0 = only at the end)
    keep: int = 2  # checkpoints kept


@dataclass(frozen=True)
class Config:
    model_path: str = "Qwen/Qwen2.5-3B-Instruct"  # hub id or local folder (HF safetensors)
    model_init: Literal["pretrained", "random"] = "pretrained"
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    tokenizer_path: str | None = None  # default: model_path; "tiny": the project's offline tokenizer
    param_dtype: DType = "float32"
    compute_dtype: DType = "bfloat16"
    steps: int = 100
    seed: int = 0
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    mesh_shape: str = "auto"  # "auto" (dp over hosts, fsdp over local chips) or "dp,fsdp,tp"
    wandb_project: str = "grpoctl"
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    wandb_name: str | None = None
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.5])  # correct, format, tags
    reward_grader: Literal["strict", "lenient"] = "strict"  # correctness grader (trainer/rewards.py)
    baseline_every_steps: int = 0  # every N steps also score the frozen start policy on the step's prompts
    eval_every_steps: int = 10  # 0 = no periodic eval
    eval_batches_per_process: int = 1  # periodic eval: batches of rollout.batch_size prompts x n
    eval_split: str = "test"
    eval_full_sweep: bool = False  # greedy pass@1 over the whole eval split after training
    eval_full_at_start: bool = True  # with eval_full_sweep: the same sweep before the first GRPO step
    eval_full_limit: int = 0  # questions in the full sweep (0 = the whole split)
    eval_full_batch_size: int = 64  # prompts per greedy batch in the full sweep
    print_time_breakdown: bool = False


# ---------------------------------------------------------------------------------------------------------
# Building a Config from plain data, with the key named on every error.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
            tp, tp.__name__
        )
    return str(tp).replace("typing.", "")


def _float_or_none(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where asked)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as text
        parsed = _float_or_none(value)
        if parsed is None:
            raise ConfigError(key, f"expected a number, got {value!r}")
        value = parsed
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}", f"unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()})


def validate(cfg: Config) -> Config:
    """Range and consistency checks that types alone cannot express."""
    positive = {
        "steps": cfg.steps,
        "rollout.batch_size": cfg.rollout.batch_size,
        "rollout.n": cfg.rollout.n,
        "rollout.global_length": cfg.rollout.global_length,
        "rollout.max_length_sample": cfg.rollout.max_length_sample,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.micro_batch_size_per_device": cfg.train.micro_batch_size_per_device,
        "train.ppo_epochs": cfg.train.ppo_epochs,
        "train.seq_bucket": cfg.train.seq_bucket,
        "optimizer.lr": cfg.optimizer.lr,
        "eval_batches_per_process": cfg.eval_batches_per_process,
        "eval_full_batch_size": cfg.eval_full_batch_size,
        "checkpoint.keep": cfg.checkpoint.keep,
        "data.train_size": cfg.data.train_size,
        "warm_start.lr": cfg.warm_start.lr,
        "warm_start.batch_size": cfg.warm_start.batch_size,
    }
    for key, v in positive.items():
        if v is not None and v <= 0:
            raise ConfigError(key, f"must be > 0, got {v}")
    non_negative = {
        "train.beta": cfg.train.beta,
        "train.clip_eps_low": cfg.train.clip_eps_low,
        "train.clip_eps_high": cfg.train.clip_eps_high,
        "rollout.temperature": cfg.rollout.temperature,
        "rollout.top_k": cfg.rollout.top_k,
        "optimizer.end_lr": cfg.optimizer.end_lr,
        "optimizer.weight_decay": cfg.optimizer.weight_decay,
        "optimizer.clip_norm": cfg.optimizer.clip_norm,
        "eval_every_steps": cfg.eval_every_steps,
        "eval_full_limit": cfg.eval_full_limit,
        "baseline_every_steps": cfg.baseline_every_steps,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "warm_start.steps": cfg.warm_start.steps,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(key, f"must be >= 0, got {v}")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError("rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.temperature == 0.0:
        raise ConfigError("rollout.temperature", "must be > 0 for training rollouts (eval uses greedy)")
    if cfg.train.clip_eps_low >= 1.0:
        raise ConfigError("train.clip_eps_low", f"must be < 1, got {cfg.train.clip_eps_low}")
    if not 0.0 <= cfg.optimizer.warmup_frac < 1.0:
        raise ConfigError("optimizer.warmup_frac", f"must be in [0, 1), got {cfg.optimizer.warmup_frac}")
    if cfg.mesh_shape != "auto":
        parts = cfg.mesh_shape.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            problem = f"expected 'auto' or 'dp,fsdp,tp' (e.g. 1,8,1), got {cfg.mesh_shape!r}"
            raise ConfigError("mesh_shape", problem)
    if cfg.warm_start.steps and cfg.model_init != "random":
        raise ConfigError("warm_start.steps", "only for model_init: random (a pretrained model starts warm)")
    if cfg.warm_start.steps and cfg.train.beta > 0:  # the KL reference would be the random init on resume
        raise ConfigError("warm_start.steps", "not supported with train.beta > 0 (set one of them to 0)")
    if not cfg.data.source.strip():
        raise ConfigError("data.source", "must not be empty")
    if cfg.data.difficulty not in (1, 2, 3, 4):
        raise ConfigError("data.difficulty", f"must be 1, 2, 3 or 4, got {cfg.data.difficulty}")
    if len(cfg.reward_weights) != 3:
        problem = f"expected 3 weights (correct, format, tag count), got {cfg.reward_weights}"
        raise ConfigError("reward_weights", problem)
    try:  # the tile sizes the loss kernels accept (trainer/kernels/types.py; imports jax, hence here)
        from trainer.kernels.types import KernelBlocks

        KernelBlocks(**cfg.train.kernel_blocks)
    except (TypeError, ValueError) as err:
        raise ConfigError("train.kernel_blocks", str(err)) from None
    return cfg


def from_dict(data: Mapping[str, Any]) -> Config:
    return validate(_build(Config, data))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    """A short stable hash of the effective config (goes into summary.json)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# Sources: YAML file, --set overrides, env flags.


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a YAML scalar: 1e-6, true, null, [1, 2], text)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(item, "an override must look like key=value (dotted keys for sections)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text; the type check names the key if a string is wrong here
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[: i + 1]), "is not a section; cannot set a key inside it")
            node = child
        node[path[-1]] = value
    return data


def apply_env_flags(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The seed's env flags switch their config fields on (they never switch them off)."""
    out = dict(data)
    for env, key in ENV_FLAGS.items():
        if environ.get(env, "").strip().lower() in ("1", "true", "yes"):
            out[key] = True
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("--config", f"{p} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The effective config of a run: defaults <- YAML <- overrides <- env flags."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    data = apply_env_flags(data, os.environ if environ is None else environ)
    return from_dict(data)


def replace(cfg: Config, *overrides: str) -> Config:
    """A copy of `cfg` with `key=value` overrides applied (handy in tests and scripts)."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))
