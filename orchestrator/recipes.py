"""Remote recipes: pure functions that build the shell text run on each worker.

Every value that comes from outside (paths, URLs, branch names, config paths, env flags) is quoted with
`shlex.quote` (paths starting with `~/` keep the tilde meaning through `"$HOME"`). No recipe ever carries a
secret: `.env` travels by `Transport.put`, and `env_verify` reports key names and value lengths only.

Each recipe prints `KEY=value` lines that the matching `parse_*` function reads back.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.errors import UsageError

# Exit codes the recipes use to say "refused" (never produced by git, pip or the trainer on purpose).
EXIT_BUSY = 75  # another job holds the worker
EXIT_EXISTS = 73  # the run's log file already exists
EXIT_NOT_CHECKOUT = 65  # remote_dir exists but is not a git checkout
EXIT_NO_PYTHON = 69  # no python >= 3.11 on the worker

# Spared by `git clean`: run outputs, the venv and the secrets file live inside the checkout.
SPARED_BY_CLEAN = ("logs/", "runs/", "wandb/", ".env", ".venv/")

PROGRESS_PREFIX = '{"event": '


def q(value: str) -> str:
    return shlex.quote(str(value))


def qpath(path: str) -> str:
    """Quote a path for the shell, keeping a leading `~/` (or a bare `~`) relative to `$HOME`."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + q(path[2:])
    return q(path)


def _script(*lines: str) -> str:
    return "\n".join(["set -eu", *lines]) + "\n"


# `kill -0` succeeds on a zombie, and a killed job whose parent never reaps it (PID 1 in many containers)
# stays one: a pid counts as alive only if it exists and is not in state Z.
_ALIVE_FN = (
    'alive() { kill -0 "$1" 2>/dev/null || return 1; '
    's=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -c1); [ "$s" != Z ]; }'
)


# --------------------------------------------------------------------------------------------- sync


def sync(repo_dir: str, url: str, branch: str) -> str:
    """Clone if missing, fetch, check out `branch` at origin's tip, clean (sparing run outputs), print HEAD.

    "Clone" is `git init` + `remote add` so that a checkout folder that already holds only spared entries
    (an `.env` pushed first, old logs) is adopted; any other non-empty folder is refused, never wiped.
    """
    excludes = " ".join(f"-e {q(p)}" for p in SPARED_BY_CLEAN)
    spared = "|".join(re.escape(p.rstrip("/")) for p in SPARED_BY_CLEAN)
    origin = q(f"origin/{branch}")
    return _script(
        f"REPO={qpath(repo_dir)}",
        'mkdir -p "$REPO"',
        'cd "$REPO"',
        "if [ ! -d .git ]; then",
        f"  if ls -A | grep -v -x -E {q(spared)} >/dev/null; then",
        f'    echo "$REPO is not a git checkout and not empty: refusing it" >&2; exit {EXIT_NOT_CHECKOUT}',
        "  fi",
        "  git init --quiet",
        f"  git remote add origin {q(url)}",
        "fi",
        f"git remote set-url origin {q(url)}",
        "git fetch --all --prune --quiet",
        f"git checkout --quiet --force -B {q(branch)} {origin}",
        f"git reset --quiet --hard {origin}",
        f"git clean -fdq {excludes}",
        'echo "HEAD=$(git rev-parse HEAD)"',
    )


def parse_head(stdout: str) -> str | None:
    return _last_value(stdout, "HEAD")


# ---------------------------------------------------------------------------------------- bootstrap


def bootstrap(repo_dir: str, extras: Sequence[str]) -> str:
    """A python >= 3.11 venv at `<checkout>/.venv` with `pip install -e .[extras]`; prints PYTHON=."""
    spec = q(".[{}]".format(",".join(extras)) if extras else ".")
    return _script(
        f"cd {qpath(repo_dir)}",
        'PY=""',
        "for c in python3.13 python3.12 python3.11 python3; do",
        '  if command -v "$c" >/dev/null 2>&1 \\',
        '     && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then',
        '    PY="$c"; break',
        "  fi",
        "done",
        f'[ -n "$PY" ] || {{ echo "no python >= 3.11 on this worker" >&2; exit {EXIT_NO_PYTHON}; }}',
        '[ -x .venv/bin/python ] || "$PY" -m venv .venv',
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        f".venv/bin/python -m pip install --quiet -e {spec}",
        'echo "PYTHON=$PWD/.venv/bin/python"',
    )


def parse_python(stdout: str) -> str | None:
    return _last_value(stdout, "PYTHON")


def venv_python(repo_dir: str) -> str:
    return f"{repo_dir.rstrip('/')}/.venv/bin/python"


# ------------------------------------------------------------------------------------------ env push


def home_dir() -> str:
    """Prints `$HOME`, to turn `~/...` into the absolute path that SFTP needs."""
    return 'printf "HOME=%s\\n" "$HOME"\n'


def parse_home(stdout: str) -> str | None:
    return _last_value(stdout, "HOME")


def env_verify(env_path: str) -> str:
    """Print the file's mode and, per key, the LENGTH of its value (never the value)."""
    # awk reads the file itself: no value is ever on a command line or in the output.
    awk = (
        r"""/^[ \t]*(export[ \t]+)?[A-Za-z_][A-Za-z0-9_]*=/ {"""
        r""" sub(/^[ \t]*(export[ \t]+)?/, ""); k = $0; sub(/=.*/, "", k);"""
        r""" v = substr($0, length(k) + 2); sub(/\r$/, "", v);"""
        r""" if (v ~ /^".*"$/ || v ~ /^'.*'$/) v = substr(v, 2, length(v) - 2);"""
        r""" print "KEYLEN=" k ":" length(v) }"""
    )
    return _script(
        f"F={qpath(env_path)}",
        'echo "MODE=$(stat -c %a "$F")"',
        f'awk {q(awk)} "$F"',
    )


def parse_env_verify(stdout: str) -> tuple[str | None, dict[str, int]]:
    mode = _last_value(stdout, "MODE")
    lengths: dict[str, int] = {}
    for line in stdout.splitlines():
        if line.startswith("KEYLEN="):
            key, _, length = line[len("KEYLEN=") :].rpartition(":")
            lengths[key] = int(length)
    return mode, lengths


# -------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files live on every worker, relative to the checkout."""

    log: str
    pid: str
    exit: str
    run_dir: str

    @staticmethod
    def for_run(config_stem: str, ts: str, run_id: str) -> RunPaths:
        base = f"logs/nohup_{config_stem}_{ts}"
        return RunPaths(log=f"{base}.log", pid=f"{base}.pid", exit=f"{base}.exit", run_dir=f"runs/{run_id}")


# The job wrapper: constant text, its inputs arrive as positional arguments (nothing to quote inside).
# It records its own pid (the session leader: `kill -- -PID` stops the whole job), runs the trainer as a
# child and writes the exit file when the child ends or when it is told to stop (TERM/INT).
_JOB_WRAPPER = r"""
py=$1; config=$2; run_dir=$3; pidf=$4; exitf=$5; shift 5
echo $$ > "$pidf"
child=""
write_exit() { printf '%s\n' "$1" > "$exitf.tmp" && mv -f "$exitf.tmp" "$exitf"; }
on_signal() {
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
  write_exit "$1"; exit "$1"
}
trap 'on_signal 143' TERM
trap 'on_signal 130' INT
"$py" -u -m trainer --config "$config" --run-dir "$run_dir" "$@" &
child=$!
wait "$child"; code=$?
write_exit "$code"
exit "$code"
""".strip()


def _busy_check() -> list[str]:
    # A job is running when a pid file has a live pid and no exit file; a TPU is busy when a process
    # holds its device files (v5e/v6e: /dev/vfio/N, older: /dev/accelN).
    return [
        _ALIVE_FN,
        "for f in logs/nohup_*.pid; do",
        '  [ -e "$f" ] || continue',
        '  case "$f" in *_latest.pid) continue ;; esac',
        '  p=$(cat "$f" 2>/dev/null || true)',
        '  if [ -n "$p" ] && [ ! -e "${f%.pid}.exit" ] && alive "$p"; then',
        f'    echo "BUSY=$f pid $p"; exit {EXIT_BUSY}',
        "  fi",
        "done",
        "for d in /dev/accel* /dev/vfio/[0-9]*; do",
        '  [ -e "$d" ] || continue',
        '  if command -v fuser >/dev/null 2>&1 && fuser "$d" >/dev/null 2>&1; then',
        f'    echo "BUSY=$d is held by another process"; exit {EXIT_BUSY}',
        "  fi",
        "done",
    ]


def launch(
    repo_dir: str,
    python: str,
    config: str,
    paths: RunPaths,
    *,
    config_stem: str,
    env: Mapping[str, str] | None = None,
    trainer_args: Sequence[str] = (),
    force: bool = False,
) -> str:
    """Start the trainer under `setsid nohup`, detached; prints PID= once the job has written its pid."""
    exports = [f"export {_env_name(k)}={q(v)}" for k, v in sorted((env or {}).items())]
    latest = [
        f"ln -sfn {q(_basename(getattr(paths, ext)))} {q(f'logs/nohup_{config_stem}_latest.{ext}')}"
        for ext in ("log", "pid", "exit")
    ]
    args = " ".join(q(a) for a in [python, config, paths.run_dir, paths.pid, paths.exit, *trainer_args])
    return _script(
        f"cd {qpath(repo_dir)}",
        "mkdir -p logs runs",
        *([] if force else _busy_check()),
        f"if [ -e {q(paths.log)} ]; then echo EXISTS={q(paths.log)}; exit {EXIT_EXISTS}; fi",
        *latest,
        "export PYTHONUNBUFFERED=1",
        *exports,
        f"setsid nohup bash -c {q(_JOB_WRAPPER)} grpoctl-job {args} > {q(paths.log)} 2>&1 < /dev/null &",
        "for _ in $(seq 100); do",
        f"  [ -s {q(paths.pid)} ] && break; sleep 0.05",
        "done",
        f'echo "PID=$(cat {q(paths.pid)} 2>/dev/null || true)"',
    )


def parse_pid(stdout: str) -> int | None:
    value = _last_value(stdout, "PID")
    return int(value) if value and value.isdigit() else None


def parse_busy(stdout: str) -> str | None:
    return _last_value(stdout, "BUSY")


# -------------------------------------------------------------------------------------------- status


def status(repo_dir: str, paths: RunPaths) -> str:
    """Probe one run on one worker: exit file, pid liveness and the last progress line of the log."""
    return _script(
        f"cd {qpath(repo_dir)} 2>/dev/null || {{ echo CHECKOUT=missing; exit 0; }}",
        _ALIVE_FN,
        f"p=$(cat {q(paths.pid)} 2>/dev/null || true)",
        'echo "PIDV=$p"',
        # Liveness before the exit file: the wrapper writes the file, then exits. Read the other way round,
        # a job ending between the two reads would look LOST (no exit file, no process).
        'if [ -n "$p" ] && alive "$p"; then echo ALIVE=1; else echo ALIVE=0; fi',
        f'if [ -e {q(paths.exit)} ]; then echo "EXIT=$(cat {q(paths.exit)})"; fi',
        f"if [ -e {q(paths.log)} ]; then echo LOG=1; else echo LOG=0; fi",
        f"line=$(grep -F {q(PROGRESS_PREFIX)} {q(paths.log)} 2>/dev/null | tail -n 1 || true)",
        'printf "PROGRESS=%s\\n" "$line"',
        # Seconds since the log last grew, by the worker's own clock (GNU stat, else BSD): STALLED.
        f"m=$(stat -c %Y {q(paths.log)} 2>/dev/null || stat -f %m {q(paths.log)} 2>/dev/null || true)",
        'if [ -n "$m" ]; then echo "QUIET=$(( $(date +%s) - m ))"; fi',
    )


STEP_TIME_KEY = "time/train/step_s"  # in the trainer's progress lines (docs/ARCHITECTURE.md)


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    elapsed_s: float | None = None
    metrics: Mapping[str, float] | None = None
    done: bool = False

    @property
    def eta_s(self) -> float | None:
        if self.total and self.step >= self.total:
            return 0.0
        if self.step <= 0:
            return None
        # elapsed/step counts start-up (compilation, a warm start) as if every step paid it again: once the
        # trainer reports its own step time (past step 1, which compiles), that is the better rate.
        step_s = (self.metrics or {}).get(STEP_TIME_KEY)
        if self.step > 1 and isinstance(step_s, int | float) and step_s > 0:
            return step_s * (self.total - self.step)
        if self.elapsed_s is None:
            return None
        return self.elapsed_s / self.step * (self.total - self.step)


@dataclass(frozen=True)
class WorkerStatus:
    state: str  # RUNNING | SUCCEEDED | FAILED | LOST
    exit_code: int | None = None
    pid: int | None = None
    progress: Progress | None = None
    quiet_s: int | None = None  # seconds since the log last grew (None: no log)

    @property
    def label(self) -> str:
        return f"FAILED({self.exit_code})" if self.state == "FAILED" else self.state


TERMINAL = frozenset({"SUCCEEDED", "FAILED", "LOST"})


def parse_progress_line(line: str) -> Progress | None:
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        event = json.loads(line)
        return Progress(
            step=int(event.get("step", 0)),
            total=int(event.get("total", 0)),
            elapsed_s=event.get("elapsed_s"),
            metrics=event.get("metrics"),
            done=event.get("event") == "done",
        )
    except (ValueError, TypeError, AttributeError):
        return None


def parse_status(stdout: str) -> WorkerStatus:
    """The exit file decides (the trap writes it); else a live pid is RUNNING; else the run is LOST."""
    progress_line = _last_value(stdout, "PROGRESS") or ""
    progress = parse_progress_line(progress_line)
    pid_text = _last_value(stdout, "PIDV") or ""
    pid = int(pid_text) if pid_text.isdigit() else None
    quiet_text = (_last_value(stdout, "QUIET") or "").strip()
    quiet = max(0, int(quiet_text)) if quiet_text.lstrip("-").isdigit() else None
    exit_text = (_last_value(stdout, "EXIT") or "").strip()
    if exit_text.lstrip("-").isdigit():
        code = int(exit_text)
        return WorkerStatus("SUCCEEDED" if code == 0 else "FAILED", code, pid, progress, quiet)
    if _last_value(stdout, "ALIVE") == "1":
        return WorkerStatus("RUNNING", None, pid, progress, quiet)
    return WorkerStatus("LOST", None, pid, progress, quiet)


def combine(states: Sequence[WorkerStatus]) -> str:
    """One state for a multi-worker run: any failure wins, then loss, then running."""
    names = [s.state for s in states]
    for state in ("FAILED", "LOST", "RUNNING"):
        if state in names:
            return state
    return "SUCCEEDED" if names else "LOST"


# ------------------------------------------------------------------------------------- kill and logs


def kill(repo_dir: str, paths: RunPaths, grace_s: float = 10.0) -> str:
    """TERM the job's process group (the trap writes the exit file), KILL it after `grace_s`."""
    ticks = max(1, int(grace_s * 10))
    return _script(
        f"cd {qpath(repo_dir)}",
        _ALIVE_FN,
        f"p=$(cat {q(paths.pid)} 2>/dev/null || true)",
        # Only a real job pid: `kill -- -1` would signal every process of the user.
        'case "$p" in ""|*[!0-9]*|0|1) echo KILL=not-running; exit 0 ;; esac',
        'if ! alive "$p"; then echo KILL=not-running; exit 0; fi',
        'kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true',
        f'for _ in $(seq {ticks}); do alive "$p" || break; sleep 0.1; done',
        'if alive "$p"; then',
        '  kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p"; echo KILL=killed',
        "else echo KILL=terminated; fi",
    )


def tail_log(repo_dir: str, log_path: str, lines: int = 200) -> str:
    return f"cd {qpath(repo_dir)} && tail -n {int(lines)} {q(log_path)}\n"


def read_log_from(repo_dir: str, log_path: str, offset: int) -> str:
    """The log's bytes from `offset` on: `--follow` polls with this, so a dropped link loses nothing."""
    return f"cd {qpath(repo_dir)} && tail -c +{int(offset) + 1} {q(log_path)}\n"


def find_wandb_summary(repo_dir: str, run_dir: str) -> str:
    """The run-specific W&B summary (never `latest-run`): newest `run-*` folder under the run's wandb/."""
    pattern = f"{run_dir.rstrip('/')}/wandb/run-*/files/wandb-summary.json"
    return _script(
        f"cd {qpath(repo_dir)}",
        f'for f in {_glob_quote(pattern)}; do [ -e "$f" ] && echo "WANDB=$f"; done; true',
    )


def existing_files(repo_dir: str, paths: Sequence[str]) -> str:
    """Which of `paths` (relative to the checkout) exist; prints FILE= lines."""
    checks = " ".join(q(p) for p in paths)
    return _script(
        f"cd {qpath(repo_dir)}",
        f'for f in {checks}; do if [ -f "$f" ]; then echo "FILE=$f"; fi; done',
    )


def parse_files(stdout: str) -> list[str]:
    return _all_values(stdout, "FILE")


def parse_wandb_paths(stdout: str) -> list[str]:
    return _all_values(stdout, "WANDB")


# ------------------------------------------------------------------------------------------- helpers


def _all_values(stdout: str, key: str) -> list[str]:
    """The values of every `KEY=value` line, in order."""
    prefix = f"{key}="
    return [line[len(prefix) :] for line in stdout.splitlines() if line.startswith(prefix)]


def _last_value(stdout: str, key: str) -> str | None:
    found = _all_values(stdout, key)
    return found[-1] if found else None


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _env_name(name: str) -> str:
    if (
        not name
        or not (name[0].isalpha() or name[0] == "_")
        or not all(c.isalnum() or c == "_" for c in name)
    ):
        raise UsageError(f"not a valid environment variable name: {name!r}")
    return name


def _glob_quote(pattern: str) -> str:
    """Quote a glob so that only its `*` stay special."""
    return "*".join(q(part) if part else "" for part in pattern.split("*"))
