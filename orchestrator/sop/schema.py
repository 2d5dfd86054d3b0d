"""The SOP file model: a procedure as data (YAML), parsed and checked into typed steps.

```yaml
name: local_pallas_vs_jax
target: local                      # default target of every step (a step may name its own)
targets: {}                        # inline target definitions; grpoctl.yaml's targets of the same name win
summary_keys: [eval_full/accuracy, ...]
steps:
  - up
  - sync
  - env_push: {optional: true}
  - run: {name: jax, config: configs/tiny_cpu.yaml, env: {EVAL_FULL_SWEEP: "1"}, secrets: [WANDB_API_KEY]}
  - run: {name: pallas, config: configs/tiny_cpu_pallas.yaml, seeds: [0, 1, 2]}
  - fetch
  - compare: {a: jax, b: pallas, plot: true}
  - down
```

A run step with `seeds: [0, 1, 2]` is one run per seed, named `<name>/s<seed>` (step ids `run:pallas/s0`,
...), each with the trainer's `seed` set, run one after another on the step's target; each is resumable like
any run step. Later steps name the whole group (`pallas`: compare takes the group as one arm) or one seed's
run (`pallas/s1`).

A file that does not parse is one UsageError line naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator import compare as cmp
from orchestrator.config import TargetConfig, read_text_utf8, safe_yaml
from orchestrator.errors import UsageError


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str | None = None  # default: the kind, or `run:<name>`
    target: str | None = None


class UpStep(_Step):
    kind: Literal["up"] = "up"


class DownStep(_Step):
    kind: Literal["down"] = "down"


class SyncStep(_Step):
    kind: Literal["sync"] = "sync"
    bootstrap: bool = True


class EnvPushStep(_Step):
    kind: Literal["env_push"] = "env_push"
    file: str = ".env"
    optional: bool = False  # skip (not fail) when the file is missing


# Run names become file names in the report folder (`<a>_vs_<b>.png`): one plain path component only.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class RunStep(_Step):
    kind: Literal["run"] = "run"
    name: str  # how later steps refer to this run
    config: str
    seeds: list[int] | None = Field(default=None, min_length=1)  # one run per seed: `<name>/s<seed>`
    seed: int | None = Field(default=None, ge=0)  # this run's trainer seed (set by `seeds` expansion)
    env: dict[str, str] = {}  # flags that are not secret (`run -e`): shown in the report
    secrets: list[str] = []  # names (`run --secret`): values from the environment or .env, never shown
    set: dict[str, str] = {}
    wait: bool = True
    force: bool = False
    interval_s: float = Field(default=5.0, gt=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _RUN_NAME.match(v) or ".." in v:
            raise ValueError(
                f"run name {v!r}: use letters, digits, '_', '-', '.' (it names files in the report folder)"
            )
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"seeds {v}: distinct integers >= 0, e.g. [0, 1, 2]")
        return v

    @field_validator("config")
    @classmethod
    def _config_path(cls, v: str) -> str:
        from orchestrator.validate import normalise_config_path  # `configs\\x.yaml` as written on Windows

        try:
            return normalise_config_path(v)
        except UsageError as err:
            raise ValueError(str(err)) from None

    @field_validator("env", "set", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else v


class WaitStep(_Step):
    kind: Literal["wait"] = "wait"
    run: str
    interval_s: float = Field(default=5.0, gt=0)


def _under_runs(v: str) -> str:
    """A fetch/compare `dest`: `runs` or a folder under it, relative, without `..` (an SOP file may come
    from anyone: it must not make grpoctl write run folders anywhere else)."""
    parts = Path(v).parts
    if Path(v).is_absolute() or ".." in parts or not parts or parts[0] != "runs":
        raise ValueError(f"dest {v!r}: use runs/ or a folder under it (relative, no '..')")
    return v


class FetchStep(_Step):
    kind: Literal["fetch"] = "fetch"
    runs: list[str] | None = None  # default: every run of this SOP
    dest: str = "runs"

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str) -> str:
        return _under_runs(v)


class CompareStep(_Step):
    kind: Literal["compare"] = "compare"
    a: str
    b: str
    keys: list[str] | None = None  # default: the SOP's summary_keys
    plot: bool = True
    margin: float = Field(default=cmp.stats.DEFAULT_MARGIN, ge=0, lt=1)  # the equivalence margin (TOST)
    dest: str = "runs"

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str) -> str:
        return _under_runs(v)


Step = Annotated[
    UpStep | DownStep | SyncStep | EnvPushStep | RunStep | WaitStep | FetchStep | CompareStep,
    Field(discriminator="kind"),
]


class Sop(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = ""
    target: str | None = None
    targets: dict[str, TargetConfig] = {}
    summary_keys: list[str] = list(cmp.SOP_KEYS)
    steps: list[Step] = Field(min_length=1)


def run_overrides(step: RunStep, overrides: Mapping[str, str]) -> dict[str, str]:
    """The trainer `--set` overrides of a run step: its own `set`, then the replay's, then its seed."""
    merged = {**step.set, **overrides}
    if step.seed is not None:
        merged[cmp.SEED_KEY] = str(step.seed)
    return merged


def _expand_seeds(steps: list[Any], source: str) -> list[Any]:
    """A run step with `seeds` -> one run step per seed, named `<name>/s<seed>`."""
    out: list[Any] = []
    for step in steps:
        if not isinstance(step, RunStep) or step.seeds is None:
            out.append(step)
            continue
        if step.seed is not None or cmp.SEED_KEY in step.set:
            raise UsageError(f"{source}: run {step.name!r}: give `seeds` or a seed, not both")
        for seed in step.seeds:
            update = {
                "name": f"{step.name}/s{seed}",
                "seeds": None,
                "seed": seed,
                "id": None if step.id is None else f"{step.id}/s{seed}",
            }
            out.append(step.model_copy(update=update))
    return out


def members(sop: Sop, ref: str) -> list[str]:
    """The run names a reference stands for: a run's own name, or a seeded group's `<ref>/s<seed>` runs."""
    names = [s.name for s in sop.steps if isinstance(s, RunStep)]
    if ref in names:
        return [ref]
    return [n for n in names if n.rpartition("/s")[0] == ref and "/" not in ref]


def step_id(step: Any) -> str:
    if step.id:
        return step.id
    return f"run:{step.name}" if isinstance(step, RunStep) else step.kind


def _normalize_step(raw: Any, n: int, source: str) -> dict[str, Any]:
    """`up` or `{run: {...}}` -> `{"kind": "run", ...}`."""
    if isinstance(raw, str):
        return {"kind": raw}
    if isinstance(raw, dict) and len(raw) == 1:
        ((kind, params),) = raw.items()
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise UsageError(f"{source}: steps.{n}.{kind}: expected a mapping of parameters")
        return {"kind": kind, **params}
    raise UsageError(f"{source}: steps.{n}: expected a step name or a one-key mapping like {{run: {{...}}}}")


def parse_sop(data: Any, source: str) -> Sop:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping at the top level")
    steps = data.get("steps")
    if isinstance(steps, list):
        data = {**data, "steps": [_normalize_step(s, i, source) for i, s in enumerate(steps)]}
    try:
        sop = Sop.model_validate(data)
        sop = sop.model_copy(update={"steps": _expand_seeds(list(sop.steps), source)})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).endswith("Step"))
        if first["type"] == "extra_forbidden":
            raise UsageError(f"{source}: unknown key {loc!r}") from None
        if first["type"] == "missing":
            raise UsageError(f"{source}: missing required key {loc!r}") from None
        if first["type"] == "union_tag_invalid":
            raise UsageError(f"{source}: {loc}: unknown step kind ({first['msg']})") from None
        raise UsageError(f"{source}: {loc}: {first['msg'].removeprefix('Value error, ')}") from None
    ids = [step_id(s) for s in sop.steps]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UsageError(f"{source}: duplicate step ids {dupes} (give the steps an `id`)")
    for s in sop.steps:
        refs = (
            [s.a, s.b]
            if isinstance(s, CompareStep)
            else [s.run]
            if isinstance(s, WaitStep)
            else (s.runs or [] if isinstance(s, FetchStep) else [])
        )
        missing = [r for r in refs if not members(sop, r)]
        if missing:
            raise UsageError(f"{source}: step {step_id(s)!r} names unknown run(s) {missing}")
    return sop


def load_sop(path: str | Path) -> Sop:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"SOP file {str(path)!r} not found")
    return parse_sop(safe_yaml(read_text_utf8(path), str(path)), str(path))
