"""Clearing stale TPU users on a worker before a launch.

A crashed or abandoned job can keep `/dev/vfio/*` (v5e, v6e) or `/dev/accel*` (v4, v5p) open, and libtpu
then refuses to start. The recipe finds the holders through `/proc/*/fd`, refuses when one of them belongs
to a grpoctl run that is still RUNNING (unless forced), sends TERM, waits, sends KILL, and only then
removes the libtpu lock file (removing it while the holder lives would let two jobs share the TPU).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from grpoctl_contract.rundir import RunPaths
from orchestrator.errors import InfraError, UsageError
from orchestrator.ops.fanout import fan_out, values
from orchestrator.transport.base import Transport
from orchestrator.transport.shell import quote_path

TPU_DEVICE_PATTERNS = ("/dev/vfio/*", "/dev/accel*")
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
BUSY_EXIT = 10  # the recipe's "a live grpoctl run holds the TPU" exit code


def clear_stale_script(
    *,
    device_patterns: Sequence[str] = TPU_DEVICE_PATTERNS,
    lockfile: str = LIBTPU_LOCKFILE,
    run_pid_glob: str = f"~/grpoctl-work/{RunPaths.PID_GLOB}",
    grace_s: float = 5.0,
    force: bool = False,
) -> str:
    """Shell text. Prints `killed PID` per holder; exits BUSY_EXIT with `busy PID PIDFILE` when refusing."""
    lname = " -o ".join(f"-lname {shlex.quote(p)}" for p in device_patterns)
    pid_dir, pid_pattern = run_pid_glob.rsplit("/", 1)
    checks = int(grace_s * 10)
    return f"""
set -u
holders=$(find /proc/[0-9]*/fd -maxdepth 1 \\( {lname} \\) 2>/dev/null | cut -d/ -f3 | sort -un |
  grep -vx "$$")
[ -z "$holders" ] && {{ rm -f -- {shlex.quote(lockfile)}; echo clear; exit 0; }}
alive() {{  # a zombie has let go of its devices already
  st=$(cat /proc/$1/stat 2>/dev/null) || return 1; set -- ${{st##*) }}; [ "$1" != Z ]
}}
# pids of grpoctl runs still RUNNING: a pid file without its exit file, pid alive
live=""
for pf in {quote_path(pid_dir)}/{pid_pattern}; do
  [ -f "$pf" ] || continue
  case "$pf" in *_latest.pid) continue;; esac
  [ -e "${{pf%.pid}}.exit" ] && continue
  p=$(cat "$pf" 2>/dev/null) && alive "$p" && live="$live $p:$pf"
done
owner_of() {{  # the live run (pid:file) that $1 descends from or shares a session with
  p=$1
  while [ -n "$p" ] && [ "$p" -gt 1 ] && [ -r /proc/$p/stat ]; do
    st=$(cat /proc/$p/stat); set -- ${{st##*) }}
    for e in $live; do [ "${{e%%:*}}" = "$p" ] || [ "${{e%%:*}}" = "$4" ] && {{ echo "$e"; return; }}; done
    p=$2
  done
}}
if [ {int(force)} = 0 ]; then
  for h in $holders; do
    o=$(owner_of "$h")
    [ -n "$o" ] && {{ echo "busy $h ${{o#*:}}"; exit {BUSY_EXIT}; }}
  done
fi
for h in $holders; do kill -TERM "$h" 2>/dev/null && echo "killed $h"; done
for _ in $(seq {checks}); do
  left=""; for h in $holders; do alive "$h" && left="$left $h"; done
  [ -z "$left" ] && break; sleep 0.1
done
for h in $holders; do alive "$h" && kill -KILL "$h" 2>/dev/null && echo "sigkill $h"; done
for h in $holders; do for _ in $(seq 100); do alive "$h" || break; sleep 0.05; done; done
rm -f -- {shlex.quote(lockfile)}
echo cleared
"""


@dataclass(frozen=True)
class StaleReport:
    worker: str
    killed: list[int]  # pids that got TERM
    force_killed: list[int]  # pids that needed KILL after the grace period


def parse_report(worker: str, stdout: str) -> StaleReport:
    killed = [int(m) for m in re.findall(r"^killed (\d+)$", stdout, re.M)]
    forced = [int(m) for m in re.findall(r"^sigkill (\d+)$", stdout, re.M)]
    return StaleReport(worker, killed, forced)


def clear_stale_tpu_users(
    transports: Sequence[Transport],
    *,
    remote_dir: str,
    device_patterns: Sequence[str] = TPU_DEVICE_PATTERNS,
    lockfile: str = LIBTPU_LOCKFILE,
    grace_s: float = 5.0,
    force: bool = False,
) -> list[StaleReport]:
    """Run the recipe on every worker in parallel; raise UsageError when a live run holds a TPU."""
    text = clear_stale_script(
        device_patterns=device_patterns,
        lockfile=lockfile,
        run_pid_glob=f"{remote_dir.rstrip('/')}/{RunPaths.PID_GLOB}",
        grace_s=grace_s,
        force=force,
    )
    results = values(fan_out(transports, lambda _i, t: t.run(text, timeout=grace_s + 60)))
    reports = []
    for t, res in zip(transports, results, strict=True):
        if res.exit_code == BUSY_EXIT:
            pid, pid_file = res.stdout.strip().splitlines()[-1].split()[1:3]
            raise UsageError(
                f"{t.name}: the TPU is held by pid {pid} of a grpoctl run still RUNNING ({pid_file}); "
                "stop it first or pass --force"
            )
        if not res.ok:
            raise InfraError(f"{t.name}: clearing stale TPU users failed with exit code {res.exit_code}")
        reports.append(parse_report(t.name, res.stdout))
    return reports
