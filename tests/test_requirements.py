"""grpoctl_contract.requirements: what a worker installs besides the checkout, read from pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl_contract.requirements import extra_requirements

ROOT = Path(__file__).resolve().parents[1]
LAPTOP_ONLY = ("typer", "paramiko", "google-cloud-tpu", "matplotlib", "rich")


def _names(reqs: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for r in reqs}


def test_a_worker_gets_the_trainer_and_not_the_laptop_stack() -> None:
    names = _names(extra_requirements(ROOT / "pyproject.toml", ["trainer", "tpu"]))
    assert {"jax", "flax", "optax", "pydantic", "pyyaml", "wandb"} <= names  # what the trainer imports
    assert not names & set(LAPTOP_ONLY)


def test_self_references_expand_once_and_unknown_extras_are_named(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "Pkg"\n[project.optional-dependencies]\n'
        'a = ["x>=1", "pkg[b]"]\nb = ["y; sys_platform == \'linux\'", "PKG[a]", "x>=1"]\n'
    )
    assert extra_requirements(pyproject, ["a"]) == ["x>=1", "y; sys_platform == 'linux'"]
    with pytest.raises(ValueError, match="no extra 'c'.*known: a, b"):
        extra_requirements(pyproject, ["c"])


def test_runs_as_a_script_with_nothing_installed(tmp_path: Path) -> None:
    out = tmp_path / "req.txt"
    script = [sys.executable, "-S", "-m", "grpoctl_contract.requirements"]  # -S: no site-packages at all
    done = subprocess.run([*script, "trainer", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "jax==" in out.read_text()
    bad = subprocess.run([*script, "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("requirements: no extra 'nope'")
