"""Whole user actions over `ops/`: what a `grpoctl` command or an SOP step does, as one function each that
returns a typed result. Both front ends call these: the CLI (cli.py) parses options and renders the results,
the SOP replayer (sop/replay.py) sequences them and records them. Nothing here prints: progress goes to
callbacks (the session's `say`, `on_stage`, `on_poll`, `on_round`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl_contract import rundir
from orchestrator import compare as cmp
from orchestrator import notify, plots, untrusted, validate, worker_data
from orchestrator import preflight as pf
from orchestrator.config import TargetConfig, load_config
from orchestrator.errors import GrpoctlError, InfraError, UsageError
from orchestrator.lifecycle import recovery as lifecycle
from orchestrator.lifecycle.monitor import Monitor, OnPoll, probe
from orchestrator.lifecycle.recovery import RecoveryPolicy
from orchestrator.lifecycle.states import RunState, is_terminal
from orchestrator.ops import env as env_ops
from orchestrator.ops import fetch as fetch_ops
from orchestrator.ops import launch as launch_ops
from orchestrator.ops import logs as logs_ops
from orchestrator.ops import sync as sync_ops
from orchestrator.ops import watch as watch_ops
from orchestrator.ops.session import Session, open_session
from orchestrator.runs import RunRecord, RunStore, utc_now_iso
from orchestrator.targets.base import Condition, Say, TargetState
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring

# ---------------------------------------------------------------------------------------- sessions


class Sessions:
    """One session per target, opened on first use and closed together: a command that touches runs of
    several targets (`status`), or an SOP whose steps name different targets, connects to each once.
    Every session shares one run store."""

    def __init__(
        self,
        *,
        config_file: str | None = None,
        target: str | None = None,
        dry_run: bool = False,
        accept_new_host_key: bool = False,
        say: Say = lambda _: None,
        store: RunStore | None = None,
        extra_targets: Mapping[str, TargetConfig] | None = None,
        stall_after_s: float | None = None,
        attach_any: bool = False,
        tpu_wiring: TpuWiring = REAL_TPU_VM,
    ) -> None:
        self.config_file, self.default_target = config_file, target
        self.attach_any = attach_any  # `--attach-any`: a TPU node of another type or spot-ness is attached
        self.dry_run, self.accept_new_host_key, self.say = dry_run, accept_new_host_key, say
        self.store = store if store is not None else (RunStore.in_memory() if dry_run else RunStore())
        self.extra_targets = dict(extra_targets or {})
        self.stall_after_s = stall_after_s  # `--stall-after`: replaces the config's stall_after_s
        self.tpu_wiring = tpu_wiring  # what tpu targets assume about their VMs (a stand-in's, in rehearsals)
        self._open: dict[str | None, Session] = {}

    def get(self, target: str | None = None) -> Session:
        """The session of `target` (default: the one given at construction, else the config's)."""
        name = target or self.default_target
        if name not in self._open:
            session = open_session(
                config_file=self.config_file,
                target=name,
                dry_run=self.dry_run,
                accept_new_host_key=self.accept_new_host_key,
                store=self.store,
                say=self.say,
                extra_targets=self.extra_targets,
                tpu_wiring=self.tpu_wiring,
            )
            if self.stall_after_s is not None:
                session.config = session.config.model_copy(update={"stall_after_s": self.stall_after_s})
            if self.attach_any and hasattr(session.target, "attach_any"):
                session.target.attach_any = True
            same = self._open.get(session.target_name)  # the default target, asked for by its name
            if same is not None:
                session.close()
                session = same
            self._open[name] = self._open[session.target_name] = session
        return self._open[name]

    def runs(self, run_id: str | None, *, limit: int = 20) -> list[RunRecord]:
        """The run `run_id` (id or unique prefix), else the latest `limit` runs."""
        self.get()  # the config is read, and a broken one refused, before the store is
        return [self.store.get(run_id)] if run_id else self.store.list(limit=limit)

    def record(self, run_id: str | None) -> RunRecord:
        """A stored run by id (or unique prefix); the latest run without one."""
        self.get()  # the config is read, and a broken one refused, before the store is
        if run_id:
            return self.store.get(run_id)
        records = self.store.list(limit=1)
        if not records:
            raise UsageError("no runs yet (grpoctl run CONFIG)")
        return records[0]

    def for_run(self, run_id: str | None, *, finished: bool = False) -> tuple[Session, RunRecord]:
        """A run and a session on the target it was launched on (not --target). Without an id: the latest
        run, or with `finished` the latest that SUCCEEDED (what `fetch` takes)."""
        record = self.latest_finished() if finished and not run_id else self.record(run_id)
        return self.get(record.target), record

    def latest_finished(self, scan: int = 200) -> RunRecord:
        self.get()
        records = self.store.list(limit=scan)
        done = next((r for r in records if r.state is RunState.SUCCEEDED), None)
        if done is None:
            latest = f" (the latest, {records[0].run_id}, is {records[0].state})" if records else ""
            raise UsageError(f"no finished run to fetch{latest}: name one, or wait for it (grpoctl status)")
        return done

    def close(self) -> None:
        for session in {id(s): s for s in self._open.values()}.values():
            session.close()
        self._open.clear()

    def __enter__(self) -> Sessions:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- machines


def up(session: Session) -> TargetState:
    """Make the target exist and be reachable (provision a TPU, or just connect)."""
    session.target.up()
    st = session.target.state()
    waited = getattr(session.target, "capacity_wait_s", None)
    if waited is not None:  # the ledger's waiting_for_capacity (TPU targets)
        st.details["waiting_for_capacity_s"] = round(waited, 1)
    return dataclasses.replace(
        st, target=session.target_name, kind=session.kind, workers=len(session.target.workers())
    )


def in_flight(session: Session) -> list[RunRecord]:
    """The runs on this target that may still run (or be recovered): deleting its machine stops them."""
    if session.kind != "tpu" or session.dry_run:  # fixed hosts: `down` releases nothing
        return []
    return [r for r in session.store.list(target=session.target_name, limit=500) if not is_terminal(r.state)]


def down(session: Session, stop: Sequence[RunRecord] = ()) -> None:
    """Release the target. The runs in `stop` (see `in_flight`) are recorded STOPPED first, and whoever
    watches them (a `run --recover` elsewhere) stops instead of recreating the node."""
    reason = f"its node was deleted by `grpoctl down` at {utc_now_iso()}"
    for record in stop:
        stored = session.store.get(record.run_id)
        stored.stop_requested, stored.state, stored.state_reason = reason, RunState.STOPPED, reason
        for w in stored.workers:
            w.state = RunState.STOPPED if not is_terminal(w.state) else w.state
        session.store.save(stored)  # these fields only: a watcher's own writes stay
    session.target.down()


def machine_line(session: Session) -> str | None:
    """`target v6e: READY (health HEALTHY, workers 1)` for TPU targets (machines with a state); the stored
    runs are still worth showing when the API cannot be asked, so an error becomes the line."""
    if session.kind != "tpu" or session.dry_run:
        return None
    try:
        st = session.target.state()
    except GrpoctlError as err:
        return f"target {session.target_name}: state unknown ({err})"
    shown = [k for k in ("health", "workers", "queued_resource") if k in st.details]
    extra = ", ".join(f"{k} {st.details[k]}" for k in shown)
    autodelete = getattr(session.target, "autodelete_line", lambda: None)() if st.state == "READY" else None
    return (
        f"target {session.target_name}: {st.state}"
        + (f" ({extra})" if extra else "")
        + (f"; {autodelete}" if autodelete else "")
    )


def sync(
    session: Session, *, bootstrap: bool = True, on_stage: sync_ops.OnStage | None = None
) -> sync_ops.SyncResult:
    """Every worker's checkout at origin's tip, then its venv (the one sync + bootstrap; recovery
    uses it too)."""
    return sync_ops.sync_and_bootstrap(session, bootstrap_venv=bootstrap, on_stage=on_stage)


def push_env(session: Session, file: str = ".env", *, optional: bool = False) -> env_ops.EnvPushResult | None:
    """The local `.env` on every worker (0600); None when `optional` and the file is absent."""
    if optional and not Path(file).is_file():
        return None
    return env_ops.push_env(session, file)


# -------------------------------------------------------------------------------------------- runs


def preflight_gate(
    session: Session, config: str, overrides: Mapping[str, str], env: Mapping[str, str]
) -> pf.Gate | None:
    """TPU targets: compile the run here for the target's chip before anything is paid for (UsageError when
    it cannot fit); None for targets without a TPU. A dry run never compiles (cached reports only)."""
    if session.kind != "tpu":
        return None
    accelerator = session.target_cfg.accelerator_type  # type: ignore[union-attr]
    return pf.gate(
        config,
        overrides=overrides,
        env=env,
        accelerator=accelerator,
        say=session.say,
        dry_run=session.dry_run,
    )


def check_run(session: Session, config: str, overrides: Mapping[str, str], env: Mapping[str, str]) -> str:
    """The run's config and `--set` overrides checked here, before anything remote (validate.py); returns
    the config path as the workers spell it."""
    return validate.check_run(
        config,
        overrides=overrides,
        env=env,
        repo_url=session.repo.url,
        branch=session.repo.branch,
        target_kind=session.kind,
    )


def launch(
    session: Session,
    config: str,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    force: bool = False,
    gate: bool = True,
    flags: Mapping[str, str] | None = None,
) -> RunRecord:
    """Check the config here (validate.py), preflight (TPU targets, unless `gate` is off), then start the
    run on every worker; returns its saved record as soon as every worker has a pid. `env`: the secrets
    (`--secret`: a 0600 file on the workers, never stored); `flags`: the `-e` values, which are not secret
    (stored, shown, exported)."""
    env, overrides, flags = dict(env or {}), dict(overrides or {}), dict(flags or {})
    config = check_run(session, config, overrides, flags)  # the env flags switch config keys on
    if gate:
        preflight_gate(session, config, overrides, flags)
    machine = None if session.dry_run else session.target.machine()
    for warning in machine.warnings if machine is not None else ():  # said before anything is paid for
        session.say(f"warning: {session.target_name}: {warning}")
    return launch_ops.start_run(
        session, config, env=env, trainer_args=launch_ops.set_args(overrides), force=force, flags=flags
    )


def wait(
    session: Session,
    record: RunRecord,
    policy: RecoveryPolicy | None = None,
    *,
    interval: float = 15.0,
    on_poll: OnPoll | None = None,
) -> RunRecord:
    """Until the run ends: what the machine does to it recovered under `policy`, raised (exit 3) without
    one (orchestrator/lifecycle/recovery.py). grpoctl.yaml's `notify` hears of each preemption and
    recovery (from the monitor's decisions), and of the end."""
    notifier = notify.Notifier(session.config.notify, session.say)
    notices = notify.RunNotices(notifier, record, lambda rec: _ledger_line(rec, session.config.prices))

    try:
        done = lifecycle.wait(
            session, record, policy, interval=interval, on_poll=on_poll,
            on_decision=[notices.on_decision],
        )
    except GrpoctlError as err:
        notices.finished(record, err)
        raise
    notices.finished(done, None)
    return done


def _ledger_line(record: RunRecord, prices: Mapping[str, Any]) -> str:
    from orchestrator import ledger

    led = ledger.run_ledger(record, now=time.time(), prices=prices)
    goodput = "?" if led.goodput is None else f"{led.goodput:.0%}"
    cost = led.cost_estimate_usd
    return f"{led.chip_hours:.3g} chip-hours, goodput {goodput}" + (f", ~${cost:.2f} (est.)" if cost else "")


def reattach(record: RunRecord, env: Mapping[str, str]) -> None:
    """Give a stored run its secrets again (never stored) before it is waited for or relaunched; refuses,
    before anything is recreated, when one is missing (a relaunch could not give it to the job)."""
    missing = sorted(set(record.env_names) - set(env))
    if missing:
        raise UsageError(
            f"run {record.run_id} was launched with --secret {', '.join(missing)}: pass them again "
            "(" + " ".join(f"--secret {m}" for m in missing) + "; secret values are never stored)"
        )
    record.env = dict(env)


def stop(session: Session, record: RunRecord) -> list[str]:
    """TERM then KILL on every worker; the record's final state is polled and saved. Returns what each
    worker said."""
    said = watch_ops.kill(session.target, record)
    probe(session.target, record)
    session.store.save(record)
    return said


@dataclass
class StatusRound(lifecycle.Round):
    """One look at the runs `status` shows, with the default target's machine line (TPU targets)."""

    machine: str | None = None


def watch_status(
    sessions: Sessions,
    records: Sequence[RunRecord],
    *,
    watch: bool,
    interval: float,
    on_round: Callable[[StatusRound], None],
) -> list[RunRecord]:
    """Poll every unfinished run once (each on its own target, through its lifecycle monitor) and hand the
    round to `on_round`; with `watch`, again every `interval` s until they all end. Records are saved as
    they change; what the monitor decides is recorded (PREEMPTED, STOPPED), never acted on."""
    base = sessions.get()

    def monitor_of(record: RunRecord) -> Monitor | str:
        try:
            session = sessions.get(record.target)
        except UsageError as err:  # e.g. an SOP's inline target: show what is stored
            return str(err)
        return Monitor(session.target, record, sessions.store, stall_after_s=session.config.stall_after_s)

    def on_look(round_: lifecycle.Round) -> None:
        on_round(StatusRound(round_.records, round_.unreachable, machine_line(base)))

    return lifecycle.observe(records, monitor_of, watch=watch, interval=interval, on_round=on_look)


def log_text(
    session: Session,
    record: RunRecord,
    *,
    worker: int = 0,
    lines: int = 200,
    env_file: str = ".env",
    events: bool = False,
) -> str:
    """The last `lines` human lines of a worker's log (with `events`: its JSON event lines instead), every
    secret value (local `.env`, the worker's, `-e`) redacted, and made safe for a terminal (worker text is
    data, never terminal control: untrusted.clean_text)."""
    redact = _redactor(session, record, worker, env_file)
    # Most events have a human twin: read enough raw lines that `lines` remain once one kind is dropped.
    raw = logs_ops.tail(session.target, record, worker=worker, lines=lines * 2 + 20)
    kept = logs_ops.select(raw, events=events).splitlines(keepends=True)
    return untrusted.clean_text(redact("".join(kept[-lines:] if lines else [])))


def follow_log(
    session: Session,
    record: RunRecord,
    emit: Callable[[str], None],
    *,
    worker: int = 0,
    env_file: str = ".env",
    events: bool = False,
) -> str:
    """Stream a worker's log (redacted, made safe for a terminal; human lines, or with `events` the JSON
    event lines) to `emit` until the run ends there; returns its final state."""
    redact = _redactor(session, record, worker, env_file)

    def shown(text: str) -> None:
        picked = logs_ops.select(text, events=events)
        if picked:
            emit(untrusted.clean_text(redact(picked)))

    return logs_ops.follow(session.target, record, shown, worker=worker)


def final_summary(session: Session, record: RunRecord) -> dict[str, Any]:
    """A finished run's summary.json as worker 0 holds it (best effort: {} when it cannot be read)."""
    from orchestrator.ops.env import absolute_remote_dir

    if record.state is not RunState.SUCCEEDED:
        return {}
    try:
        t = session.target.transports()[0]
        path = f"{absolute_remote_dir(t, record.remote_dir)}/{record.run_dir}/{rundir.SUMMARY}"
        # bounded and validated like every worker file (untrusted.py, worker_data.py)
        return worker_data.summary(untrusted.read(t, path, untrusted.SUMMARY), path)
    except (GrpoctlError, OSError):
        return {}


def _redactor(session: Session, record: RunRecord, worker: int, env_file: str) -> Callable[[str], str]:
    return env_ops.redactor(logs_ops.secret_values(session.target, record, env_file, worker=worker))


# ----------------------------------------------------------------------------------------- results


def fetch_dest(dest: str | Path, dry_run: bool) -> Path:
    """Where fetched runs land: a dry run's made-up results never beside real ones."""
    return Path(dest) / "dry-run" if dry_run else Path(dest)


def fetch(session: Session, record: RunRecord, dest: str | Path = "runs") -> fetch_ops.FetchResult:
    """Copy the run's result files to `<dest>/<run id>/` and remember where in its record."""
    try:
        result = fetch_ops.fetch(session.target, record, fetch_dest(dest, session.dry_run))
    except InfraError as err:
        raise _gone_hint(session, record, err) from None
    record.fetched_to = str(result.folder)
    session.store.save(record)
    return result


def _gone_hint(session: Session, record: RunRecord, err: InfraError) -> InfraError:
    """A fetch that failed because the VM holding the run's files is gone: say so, and how to get them."""
    try:
        machine = session.target.machine()
    except GrpoctlError:
        machine = None
    if machine is None or machine.condition is Condition.UP:
        return err
    return InfraError(
        f"{err}; the node that held run {record.run_id}'s files is {machine.state}. Its history is kept with "
        f"its checkpoints (checkpoint.dir): grpoctl recover {record.run_id} relaunches it (a finished run "
        "resumes at its last step and writes its files again), then fetch"
    )


@dataclass(frozen=True)
class LocalRun:
    folder: Path
    fetched: fetch_ops.FetchResult | None  # None: the folder was there already


def fetch_if_missing(session: Session, record: RunRecord, dest: str | Path = "runs") -> LocalRun:
    """The run's local folder, fetched only when it has no summary yet (a finished run's files never
    change, and the machine that held them may be gone since)."""
    folder = fetch_dest(dest, session.dry_run) / record.run_id
    if (folder / rundir.SUMMARY).is_file():
        return LocalRun(folder, None)
    result = fetch(session, record, dest)
    return LocalRun(result.folder, result)


def run_folder(sessions: Sessions, ref: str, dest: str | Path = "runs") -> Path:
    """A fetched folder as given, or a run id's folder (fetched on demand)."""
    path = Path(ref)
    if path.is_dir():
        return path
    session, record = sessions.for_run(ref)
    return fetch_if_missing(session, record, dest).folder


@dataclass(frozen=True)
class Compared:
    a: list[cmp.RunFiles]  # arm A: one run, or a group (seeds)
    b: list[cmp.RunFiles]
    result: cmp.Comparison
    plot: Path | None


def _folders(x: Path | Sequence[Path]) -> list[Path]:
    return [x] if isinstance(x, str | Path) else list(x)


def compare_folders(
    a: Path | Sequence[Path],
    b: Path | Sequence[Path],
    keys: Sequence[str] | None = None,
    plot: str | Path | None = None,
    *,
    margin: float = cmp.stats.DEFAULT_MARGIN,
    labels: tuple[str, str] | None = None,
    names: Mapping[str, str] | None = None,
) -> Compared:
    """Two arms of fetched run folders (one each, or groups); `labels`/`names` as in compare_runs."""
    runs_a, runs_b = [cmp.load_run(f) for f in _folders(a)], [cmp.load_run(f) for f in _folders(b)]
    result = cmp.compare_runs(
        runs_a, runs_b, list(keys) if keys else None, margin=margin, labels=labels, names=names
    )
    if plot is not None:
        plots.plot(runs_a, runs_b, plot, labels=labels, names=names)
    return Compared(runs_a, runs_b, result, None if plot is None else Path(plot))


def split_group(ref: str) -> list[str]:
    """`s0,s1,s2` -> its run ids / folders; empty parts are a usage error."""
    parts = [p.strip() for p in ref.split(",")]
    if not all(parts):
        raise UsageError(f"{ref!r}: a group is run ids or folders separated by commas, with none empty")
    return parts


def compare(
    sessions: Sessions,
    a: str,
    b: str,
    *,
    keys: Sequence[str] | None = None,
    plot: str | None = None,
    dest: str = "runs",
    margin: float = cmp.stats.DEFAULT_MARGIN,
) -> Compared:
    """Two arms side by side, with the verdicts. Each arm is a run id (fetched on demand), a fetched folder,
    or a comma-separated list of them (`s0,s1,s2`: the seeds of one arm)."""
    if plot:  # before any fetch: a bad path (or no matplotlib) is the user's to fix, nothing happens first
        plots.check_plot_path(plot)
        plots.pyplot()
    try:
        cmp.stats.check_margin(margin)
    except ValueError as err:
        raise UsageError(f"--margin: {err}") from None
    refs_a, refs_b = split_group(a), split_group(b)
    folders_a = [run_folder(sessions, r, dest) for r in refs_a]
    folders_b = [run_folder(sessions, r, dest) for r in refs_b]
    return compare_folders(folders_a, folders_b, keys, plot, margin=margin)


# ----------------------------------------------------------------------------------------- laptop


def accelerator_for(config_file: str | None, target: str | None) -> str:
    """The TPU type to preflight for: the tpu target's accelerator_type, else the default (v6e-8)."""
    _, target_cfg = load_config(config_file).target(target)
    return getattr(target_cfg, "accelerator_type", None) or pf.DEFAULT_ACCELERATOR


def find_leftovers(
    config_file: str | None, target: str | None, *, tpu_wiring: TpuWiring = REAL_TPU_VM
) -> list[tuple[Any, Any]]:
    """PREEMPTED/TERMINATED nodes and FAILED/SUSPENDED queued resources grpoctl left behind."""
    from orchestrator.cloud import gc as cloud_gc  # the Cloud TPU client: only for this command

    return cloud_gc.find_all(load_config(config_file), target, read_retry=tpu_wiring.read_retry)


def delete_leftover(api: Any, leftover: Any) -> None:
    from orchestrator.cloud import gc as cloud_gc

    cloud_gc.delete_leftover(api, leftover)
