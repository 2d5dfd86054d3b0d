"""Compare of seeded groups, the kernel parity verdict and the config-difference warnings, on hand-made run
folders (the files a fetched run holds: summary.json, eval_full*.jsonl, metrics.jsonl, config.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import compare as cmp
from orchestrator import parity
from orchestrator.cli import app
from orchestrator.errors import UsageError

N = 200  # questions per sweep
PARITY = "train/parity/"  # the trainer's parity metrics (grpoctl_contract.rundir.PARITY_KEYS), as logged


def _rows(right: int) -> str:
    return "".join(json.dumps({"id": f"q{i}", "correct": i < right}) + "\n" for i in range(N))


def make_run(
    root: Path,
    name: str,
    *,
    seed: int | None,
    start: int = 20,
    end: int = 36,
    impl: str = "jax",
    config: dict | None = None,
    metrics: list[dict] | None = None,
    summary: dict | None = None,
) -> Path:
    """A fetched run folder: `start`/`end` questions right of N, its config and metrics rows."""
    folder = root / name
    folder.mkdir(parents=True)
    cfg = {"steps": 100, "compute_dtype": "float32", "optimizer": {"lr": 3e-4},
           "train": {"policy_loss_impl": impl}, **(config or {})}
    if seed is not None:
        cfg["seed"] = seed
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "summary.json").write_text(json.dumps({"eval_full/accuracy": end / N, **(summary or {})}))
    (folder / "eval_full.jsonl").write_text(_rows(end))
    (folder / "eval_full_start.jsonl").write_text(_rows(start))
    rows = metrics if metrics is not None else [{"step": s, "loss": 0.1, "reward": 0.1 * s} for s in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _parity_rows(steps: int, logp: float = 3e-7, grad: float = 2e-6, spike: tuple[int, float] | None = None):
    rows = []
    for s in range(1, steps + 1):
        value = spike[1] if spike and s == spike[0] else logp
        rows.append({"step": s, "loss": 0.1, f"{PARITY}logp_max_abs_diff": value,
                     f"{PARITY}logp_mean_abs_diff": value / 10, f"{PARITY}grad_rel_diff": grad,
                     f"{PARITY}loss_abs_diff": 1e-8})
    return rows


@pytest.fixture
def groups(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """Seeds 0-2 per arm; end accuracies A 0.18/0.19/0.17, B 0.175/0.19/0.17 (paired by seed)."""
    a = [make_run(tmp_path, f"jax-s{s}", seed=s, end=e) for s, e in zip((0, 1, 2), (36, 38, 34), strict=True)]
    b = [make_run(tmp_path, f"pallas-s{s}", seed=s, end=e, impl="pallas")
         for s, e in zip((2, 0, 1), (34, 35, 38), strict=True)]  # listed out of seed order on purpose
    return a, b


@pytest.fixture
def st():
    """scipy.stats, the reference (the `stats` extra; the laptop-only install skips these tests)."""
    return pytest.importorskip("scipy.stats", reason="the method statistics need the stats extra")


def test_groups_pair_by_seed_and_give_a_method_verdict(groups, st):
    a, b = ([cmp.load_run(f) for f in arm] for arm in groups)
    result = cmp.compare_runs(a, b, margin=0.03)
    ends_a, ends_b = [0.18, 0.19, 0.17], [0.175, 0.19, 0.17]  # B re-ordered by seed
    reference = st.ttest_rel(ends_b, ends_a)
    assert result.method.design == "paired by seed"
    assert result.method.p_difference == pytest.approx(reference.pvalue, rel=1e-10)
    assert result.verdict == "equivalent"  # -0.0017 mean, tight: within 0.03
    assert [(p.a, p.b, p.seed) for p in result.pairs] == [
        ("jax-s0", "pallas-s0", 0), ("jax-s1", "pallas-s1", 1), ("jax-s2", "pallas-s2", 2)
    ]
    assert [p.result.only_a for p in result.pairs] == [1, 0, 0]  # seed 0: 36 vs 35 right
    assert result.paired is None  # several pairs: no single McNemar result
    as_json = result.to_json()
    assert as_json["method_verdict"] == "equivalent" and as_json["margin"] == 0.03
    assert as_json["runs_a"] == ["jax-s0", "jax-s1", "jax-s2"] and len(as_json["mcnemar_pairs"]) == 3
    assert as_json["arms"]["a"]["end"]["mean"] == pytest.approx(0.18)
    low, high = st.ttest_1samp(ends_a, 0).confidence_interval(0.95)
    assert (as_json["arms"]["a"]["end"]["ci"]["low"], as_json["arms"]["a"]["end"]["ci"]["high"]) == \
        pytest.approx((low, high))
    assert as_json["arms"]["a"]["runs"][0]["start"]["accuracy"] == 0.1
    assert as_json["config_warnings"] == []  # provider and seed differ, nothing else
    lines = result.summary_lines()
    assert [line.split(":")[0] for line in lines[:6]] == [f"{r.run_id}" for r in (*a, *b)]
    # then each arm's start -> end over its runs (greedy here: the runs have no sampled pass)
    assert [line.split(" over ")[0] for line in lines[6:8]] == [result.a, result.b]
    assert "greedy accuracy end - start" in lines[6]
    assert lines[8].startswith("method verdict: equivalent") and len(lines) == 12
    md = result.markdown()
    assert "| jax-s0,jax-s1,jax-s2 | `jax-s0` | 0 | 0.100 [" in md and "(mean over runs)" in md
    assert "| `eval_full/accuracy` | 0.18 |" in md  # the key table shows each arm's mean


def test_groups_without_shared_seeds_fall_back_to_welch(tmp_path: Path, st):
    a = [cmp.load_run(make_run(tmp_path, f"a{s}", seed=s, end=e)) for s, e in ((0, 36), (1, 38), (2, 34))]
    b = [cmp.load_run(make_run(tmp_path, f"b{s}", seed=s, end=e)) for s, e in ((0, 60), (5, 62))]
    result = cmp.compare_runs(a, b)
    assert result.method.design == "Welch (unpaired)" and (result.method.n_a, result.method.n_b) == (3, 2)
    assert result.method.p_difference == pytest.approx(
        st.ttest_ind([0.30, 0.31], [0.18, 0.19, 0.17], equal_var=False).pvalue, rel=1e-10)
    assert result.verdict == "different"
    assert [(p.a, p.b, p.seed) for p in result.pairs] == [("a0", "b0", 0)]  # McNemar on the shared seed


def test_one_run_per_arm_is_inconclusive_and_says_why(tmp_path: Path):
    a = cmp.load_run(make_run(tmp_path, "a", seed=0, end=37))
    b = cmp.load_run(make_run(tmp_path, "b", seed=0, end=26))
    result = cmp.compare_runs(a, b)
    assert result.verdict == "inconclusive" and "one run per arm" in result.method.reason
    assert result.paired is not None and result.paired.verdict in (cmp.POLICIES_DIFFER,
                                                                   cmp.NO_DETECTABLE_DIFFERENCE)
    assert "aligned" not in " ".join(result.summary_lines())


def test_a_run_in_both_arms_or_an_empty_arm_is_refused(tmp_path: Path):
    a = cmp.load_run(make_run(tmp_path, "a", seed=0))
    with pytest.raises(UsageError, match="appears twice"):
        cmp.compare_runs([a], [a])
    with pytest.raises(UsageError, match="at least one run"):
        cmp.compare_runs([a], [])


def test_config_differences_beyond_provider_shadow_and_seed_warn(tmp_path: Path):
    a = cmp.load_run(make_run(tmp_path, "a", seed=0, config={"steps": 3}))
    b = cmp.load_run(make_run(tmp_path, "b", seed=1, impl="pallas",
                              config={"steps": 10, "train": {"policy_loss_impl": "pallas",
                                                             "shadow_policy_loss_impl": "jax"}}))
    (warning,) = cmp.compare_runs(a, b).warnings
    assert warning.startswith("warning: the two arms' configs differ in more than the loss provider")
    assert warning.endswith(": steps 3 vs 10")  # provider, shadow and seed left out
    bookkeeping = {"wandb_mode": "disabled", "checkpoint": {"every_steps": 7}}  # no change to the math
    same = cmp.load_run(make_run(tmp_path, "c", seed=4, impl="pallas", config={"steps": 3, **bookkeeping}))
    assert cmp.compare_runs(a, same).warnings == []
    drift = cmp.load_run(make_run(tmp_path, "d", seed=1, config={"steps": 3, "optimizer": {"lr": 1e-3}}))
    warnings = cmp.compare_runs([a, drift], [same]).warnings
    assert any("a,d's runs a and d differ in more than the seed: optimizer.lr 0.0003 vs 0.001" in w
               for w in warnings)
    assert cmp.compare_runs([a, drift], [same]).summary_lines()[0].startswith("warning:")


def test_kernel_parity_tracked_on_every_step(tmp_path: Path):
    run = cmp.load_run(make_run(tmp_path, "p", seed=0, impl="pallas", metrics=_parity_rows(100),
                                config={"train": {"policy_loss_impl": "pallas",
                                                  "shadow_policy_loss_impl": "jax"}}))
    verdict = parity.parity_verdict("p", run.summary, run.metrics, run.config)
    assert verdict.tracked and verdict.steps == 100 and verdict.parted_at is None
    assert verdict.line() == (
        "p: kernel parity: pallas tracked jax on all 100 steps: max |dlogp| 3e-07, max grad rel diff 2e-06, "
        "max |dloss| 1e-08; tolerance |dlogp| <= 0.0001, grad rel diff <= 0.001, |dloss| <= 0.0001 (float32)"
    )
    other = cmp.load_run(make_run(tmp_path, "j", seed=0))  # no shadow: no parity line for it
    result = cmp.compare_runs(other, run)
    assert [p.run_id for p in result.parity] == ["p"] and result.summary_lines()[0] == verdict.line()
    assert result.to_json()["parity"][0]["tracked"] is True


@pytest.mark.parametrize(("spike", "on"), [((28, 5e-3), 28), ((40, math.nan), 40), ((1, math.inf), 1)])
def test_kernel_parity_parted_at_the_first_step_past_tolerance(tmp_path: Path, spike, on):
    rows = _parity_rows(60, spike=spike)
    rows[50][f"{PARITY}logp_max_abs_diff"] = 1.0  # later and larger: the first one counts
    verdict = parity.parity_verdict("p", {}, rows, {"train": {"policy_loss_impl": "pallas",
                                                              "shadow_policy_loss_impl": "jax"}})
    assert not verdict.tracked and (verdict.parted_at, verdict.parted_on) == (on, "logp_max_abs_diff")
    assert f"pallas parted from jax at step {on} (|dlogp|)" in verdict.line()


def test_kernel_parity_from_the_summary_alone_and_bf16_tolerance():
    summary = {f"{PARITY}logp_max_abs_diff_max": 0.004, f"{PARITY}grad_rel_diff_max": 0.01}
    bf16 = parity.parity_verdict("r", summary, [], {"compute_dtype": "bfloat16"})
    assert bf16.tracked and bf16.steps == 0 and "over the run (summary maxima)" in bf16.line()
    assert "(bfloat16)" in bf16.line() and "this run's loss provider tracked its shadow" in bf16.line()
    f32 = parity.parity_verdict("r", summary, [], {"compute_dtype": "float32"})
    assert not f32.tracked and "did not track" in f32.line()
    # the summary's maximum covers steps whose rows were not kept: it wins when larger
    rows = _parity_rows(3)
    merged = parity.parity_verdict("r", {f"{PARITY}grad_rel_diff_max": 0.5}, rows, {})
    assert merged.maxima["grad_rel_diff"] == 0.5 and not merged.tracked
    assert parity.parity_verdict("r", {"loss": 1.0}, [{"step": 1, "loss": 2}], {}) is None


def test_cli_compare_takes_comma_separated_groups(groups, tmp_path: Path, monkeypatch, st):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    monkeypatch.chdir(tmp_path)
    a, b = (",".join(str(f) for f in arm) for arm in groups)
    out = CliRunner().invoke(app, ["--json", "compare", a, b, "--margin", "0.05"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert (data["method_verdict"], data["margin"]) == ("equivalent", 0.05)
    assert data["runs_b"] == ["pallas-s2", "pallas-s0", "pallas-s1"]
    text = CliRunner().invoke(app, ["compare", a, b, "--plot", str(tmp_path / "g.png")])
    assert text.exit_code == 0, text.output
    first = text.stdout.splitlines()[0]
    assert first.startswith("jax-s0: start 0.100 -> end 0.180")  # the verdicts come before the table
    assert "method verdict: equivalent" in text.stdout and (tmp_path / "g.png").stat().st_size > 5000
    for bad, message in (([a, b, "--margin", "-1"], "--margin"), ([a + ",", b], "none empty")):
        refused = CliRunner().invoke(app, ["compare", *bad])
        assert refused.exit_code == 2 and message in refused.output


def test_a_non_finite_parity_value_in_metrics_jsonl_parts_at_its_step(tmp_path: Path):
    """NaN/Infinity in metrics.jsonl is left out by the validated reader; the parity verdict still sees the
    step whose value went missing and calls it parted there."""
    folder = make_run(tmp_path, "p", seed=0, impl="pallas", metrics=_parity_rows(5),
                      config={"train": {"policy_loss_impl": "pallas", "shadow_policy_loss_impl": "jax"}})
    text = (folder / "metrics.jsonl").read_text().splitlines()
    text[2] = text[2].replace('"train/parity/grad_rel_diff": 2e-06', '"train/parity/grad_rel_diff": NaN')
    assert "NaN" in text[2]
    (folder / "metrics.jsonl").write_text("\n".join(text) + "\n")
    run = cmp.load_run(folder)
    assert f"{PARITY}grad_rel_diff" not in run.metrics[2]  # dropped on reading
    (verdict,) = cmp.compare_runs(run, cmp.load_run(make_run(tmp_path, "j", seed=0))).parity
    assert (verdict.parted_at, verdict.parted_on) == (3, "grad_rel_diff") and not verdict.tracked
    assert "pallas parted from jax at step 3 (grad rel diff)" in verdict.line()


def test_worker_text_in_config_json_reaches_the_terminal_cleaned(tmp_path: Path):
    evil = "pallas\x1b]0;owned\x07\x1b[2J"
    run = cmp.load_run(make_run(tmp_path, "p", seed=0, metrics=_parity_rows(2), config={
        "steps": "3\x1b[31m", "train": {"policy_loss_impl": evil, "shadow_policy_loss_impl": "jax"}}))
    other = cmp.load_run(make_run(tmp_path, "j", seed=0))
    lines = cmp.compare_runs(other, run).summary_lines()
    assert not any("\x1b" in line or "\x07" in line for line in lines)
    assert any("kernel parity: pallas" in line for line in lines) and lines[0].startswith("warning:")


def test_verdicts_split_into_method_claims_and_lines_about_these_trajectories(tmp_path: Path):
    """Kernel parity and the method verdict claim something about the methods; each run's start -> end and
    each McNemar pair describe these trajectories, which another machine's rounding changes: shown apart."""
    run = cmp.load_run(make_run(tmp_path, "p", seed=0, impl="pallas", metrics=_parity_rows(10),
                                config={"train": {"policy_loss_impl": "pallas",
                                                  "shadow_policy_loss_impl": "jax"}}))
    result = cmp.compare_runs(cmp.load_run(make_run(tmp_path, "j", seed=0)), run)
    lines, trajectory = result.summary_lines(), result.trajectory_lines()
    assert trajectory == [*result.learning_lines(), *result.test_lines()] and set(trajectory) < set(lines)
    (claims_heading, claims), (runs_heading, runs) = cmp.grouped_verdicts(lines, trajectory)
    assert (claims_heading, runs_heading) == (cmp.METHOD_HEADING, cmp.TRAJECTORY_HEADING)
    assert claims == [result.parity_lines()[0], result.method_line()]
    assert runs == trajectory and sorted(claims + runs) == sorted(lines)  # each line once
    assert cmp.grouped_verdicts(claims, []) == [(cmp.METHOD_HEADING, claims)]  # no empty group
