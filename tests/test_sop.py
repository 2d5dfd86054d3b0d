"""SOP files: schema, replay of the repo's local SOP on the local target, resume, re-attach, --from."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import compare as cmp
from orchestrator import sop
from orchestrator.errors import JobFailed, UsageError
from orchestrator.lifecycle import recovery as lifecycle
from orchestrator.runs import RunStore
from orchestrator.sop import schema
from orchestrator.sop.replay import HANDLERS
from orchestrator.sop.schema import FetchStep

REPO = Path(__file__).resolve().parents[1]
HAVE_PLOT = importlib.util.find_spec("matplotlib") is not None  # the plot extra
LOCAL_SOP = REPO / "sops" / "local_pallas_vs_jax.yaml"


def test_step_forms_ids_and_defaults():
    parsed = sop.parse_sop(
        {
            "name": "x",
            "steps": [
                "up",
                {"sync": None},
                {"run": {"name": "a", "config": "c.yaml", "env": {"EVAL_FULL_SWEEP": 1}}},
                {"run": {"name": "b", "config": "d.yaml", "wait": False}},
                {"wait": {"run": "b"}},
                {"compare": {"a": "a", "b": "b"}},
            ],
        },
        "x.yaml",
    )
    assert [sop.step_id(s) for s in parsed.steps] == ["up", "sync", "run:a", "run:b", "wait", "compare"]
    assert parsed.steps[2].env == {"EVAL_FULL_SWEEP": "1"}  # YAML ints become env strings
    assert parsed.steps[1].bootstrap is True and parsed.summary_keys[0] == "eval_full/accuracy"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"name": "x", "steps": ["up", "up"]}, "duplicate step ids"),
        ({"name": "x", "steps": []}, "steps"),
        ({"name": "x", "steps": [{"up": {}, "down": {}}]}, "one-key mapping"),
        ({"name": "x", "steps": [{"fetch": {"runs": ["nope"]}}]}, "unknown run(s) ['nope']"),
        ({"name": "x", "steps": [{"run": {"name": "a"}}]}, "missing required key 'steps.0.run.config'"),
        ({"steps": ["up"]}, "missing required key 'name'"),
        ({"name": "x", "steps": ["up"], "targets": {"t": {"kind": "tpu"}}}, "missing required key"),
    ],
)
def test_schema_errors_are_one_line(data, message):
    with pytest.raises(UsageError, match=None) as err:
        sop.parse_sop(data, "x.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_repo_sop_files_validate():
    tpu = sop.load_sop(REPO / "sops" / "grpo_gsm8k_pallas_vs_jax.yaml")
    local = sop.load_sop(LOCAL_SOP)
    kinds = [s.kind for s in tpu.steps]
    assert kinds == [s.kind for s in local.steps]  # the same procedure on two targets
    assert tpu.targets["v6e"].kind == "tpu" and local.target == "local"
    for s in tpu.steps:
        if s.kind == "run":
            assert s.env == {"EVAL_FULL_SWEEP": "1", "PRINT_TRAIN_TIME_BREAKDOWN": "1"}
    assert len(tpu.summary_keys) == 5
    seeds = sop.load_sop(REPO / "sops" / "local_seeds_pallas_vs_jax.yaml")
    runs = [s for s in seeds.steps if s.kind == "run"]
    want = [(f"{arm}/s{k}", k) for arm in ("jax", "pallas") for k in range(5)]
    assert [(s.name, s.seed) for s in runs] == want
    assert {s.config for s in runs} == {s.config for s in local.steps if s.kind == "run"}  # the demo's


def test_seeds_expand_into_one_run_step_per_seed():
    parsed = sop.parse_sop(
        {
            "name": "x",
            "steps": [
                {"run": {"name": "a", "config": "c.yaml", "seeds": [3, 1], "set": {"lr": 1}}},
                {"run": {"name": "b", "id": "bee", "config": "d.yaml", "seeds": [1, 3]}},
                {"run": {"name": "c", "config": "d.yaml", "seed": 7}},
                {"wait": {"run": "a/s3"}},
                {"fetch": {"runs": ["b"]}},
                {"compare": {"a": "a", "b": "b", "margin": 0.05}},
            ],
        },
        "x.yaml",
    )
    ids = [sop.step_id(s) for s in parsed.steps]
    assert ids == ["run:a/s3", "run:a/s1", "bee/s1", "bee/s3", "run:c", "wait", "fetch", "compare"]
    assert [schema.run_overrides(s, {"o": "2"}) for s in parsed.steps[:5]] == [
        {"lr": "1", "o": "2", "seed": "3"}, {"lr": "1", "o": "2", "seed": "1"},
        {"o": "2", "seed": "1"}, {"o": "2", "seed": "3"}, {"o": "2", "seed": "7"},
    ]
    assert schema.members(parsed, "a") == ["a/s3", "a/s1"] and schema.members(parsed, "a/s1") == ["a/s1"]
    assert schema.members(parsed, "c") == ["c"] and schema.members(parsed, "a/s") == []
    assert parsed.steps[-1].margin == 0.05


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [-1]}, "distinct integers"),
        ({"seeds": [0, 1], "set": {"seed": 4}}, "give `seeds` or a seed, not both"),
        ({"seeds": [0, 1], "seed": 4}, "give `seeds` or a seed, not both"),
        ({"name": "a/s0"}, "run name 'a/s0'"),  # `/s<seed>` names are the expansion's own
    ],
)
def test_bad_seeds_are_one_line_errors(run, message):
    data = {"name": "x", "steps": [{"run": {"name": "a", "config": "c.yaml", **run}}]}
    with pytest.raises(UsageError) as err:
        sop.parse_sop(data, "x.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_compare_of_an_unknown_group_is_refused():
    data = {"name": "x", "steps": [{"run": {"name": "a", "config": "c", "seeds": [0, 1]}},
                                   {"compare": {"a": "a", "b": "b"}}]}
    with pytest.raises(UsageError, match=r"unknown run\(s\) \['b'\]"):
        sop.parse_sop(data, "x.yaml")


def test_local_sop_end_to_end_then_resume_then_from(local_lab):
    work, config = local_lab
    messages: list[str] = []
    first = sop.replay(LOCAL_SOP, config_file=config, say=messages.append)
    assert all(s.status == "done" for s in first.state.steps.values())
    runs = {name: first.state.steps[f"run:{name}"].run_id for name in ("jax", "pallas")}
    assert runs["jax"].startswith("tiny_cpu-") and runs["pallas"].startswith("tiny_cpu_pallas-")
    report = (work / first.report_path).read_text()
    for run_id in runs.values():
        assert f"`{run_id}` | SUCCEEDED" in report
        assert (work / "runs" / run_id / "summary.json").is_file()
    assert "logs/nohup_tiny_cpu_2" in report and ".exit`" in report and ".pid`" in report
    assert "## Observed summary" in report and "| `eval_full/accuracy` |" in report
    assert "McNemar exact test on 300 paired questions" in report and "## Summary" in report
    assert report.index("## Summary") < report.index("## Steps")  # the verdicts first
    assert report.index("2 run(s), ") < report.index("## Steps")  # and what the runs cost, in chip-hours
    if HAVE_PLOT:  # the plot, embedded relative to the report
        assert "![compare](jax_vs_pallas.png)" in report
    else:
        assert "plot skipped: matplotlib is not installed" in report
    # env values are flags that are not secret (-e): the report shows them (secrets: --secret NAME)
    assert "grpoctl --target local run configs/tiny_cpu.yaml --env EVAL_FULL_SWEEP=1" in report
    assert (work / "runs" / "sops" / "local_pallas_vs_jax" / "jax_vs_pallas.png").is_file() == HAVE_PLOT
    assert "env_push" in report and "not present: skipped (optional)" in report
    # the ledger: a row per run and the SOP total (local runs: no list price, so chip-hours per point)
    ledger = report.split("## Ledger", 1)[1].split("\n## ", 1)[0]
    assert "| jax | " in ledger and "| pallas | " in ledger and "| **SOP total** | " in ledger
    assert "Cost is an estimate (no price for host" in ledger
    # Same seed, same data: the stand-in's "pallas" agrees with "jax" on every question.
    assert first.verdict.endswith(cmp.NO_DETECTABLE_DIFFERENCE)
    assert "method verdict: inconclusive: one run per arm" in first.verdict

    # A second replay finishes nothing twice.
    messages.clear()
    again = sop.replay(LOCAL_SOP, config_file=config, say=messages.append)
    assert sum("done earlier, skipped" in m for m in messages) == 8
    assert len(RunStore().list()) == 2
    assert {n: again.state.steps[f"run:{n}"].run_id for n in runs} == runs

    # --from re-runs that step and those after it, not the ones before.
    third = sop.replay(LOCAL_SOP, config_file=config, from_step="run:pallas")
    assert third.state.steps["run:jax"].run_id == runs["jax"]
    assert third.state.steps["run:pallas"].run_id != runs["pallas"]
    assert len(RunStore().list()) == 3
    state = json.loads(third.state_path.read_text())
    assert state["steps"]["compare"]["status"] == "done"


def test_interrupted_wait_reattaches_instead_of_relaunching(local_lab, tmp_path: Path, monkeypatch):
    work, config = local_lab
    file = tmp_path / "one_run.yaml"
    file.write_text(
        "name: one_run\ntarget: local\nsteps:\n  - sync: {bootstrap: false}\n"
        "  - run: {name: w, config: configs/watch.yaml, interval_s: 0.3}\n  - fetch\n"
    )
    real_wait = lifecycle.wait

    def laptop_sleeps(*args, **kwargs):
        raise KeyboardInterrupt  # the replay dies after launching, before the run ends

    monkeypatch.setattr(lifecycle, "wait", laptop_sleeps)
    with pytest.raises(KeyboardInterrupt):
        sop.replay(file, config_file=config)
    state = json.loads((work / "runs" / "sops" / "one_run" / "report.state.json").read_text())
    launched = state["steps"]["run:w"]["run_id"]
    assert state["steps"]["run:w"]["status"] == "running" and launched

    monkeypatch.setattr(lifecycle, "wait", real_wait)
    messages: list[str] = []
    result = sop.replay(file, config_file=config, say=messages.append)
    assert result.state.steps["run:w"].run_id == launched
    assert any(f"re-attached to {launched}" in m for m in messages)
    assert [r.run_id for r in RunStore().list()] == [launched]  # launched once
    assert result.state.steps["fetch"].status == "done"
    assert (work / "runs" / launched / "summary.json").is_file()


def test_finished_runs_are_fetched_at_once_so_a_lost_vm_disk_loses_nothing(
    local_lab, tmp_path: Path, monkeypatch
):
    """Found by the rehearsal: the first run's files lived only on the VM, and the second run's preemption
    recreated it (a fresh disk) before the fetch step: "no result files". A run that SUCCEEDED is fetched
    as it ends; the fetch step then uses that copy."""
    work, config = local_lab
    file = tmp_path / "lost_disk.yaml"
    file.write_text(
        "name: lost_disk\ntarget: local\nsteps:\n  - sync: {bootstrap: false}\n"
        "  - run: {name: w, config: configs/watch.yaml, interval_s: 0.3}\n  - fetch\n"
    )
    real_fetch_step = HANDLERS[FetchStep]

    def disk_lost_first(replayer, step, st):  # the VM was recreated after the run: its run dirs are gone
        for run_dir in (work / ".grpoctl").rglob("runs/*"):
            shutil.rmtree(run_dir)
        return real_fetch_step(replayer, step, st)

    monkeypatch.setitem(HANDLERS, FetchStep, disk_lost_first)
    result = sop.replay(file, config_file=config)
    run_id = result.state.steps["run:w"].run_id
    assert result.state.steps["fetch"].status == "done"
    assert (work / "runs" / run_id / "summary.json").is_file()
    assert result.state.summaries["w"]
    assert any("fetched when the run ended" in d for d in result.state.steps["fetch"].details)


def test_failed_step_stops_the_replay_and_is_reported(local_lab, tmp_path: Path):
    _, config = local_lab
    file = tmp_path / "failing.yaml"
    file.write_text(
        "name: failing\ntarget: local\nsteps:\n  - sync: {bootstrap: false}\n"
        "  - run: {name: bad, config: configs/fail3.yaml, interval_s: 0.3}\n  - fetch\n"
    )
    with pytest.raises(JobFailed, match="exit code 3") as err:
        sop.replay(file, config_file=config, report_path=tmp_path / "r" / "report.md")
    assert getattr(err.value, "exit_code", None) == 1
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| `run:bad` | failed |" in report and "| `fetch` | pending |" in report
    assert "**error**: run fail3-" in report


@pytest.mark.slow
def test_real_local_sop_with_the_real_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`make demo` in small: the repo's own SOP, the real trainer (jax vs pallas loss), cut to 2 steps."""
    pytest.importorskip("jax", reason="runs the real trainer: needs the trainer extra")
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)  # committed code, like a worker
    config = tmp_path / "grpoctl.yaml"
    config.write_text(f"targets:\n  local: {{kind: local, workdir: {tmp_path / 'wd'}}}\n")
    monkeypatch.chdir(work)
    small = {"steps": "2", "eval_every_steps": "2", "eval_full_limit": "16", "checkpoint.every_steps": "100",
             "warm_start.steps": "20"}  # the demo's 200 warm-start steps are not what this test is about
    result = sop.replay(LOCAL_SOP, config_file=str(config), overrides=small)
    assert all(s.status == "done" for s in result.state.steps.values())
    for name in ("jax", "pallas"):
        run_id = result.state.steps[f"run:{name}"].run_id
        summary = json.loads((work / "runs" / run_id / "summary.json").read_text())
        assert summary["steps"] == 2 and 0.0 <= summary["eval_full/accuracy"] <= 1.0
        assert len((work / "runs" / run_id / "eval_full.jsonl").read_text().splitlines()) == 16
    assert "McNemar exact test on 16 paired questions" in result.verdict
    # Each verdict once: kernel parity (when the config logs it), each run against its own start
    # (eval_full_at_start), the method verdict, then jax vs pallas.
    # The pallas config computes its jax shadow every step (lockstep parity): float32 rounding, far inside
    # the tolerance (measured ~1e-6 on |dlogp| against 1e-4).
    (kernel,) = [line for line in result.verdict.splitlines() if "kernel parity" in line]
    assert kernel.startswith("pallas: kernel parity: pallas tracked jax on all 2 steps: max |dlogp| ")
    lines = [line for line in result.verdict.splitlines() if "kernel parity" not in line]
    # each run's start -> end twice: greedy (McNemar), then the sampled pass (the tiny configs turn it on)
    heads = [line.split(" ")[0].rstrip(":") for line in lines]
    assert heads == ["jax", "jax", "pallas", "pallas", "method", "jax"]
    assert all(" -> end " in line and "on 16 paired questions" in line for line in lines[:4])
    assert all("sampled pass rate (8 per question)" in lines[i] for i in (1, 3))
    assert lines[4].startswith("method verdict: inconclusive: one run per arm")
    report = result.report_path.read_text()
    assert all(report.count(line) == 1 for line in lines)
    from orchestrator.sop.report import sop_ledgers

    runs, total = sop_ledgers(sop.load_sop(LOCAL_SOP), result.state)
    for led in runs.values():
        assert led.seconds["compile"] > 0 and led.seconds["train"] > 0 and led.seconds["eval"] > 0
    assert total.wall_s >= sum(led.wall_s for led in runs.values()) and "| **SOP total** | " in report


def test_each_step_is_spelled_as_the_grpoctl_command_that_does_it():
    """The report's command column comes from one function, shell-quoted; secrets appear by name only."""
    from orchestrator.sop.report import command_line

    parsed = sop.parse_sop(
        {
            "name": "x",
            "steps": [
                "up",
                {"sync": {"bootstrap": False}},
                {"env_push": {"file": "my.env"}},
                {"run": {"name": "a", "config": "c.yaml", "env": {"K": "v4lue", "EVAL_FULL_SWEEP": "1"},
                         "secrets": ["TOK"], "set": {"s": 1, "x": "$(touch f)"}}},
                {"run": {"name": "b", "config": "d.yaml", "wait": False}},
                {"wait": {"run": "b"}},
                "fetch",
                {"compare": {"a": "a", "b": "b"}},
                "down",
            ],
        },
        "x.yaml",
    )
    state = sop.ReplayState("x.yaml", {"run:a": sop.StepState(run_id="ra")})
    lines = [
        command_line(
            s, sop=parsed, state=state, target="t", dry_run=True, overrides={"o": "2"}, report_dir=Path("r")
        )
        for s in parsed.steps
    ]
    assert [line.removeprefix("grpoctl --dry-run --target t ") for line in lines] == [
        "up",
        "sync --no-bootstrap",
        "env push --file my.env",
        "run c.yaml --env K=v4lue --env EVAL_FULL_SWEEP=1 --secret TOK --set s=1 --set 'x=$(touch f)' "
        "--set o=2 --wait",  # every -e is a flag, not a secret (secrets: --secret NAME), all shell-quoted
        "run d.yaml --set o=2",
        "status '?' --watch",  # run b has no id yet
        "fetch ra '?'",
        "compare ra '?' --plot r/a_vs_b.png",
        "down",
    ]
    # pasting a command runs what ran: the shell reads back exactly the arguments
    assert shlex.split(lines[3])[4:] == [
        "run", "c.yaml", "--env", "K=v4lue", "--env", "EVAL_FULL_SWEEP=1", "--secret", "TOK", "--set", "s=1",
        "--set", "x=$(touch f)", "--set", "o=2", "--wait",
    ]


SEEDED = """name: seeded
target: local
steps:
  - sync: {bootstrap: false}
  - run: {name: jax, config: configs/tiny_cpu.yaml, seeds: [0, 1], env: {EVAL_FULL_SWEEP: "1"},
          interval_s: 0.2}
  - run: {name: pallas, config: configs/tiny_cpu_pallas.yaml, seeds: [0, 1], env: {EVAL_FULL_SWEEP: "1"},
          interval_s: 0.2}
  - fetch
  - compare: {a: jax, b: pallas}
"""


def test_seeded_arms_run_one_after_another_resume_and_compare_as_groups(local_lab, tmp_path: Path):
    work, config = local_lab
    file = tmp_path / "seeded.yaml"
    file.write_text(SEEDED)
    with pytest.raises(UsageError, match="the SOP sets each run's seed itself"):
        sop.replay(file, config_file=config, overrides={"seed": "5"})
    assert RunStore().list() == []  # refused before anything ran
    first = sop.replay(file, config_file=config)
    names = ["jax/s0", "jax/s1", "pallas/s0", "pallas/s1"]
    ids = {n: first.state.steps[f"run:{n}"].run_id for n in names}
    for name, run_id in ids.items():  # each seed reached its trainer
        assert json.loads((work / "runs" / run_id / "config.json").read_text())["seed"] == int(name[-1])
    lines = first.verdict.splitlines()
    assert "method verdict: inconclusive: every per-seed difference is the same" in first.verdict
    assert "2 vs 2 runs, paired by seed" in first.verdict  # the stand-in's providers agree to the bit
    mcnemar = [line for line in lines if "McNemar" in line]
    assert [line.split(": A-only")[0] for line in mcnemar] == [
        "jax/s0 vs pallas/s0: McNemar exact test on 300 paired questions (seed 0 in both)",
        "jax/s1 vs pallas/s1: McNemar exact test on 300 paired questions (seed 1 in both)",
    ]
    report = first.report_path.read_text()
    # The method verdict under its heading, the lines about these trajectories (McNemar pairs) under theirs.
    claims, runs = report.index(cmp.METHOD_HEADING), report.index(cmp.TRAJECTORY_HEADING)
    assert claims < report.index("method verdict: inconclusive") < runs < report.index(mcnemar[0])
    assert ("![compare](jax_vs_pallas.png)" in report) == HAVE_PLOT
    assert f"compare {ids['jax/s0']},{ids['jax/s1']} {ids['pallas/s0']},{ids['pallas/s1']}" in report
    assert "run configs/tiny_cpu.yaml --env EVAL_FULL_SWEEP=1 --set seed=1 --wait" in report
    state = first.state.verdict_json
    assert state["runs_a"] == [ids["jax/s0"], ids["jax/s1"]] and state["margin"] == 0.03
    # Resumable like any run step: a second replay launches nothing.
    again = sop.replay(file, config_file=config)
    assert {n: again.state.steps[f"run:{n}"].run_id for n in names} == ids
    assert len(RunStore().list()) == 4
    # --from a group's name starts from its first seed's run.
    third = sop.replay(file, config_file=config, from_step="run:pallas")
    assert third.state.steps["run:jax/s1"].run_id == ids["jax/s1"]
    assert third.state.steps["run:pallas/s0"].run_id != ids["pallas/s0"] and len(RunStore().list()) == 6
    report = third.report_path.read_text()
    assert "Start and end accuracy per arm" in report and "- jax (2 runs): start - -> end 0." in report


def test_a_run_steps_secrets_reach_the_job_and_never_the_report_or_state(
    local_lab, tmp_path: Path, monkeypatch
):
    """SOP `secrets:` are names; their values (from the environment) go to the job only: the report, the
    state file and the verdict JSON in it hold the name, never the value."""
    work, config = local_lab
    value = "sop-secret-value-7f3a9c0e51d2b846"
    monkeypatch.setenv("STANDIN_SECRET", value)
    file = tmp_path / "secret.yaml"
    file.write_text(
        "name: secret\ntarget: local\nsteps:\n  - sync: {bootstrap: false}\n"
        "  - run: {name: a, config: configs/ok.yaml, secrets: [STANDIN_SECRET], interval_s: 0.2}\n"
        "  - run: {name: b, config: configs/ok_b.yaml, secrets: [STANDIN_SECRET], interval_s: 0.2}\n"
        "  - fetch\n  - compare: {a: a, b: b, plot: false}\n"
    )
    result = sop.replay(file, config_file=config)
    assert all(s.status == "done" for s in result.state.steps.values())
    assert result.state.summaries["a"]["secret_len"] == len(value)  # the job saw it
    report, state = result.report_path.read_text(), result.state_path.read_text()
    assert "--secret STANDIN_SECRET" in report and "STANDIN_SECRET" in state
    assert value not in report and value not in state


def test_replay_state_round_trips_every_field_and_refuses_a_file_that_is_not_one(tmp_path: Path):
    path = tmp_path / "report.state.json"
    saved = sop.ReplayState(
        "old.yaml", {"run:a": sop.StepState(status="done", run_id="ra", seconds={"provisioning": 1.5})},
        summaries={"a": {"k": 1}}, comparison="| t |", verdict="v", verdict_json={"method_verdict": "x"},
        plots={"compare": "a_vs_b.png"}, key_numbers=["n"], preflight={"a": "fits"},
        preflight_fits={"a": True},
    )
    saved.save(path)
    loaded = sop.ReplayState.load(path, "new.yaml")
    assert loaded.sop == "new.yaml" and loaded == sop.ReplayState(**{**vars(saved), "sop": "new.yaml"})
    for bad in ("[1]", "{not json", '{"steps": {"up": {"nope": 1}}}'):
        path.write_text(bad)
        with pytest.raises(UsageError, match="unreadable SOP state"):
            sop.ReplayState.load(path, "x.yaml")


def test_ledger_rows_cost_each_accuracy_point_a_run_gained():
    """Points gained = the summary's end accuracy minus its start accuracy (full sweeps), in points; the
    cost of one point is the run's chip-hours (no list price) over them; no start sweep: no figure."""
    from orchestrator import ledger as ledger_mod
    from orchestrator.sop.report import ledger_lines

    hour = ledger_mod.Ledger()
    hour.add("train", 3600.0)
    runs = {"a": hour, "b": hour}
    summaries = {"a": {"eval_full/accuracy": 0.30, "eval_full_start/accuracy": 0.10},
                 "b": {"eval_full/accuracy": 0.30, "eval_full_start/accuracy": True}}  # not a number
    lines = ledger_lines(runs, ledger_mod.total(runs.values()), summaries)
    cells = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:6] for line in lines[2:5]}
    assert cells["a"] == ["1", "100%", "-", "+20.0", "0.05 chip-h"]
    assert cells["b"] == ["1", "100%", "-", "-", "-"]
    assert cells["**SOP total**"] == ["2", "100%", "-", "-", "-"]
