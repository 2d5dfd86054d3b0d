"""The CI dry run: the seed SOP replays end to end against the recording transport, touching nothing."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import recipes, sop
from orchestrator.cli import app
from orchestrator.config import parse_config
from orchestrator.errors import UsageError
from orchestrator.ops import dryrun
from orchestrator.transport.recording import RecordingScript

REPO = Path(__file__).resolve().parents[1]
TPU_SOP = REPO / "sops" / "grpo_gsm8k_pallas_vs_jax.yaml"
HAVE_PLOT = importlib.util.find_spec("matplotlib") is not None  # the plot extra
SECRET = "wandb-key-0123456789abcdef0123456789abcdef"


def classify(line: str) -> str:
    """Which recipe a printed dry-run line is (one label per remote call)."""
    body = line.split("] ", 1)[1]
    if body.startswith("put "):
        name = body.split()[1].rsplit("/", 1)[-1]
        name = re.sub(r"^.*-\d{8}_\d{6}-[0-9a-f]{4}\.", "RUN.", name)  # a run's -e file and its loader
        return "put " + name + " " + re.search(r"mode (\d+)", body).group(1)
    if body.startswith("get "):
        return "get " + body.split()[1].rsplit("/", 1)[-1]
    markers = [  # most specific first: several recipes also `mkdir -p`
        ("git fetch --all", "sync"),
        ("pip install", "bootstrap"),
        ("setsid nohup", "launch"),
        ("ALIVE=", "status"),
        ('verify "$F"', "env-verify"),
        ("INSTALLED=", "env-install"),
        ("rm -f --", "rm"),
        ('echo "FILE=', "list-files"),
        ("WANDB=", "find-wandb"),
        ('printf "HOME=', "home"),
        ("mkdir -p", "mkdir"),
        ("$ true", "probe"),
    ]
    for marker, label in markers:
        if marker in line:
            return label
    return "?"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory):
    """Replay once, in an empty folder (no grpoctl.yaml, no git repo) with a secret .env present."""
    folder = tmp_path_factory.mktemp("dry_run")
    (folder / ".env").write_text(f"WANDB_API_KEY={SECRET}\n")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("GRPOCTL_STATE_DIR", str(folder / "state"))
        result = sop.replay(TPU_SOP, dry_run=True, say=lines.append)
    return folder, lines, result


def test_tpu_sop_dry_run_command_sequence(replayed):
    _, lines, result = replayed
    calls = [classify(line) for line in lines if line.startswith("[w0 ")]
    per_run_fetch = [
        "home",
        "list-files",
        "find-wandb",
        "get summary.json",
        "get eval_full.jsonl",
        "get metrics.jsonl",
        "get config.json",
    ]
    assert calls == [
        "probe",  # up
        "sync",
        "bootstrap",  # sync
        "home",
        "mkdir",
        "put .env.grpoctl-pending 0600",
        "put .env.grpoctl-check.py 0600",
        "env-verify",
        "rm",  # the checker
        "env-install",  # env_push: the upload replaces .env only once verified
        "launch",  # the SOP's env values are flags (not secrets): exported by the launch script
        "status",  # run jax (the scripted job is done at the first poll)
        "launch",
        "status",  # run pallas
        *per_run_fetch,
        *per_run_fetch,  # fetch
    ]
    steps = [line for line in lines if re.match(r"\[\d/8\]", line)]
    assert [s.split()[1] for s in steps] == [
        "up",
        "sync",
        "env_push",
        "run:jax",
        "run:pallas",
        "fetch",
        "compare",
        "down",
    ]
    assert all(v.status == "done" for v in result.state.steps.values()) and len(result.state.steps) == 8
    assert "method verdict: inconclusive: one run per arm" in result.verdict
    assert all(line.startswith("FABRICATED by --dry-run") for line in result.verdict.splitlines())
    # the made-up config.json is shaped like the trainer's (train.policy_loss_impl nested): the arms
    # differ only by the loss provider, which is no config warning
    assert "configs differ" not in result.verdict


def test_dry_run_commands_carry_the_sop_flags_and_never_the_secret(replayed):
    _, lines, _ = replayed
    text = "\n".join(lines)
    assert SECRET not in text
    launches = [line for line in lines if "setsid nohup" in line]
    assert len(launches) == 2
    for config, launch in zip(["steps100.yaml", "steps100_pallas.yaml"], launches, strict=True):
        # env values are flags that are not secret: exported (the secret is in .env, pushed, never here)
        assert "export EVAL_FULL_SWEEP=1" in launch and "export PRINT_TRAIN_TIME_BREAKDOWN=1" in launch
        assert f"configs/grpo_gsm8k_qwen25_3b_bs128_{config}" in launch
        assert "logs/nohup_grpo_gsm8k_qwen25_3b_bs128_steps100" in launch
    assert "grpoctl_contract.requirements trainer,tpu" in text  # the TPU extra on a TPU target


def test_dry_run_touches_nothing_real_and_writes_a_report(replayed):
    folder, _, result = replayed
    assert not (folder / "state").exists()  # no run records: the dry run's store is in memory
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["dry-run", "sops"]  # fetched: dry-run/
    report = (folder / result.report_path).read_text()  # relative to the folder it ran in
    assert result.report_path.name == "report.dry-run.md"
    assert SECRET not in report and SECRET not in (folder / result.state_path).read_text()  # .env pushed
    assert "(dry run)" in report and "## Summary (dry run: FABRICATED, not results)" in report
    # Each verdict once (issue 23), in the summary at the top, before the steps.
    for line in result.verdict.splitlines():
        assert report.count(line) == 1 and report.index(line) < report.index("## Steps")
    assert "FABRICATED by --dry-run, not a result: 2 run(s), " in report  # the cost line too
    # The plot is embedded beside the report, its alt text watermarked like the image itself.
    assert ("![compare: FABRICATED by --dry-run](jax_vs_pallas.png)" in report) == HAVE_PLOT
    # Every made-up figure says so: the summary table's heading and each McNemar line (issue 10).
    assert "## Made-up summary (dry run: FABRICATED figures, not results)" in report
    assert "## Observed summary" not in report
    mcnemar = [line for line in report.splitlines() if "McNemar" in line]
    assert len(mcnemar) == 1 and all("FABRICATED by --dry-run" in line for line in mcnemar), mcnemar
    for key in ("eval_full/accuracy", "time/eval_full/step_s"):
        assert f"| `{key}` |" in report
    assert re.search(
        r"\| jax \| `grpo_gsm8k_qwen25_3b_bs128_steps100-\d{8}_\d{6}-[0-9a-f]{4}` \| SUCCEEDED", report
    )
    plotted = (folder / "runs" / "sops" / "grpo_gsm8k_pallas_vs_jax" / "jax_vs_pallas.png").is_file()
    assert plotted == HAVE_PLOT  # without the plot extra the verdicts come all the same


def test_cli_dry_run_replay_exit_zero_from_the_repo_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What CI runs: `grpoctl --dry-run sop replay sops/grpo_gsm8k_pallas_vs_jax.yaml`."""
    work = tmp_path / "repo"
    (work / "sops").mkdir(parents=True)
    shutil.copy(TPU_SOP, work / "sops")
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["--dry-run", "sop", "replay", "sops/grpo_gsm8k_pallas_vs_jax.yaml"])
    assert result.exit_code == 0, result.output
    assert "report: runs/sops/grpo_gsm8k_pallas_vs_jax/report.dry-run.md" in result.stdout
    assert "McNemar exact test on 1319 paired questions" in result.stdout
    verdict = next(line for line in result.stdout.splitlines() if "McNemar" in line)
    assert "FABRICATED by --dry-run, not a result" in verdict, verdict
    assert "FABRICATED by --dry-run, not a result: jax (1 run): start - -> end 0.78" in result.stdout
    assert "method verdict: inconclusive: one run per arm" in result.stdout
    assert result.stderr.count("setsid nohup") == 2
    assert ".env not found: the dry run pushes an empty file" in result.stderr  # CI has no secrets


def test_dry_run_of_single_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    launched = runner.invoke(app, ["--dry-run", "--json", "run", "configs/tiny_cpu.yaml", "--wait"])
    assert launched.exit_code == 0, launched.output
    assert '"state": "SUCCEEDED"' in launched.stdout
    assert "[w0 localhost] $ set -eu" in launched.stderr
    assert not (tmp_path / ".grpoctl").exists()  # the local target's workdir was never created


@pytest.mark.parametrize(
    ("target", "extras"),
    [
        ("tpu: {kind: tpu, project: p, zone: us-east1-d, name: n}", "trainer,tpu"),
        ("lab: {kind: ssh, hosts: [h1]}", "trainer"),  # GPU or CPU hosts: libtpu has nothing to drive
    ],
)
def test_each_kind_of_target_says_what_sync_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, extras: str
):
    """The target declares its bootstrap extras (a TPU VM also needs libtpu); no config key and no test
    hook in grpoctl.yaml chooses them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grpoctl.yaml").write_text(
        "repo: {url: https://example.com/r.git, branch: main}\n" f"targets:\n  {target}\n"
    )
    result = CliRunner().invoke(app, ["--dry-run", "sync"])
    assert result.exit_code == 0, result.output
    assert f"grpoctl_contract.requirements {extras} " in result.stderr
    assert "logs/bootstrap.log" in result.stderr  # pip's output is kept on the worker


def test_test_wiring_is_not_user_configuration():
    """`bootstrap_extras` (the rehearsal's CPU workers) and `ssh_port: 0` (the fake API's per-worker ports)
    were grpoctl.yaml keys that only tests used: now they are an unknown key and an out-of-range port."""
    for extra, needle in (({"bootstrap_extras": ["trainer"]}, "unknown key"), ({"ssh_port": 0}, "ssh_port")):
        cfg = {"targets": {"t": {"kind": "tpu", "project": "p", "zone": "us-east1-d", "name": "n", **extra}}}
        with pytest.raises(UsageError, match=needle):
            parse_config(cfg, "grpoctl.yaml")


def test_responder_answers_recipes_by_name_never_by_their_shell_text():
    """The dry run's scripted answers are keyed by recipe name: the same text without the name (or any
    text that merely looks like a recipe) gets none, so rewording a recipe cannot change what it answers."""
    built = recipes.sync("/w", "file:///origin.git", "main")
    assert (built.name, dryrun.responder(built, "w0")) == ("sync", (f"HEAD={dryrun.FAKE_HEAD}\n", 0))
    assert dryrun.responder(str(built), "w0") is None  # the very same text, unnamed
    assert dryrun.responder("echo 'git fetch --all' ALIVE= KILL= PYTHON=", "w0") is None
    listing = recipes.existing_files("/w", ["runs/r/summary.json", "runs/r/notes.txt"])
    assert dryrun.responder(listing, "w0") == ("FILE=runs/r/summary.json\n", 0)  # from its args, not its text
    assert dryrun.responder(recipes.remove_file("/w/x"), "w0") is None  # a recipe with nothing to answer


def test_every_scripted_reply_belongs_to_a_recipe():
    """A renamed or removed recipe would silently lose its dry-run answer: the names must all exist."""
    assert set(dryrun.REPLIES) <= set(recipes.RECIPES)
    assert all(callable(recipes.RECIPES[name]) for name in dryrun.REPLIES)


def test_the_dry_run_journal_names_each_recipe():
    """The journal keeps which recipe built each command (None for plain text such as the probe)."""
    script = RecordingScript(responder=dryrun.responder)
    t = script.transport("w0 x")
    t.run(recipes.home_dir())
    t.run("true")
    assert script.recipes() == ["home_dir", None]
    assert [c.recipe for c in t.calls] == ["home_dir", None]


def test_a_seeded_tpu_sop_preflights_each_config_once_and_compares_groups(tmp_path: Path, monkeypatch):
    """Seeds change no shape: the three runs of a seeded arm share one preflight (and its cache entry)
    instead of compiling the 3B programs three times. The dry run's compare takes the groups as arms."""
    from orchestrator import api, preflight

    every = "      interval_s: 15\n"
    text = TPU_SOP.read_text().replace(every, every + "      seeds: [0, 1, 2]\n")
    assert text.count("seeds: [0, 1, 2]") == 2
    (tmp_path / "seeded.yaml").write_text(text)
    calls: list[tuple[str, dict]] = []

    def recording_gate(session, config, overrides, env):
        calls.append((config, dict(overrides)))
        return preflight.Gate(report=None, line="recorded")

    monkeypatch.setattr(api, "preflight_gate", recording_gate)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path / "state"))
    result = sop.replay(tmp_path / "seeded.yaml", dry_run=True, overrides={"train.beta": "0.01"})
    assert [c for c, _ in calls] == ["configs/grpo_gsm8k_qwen25_3b_bs128_steps100.yaml",
                                     "configs/grpo_gsm8k_qwen25_3b_bs128_steps100_pallas.yaml"]
    assert all(o == {"train.beta": "0.01"} for _, o in calls)  # no seed: one cache key per config
    assert set(result.state.preflight) == {f"{a}/s{s}" for a in ("jax", "pallas") for s in (0, 1, 2)}
    launched = [s for s in result.state.steps if s.startswith("run:")]
    assert launched == [f"run:{arm}/s{seed}" for arm in ("jax", "pallas") for seed in (0, 1, 2)]
    assert "3 vs 3 runs, paired by seed" in result.verdict or "no spread" in result.verdict
    assert result.state.verdict_json["runs_a"] and len(result.state.verdict_json["runs_b"]) == 3
    assert all(line.startswith("FABRICATED by --dry-run") for line in result.state.key_numbers)
