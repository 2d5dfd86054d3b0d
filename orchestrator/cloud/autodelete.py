"""A node that deletes itself: start the on-node watchdog (grpoctl_contract/watchdog.py) on a TPU node
grpoctl created, and read back when it will delete the node (for `status`).

Off for nodes grpoctl did not create (attached ones carry no grpoctl label: the user made them, the user
deletes them) and when `autodelete_after_idle_s` is 0. The watchdog runs on worker 0 only: deleting the
node takes every worker with it.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpoctl_contract.watchdog as watchdog
from orchestrator.config import NotifyConfig, TpuTargetConfig
from orchestrator.errors import GrpoctlError
from orchestrator.notify import Notifier
from orchestrator.transport.base import Transport
from orchestrator.transport.shell import quote as q

REMOTE_SCRIPT = "~/.grpoctl/watchdog.py"
REMOTE_NOTIFY = "~/.grpoctl/notify.json"  # 0600: the webhook URL is a secret (never on a command line)


def start_script(
    cfg: TpuTargetConfig, zone: str, remote_dir: str, *, metadata_base: str, poll_s: float,
    notify_file: bool = False,
) -> str:
    """Stop an earlier watchdog of this node (its pid from the state file, if it is one), start a new one
    detached, outside any job's environment (it must never count itself as a job)."""
    args = [
        "--idle-s", f"{cfg.autodelete_after_idle_s:g}", "--poll-s", f"{poll_s:g}",
        "--checkout", remote_dir, "--project", cfg.project, "--zone", zone, "--node", cfg.name,
        "--api-base", cfg.api_endpoint or watchdog.API_BASE, "--metadata-base", metadata_base,
        *(["--queued"] if cfg.queued else []),
        *(["--notify-file", REMOTE_NOTIFY] if notify_file else []),
    ]
    # remote_dir may start with ~/: the watchdog expands it itself, so it travels quoted as it is
    quoted = " ".join(q(a) for a in args)
    return "\n".join([
        "set -eu",
        'mkdir -p "$HOME/.grpoctl"',
        'p=$(sed -n \'s/.*"pid": \\([0-9]*\\).*/\\1/p\' "$HOME/.grpoctl/watchdog.json" 2>/dev/null || true)',
        'if [ -n "$p" ] && grep -q watchdog.py "/proc/$p/cmdline" 2>/dev/null; then kill "$p" || true; fi',
        'rm -f "$HOME/.grpoctl/watchdog.json"',
        "PY=$(command -v python3 || command -v python)",
        f'env -u GRPOCTL_RUN_ID setsid nohup "$PY" "$HOME/.grpoctl/watchdog.py" {quoted} '
        '> "$HOME/.grpoctl/watchdog.log" 2>&1 < /dev/null &',
        "echo WATCHDOG_PID=$!",
    ]) + "\n"


def start(
    t: Transport, cfg: TpuTargetConfig, zone: str, remote_dir: str, *, metadata_base: str, poll_s: float,
    notify: NotifyConfig | None = None,
) -> None:
    t.put(Path(watchdog.__file__).read_bytes(), REMOTE_SCRIPT, mode=0o700)  # read when a node needs it
    url = None
    if notify is not None:
        try:
            url = Notifier(notify).webhook_url()
        except GrpoctlError:  # webhook_env unset here: the node just deletes itself without a message
            url = None
    if url is not None:
        t.put(json.dumps({"webhook": url}).encode(), REMOTE_NOTIFY, mode=0o600)
    script = start_script(cfg, zone, remote_dir, metadata_base=metadata_base, poll_s=poll_s,
                          notify_file=url is not None)
    result = t.run(script, timeout=60)
    if not result.ok:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise GrpoctlError(f"{t.name}: could not start the autodelete watchdog: {detail}")


def read_state(t: Transport) -> dict[str, Any] | None:
    """The watchdog's state file on worker 0 (None: no watchdog there, or the worker did not answer)."""
    try:
        result = t.run('cat "$HOME/.grpoctl/watchdog.json" 2>/dev/null || true', timeout=15)
    except GrpoctlError:
        return None
    try:
        state = json.loads(result.stdout or "null")
    except (ValueError, RecursionError):  # worker data (untrusted.py): anything malformed is no state
        return None
    return state if isinstance(state, dict) else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe(state: dict[str, Any] | None, now: float | None = None) -> str | None:
    """`deletes itself at 14:05 UTC (in 29 min) unless a job runs` for `status`."""
    deletes_at, idle = (state or {}).get("deletes_at"), (state or {}).get("idle_after_s")
    if not _finite(deletes_at) or abs(deletes_at) > 1e11 or not _finite(idle):
        return None  # a worker's file: NaN, Infinity or a year past 5000 would end `status` in a traceback
    assert state is not None
    now = time.time() if now is None else now
    at = datetime.fromtimestamp(state["deletes_at"], UTC).strftime("%H:%M UTC")
    left = max(state["deletes_at"] - now, 0)
    idle = state.get("idle_after_s")
    return f"deletes itself at {at} (in {left / 60:.0f} min) unless a job runs (idle limit {idle:g} s)"
