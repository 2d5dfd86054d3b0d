"""SOP files: a procedure as data (YAML), replayed step by step, resumable, with a Markdown report.

```yaml
name: local_pallas_vs_jax
target: local                      # default target of every step (a step may name its own)
targets: {}                        # inline target definitions; grpoctl.yaml's targets of the same name win
summary_keys: [eval_full/accuracy, ...]
steps:
  - up
  - sync
  - env_push: {optional: true}
  - run: {name: jax, config: configs/tiny_cpu.yaml, env: {EVAL_FULL_SWEEP: "1"}}
  - run: {name: pallas, config: configs/tiny_cpu_pallas.yaml}
  - fetch
  - compare: {a: jax, b: pallas, plot: true}
  - down
```

State lives in `<report stem>.state.json` beside the report: a second replay skips finished steps, and a
run step that already has a run id re-attaches to it (waits) instead of launching again. `--from STEP`
re-runs from that step on. Dry runs never read state (every step runs against the recording transport).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console

from orchestrator import compare as cmp
from orchestrator import preflight
from orchestrator.config import TargetConfig, read_text_utf8
from orchestrator.errors import GrpoctlError, UsageError
from orchestrator.ops import env as env_ops
from orchestrator.ops import fetch as fetch_ops
from orchestrator.ops import launch as launch_ops
from orchestrator.ops import sync as sync_ops
from orchestrator.ops import watch as watch_ops
from orchestrator.ops.session import Session, open_session
from orchestrator.phaseview import PhaseView
from orchestrator.recovery import RecoveryPolicy, wait_run
from orchestrator.runs import RunRecord, RunStore, utc_now_iso

ViewFactory = Callable[[str], PhaseView]  # run id -> the view that shows its phases while it is waited for


class _SayFile:
    """A file for a plain (non-terminal) rich Console whose lines go to `say`."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.pending = say, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.say(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------- schema


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
    env: dict[str, str] = {}
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

    @field_validator("env", "set", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else v


class WaitStep(_Step):
    kind: Literal["wait"] = "wait"
    run: str
    interval_s: float = Field(default=5.0, gt=0)


class FetchStep(_Step):
    kind: Literal["fetch"] = "fetch"
    runs: list[str] | None = None  # default: every run of this SOP
    dest: str = "runs"


class CompareStep(_Step):
    kind: Literal["compare"] = "compare"
    a: str
    b: str
    keys: list[str] | None = None  # default: the SOP's summary_keys
    plot: bool = True
    dest: str = "runs"


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
    runs = {s.name for s in sop.steps if isinstance(s, RunStep)}
    for s in sop.steps:
        refs = (
            [s.a, s.b]
            if isinstance(s, CompareStep)
            else [s.run]
            if isinstance(s, WaitStep)
            else (s.runs or [] if isinstance(s, FetchStep) else [])
        )
        missing = [r for r in refs if r not in runs]
        if missing:
            raise UsageError(f"{source}: step {step_id(s)!r} names unknown run(s) {missing}")
    return sop


def load_sop(path: str | Path) -> Sop:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"SOP file {str(path)!r} not found")
    try:
        data = yaml.safe_load(read_text_utf8(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UsageError(f"{path}:{f' line {mark.line + 1}' if mark else ''} malformed YAML") from None
    return parse_sop(data, str(path))


# ----------------------------------------------------------------------------------------- state


@dataclass
class StepState:
    status: str = "pending"  # pending, running, done, failed, skipped
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    command: str = ""  # the grpoctl command that does the same by hand
    details: list[str] = field(default_factory=list)  # Markdown lines for the report
    run_id: str | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    remote_commands: int = 0


@dataclass
class ReplayState:
    sop: str
    steps: dict[str, StepState] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> summary
    comparison: str | None = None
    verdict: str | None = None
    preflight: dict[str, str] = field(default_factory=dict)  # run name -> the preflight's one line

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @staticmethod
    def load(path: Path, sop: str) -> ReplayState:
        if not path.is_file():
            return ReplayState(sop)
        try:
            data = json.loads(path.read_text())
            steps = {k: StepState(**v) for k, v in data.get("steps", {}).items()}
        except (ValueError, TypeError):
            raise UsageError(f"{path}: unreadable SOP state (use --fresh)") from None
        return ReplayState(
            sop,
            steps,
            data.get("summaries", {}),
            data.get("comparison"),
            data.get("verdict"),
            data.get("preflight", {}),
        )


@dataclass
class ReplayResult:
    report_path: Path
    state_path: Path
    state: ReplayState
    verdict: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "report": str(self.report_path),
            "state": str(self.state_path),
            "verdict": self.verdict,
            "steps": {k: v.status for k, v in self.state.steps.items()},
            "runs": {k: v.run_id for k, v in self.state.steps.items() if v.run_id},
            "preflight": self.state.preflight,
        }


# ---------------------------------------------------------------------------------------- replay


def default_report_path(sop_path: Path, dry_run: bool) -> Path:
    return Path("runs") / "sops" / sop_path.stem / ("report.dry-run.md" if dry_run else "report.md")


def _start_index(sop: Sop, from_step: str | None) -> int:
    if from_step is None:
        return 0
    ids = [step_id(s) for s in sop.steps]
    if from_step in ids:
        return ids.index(from_step)
    if from_step.isdigit() and 1 <= int(from_step) <= len(ids):
        return int(from_step) - 1
    raise UsageError(f"--from {from_step!r}: not a step id or number (steps: {', '.join(ids)})")


class _Replayer:
    def __init__(
        self,
        sop: Sop,
        sop_path: Path,
        state: ReplayState,
        *,
        config_file: str | None,
        target: str | None,
        dry_run: bool,
        accept_new_host_key: bool,
        say: Callable[[str], None],
        report_dir: Path,
        state_path: Path,
        recover: RecoveryPolicy | None,
        overrides: dict[str, str],
        view: ViewFactory | None = None,
    ) -> None:
        self.sop, self.sop_path, self.state = sop, sop_path, state
        self.config_file, self.target_override = config_file, target
        self.dry_run, self.accept_new_host_key, self.say = dry_run, accept_new_host_key, say
        self.report_dir, self.state_path = report_dir, state_path
        self.recover = recover  # `--recover`: preempted runs are relaunched
        self.overrides = overrides  # trainer `--set` overrides for every run step
        self.view = view  # a phase bar per waited run (the CLI's); else plain lines through `say`
        self.store = RunStore.in_memory() if dry_run else RunStore()
        self.sessions: dict[str | None, Session] = {}

    def session(self, step: Any) -> Session:
        name = self.target_override or step.target or self.sop.target
        if name not in self.sessions:
            self.sessions[name] = open_session(
                config_file=self.config_file,
                target=name,
                dry_run=self.dry_run,
                accept_new_host_key=self.accept_new_host_key,
                store=self.store,
                say=self.say,
                extra_targets=dict(self.sop.targets),
            )
        return self.sessions[name]

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()

    def _cli(self, session: Session, *args: str) -> str:
        dry = " --dry-run" if self.dry_run else ""
        return f"grpoctl{dry} --target {session.target_name} " + " ".join(args)

    def _journal_len(self, session: Session) -> int:
        return len(session.script.journal) if session.script else 0

    def preflight(self, start: int, rerun: bool) -> None:
        """Before `up`: every run step still to launch on a TPU target compiles here for its chip; one
        that cannot fit stops the replay (exit 2) before any node is paid for."""
        for step in self.sop.steps[start:]:
            st = self.state.steps.get(step_id(step))
            if not isinstance(step, RunStep) or (not rerun and st and (st.status == "done" or st.run_id)):
                continue
            s = self.session(step)
            if s.kind != "tpu":
                continue
            overrides = {**step.set, **self.overrides}
            accelerator = s.target_cfg.accelerator_type  # type: ignore[union-attr]
            cmd = preflight.command(step.config, accelerator, overrides, step.env)
            try:
                gate = preflight.gate(
                    step.config, overrides=overrides, env=step.env, accelerator=accelerator, say=self.say
                )
            except GrpoctlError as err:
                self.state.preflight[step.name] = f"`{cmd}`: **{err}**"
                raise
            self.state.preflight[step.name] = f"`{cmd}`: {gate.report.line() if gate.report else gate.line}"

    # One method per step kind; each fills `st.command` and `st.details`.

    def do_up(self, step: UpStep, st: StepState) -> None:
        s = self.session(step)
        st.command = self._cli(s, "up")
        s.target.up()
        state = s.target.state()
        st.details.append(
            f"target `{s.target_name}` ({s.kind}): {state.state}, {len(s.target.workers())} worker(s)"
        )

    def do_down(self, step: DownStep, st: StepState) -> None:
        s = self.session(step)
        st.command = self._cli(s, "down")
        s.target.down()
        st.details.append(f"target `{s.target_name}` released")

    def do_sync(self, step: SyncStep, st: StepState) -> None:
        s = self.session(step)
        st.command = self._cli(s, "sync" + ("" if step.bootstrap else " --no-bootstrap"))
        result = sync_ops.sync(s)
        st.details.append(f"repo `{result.url}` branch `{result.branch}`")
        st.details += [f"{w}: HEAD `{h[:12]}`" for w, h in result.heads.items()]
        st.details += [f"warning: {w}" for w in result.warnings]
        if step.bootstrap:
            def on_stage(worker: str, k: int, n: int, label: str) -> None:
                self.say(f"  {worker.split()[0]}: bootstrap stage {k}/{n}: {label}")

            for w, py in sync_ops.bootstrap(s, on_stage=on_stage).items():
                st.details.append(f"{w}: python `{py}`")

    def do_env_push(self, step: EnvPushStep, st: StepState) -> None:
        s = self.session(step)
        st.command = self._cli(s, "env push", "--file", step.file)
        if step.optional and not Path(step.file).is_file():
            st.details.append(f"`{step.file}` not present: skipped (optional)")
            return
        result = env_ops.push_env(s, step.file)
        st.details.append(f"`{result.remote_path}` mode {result.mode} on {len(result.workers)} worker(s)")
        st.details += [f"`{k}_len={n}`" for k, n in result.lengths.items()]

    def do_run(self, step: RunStep, st: StepState) -> None:
        s = self.session(step)
        overrides = {**step.set, **self.overrides}  # `sop replay --set` applies to every run
        flags = [f"--env {k}=***" for k in step.env] + [  # -e values are secrets: never in a report
            f"--set {k}={v}" for k, v in overrides.items()
        ]
        st.command = self._cli(s, "run", step.config, *flags, *(["--wait"] if step.wait else []))
        record = self._attached(st)
        if record is None:
            record = launch_ops.start_run(
                s, step.config, env=step.env, trainer_args=launch_ops.set_args(overrides), force=step.force
            )
            self._remember(st, record)
            self.say(f"{step_id(step)}: launched {record.run_id}")
        else:
            record.env = dict(step.env)  # never stored: a relaunch on recovery needs them again
            self.say(f"{step_id(step)}: re-attached to {record.run_id} ({record.state})")
            st.details.append(f"re-attached to `{record.run_id}`")
        if step.wait:
            self._wait(s, st, record, step.interval_s)
            self._fetch_finished(s, step.name, st, record)
        self._describe_run(st, record)

    def _fetch_dest(self, run: str) -> Path:
        """Where this SOP's fetch step puts `run` (default `runs`)."""
        for f in self.sop.steps:
            if isinstance(f, FetchStep) and (f.runs is None or run in f.runs):
                return self._dest(f.dest)
        return self._dest("runs")

    def _fetch_finished(self, s: Session, name: str, st: StepState, record: RunRecord) -> None:
        """Bring a run's results to the laptop as soon as it has SUCCEEDED.

        Found by the rehearsal: the run files live on the VM's disk, so when a later run's VM is preempted
        and recreated, an earlier finished run's results are gone before the SOP's fetch step. A failure
        here is only a note: the fetch step tries again.
        """
        if self.dry_run or record.state != "SUCCEEDED":
            return
        try:
            result = fetch_ops.fetch(s.target, record, self._fetch_dest(name))
        except GrpoctlError as err:
            st.details.append(f"results not fetched yet ({err}); the fetch step tries again")
            return
        self.state.summaries[name] = result.summary
        st.details.append(f"results fetched to `{result.folder}/` as the run ended")

    def do_wait(self, step: WaitStep, st: StepState) -> None:
        run_state = self._run_state(step.run)
        s = self.session(step)
        st.command = self._cli(s, "status", run_state.run_id or "?", "--watch")
        record = self._attached(run_state)
        if record is None:
            raise UsageError(f"step {step_id(step)!r}: run {step.run!r} was never launched")
        self._wait(s, run_state, record, step.interval_s)
        self._describe_run(st, record)

    def _dest(self, dest: str) -> Path:
        """Dry runs keep their made-up results away from real ones."""
        return Path(dest) / "dry-run" if self.dry_run else Path(dest)

    def do_fetch(self, step: FetchStep, st: StepState) -> None:
        s = self.session(step)
        names = step.runs or [r.name for r in self.sop.steps if isinstance(r, RunStep)]
        ids = []
        for name in names:
            record = self._attached(self._run_state(name))
            if record is None:
                raise UsageError(f"step {step_id(step)!r}: run {name!r} was never launched")
            ids.append(record.run_id)
            local = self._dest(step.dest) / record.run_id
            if (
                record.state == "SUCCEEDED"
                and (local / "summary.json").is_file()
                and name in self.state.summaries
            ):
                # fetched when it ended (_fetch_finished): a finished run's files do not change, and the VM
                # that held them may have been recreated since
                st.details.append(f"`{name}` -> `{local}/` (fetched when the run ended)")
                continue
            result = fetch_ops.fetch(s.target, record, self._dest(step.dest))
            self.state.summaries[name] = result.summary
            st.details.append(f"`{name}` -> `{result.folder}/` ({', '.join(result.files)})")
        st.command = self._cli(s, "fetch", *ids)

    def do_compare(self, step: CompareStep, st: StepState) -> None:
        s = self.session(step)
        folders = []
        for name in (step.a, step.b):
            run_state = self._run_state(name)
            if not run_state.run_id:
                raise UsageError(f"step {step_id(step)!r}: run {name!r} was never launched")
            folder = self._dest(step.dest) / run_state.run_id
            if not (folder / "summary.json").is_file():
                record = self._attached(run_state)
                if record is None:
                    raise UsageError(f"step {step_id(step)!r}: no record of run {name!r}")
                folder = fetch_ops.fetch(s.target, record, self._dest(step.dest)).folder
            folders.append(folder)
        run_a, run_b = cmp.load_run(folders[0]), cmp.load_run(folders[1])
        result = cmp.compare_runs(run_a, run_b, step.keys or self.sop.summary_keys)
        plot_args = []
        if step.plot:
            out = self.report_dir / f"{step.a}_vs_{step.b}.png"  # run names are plain (RunStep)
            self.report_dir.mkdir(parents=True, exist_ok=True)
            cmp.plot(run_a, run_b, out)
            st.details.append(f"plot: `{out}`")
            plot_args = ["--plot", str(out)]
        st.command = self._cli(s, "compare", run_a.run_id, run_b.run_id, *plot_args)
        self.state.comparison = f"A = `{step.a}`, B = `{step.b}`\n\n" + result.markdown()
        # One line per verdict: each run's start -> end (did GRPO help?), then run vs run.
        names = (step.a, step.b)
        learning = [f"{name} {line}" for name, line in zip(names, result.learning_lines(), strict=True)]
        versus = f"{step.a} vs {step.b}: " + (
            result.test_line() if result.paired else "no paired eval results"
        )
        self.state.verdict = "\n".join([*learning, versus])
        st.details.extend([*learning, versus])

    # Helpers for runs.

    def _run_state(self, name: str) -> StepState:
        for s in self.sop.steps:
            if isinstance(s, RunStep) and s.name == name:
                return self.state.steps.setdefault(step_id(s), StepState())
        raise UsageError(f"no run step named {name!r}")

    def _attached(self, st: StepState) -> RunRecord | None:
        if not st.run_id:
            return None
        try:
            return self.store.get(st.run_id)
        except UsageError:
            if st.record is None:
                return None
            record = RunRecord.from_json(st.record)  # the run store moved: the state file remembers
            self.store.save(record)
            return record

    def _remember(self, st: StepState, record: RunRecord) -> None:
        st.run_id, st.record = record.run_id, record.to_json()
        self.state.save(self.state_path)

    def _wait(self, s: Session, st: StepState, record: RunRecord, interval: float) -> None:
        view = (self.view or self._plain_view)(record.run_id).__enter__()
        stalled = [False]

        def on_poll(rec: RunRecord, poll: watch_ops.Poll) -> None:
            if rec.state == "STALLED" and not stalled[0]:  # once per stall, until output moves again
                stalled[0] = True
                quiet = max((w.quiet_s or 0 for w in rec.workers), default=0)
                self.say(f"  {rec.run_id}: STALLED, no output for {quiet} s (still waiting)")
            elif rec.state != "STALLED":
                stalled[0] = False
            view.show(rec.state, poll.progress)
            st.record = rec.to_json()

        try:
            policy = None if self.dry_run else self.recover
            wait_run(s, record, policy, interval=0 if self.dry_run else interval, on_poll=on_poll)
        finally:
            view.close()
            self._remember(st, record)

    def _plain_view(self, label: str) -> PhaseView:
        return PhaseView(Console(file=_SayFile(self.say), width=10_000), f"  {label}")

    def _describe_run(self, st: StepState, record: RunRecord) -> None:
        st.details.append(f"run id `{record.run_id}`: **{record.state}**")
        st.details.append(
            f"log `{record.log_path}`, pid file `{record.pid_path}`, exit file `{record.exit_path}`"
        )
        for w in record.workers:
            code = "" if w.exit_code is None else f", exit {w.exit_code}"
            st.details.append(f"{w.worker} ({w.host}): pid {w.pid}, {w.state}{code}")
        phase = watch_ops.phase_json(record)
        if phase is not None:
            st.details.append(f"last phase: {phase['text']}")
        st.details.append(
            f"commit `{record.git_commit or 'unknown'}`, config hash `{record.config_hash or 'unknown'}`"
            + (f", W&B {record.wandb_url}" if record.wandb_url else "")
        )
        for i, r in enumerate(record.recoveries, 1):
            st.details.append(
                f"recovery {i}: {r['kind']} ({r['reason']}) at step {r.get('step')}, "
                f"relaunched at {r['at']} with log `{r.get('log')}`"
            )


def replay(
    path: str | Path,
    *,
    config_file: str | None = None,
    target: str | None = None,
    dry_run: bool = False,
    from_step: str | None = None,
    report_path: str | Path | None = None,
    fresh: bool = False,
    accept_new_host_key: bool = False,
    say: Callable[[str], None] = lambda _: None,
    recover: RecoveryPolicy | None = None,
    overrides: dict[str, str] | None = None,
    run_preflight: bool = True,
    view: ViewFactory | None = None,
) -> ReplayResult:
    sop_path = Path(path)
    sop = load_sop(sop_path)
    report = Path(report_path) if report_path else default_report_path(sop_path, dry_run)
    state_path = report.with_suffix(".state.json")
    state = ReplayState(str(sop_path)) if (fresh or dry_run) else ReplayState.load(state_path, str(sop_path))
    start = _start_index(sop, from_step)
    replayer = _Replayer(
        sop,
        sop_path,
        state,
        config_file=config_file,
        target=target,
        dry_run=dry_run,
        accept_new_host_key=accept_new_host_key,
        say=say,
        report_dir=report.parent,
        state_path=state_path,
        recover=recover,
        overrides=dict(overrides or {}),
        view=view,
    )
    try:
        if run_preflight:
            try:
                replayer.preflight(start, rerun=from_step is not None)
            finally:
                state.save(state_path)
                write_report(report, sop, sop_path, state, dry_run)
        for i, step in enumerate(sop.steps):
            sid = step_id(step)
            st = state.steps.setdefault(sid, StepState())
            if i < start:
                if st.status != "done":
                    st.status = "skipped"
                continue
            if from_step is not None and st.status == "done":  # --from: run it again
                state.steps[sid] = st = StepState()
            if st.status == "done":
                say(f"[{i + 1}/{len(sop.steps)}] {sid}: done earlier, skipped")
                continue
            say(f"[{i + 1}/{len(sop.steps)}] {sid}")
            st.status, st.started_at, st.error = "running", utc_now_iso(), None
            st.details = [d for d in st.details if d.startswith("re-attached")] if st.run_id else []
            began = time.monotonic()
            session = replayer.session(step)
            journal_before = replayer._journal_len(session)
            try:
                getattr(replayer, f"do_{step.kind}")(step, st)
                st.status = "done"
            except GrpoctlError as err:
                st.status, st.error = "failed", str(err)
                raise
            finally:
                st.finished_at = utc_now_iso()
                st.duration_s = round(time.monotonic() - began, 2)
                st.remote_commands = replayer._journal_len(session) - journal_before
                state.save(state_path)
                write_report(report, sop, sop_path, state, dry_run)
    finally:
        replayer.close()
    return ReplayResult(report, state_path, state, state.verdict)


# ---------------------------------------------------------------------------------------- report


def write_report(path: Path, sop: Sop, sop_path: Path, state: ReplayState, dry_run: bool) -> None:
    lines = [f"# SOP `{sop.name}`{' (dry run)' if dry_run else ''}", ""]
    if dry_run:  # nothing below happened: say so before any figure can be quoted out of context
        lines += ["**Dry run: every pid, state, figure and verdict below is FABRICATED, not a result.**", ""]
    if sop.description:
        lines += [sop.description.strip(), ""]
    lines += [f"- file: `{sop_path}`", f"- default target: `{sop.target}`", f"- written: {utc_now_iso()}", ""]
    lines += ["## Steps", "", "| # | step | status | duration | command |", "|---|---|---|---|---|"]
    for i, step in enumerate(sop.steps, 1):
        st = state.steps.get(step_id(step), StepState())
        duration = "" if st.duration_s is None else f"{st.duration_s:.1f} s"
        lines.append(f"| {i} | `{step_id(step)}` | {st.status} | {duration} | `{st.command}` |")
    if state.preflight:
        lines += ["", "## Preflight (compiled here for the target's TPU before `up`)", ""]
        lines += [f"- `{name}`: {line}" for name, line in state.preflight.items()]
    for i, step in enumerate(sop.steps, 1):
        st = state.steps.get(step_id(step))
        if st is None or not (st.details or st.error):
            continue
        lines += ["", f"### {i}. {step_id(step)}", ""]
        if st.remote_commands:
            lines.append(f"- {st.remote_commands} remote command(s) recorded")
        lines += [f"- {d}" for d in st.details]
        if st.error:
            lines.append(f"- **error**: {st.error}")
    runs = [(s.name, state.steps.get(step_id(s))) for s in sop.steps if isinstance(s, RunStep)]
    runs = [(name, st) for name, st in runs if st is not None and st.record]
    if runs:
        lines += [
            "",
            "## Runs",
            "",
            "| run | run id | state | pid(s) | log | exit file | commit | config hash | W&B |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, st in runs:
            rec = RunRecord.from_json(st.record or {})
            pids = ", ".join(f"{w.worker}:{w.pid}" for w in rec.workers)
            commit = f"`{rec.git_commit[:12]}`" if rec.git_commit else ""
            config_hash = f"`{rec.config_hash}`" if rec.config_hash else ""
            lines.append(
                f"| {name} | `{rec.run_id}` | {rec.state} | {pids} | `{rec.log_path}` | `{rec.exit_path}` "
                f"| {commit} | {config_hash} | {rec.wandb_url or ''} |"
            )
    if state.summaries:
        names = list(state.summaries)
        lines += [
            "",
            "## Made-up summary (dry run: FABRICATED figures, not results)"
            if dry_run
            else "## Observed summary",
            "",
            "| key | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for key in sop.summary_keys:
            lines.append(
                f"| `{key}` | " + " | ".join(cmp.fmt(state.summaries[n].get(key)) for n in names) + " |"
            )
    if state.comparison:
        lines += ["", "## Compare", "", state.comparison]
    if state.verdict:  # one line per verdict (start -> end of each run, then run vs run)
        for verdict in state.verdict.splitlines():
            lines += ["", f"**Verdict**: {verdict}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
