"""The contracts both halves read from grpoctl_contract: the preflight report (schema, JSON, exit codes, its
one rendering), the accelerator table (every half accepts and refuses the same slices) and the run's file
layout. Fast: no compile, no jax import in the contract checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl_contract import preflight_table
from grpoctl_contract.accelerators import CHIPS, AcceleratorError, family, parse_slice
from grpoctl_contract.preflight import EXIT_DOES_NOT_FIT, EXIT_FITS, EXIT_UNAVAILABLE, FunctionReport, Report
from grpoctl_contract.rundir import RunPaths

ROOT = Path(__file__).resolve().parents[1]

# One function as `python -m trainer.preflight --json` prints it: every key the trainer sets.
UPDATE = {
    "name": "update_step", "seq_len": 1536, "peak_bytes": 20 * 2**30, "capacity_bytes": int(28.125 * 2**30),
    "fits": True, "mosaic_kernels": 2, "argument_bytes": 6 * 2**30, "output_bytes": 6 * 2**30,
    "alias_bytes": 6 * 2**30, "temp_bytes": 14 * 2**30, "generated_code_bytes": 2**20, "compile_s": 91.5,
    "flops": 3.2e14, "bytes_accessed": 1.1e11, "estimated_s": 0.62, "hbm_bytes": 4.0e11,
    "collective_bytes": 3 * 2**30, "collectives": {"all-gather": 2 * 2**30, "reduce-scatter": 2**30},
    "xla_flops": 1.1e13, "xla_estimated_s": 0.07, "data_loop": None,
}  # fmt: skip
DECODE = {**UPDATE, "name": "decode_step", "seq_len": 1536, "peak_bytes": 3 * 2**20, "estimated_s": 4.2e-4,
          "data_loop": {"flops": 1.0, "hbm_bytes": 2.0, "collective_bytes": 0.0}}  # fmt: skip
TRAINER_REPORT = {
    "fits": True, "accelerator": "v6e-8", "topology": "v6e:2x4", "num_devices": 8, "headroom": 0.1,
    "usable_bytes": int(31.25 * 2**30), "jax_version": "0.6.2", "config_hash": "abc123", "reason": None,
    "model": "tiny_model", "mesh": {"data": 1, "fsdp": 8, "tp": 1}, "num_micro": 2, "max_new_tokens": 1024,
    "sweep_max_new_tokens": 512, "policy_loss_impl": "pallas", "shadow_policy_loss_impl": "jax",
    "decode_estimate": {"decode_step_s": 4.2e-4, "tokens": 1024, "decode_s": 0.43, "prefill_s": 0.01,
                        "rollout_s": 0.44},
    "grpo_step": {"flops": 1e15, "hbm_bytes": 2e12, "collective_bytes": 1e10, "estimated_s": 1.5,
                  "rollout_s": 0.44, "logprob_s": 0.0, "update_s": 0.62, "eval_s": 0.44, "parts": {},
                  "plan": {}},
    "suggest": {"micro_batch_size_per_device": 4, "tried": [{"micro_batch_size_per_device": 4,
                                                             "peak_bytes": 2**30, "fits": True}]},
    "functions": [UPDATE, DECODE],
}  # fmt: skip


def test_the_contract_package_imports_nothing_outside_the_stdlib() -> None:
    modules = sorted(p.stem for p in (ROOT / "grpoctl_contract").glob("*.py") if p.stem != "__init__")
    heavy = ("jax", "numpy", "pydantic", "typer", "rich", "yaml", "orchestrator", "trainer")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('grpoctl_contract.' + m)\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert {"preflight", "preflight_table", "accelerators", "rundir"} <= set(modules)


def test_a_trainer_report_round_trips_through_the_contract_unchanged() -> None:
    report = Report.from_json(json.loads(json.dumps(TRAINER_REPORT)))
    assert report.functions[0] == FunctionReport(**{**UPDATE})
    assert report.extra["grpo_step"]["update_s"] == 0.62 and report.extra["mesh"]["fsdp"] == 8
    assert report.to_json() == TRAINER_REPORT
    assert report.largest is not None and report.largest.name == "update_step"


def test_the_laptop_reads_partial_and_newer_reports() -> None:
    # A hand-made cache entry (fields missing), and a newer trainer's extra keys: both parse.
    hand_made = {"fits": True, "accelerator": "v6e-8", "functions": [{"name": "u", "peak_bytes": 1}]}
    minimal = Report.from_json(hand_made)
    assert minimal.functions[0].peak_bytes == 1 and minimal.functions[0].estimated_s == 0.0
    newer = Report.from_json({**TRAINER_REPORT, "functions": [{**UPDATE, "new_key": 1, "compile_s": None}]})
    assert newer.functions[0].compile_s == 0.0 and newer.extra["model"] == "tiny_model"
    for bad in ({"functions": []}, {"fits": True}, {"fits": True, "functions": [{"peak_bytes": 1}]}, []):
        with pytest.raises(ValueError):
            Report.from_json(bad)


def test_one_line_verdict_and_exit_codes() -> None:
    report = Report.from_json(TRAINER_REPORT, cached=True)
    assert report.line() == (
        "fits on v6e-8: largest update_step at T=1536 20.00 of 28.12 GiB per chip (headroom 10%) [cached]"
    )
    assert (EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_UNAVAILABLE) == (0, 2, 4)


def test_one_renderer_prints_the_table_and_its_notes() -> None:
    lines = preflight_table.render(Report.from_json(TRAINER_REPORT))
    title, header, update, decode = lines[:4]
    assert title.startswith("preflight v6e-8 (v6e:2x4, 8 chips, mesh data=1,fsdp=8,tp=1), per chip, GiB")
    assert header.split()[:3] == ["function", "T", "args"] and header.endswith("est. ms*")
    assert len(header) == len(update) == len(decode)  # aligned columns
    # GiB, MiB under 0.01 GiB; estimates in ms (0.62 s -> 620.0, 0.42 ms -> 0.420)
    assert update.split()[-1] == "620.0" and " 20.00 " in update
    assert decode.split()[-1] == "0.420" and " 3.0M " in decode
    text = "\n".join(lines)
    assert "update_step includes the lockstep parity: the jax provider beside pallas" in text
    assert "GRPO step (estimate, device work only): 1.50 s = rollout 0.44" in text
    assert "decode (estimate): 0.42 ms per decode step x 1024 tokens" in text
    assert "suggestion: --set train.micro_batch_size_per_device=4 (tried 4: 1.00 GiB fits)" in text
    assert lines[-1].startswith("fits on v6e-8: largest update_step")


@pytest.mark.parametrize(
    ("name", "chips", "hosts", "topology"),
    [
        ("v6e-1", 1, 1, "v6e:1x1"),
        ("v6e-8", 8, 1, "v6e:2x4"),
        ("v6e-16", 16, 4, "v6e:4x4"),
        ("v6e-256", 256, 64, "v6e:16x16"),
        ("v5litepod-16", 16, 4, "v5e:4x4"),
        ("v4-8", 4, 1, "v4:2x2x1"),
        ("v4-32", 16, 4, "v4:2x2x4"),
        ("v5p-16", 8, 2, "v5p:2x2x2"),
    ],
)
def test_one_table_gives_chips_hosts_and_topology(name: str, chips: int, hosts: int, topology: str) -> None:
    s = parse_slice(name)
    assert (s.num_chips, s.hosts, s.topology) == (chips, hosts, topology)
    assert s.chip is CHIPS[family(name)]


@pytest.mark.parametrize("bad", ["v3-8", "v2-8", "v7x-9000", "v6e-12", "v4-7", "v6e"])
def test_every_half_refuses_what_the_table_does_not_know_with_one_line(bad: str) -> None:
    from orchestrator.config import parse_config
    from orchestrator.errors import UsageError
    from orchestrator.targets.topology import hosts_for_accelerator

    with pytest.raises(AcceleratorError) as contract:
        parse_slice(bad)
    why = str(contract.value)
    assert "\n" not in why and (f"{bad!r}" in why or why.startswith("no v")), why
    with pytest.raises(UsageError) as laptop:
        hosts_for_accelerator(bad)
    assert str(laptop.value) == f"accelerator_type: {why}"
    tpu = {"kind": "tpu", "project": "p", "zone": "us-east1-d", "name": "n", "accelerator_type": bad}
    with pytest.raises(UsageError) as config:
        parse_config({"targets": {"tpu": tpu}}, "grpoctl.yaml")
    line = str(config.value)  # refused at load, before any API call
    assert line.startswith("grpoctl.yaml: targets.tpu.") and line.endswith(f".accelerator_type: {why}"), line


def test_the_trainer_refuses_the_same_slices() -> None:
    pytest.importorskip("jax")
    from trainer import preflight

    with pytest.raises(preflight.PreflightError) as err:
        preflight.parse_accelerator("v3-8")
    assert str(err.value) == (
        "preflight: unknown accelerator 'v3-8' (expected e.g. v6e-8, v5litepod-16, v5p-8, v4-8)"
    )
    assert err.value.code == EXIT_DOES_NOT_FIT


def test_run_paths_are_the_workers_file_layout() -> None:
    paths = RunPaths.for_run("tiny", "20260101_000000", "tiny-1")
    assert (paths.log, paths.pid, paths.exit) == (
        "logs/nohup_tiny_20260101_000000.log", "logs/nohup_tiny_20260101_000000.pid",
        "logs/nohup_tiny_20260101_000000.exit",
    )  # fmt: skip
    assert (paths.run_dir, paths.run_id, paths.env) == ("runs/tiny-1", "tiny-1", "logs/tiny-1.env")
    assert RunPaths.latest("tiny", "log") == "logs/nohup_tiny_latest.log"
