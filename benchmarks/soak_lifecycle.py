"""Soak the run lifecycle: one `run --recover` hit by >= 10 preemptions and restarts at random moments.

    python benchmarks/soak_lifecycle.py [--hits 12] [--steps 400] [--seed 1]

The fake Cloud TPU API (grpoctl_testing/fake_tpu.py) with loopback sshd workers and the stand-in
trainer (tests/standin.py, checkpoints and metrics history in a "bucket" outside the VMs): the real CLI,
in-process. Hits are drawn from preemption (a new node) and RESTARTING / REIMAGING / REPAIRING (the node
comes back by itself); each lands on a running job (after a checkpoint past the previous hit). Then a
second run is preempted and `grpoctl down` deletes its node while the recovery recreates it.

Prints a markdown table and exits 1 unless: the run SUCCEEDED with the same run id, one recovery per hit,
every step's metrics row exactly once, the second run's waiter stopped (exit 3), no node created after the
`down`, and no node left. Needs /usr/sbin/sshd (as the tpu tests do). Not in the test suite (slow); its
small version is test_soak_three_random_hits_one_run_every_metrics_row_nothing_after_down
in tests/test_lifecycle.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # standin, tpu_support


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hits", type=int, default=12)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from standin import make_standin_repo  # noqa: F401 (tpu_support needs it importable)
    from tpu_support import Project, soak

    from grpoctl_testing.fake_tpu import FakeTpuApi, Script, sshd_workers
    with tempfile.TemporaryDirectory(prefix="grpoctl-soak-") as tmp:
        root = Path(tmp)
        os.environ["GRPOCTL_STATE_DIR"] = str(root / "state")
        with FakeTpuApi(sshd_workers(root / "vms"), Script(create_s=0.2, wait_for_resources_s=0.3)) as fake:
            project = Project(root, None, fake)  # type: ignore[arg-type] (soak makes the repo)
            out = soak(project, node="grpo-soak", steps=args.steps, hits=args.hits, seed=args.seed)
    steps = out["steps"]
    kinds = Counter(h.split("@")[0] for h in out["injected"])  # type: ignore[union-attr]
    checks = {
        "SUCCEEDED, same run id": out["state"] == "SUCCEEDED",
        f">= 10 hits injected ({len(out['injected'])})": len(out["injected"]) >= min(10, args.hits),
        "one recovery per hit": len(out["recoveries"]) == len(out["injected"]),
        f"every step's metrics row once ({len(steps)} rows)": steps == list(range(1, args.steps + 1)),
        "the waiter stopped at `down` (exit 3)": out["waiter_code"] == 3,
        "no node created after `down`": out["created_after_down"] == 0,
        "no node left": out["nodes_left"] == [],
    }
    print(f"| run | hits | kinds | recoveries | wall s |\n|---|---|---|---|---|\n"
          f"| `{out['run_id']}` | {len(out['injected'])} | {dict(kinds)} | {len(out['recoveries'])} | "
          f"{out['wall_s']:.1f} |\n")
    for name, ok in checks.items():
        print(f"- {'PASS' if ok else 'FAIL'}: {name}")
    print("hits:", " ".join(out["injected"]))  # type: ignore[arg-type]
    print("recoveries:", " ".join(f"{r['kind']}@{r['step']}" for r in out["recoveries"]))  # type: ignore[union-attr]
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
