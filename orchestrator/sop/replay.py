"""Replay an SOP: each step is one `orchestrator.api` call (or a few), found in a table keyed by the step's
type; the replay records what happened (state file) and rewrites the report after every step.

State lives in `<report stem>.state.json` beside the report: a second replay skips finished steps, and a
run step that already has a run id re-attaches to it (waits) instead of launching again. `--from STEP`
re-runs from that step on. Dry runs never read state (every step runs against the recording transport).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator import api, doctor
from orchestrator import compare as cmp
from orchestrator import preflight as pf
from orchestrator.config import load_config
from orchestrator.errors import GrpoctlError, UsageError
from orchestrator.lifecycle.monitor import Poll
from orchestrator.lifecycle.recovery import RecoveryPolicy
from orchestrator.lifecycle.states import RunState
from orchestrator.ops import env as env_ops
from orchestrator.ops.session import Session
from orchestrator.phaseview import PhaseView
from orchestrator.runs import RunRecord, utc_now_iso
from orchestrator.sop import report as report_
from orchestrator.sop.schema import (
    CompareStep,
    DownStep,
    EnvPushStep,
    FetchStep,
    RunStep,
    Sop,
    SyncStep,
    UpStep,
    WaitStep,
    load_sop,
    members,
    run_overrides,
    step_id,
)
from orchestrator.sop.state import ReplayResult, ReplayState, StepState
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring
from orchestrator.untrusted import md

# Quick steps rewrite the state file and the report at most this often (the end and a failure always).
WRITE_EVERY_S = 2.0


def clock() -> float:
    """The write throttle's clock (a test replaces it to count writes without timing anything)."""
    return time.monotonic()


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
    seeded = [i for i, sid in enumerate(ids) if sid.startswith(f"{from_step}/s")]
    if seeded:  # `run:jax` of a seeded group: from its first seed's run
        return seeded[0]
    raise UsageError(f"--from {from_step!r}: not a step id or number (steps: {', '.join(ids)})")


class Replayer:
    """The replay's context: the SOP, its state, one session per target, and the options of this replay."""

    def __init__(
        self,
        sop: Sop,
        state: ReplayState,
        sessions: api.Sessions,
        *,
        target: str | None,
        report_dir: Path,
        state_path: Path,
        recover: RecoveryPolicy | None,
        overrides: dict[str, str],
        view: ViewFactory | None = None,
    ) -> None:
        self.sop, self.state, self.sessions = sop, state, sessions
        self.target_override, self.report_dir, self.state_path = target, report_dir, state_path
        self.dry_run, self.say = sessions.dry_run, sessions.say
        self.recover = recover  # `--recover`: preempted runs are relaunched
        self.overrides = overrides  # trainer `--set` overrides for every run step
        self.view = view  # a phase bar per waited run (the CLI's); else plain lines through `say`

    def session(self, step: Any) -> Session:
        return self.sessions.get(self.target_override or step.target or self.sop.target)

    def command_line(self, step: Any) -> str:
        return report_.command_line(
            step,
            sop=self.sop,
            state=self.state,
            target=self.session(step).target_name,
            dry_run=self.dry_run,
            overrides=self.overrides,
            report_dir=self.report_dir,
        )

    def to_launch(self, start: int, rerun: bool) -> list[RunStep]:
        """The run steps this replay will launch (not those done or attached earlier)."""
        out = []
        for step in self.sop.steps[start:]:
            st = self.state.steps.get(step_id(step))
            if isinstance(step, RunStep) and (rerun or not (st and (st.status == "done" or st.run_id))):
                out.append(step)
        return out

    def check(self, start: int, rerun: bool) -> None:
        """Before `up`, nothing paid for yet: every run step's config and overrides (validate.py), then the
        cheap doctor checks its steps need (.env, credentials file, SSH key, local tools, a repo a VM can
        clone). A real replay stops on the first failures (exit 2); a dry run says them and goes on."""
        runs = self.to_launch(start, rerun)
        for step in runs:
            api.check_run(self.session(step), step.config, {**step.set, **self.overrides}, step.env)
        steps = self.sop.steps[start:]
        if not steps:
            return
        sessions = [self.session(step) for step in steps]
        targets = {s.target_name: s.target_cfg for s in sessions}
        env_files = [(step.file, step.optional) for step in steps if isinstance(step, EnvPushStep)]
        pairs = zip(steps, sessions, strict=True)
        syncs = [s.kind != "local" for step, s in pairs if isinstance(step, SyncStep)]
        checks = doctor.before_up(
            targets,
            sessions[0].config,
            env_files=env_files,
            runs=[(step.config, {**step.set, **self.overrides}, step.env) for step in runs],
            syncs_remote=any(syncs),
            reach=not self.dry_run,
        )
        for check in checks:
            if check.status == doctor.WARN:
                self.say(f"doctor: {check.line()}")
        bad = doctor.failed(checks)
        if not bad:
            return
        if self.dry_run:
            for check in bad:
                self.say(f"doctor: {check.line()} (a real replay stops here, before `up`)")
            return
        said = "; ".join(f"{c.name}: {c.detail}" + (f" ({c.fix})" if c.fix else "") for c in bad)
        raise UsageError(f"before `up` (nothing paid for yet): {said}")

    def preflight(self, start: int, rerun: bool) -> None:
        """Before `up`: every run step still to launch on a TPU target compiles here for its chip; one
        that cannot fit stops the replay (exit 2) before any node is paid for."""
        seen: dict[tuple, tuple[str, bool | None]] = {}
        for step in self.to_launch(start, rerun):
            s = self.session(step)
            if s.kind != "tpu":
                continue
            # A seed changes no shape or buffer: the runs of a seeded group share one preflight instead of
            # compiling the same programs once per seed.
            overrides = {
                k: v
                for k, v in run_overrides(step, self.overrides).items()
                if k != cmp.SEED_KEY or step.seed is None
            }
            key = (s.target_name, step.config, tuple(sorted(overrides.items())), tuple(sorted(step.env)))
            if key in seen:
                self.state.preflight[step.name], self.state.preflight_fits[step.name] = seen[key]
                continue
            accelerator = s.target_cfg.accelerator_type  # type: ignore[union-attr]
            cmd = pf.command(step.config, accelerator, overrides, step.env)
            try:
                gate = api.preflight_gate(s, step.config, overrides, step.env)
            except GrpoctlError as err:
                self.state.preflight[step.name] = f"`{cmd}`: **{err}**"
                self.state.preflight_fits[step.name] = False
                raise
            assert gate is not None  # a TPU target
            self.state.preflight[step.name] = f"`{cmd}`: {gate.report.line() if gate.report else gate.line}"
            self.state.preflight_fits[step.name] = gate.report.fits if gate.report else None
            seen[key] = (self.state.preflight[step.name], self.state.preflight_fits[step.name])

    # Helpers for run steps.

    def fetch_dest(self, run: str) -> str:
        """Where this SOP's fetch step puts `run` (default `runs`)."""
        for f in self.sop.steps:
            if isinstance(f, FetchStep) and (f.runs is None or run in self.expand(f.runs)):
                return f.dest
        return "runs"

    def expand(self, refs: list[str]) -> list[str]:
        """Run names for references that may name a seeded group (`jax` -> `jax/s0`, `jax/s1`, ...)."""
        return [name for ref in refs for name in members(self.sop, ref)]

    def run_state(self, name: str) -> StepState:
        for s in self.sop.steps:
            if isinstance(s, RunStep) and s.name == name:
                return self.state.steps.setdefault(step_id(s), StepState())
        raise UsageError(f"no run step named {name!r}")

    def attached(self, st: StepState) -> RunRecord | None:
        if not st.run_id:
            return None
        try:
            return self.sessions.store.get(st.run_id)
        except UsageError:
            if st.record is None:
                return None
            record = RunRecord.from_json(st.record)  # the run store moved: the state file remembers
            self.sessions.store.save(record)
            return record

    def launched(self, step: Any, name: str) -> RunRecord:
        record = self.attached(self.run_state(name))
        if record is None:
            raise UsageError(f"step {step_id(step)!r}: run {name!r} was never launched")
        return record

    def remember(self, st: StepState, record: RunRecord) -> None:
        st.run_id, st.record = record.run_id, record.to_json()
        if not self.dry_run:  # a dry run's state is never read back: written once, at the end
            self.state.save(self.state_path)

    def wait(self, s: Session, st: StepState, record: RunRecord, interval: float) -> None:
        view = (self.view or self._plain_view)(record.run_id).__enter__()
        stalled = [False]

        def on_poll(rec: RunRecord, poll: Poll) -> None:
            if rec.state is RunState.STALLED and not stalled[0]:  # once per stall, until output moves again
                stalled[0] = True
                quiet = max((w.quiet_s or 0 for w in rec.workers), default=0)
                self.say(f"  {rec.run_id}: STALLED, no output for {quiet} s (still waiting)")
            elif rec.state is not RunState.STALLED:
                stalled[0] = False
            view.show(rec.state, poll.progress)
            st.record = rec.to_json()

        try:
            policy = None if self.dry_run else self.recover
            api.wait(s, record, policy, interval=0 if self.dry_run else interval, on_poll=on_poll)
        finally:
            view.close()
            self.remember(st, record)

    def _plain_view(self, label: str) -> PhaseView:
        return PhaseView(Console(file=_SayFile(self.say), width=10_000), f"  {label}")

    def fetch_finished(self, s: Session, name: str, st: StepState, record: RunRecord) -> None:
        """Bring a run's results to the laptop as soon as it has SUCCEEDED.

        Found by the rehearsal: the run files live on the VM's disk, so when a later run's VM is preempted
        and recreated, an earlier finished run's results are gone before the SOP's fetch step. A failure
        here is only a note: the fetch step tries again.
        """
        if self.dry_run or record.state is not RunState.SUCCEEDED:
            return
        try:
            result = api.fetch(s, record, self.fetch_dest(name))
        except GrpoctlError as err:
            st.details.append(f"results not fetched yet ({md(str(err))}); the fetch step tries again")
            return
        self.state.summaries[name] = result.summary
        st.details.append(f"results fetched to `{result.folder}/` as the run ended")


# One handler per step kind: each performs the step through `api` and fills `st.details`.


def _up(r: Replayer, step: UpStep, st: StepState) -> None:
    t = api.up(r.session(step))
    st.details.append(f"target `{t.target}` ({t.kind}): {t.state}, {t.workers} worker(s)")
    waited = t.details.get("waiting_for_capacity_s")
    if waited:
        st.seconds["waiting_for_capacity"] = float(waited)


def _down(r: Replayer, step: DownStep, st: StepState) -> None:
    s = r.session(step)
    api.down(s)
    st.details.append(f"target `{s.target_name}` released")


def _sync(r: Replayer, step: SyncStep, st: StepState) -> None:
    def on_stage(worker: str, k: int, n: int, label: str) -> None:
        r.say(f"  {worker.split()[0]}: bootstrap stage {k}/{n}: {label}")

    result = api.sync(r.session(step), bootstrap=step.bootstrap, on_stage=on_stage)
    st.details.append(f"repo `{result.url}` branch `{result.branch}`")
    st.details += [f"{w}: HEAD `{h[:12]}`" for w, h in result.heads.items()]
    st.details += [f"warning: {w}" for w in result.warnings]
    st.details += [f"{w}: python `{py}`" for w, py in result.pythons.items()]


def _env_push(r: Replayer, step: EnvPushStep, st: StepState) -> None:
    result = api.push_env(r.session(step), step.file, optional=step.optional)
    if result is None:
        st.details.append(f"`{step.file}` not present: skipped (optional)")
        return
    st.details.append(f"`{result.remote_path}` mode {result.mode} on {len(result.workers)} worker(s)")
    st.details += [f"`{k}_len={n}`" for k, n in result.lengths.items()]


def _run(r: Replayer, step: RunStep, st: StepState) -> None:
    s = r.session(step)
    record = r.attached(st)
    if record is None:  # the preflight ran for every run before `up`
        overrides = run_overrides(step, r.overrides)  # `sop replay --set` applies to every run
        record = api.launch(
            s, step.config, env=_secrets(step), flags=step.env, overrides=overrides, force=step.force,
            gate=False,
        )
        r.remember(st, record)
        r.say(f"{step_id(step)}: launched {record.run_id}")
    else:
        record.env = _secrets(step)  # never stored: a relaunch on recovery needs them again
        r.say(f"{step_id(step)}: re-attached to {record.run_id} ({record.state})")
        st.details.append(f"re-attached to `{record.run_id}`")
    if step.wait:
        r.wait(s, st, record, step.interval_s)
        r.fetch_finished(s, step.name, st, record)
    st.details += report_.run_details(record)


def _secrets(step: RunStep) -> dict[str, str]:
    """The step's `secrets:` values, from the environment or ./.env (never from the SOP file)."""
    return env_ops.resolve_secrets(step.secrets) if step.secrets else {}


def _wait(r: Replayer, step: WaitStep, st: StepState) -> None:
    for name in r.expand([step.run]):  # a seeded group: each of its runs in turn
        record = r.launched(step, name)
        r.wait(r.session(step), r.run_state(name), record, step.interval_s)
        st.details += report_.run_details(record)


def _fetch(r: Replayer, step: FetchStep, st: StepState) -> None:
    s = r.session(step)
    for name in r.expand(step.runs) if step.runs else [x.name for x in r.sop.steps if isinstance(x, RunStep)]:
        record = r.launched(step, name)
        if record.state is RunState.SUCCEEDED and name in r.state.summaries:
            # fetched when it ended (fetch_finished): a finished run's files do not change, and the VM that
            # held them may have been recreated since
            local = api.fetch_if_missing(s, record, step.dest)
            if local.fetched is None:
                st.details.append(f"`{name}` -> `{local.folder}/` (fetched when the run ended)")
                continue
            result = local.fetched
        else:
            result = api.fetch(s, record, step.dest)
        r.state.summaries[name] = result.summary
        st.details.append(f"`{name}` -> `{result.folder}/` ({', '.join(result.files)})")


def _compare(r: Replayer, step: CompareStep, st: StepState) -> None:
    s = r.session(step)
    arms = [r.expand([step.a]), r.expand([step.b])]  # a seeded group is one arm of several runs
    names: dict[str, str] = {}
    folders: list[list[Path]] = []
    for arm in arms:
        folders.append([])
        for name in arm:
            record = r.launched(step, name)
            names[record.run_id] = name
            folders[-1].append(api.fetch_if_missing(s, record, step.dest).folder)
    plot = None
    if step.plot and importlib.util.find_spec("matplotlib") is None:  # the verdicts need no plot
        st.details.append("plot skipped: matplotlib is not installed (pip install 'grpoctl[plot]')")
    elif step.plot:
        plot = report_.plot_path(r.report_dir, step)
        r.report_dir.mkdir(parents=True, exist_ok=True)
    done = api.compare_folders(
        folders[0],
        folders[1],
        step.keys or r.sop.summary_keys,
        plot,
        margin=step.margin,
        labels=(step.a, step.b),
        names=names,
    )
    if plot is not None:
        st.details.append(f"plot: `{plot}`")
        r.state.plots[step_id(step)] = plot.name  # beside the report: the report links it by name
    r.state.comparison = f"A = `{step.a}`, B = `{step.b}`\n\n" + done.result.details_markdown()
    # Each verdict once, in reading order (warnings, kernel parity, start -> end, method, McNemar).
    lines = done.result.summary_lines()
    r.state.verdict = "\n".join(lines)
    r.state.verdict_json = done.result.to_json()
    r.state.key_numbers = done.result.key_lines()
    r.state.trajectory_lines = done.result.trajectory_lines()
    st.details.append(f"{len(lines)} verdict line(s): see the summary at the top of the report")


Handler = Callable[[Replayer, Any, StepState], None]
HANDLERS: dict[type, Handler] = {
    UpStep: _up,
    DownStep: _down,
    SyncStep: _sync,
    EnvPushStep: _env_push,
    RunStep: _run,
    WaitStep: _wait,
    FetchStep: _fetch,
    CompareStep: _compare,
}


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
    tpu_wiring: TpuWiring = REAL_TPU_VM,
) -> ReplayResult:
    sop_path = Path(path)
    sop = load_sop(sop_path)
    seeded = [s.name for s in sop.steps if isinstance(s, RunStep) and s.seed is not None]
    if seeded and cmp.SEED_KEY in (overrides or {}):
        raise UsageError(
            f"--set {cmp.SEED_KEY}=...: the SOP sets each run's seed itself ({', '.join(seeded)}); "
            "drop the override or the SOP's seeds"
        )
    report = Path(report_path) if report_path else default_report_path(sop_path, dry_run)
    state_path = report.with_suffix(".state.json")
    state = ReplayState(str(sop_path)) if (fresh or dry_run) else ReplayState.load(state_path, str(sop_path))
    start = _start_index(sop, from_step)

    prices = load_config(config_file).prices  # the ledger's cost estimate
    last_write = [-WRITE_EVERY_S]

    def write(force: bool = True) -> None:
        # Each write is linear in the number of steps: after every step (forced) that would make a long
        # SOP quadratic. Steps that took a while, a failure and the end are always written; a burst of
        # quick steps (a dry run, skipped steps) at most every WRITE_EVERY_S.
        now = clock()
        if not force and now - last_write[0] < WRITE_EVERY_S:
            return
        state.save(state_path)
        report_.write_report(report, sop, sop_path, state, dry_run, prices)
        last_write[0] = clock()

    sessions = api.Sessions(
        config_file=config_file,
        dry_run=dry_run,
        accept_new_host_key=accept_new_host_key,
        say=say,
        extra_targets=sop.targets,
        tpu_wiring=tpu_wiring,
    )
    replayer = Replayer(
        sop,
        state,
        sessions,
        target=target,
        report_dir=report.parent,
        state_path=state_path,
        recover=recover,
        overrides=dict(overrides or {}),
        view=view,
    )
    with sessions:
        replayer.check(start, rerun=from_step is not None)
        if run_preflight:
            try:
                replayer.preflight(start, rerun=from_step is not None)
            finally:
                write()
        try:
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
                st.command = replayer.command_line(step)
                began = time.monotonic()
                journal = replayer.session(step).script
                journal_before = len(journal.journal) if journal else 0
                try:
                    HANDLERS[type(step)](replayer, step, st)
                    st.status = "done"
                except GrpoctlError as err:
                    st.status, st.error = "failed", str(err)
                    raise
                finally:
                    st.finished_at = utc_now_iso()
                    st.duration_s = round(time.monotonic() - began, 2)
                    st.remote_commands = (len(journal.journal) if journal else 0) - journal_before
                    write(st.status == "failed" or st.duration_s >= WRITE_EVERY_S)
        finally:
            write()  # the end, or the failure that stopped the replay
    return ReplayResult(report, state_path, state)
