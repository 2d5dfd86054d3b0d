"""Launch a run on every worker (detached under setsid nohup) and return its record at once."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from grpoctl_contract import envfile
from grpoctl_contract.rundir import RunPaths
from orchestrator import recipes
from orchestrator.errors import InfraError, UsageError
from orchestrator.lifecycle.states import RunState
from orchestrator.ops.fanout import PerWorker, fan_out
from orchestrator.ops.session import Session
from orchestrator.retry import Backoff, poll_until, retry_call
from orchestrator.runs import RunRecord, WorkerRun, new_run_id, utc_stamp
from orchestrator.targets.base import COORDINATOR_PORT, Worker
from orchestrator.transport.base import Transport
from orchestrator.transport.local import LOCAL_TOOLS_NEEDED


def new_record(
    session: Session,
    config: str,
    *,
    env: Mapping[str, str] | None = None,
    trainer_args: Sequence[str] = (),
    git_commit: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> RunRecord:
    """A record with its id and the per-worker paths decided here, before anything starts. `env`: the
    secrets (never stored); `flags`: the `-e` values that are not secret (stored, exported on the worker)."""
    stem = Path(config).stem
    ts = utc_stamp()
    run_id = new_run_id(stem, ts)
    paths = RunPaths.for_run(stem, ts, run_id)
    return RunRecord(
        run_id=run_id,
        config=config,
        target=session.target_name,
        target_kind=session.kind,
        remote_dir=session.remote_dir,
        log_path=paths.log,
        pid_path=paths.pid,
        exit_path=paths.exit,
        run_dir=paths.run_dir,
        ts=ts,
        env=dict(env or {}),
        flags=dict(flags or {}),
        trainer_args=list(trainer_args),
        workers=[
            WorkerRun(w.label, f"{w.host}:{w.port}" if w.port != 22 else w.host)
            for w in session.target.workers()
        ],
        git_commit=git_commit,
        python=session.python,
        accelerator_type=getattr(session.target_cfg, "accelerator_type", None),
        spot=_spot_of(session),
    )


def _spot_of(session: Session) -> bool | None:
    """Whether the run's machine is spot (the ledger's price): the node's own answer where the target has
    one (`spot: prefer` may have ended on-demand), else the config's."""
    is_spot = getattr(session.target, "is_spot", None)
    if is_spot is not None:
        return is_spot()
    spot = getattr(session.target_cfg, "spot", None)
    return None if spot is None else spot is not False


def set_args(overrides: Mapping[str, str]) -> list[str]:
    """Trainer `--set key=value` arguments for these overrides."""
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def paths_of(record: RunRecord) -> RunPaths:
    return RunPaths(record.log_path, record.pid_path, record.exit_path, record.run_dir)


def renew_attempt(record: RunRecord) -> None:
    """New log/pid/exit paths (a fresh UTC stamp) for relaunching the same run, e.g. after preemption.

    The run dir stays: the trainer resumes from its checkpoints there. The paths differ from the last
    attempt's: they are stamped to the second, so a relaunch within the same second waits for the next.
    """
    taken = record.log_path

    def stamped() -> bool | None:
        record.ts = utc_stamp()
        fresh = RunPaths.for_run(record.config_stem, record.ts, record.run_id)
        record.log_path, record.pid_path, record.exit_path = fresh.log, fresh.pid, fresh.exit
        return True if record.log_path != taken else None

    poll_until(stamped, poll_s=0.2)
    for w in record.workers:
        w.pid, w.state, w.exit_code = None, RunState.STARTING, None


def secret_env_file(env: Mapping[str, str]) -> bytes | None:
    """`--secret` values as a `.env` file for the worker (None without any): the same format and parser as
    `.env`, so they never need a command line. A value the format cannot hold is a one-line UsageError."""
    if not env:
        return None
    try:
        return envfile.render(dict(env))
    except ValueError as err:
        raise UsageError(f"--secret {err}") from None


# `-e NAME=VALUE` is for flags that are not secret (they are stored, exported on the worker's command lines
# and shown in reports). A name made of one of these words is a secret's: `-e` refuses it (--secret).
_SECRET_WORDS = frozenset(
    {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "PWD", "CREDENTIAL", "CREDENTIALS",
     "AUTH", "PRIVATE", "SESSION", "COOKIE"}
)


def check_flags(flags: Mapping[str, str]) -> None:
    """Refuse an `-e` flag whose name says it is a secret: its value would be stored and shown."""
    for name in flags:
        if _SECRET_WORDS & set(name.upper().replace("-", "_").split("_")):
            raise UsageError(
                f"-e {name}=...: {name} looks like a secret, and -e values are stored and shown; pass "
                f"--secret {name} instead (its value from the environment, .env or a prompt)"
            )


class LogNameTaken(UsageError):
    """This run's log file name is already in use on a worker (another launch in the same second)."""


class _EveryNameTaken(Exception):
    """The log name was taken on every worker: nothing started, a fresh name may start everywhere."""

    def __init__(self, results: list[PerWorker[int]]) -> None:
        super().__init__("log name taken on every worker")
        self.results = results


# No wait of its own between tries: `renew_attempt` waits for the clock's next second.
NAME_TAKEN_RETRY = Backoff(attempts=4, first_s=0.0, jitter=False)


def worker_env(
    run_id: str, index: int, workers: Sequence[Worker], coordinator_port: int = COORDINATOR_PORT
) -> dict[str, str]:
    """What every worker's trainer is told about the run and its peers.

    With several workers the trainer calls jax.distributed.initialize() with worker 0 (as its peers reach
    it: a TPU VM's internal IP) as the coordinator, whatever the target's kind. On a TPU slice that is the
    address JAX would discover from the TPU metadata anyway; saying it makes a slice whose metadata JAX
    cannot read (the rehearsal's CPU workers, a VM built by hand) work the same way. `coordinator_port`
    is the target's (a stand-in whose workers share one address picks a free one).
    """
    env = {"GRPOCTL_RUN_ID": run_id, "GRPOCTL_WORKER": str(index)}
    if len(workers) > 1:
        env |= {
            "GRPOCTL_DISTRIBUTED": "1",
            "GRPOCTL_NUM_PROCESSES": str(len(workers)),
            "GRPOCTL_PROCESS_ID": str(index),
            "JAX_COORDINATOR_ADDRESS": f"{workers[0].peer_host or workers[0].host}:{coordinator_port}",
        }
    return env


def launch(target, record: RunRecord, *, force: bool = False, timeout: float = 120) -> RunRecord:
    """Start `record` on every worker of `target` in parallel; fill in pids. Does not save the record.

    Refuses (UsageError, nothing started anywhere new) when a worker is busy, unless `force`. A worker that
    fails to start makes the launch fail after the started ones are stopped again.
    """
    python = record.python or recipes.venv_python(record.remote_dir)
    paths = paths_of(record)
    target.before_launch(record.remote_dir, force=force)  # a TPU VM: clear stale chip users (tpu.py)
    record.launched_at_s, record.ended_at_s = time.time(), None

    workers = target.workers()

    missing = sorted(set(record.env_names) - set(record.env))
    if missing:  # a record read back from the store: the values were never stored
        raise UsageError(
            f"run {record.run_id} needs its secrets {', '.join(missing)} again (never stored): "
            f"grpoctl recover {record.run_id} " + " ".join(f"--secret {m}" for m in missing)
        )
    secrets_file = secret_env_file(record.env)
    heads: dict[int, str] = {}

    def one(i: int, t: Transport) -> int:
        if secrets_file is not None:  # before the launch script, whose job reads them
            base = record.remote_dir.rstrip("/")
            t.put(recipes.ENVFILE_SOURCE, f"{base}/{paths.env_loader}", mode=0o600)
            t.put(secrets_file, f"{base}/{paths.env}", mode=0o600)
        script = recipes.launch(
            record.remote_dir,
            python,
            record.config,
            paths,
            config_stem=record.config_stem,
            env={**record.flags, **worker_env(record.run_id, i, workers, target.coordinator_port)},
            trainer_args=record.trainer_args,
            force=force,
            env_file=secrets_file is not None,
        )
        result = t.run(script, timeout=timeout)
        if result.exit_code == recipes.EXIT_BUSY:
            raise UsageError(f"{t.name}: busy ({recipes.parse_busy(result.stdout)}); stop it or pass --force")
        if result.exit_code == recipes.EXIT_NO_CHECKOUT:
            raise UsageError(f"{t.name}: no checkout in {record.remote_dir}: run `grpoctl sync` first")
        if result.exit_code == recipes.EXIT_NO_CONFIG:
            raise UsageError(
                f"{t.name}: {record.config} is not in the checkout (commit and push it, then `grpoctl sync`)"
            )
        if result.exit_code == recipes.EXIT_NO_TOOL:
            tool = recipes.parse_missing_tool(result.stdout) or "setsid or flock"
            if record.target_kind == "local":
                raise UsageError(f"{LOCAL_TOOLS_NEEDED} (missing: {tool}; install util-linux)")
            raise UsageError(f"{t.name}: no {tool} on the worker (install util-linux)")
        if result.exit_code == recipes.EXIT_EXISTS:
            raise LogNameTaken(f"{t.name}: {record.log_path} already exists")
        pid = recipes.parse_pid(result.stdout)
        head = recipes.parse_launch_head(result.stdout)
        if head:
            heads[i] = head
        if not result.ok or pid is None:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise InfraError(f"{t.name}: launch failed (exit {result.exit_code}): {detail}")
        return pid

    def start_everywhere() -> list[PerWorker[int]]:
        results = fan_out(target.transports(), one)
        if results and all(isinstance(r.error, LogNameTaken) for r in results):
            raise _EveryNameTaken(results)
        return results

    def next_name(_attempt: int, _err: BaseException, _wait_s: float) -> None:
        nonlocal paths
        renew_attempt(record)
        paths = paths_of(record)

    # Log names have 1 s resolution: another launch of the same config in the same second took this one
    # on every worker. Nothing started, so it is tried again under the next second's name (3 times).
    try:
        results = retry_call(
            start_everywhere,
            retry_on=lambda err: isinstance(err, _EveryNameTaken),
            policy=NAME_TAKEN_RETRY,
            on_retry=next_name,
        )
    except _EveryNameTaken as still:
        results = still.results  # reported below like any launch that failed everywhere
    for r, w in zip(results, record.workers, strict=True):
        w.pid, w.state = r.value, (RunState.RUNNING if r.ok else RunState.LOST)
    failed = [r for r in results if r.error is not None]
    if failed:
        started = [t for r, t in zip(results, target.transports(), strict=True) if r.ok]
        if started:  # a partial start is worse than none: multi-host jobs would hang waiting for peers
            kill_script = recipes.kill(record.remote_dir, paths)
            fan_out(started, lambda _i, t: t.run(kill_script, timeout=60))
        record.state = RunState.FAILED
        raise failed[0].error
    record.state = RunState.RUNNING
    if heads:  # sync left every worker on one commit; worker 0's is the run's
        record.git_commit = heads.get(0) or next(iter(heads.values()))
    return record


def start_run(
    session: Session,
    config: str,
    *,
    env: Mapping[str, str] | None = None,
    trainer_args: Sequence[str] = (),
    force: bool = False,
    git_commit: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> RunRecord:
    """Create, save, launch, save again; returns as soon as every worker has a pid. `env`: secrets;
    `flags`: the `-e` values that are not secret."""
    check_flags(flags or {})
    record = new_record(
        session, config, env=env, trainer_args=trainer_args, git_commit=git_commit, flags=flags
    )
    secret_env_file(record.env)  # refuse an unrepresentable secret before anything is saved or started
    session.store.save(record)
    # Ctrl-C while the workers start the job would leave a job no record tracks: the launch (bounded by
    # its timeout) finishes and is recorded first, then the interrupt is raised.
    with deferred_interrupt(session.say) as interrupted:
        try:
            launch(session.target, record, force=force)
        except BaseException:
            if any(w.pid for w in record.workers):
                session.store.save(record)
            else:  # nothing started anywhere: leave no record behind
                session.store.delete(record.run_id)
            raise
        session.store.save(record)
    if interrupted():
        raise KeyboardInterrupt
    return record


@contextlib.contextmanager
def deferred_interrupt(say: Callable[[str], None]) -> Iterator[Callable[[], bool]]:
    """Hold SIGINT back for the block; yields a function saying whether one arrived. Only the main thread
    can handle signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    seen: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        if not seen:
            say("interrupt: finishing the launch so that the job is recorded (it keeps running)")
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)
