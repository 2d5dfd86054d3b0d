"""The dress rehearsal (grpoctl_testing/rehearsal.py) as a CI test: the seed TPU SOP replayed on the
fake Cloud TPU API, two sshd workers, the real trainer as two JAX processes, a preemption recovered.

`make rehearsal` also bootstraps the workers from the package registry (minutes); this test gives the
workers the test venv's interpreter instead (the target's `python`), so the bootstrap is the one part
left out, and runs 2 steps per run with the preemption after the Pallas run's first checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from grpoctl_testing import rehearsal
from grpoctl_testing.sshd import SSHD, sshd_available


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rehearsal_replays_the_tpu_sop_through_a_preemption(tmp_path: Path) -> None:
    if not sshd_available():
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} is missing but CI is set", pytrace=False)
        pytest.skip(f"{SSHD} not installed")
    pytest.importorskip("jax", reason="runs the real trainer on the fake VMs: needs the trainer extra")
    out = tmp_path / "out"
    code = rehearsal.main(
        ["--out", str(out), "--steps", "2", "--preempt-at-step", "1", "--worker-python", sys.executable]
    )
    report = (out / "report.md").read_text()
    assert code == 0, report
    state = json.loads((out / "report.state.json").read_text())
    runs = {name: state["steps"][f"run:{name}"]["record"] for name in ("jax", "pallas")}
    for rec in runs.values():
        assert rec["state"] == "SUCCEEDED" and len(rec["workers"]) == 2
    (recovery,) = runs["pallas"]["recoveries"]
    assert recovery["kind"] == "preemption"
    # The relaunch resumed from the checkpoint (it did not start over): the trainer logged the step.
    assert "the relaunched trainer resumed from its checkpoint of step 1" in report
    for name in ("jax", "pallas"):
        for key in rehearsal.SUMMARY_KEYS:
            assert state["summaries"][name].get(key) is not None, (name, key)
    assert "jax vs pallas: " in state["verdict"]
    for name in ("jax", "pallas"):  # the resumed pallas run kept its start sweep through the fresh disk
        assert state["summaries"][name].get("eval_full_start/accuracy") is not None, name
        assert f"`{name}` accuracy start -> end" in report
    # the fake played the real service's defaults: transient read errors sprinkled, host keys late
    assert "the fake API's realistic defaults: " in report and "rate 5%" in report
    # the ledger: both runs and the SOP total; the preemption's cost; the compile cache on the new VM
    assert "## Ledger" in report and "| **SOP total** | " in report
    assert "- ledger `pallas`: " in report and "ratio **" in report
    first, resumed = rehearsal.compile_seconds(state)
    assert first and resumed is not None and resumed < first
    assert "- result: **PASSED**" in report
