"""Scripted answers for `--dry-run`: plausible replies to each recipe so that a whole SOP completes.

Everything here is fake and says so: summaries carry `"dry_run": true`. The numbers echo the seed SOP's
observed results (jax 0.783 / pallas 0.797 eval_full accuracy) so that the report reads like a real one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable

from grpoctl_contract import progress, rundir
from orchestrator.recipes import Recipe

FAKE_HEAD = "a306f8f" + "0" * 33
FAKE_HOME = "/root"
_pids = itertools.count(11522, 17)

_SEED_SUMMARY = {
    "jax": {
        "eval_full/accuracy": 0.7831690675,
        "eval/reward/func/reward_correct/mean": 0.796875,
        "eval/reward/total/mean": 1.796875,
        "time/train/step_avg_last10_s": 11.7047013686,
        "time/eval_full/step_s": 89.569688504,
    },
    "pallas": {
        "eval_full/accuracy": 0.7968157695,
        "eval/reward/func/reward_correct/mean": 0.75,
        "eval/reward/total/mean": 1.75,
        "time/train/step_avg_last10_s": 12.9079808251,
        "time/eval_full/step_s": 109.52094157,
    },
}
N_QUESTIONS = 1319
STEPS = 100


def _done_line(elapsed_s: float | None = None) -> str:
    return progress.encode(progress.Event("done", "done", step=STEPS, total=STEPS, elapsed_s=elapsed_s))


# What each recipe (orchestrator/recipes.py, by name) prints when all goes well. A recipe missing here
# gets an empty stdout and exit 0 (e.g. `env_install`, `remove_file`: nothing to read back).
REPLIES: dict[str, Callable[[Recipe], str]] = {
    "sync": lambda _: f"HEAD={FAKE_HEAD}\n",
    "home_dir": lambda _: f"HOME={FAKE_HOME}\n",
    "env_verify": lambda _: "MODE=600\n",
    "launch": lambda _: f"PID={next(_pids)}\n",
    "status": lambda _: f"EXIT=0\nALIVE=0\nLOG=1\nPROGRESS={_done_line(1200.0)}\n",
    "kill": lambda _: "KILL=not-running\n",
    "existing_files": lambda r: "".join(f"FILE={p}\n" for p in r.args["paths"] if fake_file(p) is not None),
    "bootstrap": lambda _: "PYTHON=/root/grpoctl-work/.venv/bin/python\n",
    "tail_log": lambda _: _done_line() + "\n",
}


def responder(command: str, worker: str) -> tuple[str, int] | None:
    """The RecordingScript responder: (stdout, exit code) for a recipe, looked up by the recipe's name.
    Text that is not a recipe (or a recipe without a reply) falls through to the script's rules."""
    del worker
    reply = REPLIES.get(command.name) if isinstance(command, Recipe) else None
    return (reply(command), 0) if reply is not None else None


def _flavour(path: str) -> str:
    return "pallas" if "pallas" in path else "jax"


def _rng(path: str) -> random.Random:
    return random.Random(int(hashlib.sha256(path.encode()).hexdigest()[:16], 16))


def fake_file(path: str) -> bytes | None:
    """Contents for a run file `get` asks for in a dry run (None: no such file)."""
    name = path.rsplit("/", 1)[-1]
    flavour = _flavour(path)
    seed = _SEED_SUMMARY[flavour]
    if name == rundir.SUMMARY:
        return json.dumps({**seed, "steps": STEPS, "dry_run": True}, indent=1).encode()
    if name == rundir.EVAL_FULL_ROWS:
        rng = random.Random(7 if flavour == "jax" else 8)
        rows = [
            {
                "id": f"gsm8k-test-{i}",
                "answer": "0",
                "prediction": "0",
                "correct": rng.random() < seed["eval_full/accuracy"],
            }
            for i in range(N_QUESTIONS)
        ]
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if name == rundir.METRICS:
        rng = _rng(path)
        rows = [
            {
                "step": s,
                "train/reward/total/mean": min(2.0, 0.6 + 1.2 * s / STEPS + rng.gauss(0, 0.08)),
                "loss": rng.gauss(0, 0.02),
            }
            for s in range(1, STEPS + 1)
        ]
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if name == rundir.CONFIG:
        # nested like the trainer's own config.json: compare reads train.policy_loss_impl as the arm's key
        return json.dumps({"train": {"policy_loss_impl": flavour}, "dry_run": True}).encode()
    return None


class FakeRunFiles(dict):
    """The RecordingScript's `files`: `get` in a dry run finds plausible contents for any run file."""

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and fake_file(path) is not None

    def __getitem__(self, path: str) -> bytes:
        data = fake_file(path)
        if data is None:
            raise KeyError(path)
        return data
