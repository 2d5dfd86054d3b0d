"""The trainer's configuration: every key declared once here, typed, defaulted and validated.

A run's config is: defaults <- YAML file <- `--set key=value` overrides <- the seed's env flags
(`EVAL_FULL_SWEEP=1`, `PRINT_TRAIN_TIME_BREAKDOWN=1`), read from the environment AFTER the worker's
`.env` was loaded into it (`load_dotenv`, which `python -m trainer` calls first). Types are checked by
pydantic (strict: 1.5 is no integer, "yes" no boolean), bounds by `Field`, the rest by `validate`. Unknown
keys and bad values raise `ConfigError` naming the dotted key; `python -m trainer` turns that into one
line on stderr and exit code 2. docs/trainer-config.md documents every key.

No jax here: the laptop (orchestrator/validate.py) checks a run's config and `--set` keys with this same
schema before anything remote happens, on an install without the trainer extra.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from grpoctl_contract import envfile
from grpoctl_contract.envflags import ENV_FLAGS  # the seed's env flags -> the config keys they set
from trainer.kernel_blocks import KernelBlocks  # jax-free, like this whole module (the laptop uses it)

PolicyLossImpl = Literal["jax", "chunked", "pallas"]
ShadowImpl = Literal["jax", "chunked", "pallas", "none"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]
AdvantageScaling = Literal["group", "batch", "none"]
DType = Literal["float32", "bfloat16"]
# What a remat'd layer keeps for the backward pass (trainer/model.py REMAT_POLICIES, BENCHMARKS.md).
RematPolicy = Literal[
    "nothing_saveable", "dots_with_no_batch_dims_saveable", "save_attention", "offload_dots_to_host"
]


class ConfigError(Exception):
    """A bad config: `str(err)` is one line that names the offending key. Exit code 2."""

    exit_code = 2

    def __init__(self, key: str, problem: str):
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


def _number_from_text(value: Any) -> Any:
    """PyYAML reads 1e-6 (no dot) as text: a finite number written as text is that number; anything else
    is left for the strict float check to reject with the key's name."""
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return value
        return parsed if math.isfinite(parsed) else value
    return value


# A float key: strict (no bools, no free text), ints widened, YAML's dotless exponents read as numbers.
Number = Annotated[float, BeforeValidator(_number_from_text)]


class Section(BaseModel):
    """A block of keys: typed strictly (1.5 is no int, "yes" no bool), unknown keys refused, immutable
    and hashable (optimizer_for caches on its section)."""

    # protected_namespaces: `model_path` and `model_init` are keys here, not pydantic's model_* API
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, protected_namespaces=())


class RolloutConfig(Section):
    backend: Literal["naive"] = "naive"  # the jitted KV-cache sampler (trainer/sampler.py)
    batch_size: int = Field(16, gt=0)  # prompts per step, global (all processes)
    n: int = Field(8, gt=0)  # completions per prompt (the GRPO group)
    global_length: int = Field(512, gt=0)  # prompt bucket: prompts are left-padded to a power of 2 >= this
    max_length_sample: int = Field(1024, gt=0)  # decode budget (new tokens per completion)
    temperature: Number = Field(1.0, ge=0)  # and > 0 (validate): only the full sweep decodes greedily
    top_k: int = Field(50, ge=0)  # 0 = off
    top_p: Number = 1.0  # 1.0 = off


class TrainConfig(Section):
    micro_batch_size: int | None = Field(None, gt=0)  # sequences per micro-batch, global
    micro_batch_size_per_device: int | None = Field(None, gt=0)  # wins over micro_batch_size when set
    ppo_epochs: int = Field(1, gt=0)  # optimizer steps per rollout; old log-probs are kept across them
    beta: Number = Field(0.0, ge=0)  # KL (k3) weight against the frozen initial policy; 0 loads no reference
    policy_loss_impl: PolicyLossImpl = "jax"  # per-token log-prob provider (trainer/kernels)
    # Lockstep parity: every GRPO step also runs this provider on the same batch and parameters and logs
    # train/parity/* (its difference from policy_loss_impl); it never touches the update. none = off.
    shadow_policy_loss_impl: ShadowImpl = "none"
    kernel_blocks: dict[str, int] = {}  # passed to token_logprobs(**blocks)
    clip_eps_low: Number = Field(0.2, ge=0)
    clip_eps_high: Number = Field(0.3, ge=0)
    loss_aggregation: LossAggregation = "token_mean"
    advantage_scaling: AdvantageScaling = "group"
    seq_bucket: int = Field(128, gt=0)  # training tensors are trimmed to a multiple of this above the longest
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    remat_policy: RematPolicy = "nothing_saveable"  # with remat: what each layer keeps instead


class OptimizerConfig(Section):
    name: Literal["lion", "adamw"] = "lion"
    lr: Number = Field(1e-6, gt=0)  # peak learning rate
    warmup_frac: Number = 0.05  # linear warmup over this fraction of the optimizer steps
    end_lr: Number = Field(0.0, ge=0)  # cosine decay ends here
    weight_decay: Number = Field(1e-8, ge=0)
    clip_norm: Number = Field(1.0, ge=0)  # clip by global norm; 0 = off
    b1: Number = 0.9
    b2: Number = 0.99  # lion's default; AdamW users usually want 0.999


class DataConfig(Section):
    # "openai/gsm8k" (hub, config main), "builtin" (offline generator), or a local .jsonl/.parquet file,
    # a folder holding <split>.jsonl, or a path containing "{split}" (see trainer/data.py).
    source: str = "openai/gsm8k"
    train_split: str = "train"
    train_size: int | None = Field(None, gt=0)  # truncate the train split (builtin: how many to generate)
    difficulty: int = 1  # builtin generator level, 1 (one single-digit + or -) to 4


class TinyModelConfig(Section):
    """The architecture used when `model_init: random` (vocab size comes from the tokenizer). The keys are
    Hugging Face config.json keys: the model config is built from them by the constructor that reads a
    pretrained model's config.json (Qwen2Config.from_hf)."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    tie_word_embeddings: bool = True
    rope_theta: Number = Field(1e6, gt=0)


class WarmStartConfig(Section):
    """Supervised steps on ideal completions before GRPO (random init only; trainer/warm_start.py)."""

    steps: int = Field(0, ge=0)  # 0 = off
    lr: Number = Field(3e-3, gt=0)  # peak AdamW learning rate, cosine decay to 0
    batch_size: int = Field(32, gt=0)  # examples per step, global


class CheckpointConfig(Section):
    dir: str | None = None  # local folder or gs://...; default <run_dir>/checkpoints
    every_steps: int = Field(0, ge=0)  # also save every N steps (0 = only at the end)
    keep: int = Field(2, gt=0)  # checkpoints kept


class Config(Section):
    model_path: str = "Qwen/Qwen2.5-3B-Instruct"  # hub id or local folder (HF safetensors)
    model_init: Literal["pretrained", "random"] = "pretrained"
    tiny_model: TinyModelConfig = TinyModelConfig()
    tokenizer_path: str | None = None  # default: model_path; "tiny": the project's offline tokenizer
    param_dtype: DType = "float32"
    compute_dtype: DType = "bfloat16"
    steps: int = Field(100, gt=0)
    seed: int = 0
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    # JAX's persistent compilation cache (trainer/checkpoints.py, compile_cache_dir): a relaunch, or the next
    # run with the same shapes, loads its programs instead of compiling them. null = beside the checkpoints
    # (`<checkpoint.dir>/compile_cache`, else `DIR/../.compile_cache`); a folder or gs://...; false = none.
    compile_cache_dir: str | Literal[False] | None = None
    warm_start: WarmStartConfig = WarmStartConfig()
    mesh_shape: str = "auto"  # "auto" (dp over hosts, fsdp over local chips) or "dp,fsdp,tp"
    wandb_project: str = "grpoctl"
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    wandb_name: str | None = None
    reward_weights: list[Number] = [1.0, 0.5, 0.5]  # correct, format, tags
    reward_grader: Literal["strict", "lenient"] = "strict"  # correctness grader (trainer/rewards.py)
    baseline_every_steps: int = Field(0, ge=0)  # every N steps also score the frozen start policy
    eval_every_steps: int = Field(10, ge=0)  # 0 = no periodic eval
    eval_batches_per_process: int = Field(1, gt=0)  # periodic eval: batches of rollout.batch_size x n
    eval_split: str = "test"
    eval_full_sweep: bool = False  # greedy pass@1 over the whole eval split after training
    eval_full_at_start: bool = True  # with eval_full_sweep: the same sweep before the first GRPO step
    eval_full_limit: int = Field(0, ge=0)  # questions in the full sweep (0 = the whole split)
    eval_full_batch_size: int = Field(64, gt=0)  # prompts per greedy batch in the full sweep
    # with eval_full_sweep: each question also sampled rollout.n times at the rollout's settings, in batches
    # of rollout.batch_size (the training rollout's own program) with keys fixed per batch, the same at the
    # start and the end: eval_full/sampled_accuracy, the pass rate of the objective GRPO optimises
    eval_full_sampled: bool = False
    print_time_breakdown: bool = False


# ---------------------------------------------------------------------------------------------------------
# Building a Config from plain data: pydantic checks it, and its first error becomes one line naming the
# dotted key in the words the trainer always used ("expected a number, got 'high'").


def _unwrap(tp: Any) -> Any:
    """`X | None` -> X and Annotated[X, ...] -> X: the type a value's message talks about."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp
            tp = inner[0]
        else:
            return tp


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        return names.get(tp, tp.__name__)
    return str(tp).replace("typing.", "")


def _located(loc: tuple[str | int, ...]) -> tuple[str, Any, Any]:
    """(dotted key, the annotation at `loc` or None for an unknown key, the section that holds it)."""
    key, tp, parent = "", Config, Config
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            key, tp = f"{key}[{part}]", typing.get_args(tp)[0]
            continue
        key = f"{key}.{part}" if key else part
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent, field = tp, tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            tp = None
    return key, (None if tp is None else _unwrap(tp)), parent


def _problem(error: Mapping[str, Any], tp: Any, parent: Any) -> str:
    kind, got = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        known = sorted(parent.model_fields)
        guess = did_you_mean(".".join(str(p) for p in error["loc"]))
        hint = f"did you mean {guess!r}? " if guess else ""
        return f"unknown key ({hint}known: {', '.join(known)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
        op = ops[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound:g}, got {got}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"expected a mapping of {tp.__name__} keys, got {got!r}"
    if typing.get_origin(tp) is Literal:
        return f"expected one of {_type_name(tp)}, got {got!r}"
    if typing.get_origin(tp) is list:
        return f"expected a list, got {got!r}"
    if typing.get_origin(tp) is dict:
        return f"expected a mapping, got {got!r}"
    if tp is None:
        return str(error.get("msg", "invalid value"))
    return f"expected {_type_name(tp)}, got {got!r}"


def dotted_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every settable key, dotted (`train.policy_loss_impl`); sections themselves are not listed."""
    out = []
    for name, field in model.model_fields.items():
        tp = _unwrap(field.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out += dotted_keys(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def did_you_mean(key: str) -> str | None:
    """The known key closest to a misspelt or misplaced one: `train.polcy_loss_impl` ->
    `train.policy_loss_impl`, `train.num_steps` -> `steps`."""
    keys = dotted_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, str] = {}
    for k in sorted(keys, key=lambda k: k.count(".")):  # a top-level key before a section's namesake
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[close[0]] if close else None


def _build(data: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(dict(data))
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        key, tp, parent = _located(tuple(first["loc"]))
        raise ConfigError(key or "config", _problem(first, tp, parent)) from None


def validate(cfg: Config) -> Config:
    """Consistency checks across keys, and ranges whose message says more than a bound."""
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
    try:  # the tile sizes the loss kernels accept
        KernelBlocks(**cfg.train.kernel_blocks)
    except (TypeError, ValueError) as err:
        raise ConfigError("train.kernel_blocks", str(err)) from None
    return cfg


def from_dict(data: Mapping[str, Any]) -> Config:
    return validate(_build(data))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain data (config.json, the W&B run config, the hash)."""
    return cfg.model_dump(mode="python")


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


def load_dotenv(path: str | os.PathLike[str] = ".env") -> list[str]:
    """KEY=VALUE lines into os.environ without overriding what is set; returns the names (never values).

    Called before the config is built: the env flags a `.env` holds (EVAL_FULL_SWEEP=1) must count, and
    its secrets (WANDB_API_KEY, HF_TOKEN) only ever reach the environment, never the config. Parsed by
    grpoctl_contract.envfile, the parser `grpoctl env push` verified the file with."""
    try:
        values = envfile.read(path)
    except envfile.EnvFileError as err:
        raise ConfigError("env", str(err)) from None
    names = []
    for key, value in values.items():
        if key not in os.environ:
            os.environ[key] = value
            names.append(key)
    return names


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
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
