"""`grpoctl preflight` and the preflight gate of `run` and `sop replay` on TPU targets, driving the REAL
trainer preflight (`python -m trainer.preflight`: the tiny configs compiled by libtpu for an abstract
v6e-8, no TPU). Compiles are counted through a wrapper interpreter, so the cache is checked by count.

Cost: two real preflights of the tiny config per module (one that fits, one that cannot: ~1 min each on 2
idle cores, several on a loaded machine, hence `slow`); everything else hits the cache or never reaches
the compiler.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grpoctl_testing.fake_tpu import FakeTpuApi
from orchestrator import preflight as pf
from orchestrator.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_cpu.yaml"
# No v6e chip holds one micro-batch of 128 rows x 8192 tokens (attention alone). Eval off: fewer compiles.
HUGE = {
    "rollout.batch_size": "16",
    "train.micro_batch_size": "128",
    "rollout.global_length": "4096",
    "rollout.max_length_sample": "4096",
    "eval_every_steps": "0",
}
FUNCTION_KEYS = {
    "name", "seq_len", "peak_bytes", "capacity_bytes", "fits", "mosaic_kernels", "argument_bytes",
    "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes", "compile_s", "flops",
    "bytes_accessed", "estimated_s", "hbm_bytes", "collective_bytes",
}  # fmt: skip


def _libtpu_here() -> bool:
    return pf.probe(sys.executable, REPO).unavailable_reason() is None


needs_libtpu = pytest.mark.skipif(
    not _libtpu_here() and not os.environ.get("CI"), reason="no libtpu on this host (CI always has it)"
)


def _wrapper(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The repo as the laptop's checkout, a private state folder (the cache), a counting interpreter and
    a fake Cloud TPU API that must never be called (a preflight that fails provisions nothing)."""
    root = tmp_path_factory.mktemp("preflight")
    log = root / "compiles.log"
    counting = _wrapper(
        root,
        "python-counting",
        f'if [ "$1 $2" = "-m trainer.preflight" ]; then echo "$*" >> {log}; fi\nexec {sys.executable} "$@"',
    )
    with pytest.MonkeyPatch.context() as mp, FakeTpuApi() as fake:
        mp.chdir(REPO)
        mp.setenv("GRPOCTL_STATE_DIR", str(root / "state"))
        mp.setenv(pf.PYTHON_ENV, str(counting))
        yield Lab(root, log, fake)


@pytest.fixture(autouse=True)
def _shared_preflight_cache(lab: Lab, _isolated_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest gives each test its own state folder; these tests share one so the compiles are reused."""
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(lab.root / "state"))


class Lab:
    def __init__(self, root: Path, log: Path, fake: FakeTpuApi) -> None:
        self.root, self.log, self.fake = root, log, fake
        target = {
            "kind": "tpu",
            "project": "proj",
            "zone": "us-east1-d",
            "name": "grpo-preflight",
            "accelerator_type": "v6e-8",
            "api_endpoint": fake.endpoint,
            "ssh_key": str(root / "key"),
            "poll_s": 0.05,
        }
        self.config = root / "grpoctl.yaml"
        # repo.url: this checkout by its path (sop replay checks the repo before `up`: a path is only said)
        config = {"repo": {"url": str(REPO)}, "targets": {"tpu": target}, "default_target": "tpu"}
        self.config.write_text(yaml.safe_dump(config))

    def compiles(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.is_file() else 0

    def cli(self, *args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = CliRunner().invoke(app, ["--config-file", str(self.config), *args])
        out = result.stdout + result.stderr
        assert result.exit_code == code, f"{args}: exit {result.exit_code}\n{out}\n{result.exception!r}"
        assert "Traceback" not in out
        return result


def _error_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = [x for x in result.stderr.splitlines() if x.startswith("grpoctl: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _set(overrides: dict[str, str]) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@needs_libtpu
@pytest.mark.slow
def test_tiny_config_fits_json_schema_then_table_from_the_cache(lab: Lab) -> None:
    before = lab.compiles()
    # Default accelerator: the tpu target's accelerator_type (v6e-8).
    data = json.loads(lab.cli("preflight", TINY, "--json").stdout)
    assert lab.compiles() == before + 1
    assert data["fits"] is True and data["accelerator"] == "v6e-8" and data["num_devices"] == 8
    assert data["reason"] is None and data["headroom"] == pytest.approx(0.10)
    names = [f["name"] for f in data["functions"]]
    assert {"optimizer_init", "sampler", "update_step", "eval", "eval_full"} <= set(names), names
    for f in data["functions"]:
        assert set(f) >= FUNCTION_KEYS, f
        assert f["fits"] and 0 < f["peak_bytes"] <= f["capacity_bytes"]
    by_name = {f["name"]: f for f in data["functions"]}
    # the periodic eval is the rollout sampler's program: its figures, not a second compile
    assert by_name["eval"]["compile_s"] == 0.0 < by_name["sampler"]["compile_s"]
    assert {k: v for k, v in by_name["eval"].items() if k not in ("name", "compile_s")} == \
        {k: v for k, v in by_name["sampler"].items() if k not in ("name", "compile_s")}
    update = next(f for f in data["functions"] if f["name"] == "update_step")
    assert update["seq_len"] >= 128 + 16  # the worst case: prompt bucket + every token it may sample
    step = data["grpo_step"]  # the whole GRPO step's estimate: its parts add up to it
    parts = ("rollout_s", "logprob_s", "update_s", "eval_s")
    assert step["estimated_s"] == pytest.approx(sum(step[k] for k in parts)) and step["update_s"] > 0
    assert step["update_s"] == pytest.approx(update["estimated_s"])  # ppo_epochs 1

    table = lab.cli("preflight", TINY, "--accelerator", "v6e-8").stdout
    assert lab.compiles() == before + 1  # the same config, overrides, chip and jax: answered from the cache
    assert "update_step" in table and "capacity" in table and "est. ms" in table
    assert "fits on v6e-8: largest " in table and "[cached]" in table
    assert "GRPO step (estimate, device work only): " in table

    # The library agrees, and reads the same entry.
    report = pf.run(TINY, accelerator="v6e-8")
    assert report.cached and report.fits and report.largest is not None
    assert report.largest.peak_bytes == max(f["peak_bytes"] for f in data["functions"])
    assert lab.compiles() == before + 1


@needs_libtpu
@pytest.mark.slow
def test_impossible_config_exits_2_and_run_launches_nothing(lab: Lab) -> None:
    result = lab.cli("preflight", TINY, *_set(HUGE), code=2)
    line = _error_line(result)
    # The trainer names the function, T and GiB; where XLA's own HBM check refuses to compile (temp alone
    # above HBM) its line says the GiB.
    assert "does not fit a v6e-8 chip" in line and "GiB" in line, line
    compiles = lab.compiles()

    # `run` on the tpu target: exit 2 before anything remote (the fake API saw no request at all).
    ran = lab.cli("run", TINY, *_set(HUGE), code=2)
    assert "does not fit a v6e-8 chip" in _error_line(ran)
    assert lab.compiles() == compiles  # cached, even XLA's own refusal (it leaves no report)
    assert lab.fake.requests == [] and not lab.fake.nodes


@needs_libtpu
@pytest.mark.slow
def test_sop_replay_never_provisions_a_config_that_cannot_fit(lab: Lab) -> None:
    sop_file = lab.root / "sop.yaml"
    sop_file.write_text(
        yaml.safe_dump(
            {
                "name": "preflight_gate",
                "target": "tpu",
                "steps": [
                    "up",
                    "sync",
                    {"run": {"name": "ok", "config": TINY}},
                    {"run": {"name": "huge", "config": TINY, "set": HUGE}},
                    "down",
                ],
            }
        )
    )
    report = lab.root / "report.md"
    result = lab.cli("sop", "replay", str(sop_file), "--report", str(report), code=2)
    assert "does not fit a v6e-8 chip" in _error_line(result)
    assert lab.fake.requests == [] and not lab.fake.nodes  # `up` never ran
    text = report.read_text()
    assert "## Preflight" in text
    assert "- `ok`: `grpoctl preflight configs/tiny_cpu.yaml --accelerator v6e-8`: fits on v6e-8" in text
    assert "fits on v6e-8: largest " in text and " GiB per chip" in text
    assert "- `huge`: " in text and "does not fit a v6e-8 chip" in text
    state = json.loads((lab.root / "report.state.json").read_text())
    assert state["preflight_fits"] == {"ok": True, "huge": False}  # what the rehearsal's check reads

    # --dry-run shows the preflight too (it is local); a run that fits goes on to the recorded commands.
    data = yaml.safe_load(sop_file.read_text())
    data["steps"] = data["steps"][:3]
    sop_file.write_text(yaml.safe_dump(data))
    dry = lab.cli("--dry-run", "sop", "replay", str(sop_file), "--report", str(lab.root / "dry.md"))
    assert "preflight configs/tiny_cpu.yaml: fits on v6e-8" in dry.stderr
    assert "setsid nohup" in dry.stderr
    assert "## Preflight" in (lab.root / "dry.md").read_text()
    assert lab.fake.requests == []


@needs_libtpu
def test_bad_config_or_accelerator_is_one_line_exit_2_and_never_cached(lab: Lab) -> None:
    """The trainer refuses these before compiling anything (fast)."""
    cached = sorted(pf.cache_dir().glob("*"))
    bad = lab.cli("preflight", TINY, "--set", "train.remat=maybe", code=2)
    assert "train.remat" in _error_line(bad)
    chip = lab.cli("preflight", TINY, "--accelerator", "v7z-3", code=2)
    assert "unknown accelerator 'v7z-3'" in _error_line(chip)
    missing = lab.cli("preflight", "configs/nope.yaml", code=2)
    assert "not found" in _error_line(missing)
    ran = lab.cli("run", TINY, "--set", "train.remat=maybe", code=2)  # refused before the API is asked
    assert "train.remat" in _error_line(ran) and lab.fake.requests == []
    assert sorted(pf.cache_dir().glob("*")) == cached  # a refusal is no answer to remember


def test_unavailable_host_says_one_line_and_run_goes_on(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter without jax (as on a laptop with no trainer extra; libtpu is Linux x86_64 only)."""
    # -S: no site-packages, so no jax whatever this machine has installed.
    bare = _wrapper(lab.root, "python-bare", f'exec {sys.executable} -S "$@"')
    monkeypatch.setenv(pf.PYTHON_ENV, str(bare))
    with pytest.raises(pf.PreflightUnavailable) as err:
        pf.run(TINY)
    assert err.value.exit_code == 3 and "has no jax" in str(err.value)

    result = lab.cli("preflight", TINY, code=3)
    assert "preflight unavailable" in _error_line(result)

    ran = lab.cli("--dry-run", "run", TINY)  # the dry run's recorded launch stands for the real one
    said = [x for x in ran.stderr.splitlines() if x.startswith("preflight")]
    assert len(said) == 1 and said[0].endswith("going on without it"), said
    assert "setsid nohup" in ran.stderr


def test_env_flags_become_overrides_and_match_the_trainer() -> None:
    from trainer.config import ENV_FLAGS

    assert pf.ENV_FLAGS is ENV_FLAGS  # one table (grpoctl_contract.envflags) for both halves
    env = {"EVAL_FULL_SWEEP": "1", "PRINT_TRAIN_TIME_BREAKDOWN": "0"}
    assert pf.effective_overrides({"a.b": "1"}, env) == ["a.b=1", "eval_full_sweep=true"]


def test_cache_key_covers_config_bytes_overrides_chip_and_trainer_source(tmp_path: Path) -> None:
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / "model.py").write_text("REMAT = False\n")
    p = pf.Probe("py", "0.10.2", "0.0.42", str(trainer), True)
    newer_jax = pf.Probe("py", "0.10.3", "0.0.42", str(trainer), True)
    base = pf.cache_key(b"steps: 1\n", ["a=1"], "v6e-8", 0.1, False, p)
    assert base == pf.cache_key(b"steps: 1\n", ["a=1"], "v6e-8", 0.1, False, p)
    others = {
        pf.cache_key(b"steps: 2\n", ["a=1"], "v6e-8", 0.1, False, p),
        pf.cache_key(b"steps: 1\n", ["a=2"], "v6e-8", 0.1, False, p),
        pf.cache_key(b"steps: 1\n", ["a=1"], "v5litepod-16", 0.1, False, p),
        pf.cache_key(b"steps: 1\n", ["a=1"], "v6e-8", 0.2, False, p),
        pf.cache_key(b"steps: 1\n", ["a=1"], "v6e-8", 0.1, True, p),
        pf.cache_key(b"steps: 1\n", ["a=1"], "v6e-8", 0.1, False, newer_jax),
    }
    (trainer / "model.py").write_text("REMAT = True\n")  # an edited trainer is a new question
    others.add(pf.cache_key(b"steps: 1\n", ["a=1"], "v6e-8", 0.1, False, p))
    assert base not in others and len(others) == 7
