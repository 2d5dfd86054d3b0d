"""The on-node watchdog: a TPU VM that grpoctl created deletes itself once no grpoctl job has run on it for
`--idle-s` seconds (grpoctl.yaml `autodelete_after_idle_s`), so a closed laptop does not leave a slice
billing all night.

grpoctl uploads this file to each node it creates (`up`) and starts it detached on worker 0; stdlib only,
it runs on the VM's own python3 before any checkout or venv exists. Every `--poll-s` it looks for a job:
a process whose environment carries GRPOCTL_RUN_ID (every grpoctl job has it) and whose working folder is
inside the checkout, or a log under `<checkout>/logs` written since. When the last one is `--idle-s` old,
it asks the metadata server for the VM's service-account token and deletes its node (or its queued
resource) through the Cloud TPU API: the VM goes, and this process with it. Before that, when grpoctl gave
it a notify file (0600, the webhook URL is a secret), it posts one `node_deleted` message.

It keeps `--state` (JSON) current: `deletes_at` (unix seconds) is what `grpoctl status` shows. The
metadata and API base URLs are arguments so that a test points them at the fake API on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

METADATA_BASE = "http://metadata.google.internal"
API_BASE = "https://tpu.googleapis.com"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
STATE_FILE = "~/.grpoctl/watchdog.json"
JOB_MARK = b"GRPOCTL_RUN_ID="


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def job_running(checkout: str, proc: str = "/proc") -> bool:
    """A grpoctl job of this checkout is alive (its environment names a run, its cwd is in the checkout)."""
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/environ", "rb") as fh:
                if JOB_MARK not in fh.read():
                    continue
            if _inside(os.readlink(f"{proc}/{pid}/cwd"), checkout):
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def newest_log(checkout: str) -> float:
    """When a run's log last grew (0: none)."""
    logs = Path(checkout) / "logs"
    try:
        return max((p.stat().st_mtime for p in logs.iterdir() if p.is_file()), default=0.0)
    except OSError:
        return 0.0


def _request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
             body: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {**(headers or {}), "Content-Type": "application/json"},
                                 method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode() or "{}"
    return json.loads(text)


def token(metadata_base: str) -> str:
    """The VM's service-account access token (never written anywhere)."""
    got = _request(metadata_base.rstrip("/") + TOKEN_PATH, headers={"Metadata-Flavor": "Google"})
    return str(got["access_token"])


def delete_self(
    api_base: str, project: str, zone: str, node: str, *, queued: bool, metadata_base: str
) -> None:
    auth = {"Authorization": f"Bearer {token(metadata_base)}"}
    parent = f"{api_base.rstrip('/')}/v2/projects/{project}/locations/{zone}"
    if queued:  # a queued resource owns its node: deleting it (force) takes the node with it
        _request(f"{parent}/queuedResources/{node}?force=true", method="DELETE", headers=auth)
    else:
        _request(f"{parent}/nodes/{node}", method="DELETE", headers=auth)


def notify(notify_file: str | None, node: str, idle_s: float) -> None:
    """One `node_deleted` message to the webhook in `notify_file` (best effort: never stops the delete)."""
    if not notify_file:
        return
    try:
        url = json.loads(Path(os.path.expanduser(notify_file)).read_text())["webhook"]
        text = f"🗑️ grpoctl: {node} node deleted: no grpoctl job for {idle_s:g} s (autodelete_after_idle_s)"
        body = {"text": text, "event": "node_deleted", "subject": node}
        _request(url, method="POST", body=body, timeout=10)
    except Exception as err:  # noqa: BLE001 - say what failed, never the URL
        print(f"watchdog: notify failed ({type(err).__name__})", file=sys.stderr, flush=True)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="watchdog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-s", type=float, required=True)
    ap.add_argument("--poll-s", type=float, default=30.0)
    ap.add_argument("--checkout", required=True)
    ap.add_argument("--project", required=True)
    ap.add_argument("--zone", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--queued", action="store_true")
    ap.add_argument("--api-base", default=API_BASE)
    ap.add_argument("--metadata-base", default=METADATA_BASE)
    ap.add_argument("--state", default=STATE_FILE)
    ap.add_argument("--notify-file")
    args = ap.parse_args(argv)
    checkout = os.path.realpath(os.path.expanduser(args.checkout))
    state_path = Path(os.path.expanduser(args.state))
    last_active = time.time()  # (re)started by `up`: the node gets the full idle time from now
    notified = False  # the node_deleted message of this idle spell went out (a failed delete is retried)
    while True:
        now = time.time()
        if job_running(checkout):
            last_active = now
        last_active = max(last_active, newest_log(checkout))
        deletes_at = last_active + args.idle_s
        state = {"pid": os.getpid(), "node": args.node, "idle_after_s": args.idle_s,
                 "last_active": last_active, "deletes_at": deletes_at}
        if now >= deletes_at:
            if not notified:
                notify(args.notify_file, args.node, args.idle_s)
                notified = True
            try:
                delete_self(args.api_base, args.project, args.zone, args.node, queued=args.queued,
                            metadata_base=args.metadata_base)
            except Exception as err:  # noqa: BLE001 - try again next poll (API blip, token not yet ready)
                _write_state(state_path, {**state, "error": f"delete failed: {type(err).__name__}: {err}"})
                why = type(err).__name__
                print(f"watchdog: delete failed ({why}); retrying", file=sys.stderr, flush=True)
                time.sleep(args.poll_s)
                continue
            _write_state(state_path, {**state, "deleted_at": now})
            return 0
        notified = False  # a job ran since (the delete kept failing meanwhile): a new spell, a new message
        _write_state(state_path, state)
        time.sleep(min(args.poll_s, max(deletes_at - now, 0.05)))


if __name__ == "__main__":
    sys.exit(main())
