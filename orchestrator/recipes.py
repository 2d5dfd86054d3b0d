"""Remote recipes: pure functions that build the shell text run on each worker.

Every value that comes from outside (paths, URLs, branch names, config paths, env flags) is quoted with
the one quoting helper of `orchestrator.transport.shell` (`q` / `qpath` here; paths starting with `~/` keep
the tilde meaning through `"$HOME"`). No recipe ever carries a secret: `.env` and `-e` values travel by
`Transport.put` into 0600 files, and `env_verify` reports key names and value byte lengths only.

Each recipe prints `KEY=value` lines that the matching `parse_*` function reads back, and returns a
`Recipe`: its shell text together with its name (the function's), so that whoever needs to know which
recipe a command is (the dry run's scripted answers, the journal) asks the name, never the text.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ParamSpec

import grpoctl_contract.envfile
from grpoctl_contract import progress as contract
from grpoctl_contract import rundir
from grpoctl_contract.rundir import RunPaths
from orchestrator import untrusted
from orchestrator.errors import UsageError
from orchestrator.lifecycle import states
from orchestrator.transport.shell import GET_NOT_REGULAR
from orchestrator.transport.shell import quote as q
from orchestrator.transport.shell import quote_path as qpath

# Exit codes the recipes use to say "refused" (never produced by git, pip or the trainer on purpose).
EXIT_BUSY = 75  # another job holds the worker
EXIT_EXISTS = 73  # the run's log file already exists
EXIT_NOT_CHECKOUT = 65  # remote_dir holds something that is not grpoctl's checkout: refused, untouched
EXIT_REFUSED = EXIT_NOT_CHECKOUT  # sync refuses to overwrite or delete a user's files
EXIT_NO_PYTHON = 69  # no python >= 3.11 on the worker
EXIT_NO_CHECKOUT = 66  # launch: the checkout is not there yet (`grpoctl sync` first)
EXIT_NO_CONFIG = 67  # launch: the config is not in the worker's checkout
EXIT_NO_TOOL = 68  # launch: the worker lacks setsid or flock (macOS without util-linux)

# What grpoctl itself writes inside the checkout (run outputs, the venv, the secrets file): these may be
# present when a folder is adopted, and sync never counts them as the user's changes.
GENERATED = ("logs/", "runs/", "wandb/", ".env", ".venv/")
# Written into `.git/` at first clone: the only proof that a checkout is grpoctl's to reset.
CHECKOUT_MARKER = ".git/grpoctl-checkout"

PROGRESS_PREFIX = contract.PREFIX

_P = ParamSpec("_P")


class Recipe(str):
    """The shell text of one recipe, with the recipe's `name` and the `args` it was built from.

    A `str`, so every transport runs it unchanged; text built around it (`"x" + recipe`) is plain text
    again, which is right: it is no longer the recipe. `args` are never printed or journaled (`env` holds
    launch flags); only the dry run's responder reads them (e.g. which paths `existing_files` asked for).
    """

    name: str
    args: Mapping[str, Any]

    def __new__(cls, name: str, script: str, args: Mapping[str, Any] | None = None) -> Recipe:
        obj = super().__new__(cls, script)
        obj.name = name
        obj.args = MappingProxyType(dict(args or {}))
        return obj

    @property
    def script(self) -> str:
        return str(self)


# Every function decorated with `_recipe`, by name: the set of names a dry-run responder must know.
RECIPES: dict[str, Callable[..., Recipe]] = {}


def _recipe(build: Callable[_P, str]) -> Callable[_P, Recipe]:
    """Name the text `build` returns after `build` itself, and register it in RECIPES."""
    signature = inspect.signature(build)

    @functools.wraps(build)
    def named(*args: _P.args, **kwargs: _P.kwargs) -> Recipe:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return Recipe(build.__name__, build(*args, **kwargs), bound.arguments)

    RECIPES[build.__name__] = named
    return named


def _script(*lines: str) -> str:
    return "\n".join(["set -eu", *lines]) + "\n"


# `kill -0` succeeds on a zombie, and a killed job whose parent never reaps it (PID 1 in many containers)
# stays one: a pid counts as alive only if it exists and is not in state Z.
# `ours PID RUN_ID` adds identity: a pid file outlives its job and the pid may now belong to anything
# else, so a pid is the run's only while its process carries the run's GRPOCTL_RUN_ID (every job is
# started with it exported; "" accepts any grpoctl job). Without /proc, liveness is all we can know.
# A pid of -1, 0 or 1 (or no number) is never a job: `kill -0 -1` succeeds whenever any process of the
# user lives, `kill -0 0` on our own group, and 1 is init.
_ALIVE_FN = (
    'alive() { case "$1" in ""|*[!0-9]*|0|1) return 1 ;; esac; kill -0 "$1" 2>/dev/null || return 1; '
    's=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -c1); [ "$s" != Z ]; }\n'
    'ours() { alive "$1" || return 1; [ -d "/proc/$1" ] || return 0; '
    'if [ -n "$2" ]; then tr "\\0" "\\n" < "/proc/$1/environ" 2>/dev/null | grep -qxF "GRPOCTL_RUN_ID=$2"; '
    'else tr "\\0" "\\n" < "/proc/$1/environ" 2>/dev/null | grep -q "^GRPOCTL_RUN_ID="; fi; }'
)


# --------------------------------------------------------------------------------------------- sync


@_recipe
def sync(repo_dir: str, url: str, branch: str) -> str:
    """Clone if missing, fetch, check out `branch` at origin's tip, print HEAD; never destroy user files.

    The folder is grpoctl's only if `git init` ran there under grpoctl (the marker in `.git/`), or it is a
    clean clone of `url` (adopted, marked). Anything else at `remote_dir` (a user's own repo, a folder
    with files) is refused with one line and left byte-identical. In grpoctl's checkout, edits to tracked
    files are discarded (workers run origin's code) but untracked files are never deleted: sync refuses
    when one would be overwritten, and refuses while a job of ours runs there.
    """
    generated = [f":(exclude){p.rstrip('/')}" for p in GENERATED]
    spared = "|".join(re.escape(p.rstrip("/")) for p in GENERATED)
    return _script(
        f"REPO={qpath(repo_dir)}",
        f"URL={q(url)}",
        'mkdir -p -- "$REPO"',
        'cd -- "$REPO"',
        _ALIVE_FN,
        "if [ -e .git ]; then",
        f"  if [ ! -e {CHECKOUT_MARKER} ]; then",
        "    o=$(git config --get remote.origin.url 2>/dev/null || true)",
        '    if [ "$o" != "$URL" ]; then',
        '      echo "$REPO is a git checkout grpoctl did not make (origin ${o:-none}): refusing to touch it;'
        ' point remote_dir at another folder" >&2',
        f"      exit {EXIT_REFUSED}",
        "    fi",
        # --no-optional-locks: even looking must not rewrite the index of a repo that may not be ours.
        '    if [ -n "$(git --no-optional-locks status --porcelain --untracked-files=all -- . '
        + " ".join(q(g) for g in generated)
        + ')" ] || [ -n "$(git rev-list -n 1 --branches --not --remotes 2>/dev/null)" ]; then',
        '      echo "$REPO is a clone of $URL with changes grpoctl did not make: refusing to touch it;'
        ' commit, push or move them, or point remote_dir at another folder" >&2',
        f"      exit {EXIT_REFUSED}",
        "    fi",
        f"    : > {CHECKOUT_MARKER}",
        "  fi",
        "else",
        f"  if ls -A | grep -v -x -E {q(spared)} >/dev/null; then",
        f'    echo "$REPO is not a git checkout and not empty: refusing it" >&2; exit {EXIT_NOT_CHECKOUT}',
        "  fi",
        "  git init --quiet",
        '  git remote add origin "$URL"',
        f"  : > {CHECKOUT_MARKER}",
        "fi",
        *_job_running_check(),
        'git remote set-url origin "$URL"',
        "git fetch --all --prune --quiet",
        # Tracked edits go (the worker runs origin's code); untracked files stay, and a checkout that
        # would overwrite one is refused (no --force).
        "if git rev-parse --verify --quiet HEAD >/dev/null; then git reset --quiet --hard; fi",
        f"BRANCH={q(branch)}",
        'ORIGIN="origin/$BRANCH"',
        'if ! out=$(git checkout --quiet -B "$BRANCH" "$ORIGIN" 2>&1); then',
        "  first=$(printf '%s\\n' \"$out\" | sed -n 's/^\\t//p' | head -n 1)",
        '  if [ -n "$first" ]; then',
        '    echo "$REPO: untracked files would be overwritten by $ORIGIN (first: $first): move them'
        ' aside; sync deletes no untracked file" >&2',
        f"    exit {EXIT_REFUSED}",
        "  fi",
        "  printf '%s\\n' \"$out\" >&2; exit 1",
        "fi",
        'echo "HEAD=$(git rev-parse HEAD)"',
    )


def parse_head(stdout: str) -> str | None:
    return _last_value(stdout, "HEAD")


# ---------------------------------------------------------------------------------------- bootstrap


def _read_small(path: str) -> str:
    """Shell that prints a pid or exit file: a regular file only, 32 bytes at most (worker files are
    untrusted: a FIFO or a link to /dev/zero there reads as nothing, never as a hang or a flood)."""
    return f"[ -f {q(path)} ] && head -c 32 {q(path)} 2>/dev/null || true"


BOOTSTRAP_LOG = "logs/bootstrap.log"  # relative to the checkout, on every worker
BOOTSTRAP_REQUIREMENTS = "logs/requirements.txt"  # what the bootstrap installs besides the checkout
BOOTSTRAP_STAGES = ("find python, create the venv", "upgrade pip", "install the trainer")


@_recipe
def bootstrap(repo_dir: str, extras: Sequence[str]) -> str:
    """A python >= 3.11 venv at `<checkout>/.venv` with the checkout and its extras; prints PYTHON=.

    The checkout goes in with `--no-deps` and then only the extras' requirements (listed from
    pyproject.toml by grpoctl_contract.requirements): a worker gets the trainer, not the laptop stack of
    the base install (typer, paramiko, the Cloud TPU client, matplotlib). No extras: `pip install -e .`.
    Prints `STAGE=k/n label` as each stage begins (the caller streams them into a progress bar); pip's
    output lands in `logs/bootstrap.log` on the worker (kept by `git clean`)."""
    spec = q(".[{}]".format(",".join(extras)) if extras else ".")
    if extras:
        install = [
            "step .venv/bin/python -m pip install --no-deps -e .",
            f"step .venv/bin/python -m grpoctl_contract.requirements {q(','.join(extras))} "
            f"--out {q(BOOTSTRAP_REQUIREMENTS)}",
            f"step .venv/bin/python -m pip install -r {q(BOOTSTRAP_REQUIREMENTS)}",
        ]
    else:
        install = ["step .venv/bin/python -m pip install -e ."]
    n = len(BOOTSTRAP_STAGES)
    stage = [f"echo {q(f'STAGE={k}/{n} {label}')}" for k, label in enumerate(BOOTSTRAP_STAGES, 1)]
    return _script(
        f"cd {qpath(repo_dir)}",
        stage[0],
        'PY=""',
        "for c in python3.13 python3.12 python3.11 python3; do",
        '  if command -v "$c" >/dev/null 2>&1 \\',
        '     && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then',
        '    PY="$c"; break',
        "  fi",
        "done",
        f'[ -n "$PY" ] || {{ echo "no python >= 3.11 on this worker" >&2; exit {EXIT_NO_PYTHON}; }}',
        "mkdir -p logs",
        # pip's full output goes to a log on the worker (what was installed, from where); a failure shows
        # its tail, the success path prints only the stages and PYTHON=.
        f"LOG={q(BOOTSTRAP_LOG)}",
        f'echo "bootstrap $(date -u +%FT%TZ) on $(hostname): install "{spec} > "$LOG"',
        "if [ -x .venv/bin/python ]; then",
        '  echo "venv .venv exists: reused" >> "$LOG"',
        "else",
        '  "$PY" -m venv .venv',
        '  echo "venv created: $PY -m venv $PWD/.venv ($("$PY" --version 2>&1))" >> "$LOG"',
        "fi",
        "step() {",
        '  echo "+ $*" >> "$LOG"',
        '  "$@" >> "$LOG" 2>&1 && return 0',
        '  c=$?; echo "bootstrap failed (exit $c); the end of $PWD/$LOG:" >&2',
        '  tail -n 15 "$LOG" >&2; exit $c',
        "}",
        stage[1],
        "step .venv/bin/python -m pip install --upgrade pip",
        stage[2],
        *install,
        'echo "PYTHON=$PWD/.venv/bin/python"',
    )


def parse_stage(line: str) -> tuple[int, int, str] | None:
    """`STAGE=2/3 upgrade pip` -> (2, 3, "upgrade pip")."""
    m = re.fullmatch(r"STAGE=(\d+)/(\d+) (.*)", line.strip())
    # the label is worker text shown on a bar: inert (untrusted.clean)
    return (int(m.group(1)), int(m.group(2)), untrusted.clean(m.group(3), untrusted.FIELD)) if m else None


def parse_python(stdout: str) -> str | None:
    return _last_value(stdout, "PYTHON")


def venv_python(repo_dir: str) -> str:
    return f"{repo_dir.rstrip('/')}/.venv/bin/python"


# ------------------------------------------------------------------------------------------ env push


@_recipe
def home_dir() -> str:
    """Prints `$HOME`, to turn `~/...` into the absolute path that SFTP needs."""
    return 'printf "HOME=%s\\n" "$HOME"\n'


def parse_home(stdout: str) -> str | None:
    return _last_value(stdout, "HOME")


ENVFILE_SOURCE = Path(grpoctl_contract.envfile.__file__).read_bytes()


@_recipe
def env_verify(env_path: str, checker: str) -> str:
    """Print the file's mode and, per key, the BYTE length of its value (never the value).

    `checker` is a copy of grpoctl_contract/envfile.py (ENVFILE_SOURCE, put there first): the worker runs
    the very parser the laptop used, with any python3 and nothing installed yet, so both count the same.
    """
    return _script(
        f"F={qpath(env_path)}",
        "PY=$(command -v python3 || command -v python || true)",
        '[ -n "$PY" ] || { echo "no python3 on this worker to check the .env with" >&2; exit '
        + f"{EXIT_NO_PYTHON}; }}",
        f'"$PY" {qpath(checker)} verify "$F"',
    )


@_recipe
def env_install(pending: str, dest: str) -> str:
    """Rename the verified upload over the live file (atomic: a reader sees the old or the new file)."""
    return _script(f"mv -f -T -- {qpath(pending)} {qpath(dest)}", 'echo "INSTALLED=1"')


@_recipe
def remove_file(path: str) -> str:
    return _script(f"rm -f -- {qpath(path)}")


def parse_env_verify(stdout: str) -> tuple[str | None, dict[str, int]]:
    """(mode, key -> byte length); mode is None when the worker could not parse the file."""
    mode = _last_value(stdout, "MODE")
    lengths: dict[str, int] = {}
    for line in stdout.splitlines():
        if line.startswith("KEYLEN="):
            key, _, length = line[len("KEYLEN=") :].rpartition(":")
            lengths[key] = int(length)
    return mode, lengths


# -------------------------------------------------------------------------------------------- launch


# The job wrapper: constant text, its inputs arrive as positional arguments (nothing to quote inside).
# It records its own pid (the session leader: `kill -- -PID` stops the whole job), runs the trainer as a
# child and writes the exit file when the child ends or when it is told to stop (TERM/INT).
_JOB_WRAPPER = r"""
py=$1; config=$2; run_dir=$3; pidf=$4; exitf=$5; envf=$6; shift 6
echo $$ > "$pidf"
child=""
write_exit() { printf '%s\n' "$1" > "$exitf.tmp" && mv -f "$exitf.tmp" "$exitf"; }
on_signal() {
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
  write_exit "$1"; exit "$1"
}
trap 'on_signal 143' TERM
trap 'on_signal 130' INT
if [ -n "$envf" ]; then
  # The -e values: the shared parser (a copy put beside them) loads them into the environment and execs
  # the trainer in its place (same pid), so no value is ever on a command line.
  "$py" "${envf%.env}.loader.py" exec "$envf" -- "$py" -u -m trainer --config "$config" \
    --run-dir "$run_dir" "$@" &
else
  "$py" -u -m trainer --config "$config" --run-dir "$run_dir" "$@" &
fi
child=$!
wait "$child"; code=$?
write_exit "$code"
exit "$code"
""".strip()


def _job_running_check(before_exit: str = "") -> list[str]:
    """Exit EXIT_BUSY when a job of ours runs in this checkout: a pid file whose pid is alive, is a
    grpoctl job (not a process that later got the same pid) and has no exit file. Needs _ALIVE_FN.
    `before_exit`: shell text run first when refusing."""
    return [
        f"for f in {RunPaths.PID_GLOB}; do",
        '  [ -e "$f" ] || continue',
        '  case "$f" in *_latest.pid) continue ;; esac',
        '  p=$([ -f "$f" ] && head -c 32 "$f" 2>/dev/null || true)',  # as _read_small: untrusted
        '  case "$p" in ""|*[!0-9]*) continue ;; esac',
        '  if [ ! -e "${f%.pid}.exit" ] && ours "$p" ""; then',
        f'    {before_exit}echo "BUSY=$f pid $p"; exit {EXIT_BUSY}',
        "  fi",
        "done",
    ]


def _busy_check(before_exit: str = "") -> list[str]:
    # A job is running when a pid file has a live pid and no exit file; a TPU is busy when a process
    # holds its device files (v5e/v6e: /dev/vfio/N, older: /dev/accelN).
    return [
        *_job_running_check(before_exit),
        "for d in /dev/accel* /dev/vfio/[0-9]*; do",
        '  [ -e "$d" ] || continue',
        '  if command -v fuser >/dev/null 2>&1 && fuser "$d" >/dev/null 2>&1; then',
        f'    {before_exit}echo "BUSY=$d is held by another process"; exit {EXIT_BUSY}',
        "  fi",
        "done",
    ]


LAUNCH_LOCK = "logs/.launch.lock"
LOCK_WAIT_S = 60


@_recipe
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
    env_file: bool = False,
) -> str:
    """Start the trainer under `setsid nohup`, detached; prints PID= once the job has written its pid.

    `env` holds non-secret flags (exported here, so they are on the worker's command lines); with
    `env_file` the job also loads `paths.env` (already put there, 0600: the secrets) with
    `paths.env_loader` (put there too). One launch at a time
    per worker: the busy check and the start happen under `flock` on LAUNCH_LOCK, so of two simultaneous
    launches the second sees the first's job (and is refused unless `force`).
    """
    exports = [f"export {_env_name(k)}={q(v)}" for k, v in sorted((env or {}).items())]
    latest = [
        f"ln -sfn {q(_basename(getattr(paths, ext)))} {q(RunPaths.latest(config_stem, ext))}"
        for ext in ("log", "pid", "exit")
    ]
    envf = paths.env if env_file else ""
    # qpath: the interpreter is often `~/<remote_dir>/.venv/bin/python`, whose tilde must reach $HOME
    args = " ".join(
        [qpath(python), *(q(a) for a in [config, paths.run_dir, paths.pid, paths.exit, envf, *trainer_args])]
    )
    # A refused launch leaves no secrets file behind.
    refuse = f"rm -f -- {q(paths.env)} {q(paths.env_loader)}; " if env_file else ""
    return _script(
        # Refusals before anything starts: no checkout yet (a secrets file put here made the folder, not a
        # clone), no config in it, no setsid/flock (macOS without util-linux would otherwise read "busy").
        f"cd {qpath(repo_dir)} 2>/dev/null || exit {EXIT_NO_CHECKOUT}",
        f"[ -e .git ] || {{ {refuse}exit {EXIT_NO_CHECKOUT}; }}",
        f"[ -f {q(config)} ] || {{ {refuse}exit {EXIT_NO_CONFIG}; }}",
        "for tool in setsid flock; do command -v $tool >/dev/null 2>&1 || "
        f'{{ {refuse}echo "MISSING=$tool"; exit {EXIT_NO_TOOL}; }}; done',
        "mkdir -p logs runs",
        _ALIVE_FN,
        f"exec 9>> {q(LAUNCH_LOCK)}",
        f"if ! flock -w {LOCK_WAIT_S} 9; then",
        f'  {refuse}echo "BUSY=another launch held {LAUNCH_LOCK} for {LOCK_WAIT_S} s"; exit {EXIT_BUSY}',
        "fi",
        *([] if force else _busy_check(refuse)),
        f"if [ -e {q(paths.log)} ]; then {refuse}echo EXISTS={q(paths.log)}; exit {EXIT_EXISTS}; fi",
        *latest,
        "export PYTHONUNBUFFERED=1",
        # The job's identity (see `ours`): status, stop and the busy check trust a pid only with it.
        f"export GRPOCTL_RUN_ID={q(paths.run_id)}",
        *exports,
        # The commit the job runs (what produced the run), recorded before the job can change anything.
        'echo "HEAD=$(git rev-parse HEAD 2>/dev/null || true)"',
        # 9>&-: the job must not inherit (and so hold) the launch lock.
        f"setsid nohup bash -c {q(_JOB_WRAPPER)} grpoctl-job {args} > {q(paths.log)} 2>&1 < /dev/null 9>&- &",
        "for _ in $(seq 100); do",
        f"  [ -s {q(paths.pid)} ] && break; sleep 0.05",
        "done",
        f'echo "PID=$({_read_small(paths.pid)})"',
    )


def parse_missing_tool(stdout: str) -> str | None:
    return _last_value(stdout, "MISSING")


def parse_pid(stdout: str) -> int | None:
    value = _last_value(stdout, "PID")
    return int(value) if value and value.isdigit() else None


def parse_launch_head(stdout: str) -> str | None:
    """The checkout's commit printed by `launch` (None outside git)."""
    value = (_last_value(stdout, "HEAD") or "").strip()
    return value if re.fullmatch(r"[0-9a-f]{40,64}", value) else None


def parse_busy(stdout: str) -> str | None:
    return _last_value(stdout, "BUSY")


# -------------------------------------------------------------------------------------------- status


@_recipe
def status(repo_dir: str, paths: RunPaths) -> str:
    """Probe one run on one worker: exit file, pid liveness and the last progress line of the log."""
    return _script(
        f"cd {qpath(repo_dir)} 2>/dev/null || {{ echo CHECKOUT=missing; exit 0; }}",
        _ALIVE_FN,
        f"p=$({_read_small(paths.pid)})",
        'echo "PIDV=$p"',
        # Liveness before the exit file: the wrapper writes the file, then exits. Read the other way round,
        # a job ending between the two reads would look LOST (no exit file, no process).
        # A pid that now belongs to another process is not the job: the run is LOST, not RUNNING.
        f'if [ -n "$p" ] && ours "$p" {q(paths.run_id)}; then echo ALIVE=1; else echo ALIVE=0; fi',
        f'if [ -e {q(paths.exit)} ]; then echo "EXIT=$({_read_small(paths.exit)})"; fi',
        f"if [ -e {q(paths.log)} ]; then echo LOG=1; else echo LOG=0; fi",
        # Worker files are untrusted: the log is read only as a regular file, one line at most 64 KiB.
        f"line=$([ -f {q(paths.log)} ] && grep -F {q(PROGRESS_PREFIX)} {q(paths.log)} 2>/dev/null "
        f"| tail -n 1 | head -c {untrusted.LINE_CAP} || true)",
        'printf "PROGRESS=%s\\n" "$line"',
        # Seconds since the log last grew, by the worker's own clock (GNU stat, else BSD): STALLED.
        f"m=$(stat -c %Y {q(paths.log)} 2>/dev/null || stat -f %m {q(paths.log)} 2>/dev/null || true)",
        'if [ -n "$m" ]; then echo "QUIET=$(( $(date +%s) - m ))"; fi',
        # The run's identity (config hash, W&B URL), printed once near the top of the log.
        f"info=$([ -f {q(paths.log)} ] && grep -m 1 -F {q(contract.INFO_PREFIX)} {q(paths.log)} 2>/dev/null "
        f"| head -c {untrusted.LINE_CAP} || true)",
        'printf "INFO=%s\\n" "$info"',
    )


@dataclass(frozen=True)
class WorkerStatus:
    """What one worker's status probe saw: facts only. Which state they make is the lifecycle's call."""

    alive: bool
    exit_code: int | None = None
    pid: int | None = None
    progress: contract.Event | None = None  # the log's last event, made safe (parse_progress_line)
    quiet_s: int | None = None  # seconds since the log last grew (None: no log)
    info: Mapping[str, str] | None = None  # the trainer's info event: config_hash, wandb_url, ...

    @property
    def state(self) -> states.RunState:
        return states.worker_state(self.exit_code, self.alive)

    @property
    def finished(self) -> bool:
        return states.is_finished(self.state)

    @property
    def label(self) -> str:
        return states.label(self.state, self.exit_code)


def parse_progress_line(line: str) -> contract.Event | None:
    """The worker's last event; its strings made safe to show (untrusted.clean), its numbers finite
    (contract.decode). Step and total read 0 while unknown, and a finished run's ETA is 0: the
    trainer ships in the same commit, so the laptop makes up no ETA of its own."""
    ev = contract.decode(line)
    if ev is None or ev.event == "info":
        return None
    return dataclasses.replace(
        ev,
        step=ev.step or 0,
        total=ev.total or 0,
        eta_s=0.0 if ev.done else ev.eta_s,
        phase=untrusted.clean(ev.phase, untrusted.FIELD),
        detail=untrusted.clean_opt(ev.detail),
        summary=untrusted.clean_opt(ev.summary),
        metrics=untrusted.clean_map(ev.metrics),
        info={},  # only an info event's means anything (parse_info_line); a progress line's is dropped
    )


def parse_info_line(line: str) -> dict[str, str] | None:
    ev = contract.decode(line)
    return untrusted.clean_map(ev.info) if ev is not None and ev.event == "info" else None


def parse_status(stdout: str) -> WorkerStatus:
    """The probe's facts: exit code (the trap writes it), liveness, pid, last progress and info lines."""
    progress_line = _last_value(stdout, "PROGRESS") or ""
    progress = parse_progress_line(progress_line)
    info = parse_info_line(_last_value(stdout, "INFO") or "")
    pid_text = _last_value(stdout, "PIDV") or ""
    pid = int(pid_text) if pid_text.isdigit() and int(pid_text) > 1 else None  # never -1, 0 or 1
    quiet_text = (_last_value(stdout, "QUIET") or "").strip()
    quiet = max(0, int(quiet_text)) if quiet_text.lstrip("-").isdigit() else None
    exit_text = (_last_value(stdout, "EXIT") or "").strip()
    code = int(exit_text) if exit_text.lstrip("-").isdigit() else None
    return WorkerStatus(_last_value(stdout, "ALIVE") == "1", code, pid, progress, quiet, info)


# ------------------------------------------------------------------------------------- kill and logs


@_recipe
def kill(repo_dir: str, paths: RunPaths, grace_s: float = 10.0) -> str:
    """TERM the job's process group (the trap writes the exit file), KILL it after `grace_s`.

    Only the run's own process is signalled: its pid must carry the run's GRPOCTL_RUN_ID (a LOST run's pid
    may since have been given to anything), and its group is signalled only if it leads one.
    """
    ticks = max(1, int(grace_s * 10))
    return _script(
        f"cd {qpath(repo_dir)}",
        _ALIVE_FN,
        f"RUN={q(paths.run_id)}",
        f"p=$({_read_small(paths.pid)})",
        # Only a real job pid: `kill -- -1` would signal every process of the user.
        'case "$p" in ""|*[!0-9]*|0|1) echo KILL=not-running; exit 0 ;; esac',
        'if ! alive "$p"; then echo KILL=not-running; exit 0; fi',
        'if ! ours "$p" "$RUN"; then echo KILL=not-ours; exit 0; fi',
        # The wrapper is started by setsid: it leads its own group. Anything else gets only its own signal.
        'g=$(sed "s/.*) //" "/proc/$p/stat" 2>/dev/null | cut -d" " -f3 || true)',
        'sig() { if [ -z "$g" ] || [ "$g" = "$p" ]; then kill "$1" -- "-$p" 2>/dev/null || kill "$1" "$p"; '
        'else kill "$1" "$p"; fi; }',
        "sig -TERM 2>/dev/null || true",
        f'for _ in $(seq {ticks}); do alive "$p" || break; sleep 0.1; done',
        'if alive "$p"; then',
        "  sig -KILL; echo KILL=killed",
        "else echo KILL=terminated; fi",
    )


def _regular_log(log_path: str) -> str:
    """Shell text refusing a log that is not a regular file (a link to /dev/zero, a FIFO): one stderr line,
    exit GET_NOT_REGULAR; a missing one fails the way tail says it."""
    return (
        f"lp={q(log_path)}; "
        'if [ ! -e "$lp" ]; then echo "tail: cannot open $lp: No such file or directory" >&2; exit 1; fi; '
        'if [ ! -f "$lp" ]; then '
        'echo "$lp: not a regular file ($(stat -L -c %F -- "$lp" 2>/dev/null)): refused" >&2; '
        f"exit {GET_NOT_REGULAR}; fi; "
    )


@_recipe
def tail_log(repo_dir: str, log_path: str, lines: int = 200) -> str:
    """The log's last `lines` lines, at most untrusted.LOG_CHUNK bytes of them (a regular file only)."""
    return (
        f"cd {qpath(repo_dir)} && {{ {_regular_log(log_path)}"
        f'tail -n {int(lines)} -- "$lp" | head -c {untrusted.LOG_CHUNK}; }}\n'
    )


@_recipe
def read_log_from(repo_dir: str, log_path: str, offset: int) -> str:
    """The log's bytes from `offset` on, at most untrusted.LOG_CHUNK of them (the rest comes with the next
    poll): `--follow` polls with this, so a dropped link loses nothing (a regular file only)."""
    return (
        f"cd {qpath(repo_dir)} && {{ {_regular_log(log_path)}"
        f'tail -c +{int(offset) + 1} -- "$lp" | head -c {untrusted.LOG_CHUNK}; }}\n'
    )


@_recipe
def find_wandb_summary(repo_dir: str, run_dir: str) -> str:
    """The run-specific W&B summary (never `latest-run`): newest `run-*` folder under the run's wandb/."""
    pattern = f"{run_dir.rstrip('/')}/{rundir.WANDB_SUMMARY_GLOB}"
    return _script(
        f"cd {qpath(repo_dir)}",
        f'for f in {_glob_quote(pattern)}; do [ -e "$f" ] && echo "WANDB=$f"; done; true',
    )


@_recipe
def existing_files(repo_dir: str, paths: Sequence[str]) -> str:
    """Which of `paths` (relative to the checkout) exist, as anything: prints FILE= lines. A device, FIFO or
    link to one is listed too, so that the bounded reader refuses it in one line (untrusted.read) instead
    of the result silently going missing."""
    checks = " ".join(q(p) for p in paths)
    return _script(
        f"cd {qpath(repo_dir)}",
        f'for f in {checks}; do if [ -e "$f" ] || [ -L "$f" ]; then echo "FILE=$f"; fi; done',
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
