"""The time ledger (orchestrator/ledger.py) on run records as grpoctl stores them: one attempt, a run
recovered from a preemption (lost steps, recovery time), an older trainer's lines, prices and overrides.
Times are made-up unix seconds: nothing here waits."""

from __future__ import annotations

import pytest

from orchestrator import ledger as L
from orchestrator.config import parse_config
from orchestrator.runs import RunRecord, WorkerRun


def _record(kind: str = "tpu", **fields) -> RunRecord:
    base = dict(run_id="r", config="c.yaml", target="t", target_kind=kind, remote_dir="~/w", log_path="l",
                pid_path="p", exit_path="e", run_dir="runs/r", ts="x", workers=[WorkerRun("w0", "h")],
                accelerator_type="v6e-8" if kind == "tpu" else None, spot=kind == "tpu")
    return RunRecord(**{**base, **fields})


def _trainer(t0: float, resumed_from: int = 0, **phase_s: float) -> dict:
    return {"t0": t0, "phase_s": phase_s, "resumed_from": resumed_from}


def test_one_attempt_adds_up_to_its_wall_time_with_the_trainers_split():
    trainer = _trainer(1005.0, setup=2, model_load=8, compile=30, warm_start=10, train=40, eval=6,
                       checkpoint=4)
    rec = _record(state="SUCCEEDED", launched_at_s=1000.0, ended_at_s=1110.0,
                  last_progress={"phase": "done", "step": 10, "ledger": trainer})
    led = L.run_ledger(rec, now=5000.0)
    s = led.seconds
    assert led.wall_s == pytest.approx(110.0)  # launch -> end, nothing lost, nothing made up
    assert s["bootstrap"] == pytest.approx(5 + 2 + 8 + 5)  # start-up, setup, load, exit + last poll
    assert (s["compile"], s["train"], s["warm_start"], s["eval"], s["checkpoint"]) == (30, 40, 10, 6, 4)
    assert s["recovery"] == s["lost_progress"] == s["idle"] == 0
    assert led.goodput == pytest.approx(40 / 110)
    assert led.devices == 8 and led.chip_hours == pytest.approx(110 * 8 / 3600)
    assert led.cost_estimate_usd == pytest.approx(led.chip_hours * L.PRICES["v6e"][1])  # spot
    out = led.to_json()
    assert set(out) >= {"chip_hours", "seconds", "goodput", "cost_estimate_usd"}
    assert set(out["seconds"]) == set(L.CATEGORIES)
    assert "estimate" in out["price"] and L.PRICES_DATE in out["price"]


def test_a_preempted_and_recovered_run_counts_lost_steps_and_recovery():
    first = _trainer(1010.0, setup=10, compile=40, train=100)  # steps 1..10 in 100 s, then preempted
    second = _trainer(1300.0, resumed_from=6, setup=10, compile=5, train=40)  # resumed from step 6's ckpt
    rec = _record(
        state="SUCCEEDED", launched_at_s=1290.0, ended_at_s=1360.0,
        last_progress={"phase": "done", "step": 10, "ledger": second},
        recoveries=[{"kind": "preemption", "step": 10, "attempt_launched_at_s": 1000.0,
                     "detected_at_s": 1180.0, "attempt_ledger": first, "relaunched_at_s": 1290.0,
                     "alive_at_s": 1170.0}],
    )
    led = L.run_ledger(rec, now=9999.0)
    s = led.seconds
    assert led.wall_s == pytest.approx(1360.0 - 1000.0)
    # steps 7..10 (4 of 10) were done twice, and the job's work after its last event (1160) until a poll
    # last saw it running (1170) was thrown away
    assert s["lost_progress"] == pytest.approx(40.0 + 10.0)
    assert s["train"] == pytest.approx(60.0 + 40.0)
    # detection (last seen alive at 1170 -> seen gone at 1180) + recreate, re-sync (1180 -> 1290)
    assert s["recovery"] == pytest.approx(10.0 + 110.0)
    assert s["compile"] == pytest.approx(45.0)
    assert sum(s.values()) == pytest.approx(led.wall_s)


def test_a_running_run_and_a_trainer_without_a_ledger():
    running = _record(kind="local", state="RUNNING", launched_at_s=100.0,
                      last_progress={"phase": "train", "step": 2,
                                     "ledger": _trainer(101.0, setup=1, compile=3, train=5)})
    led = L.run_ledger(running, now=130.0)
    assert led.wall_s == pytest.approx(30.0)
    assert led.seconds["train"] == pytest.approx(5 + 20)  # still training since its last event
    assert led.devices == 1 and led.cost_estimate_usd is None  # the local host: one device, no list price
    old = _record(kind="ssh", state="SUCCEEDED", workers=[WorkerRun("w0", "a"), WorkerRun("w1", "b")],
                  created_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:01:40+00:00",
                  last_progress={"step": 3, "total": 3, "elapsed_s": 90.0})
    led = L.run_ledger(old, now=0.0)
    assert led.wall_s == pytest.approx(100.0) and led.seconds["train"] == pytest.approx(90.0)
    assert led.devices == 2  # ssh: one device per host


def test_prices_from_grpoctl_yaml_replace_the_table_and_bad_ones_are_refused():
    cfg = parse_config({"prices": {"v6e": {"spot": 1.0}, "host": {"on_demand": 2.0}}}, "grpoctl.yaml")
    rec = _record(state="SUCCEEDED", launched_at_s=0.0, ended_at_s=3600.0, last_progress={"step": 1})
    led = L.run_ledger(rec, now=0.0, prices=cfg.prices)
    assert led.cost_estimate_usd == pytest.approx(8.0) and "grpoctl.yaml" in led.price.note()
    on_demand = L.run_ledger(_record(spot=False, state="SUCCEEDED", launched_at_s=0.0, ended_at_s=3600.0),
                             now=0.0, prices=cfg.prices)
    assert on_demand.cost_estimate_usd == pytest.approx(8 * L.PRICES["v6e"][0])  # not overridden
    local = L.run_ledger(_record(kind="local", state="SUCCEEDED", launched_at_s=0.0, ended_at_s=1800.0),
                         now=0.0, prices=cfg.prices)
    assert local.cost_estimate_usd == pytest.approx(1.0)
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError, match="prices"):
        parse_config({"prices": {"v6e": {"spot": -1}}}, "grpoctl.yaml")
    with pytest.raises(UsageError, match="unknown key"):
        parse_config({"prices": {"v6e": {"preemptible": 1}}}, "grpoctl.yaml")


def test_chips_per_accelerator_type_and_every_trainer_phase_has_a_category():
    from grpoctl_contract.progress import PHASES
    from orchestrator.targets.topology import accelerator_family, chips_for_accelerator

    assert chips_for_accelerator("v6e-8") == 8 and chips_for_accelerator("v4-8") == 4
    assert chips_for_accelerator("v5litepod-16") == 16 and accelerator_family("v5litepod-16") == "v5e"
    assert set(PHASES) - {"done"} <= set(L.PHASE_CATEGORY)
    assert set(L.PHASE_CATEGORY.values()) <= set(L.CATEGORIES)


def test_an_sop_total_adds_its_own_steps():
    a = L.run_ledger(_record(state="SUCCEEDED", launched_at_s=0.0, ended_at_s=100.0,
                             last_progress={"step": 1, "ledger": _trainer(0.0, train=100)}), now=0.0)
    tot = L.total([a, a], {"provisioning": 50.0, "idle": 10.0})
    assert tot.wall_s == pytest.approx(260.0) and tot.seconds["provisioning"] == 50.0
    assert tot.chip_hours == pytest.approx(260 * 8 / 3600)
    assert tot.cost_estimate_usd == pytest.approx(tot.chip_hours * L.PRICES["v6e"][1])
    assert tot.goodput == pytest.approx(200 / 260)
