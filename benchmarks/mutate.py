"""Mutation run over the modules where a bug costs most: `make mutate` (not part of the test suite).

Each module is mutated by mutmut 3 in its own scratch copy of the tree (.mutate/<module>/), and every
mutant runs against that module's own test files only (mutmut narrows further to the tests that reach
the mutated function). A mutant "survives" when those tests still pass. Survivors judged equivalent (no
input can tell them apart from the original) are listed with a one-line reason in
benchmarks/mutate_equivalents.txt and left out of the score.

    python benchmarks/mutate.py                 # every module, table to stdout and .mutate/report.md
    python benchmarks/mutate.py grpo compare    # some modules
    python benchmarks/mutate.py --show grpo     # diffs of the surviving, non-equivalent mutants

The score is killed / (mutants - equivalent), where killed includes timeouts (a mutant that makes the
tests hang is caught) and "no tests" mutants (a function the module's tests never call) count as
survivors.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutate"
EQUIVALENTS = ROOT / "benchmarks" / "mutate_equivalents.txt"
COPIED = ("orchestrator", "trainer", "grpoctl_contract", "tests", "configs", "docs", "pyproject.toml")


@dataclass(frozen=True)
class Module:
    name: str
    sources: tuple[str, ...]  # files mutmut mutates
    tests: tuple[str, ...]  # the module's own test files
    only: tuple[str, ...] = ()  # mutant-name globs (a part of a module), empty for all of it
    skip: tuple[str, ...] = ()  # mutant-name globs left out (functions only slow tests can judge)
    pytest_args: tuple[str, ...] = ()
    # "collect": the fork server imports and collects the tests once, each mutant is a fork of it (fast).
    # "none": each mutant's fork imports everything itself: for jax tests, whose backend must never be
    # initialised before a fork.
    warmup: str = "collect"

    def covers(self, name: str) -> bool:
        if self.only and not any(fnmatch.fnmatch(name, g) for g in self.only):
            return False
        return not any(fnmatch.fnmatch(name, g) for g in self.skip)


MODULES = (
    # grpo: its pure functions only, against the fast tests. The three model-gradient tests (the only ones
    # reaching sequence_logprobs / micro_batch_grads / step_gradients) compile a scan over a model's grad:
    # 1-4 min per mutant on 2 cores, so that glue is left to them and out of the mutation run.
    Module(
        "grpo",
        ("trainer/grpo.py",),
        ("tests/test_grpo.py",),
        only=tuple(
            f"trainer.grpo.x_{f}__mutmut_*"
            for f in ("group_advantages", "token_weights", "policy_loss", "prepare_batch",
                      "split_micro_batches", "round_up", "pack_sequences", "scatter_completion_values")
        ),
        pytest_args=("-k", "not (accumulated_micro_batch or beta_adds_a_real_kl or old_logprobs_equal)"),
        warmup="none",
    ),
    Module("rewards", ("trainer/rewards.py",), ("tests/test_rewards.py",)),
    Module("softmax_math", ("trainer/kernels/softmax_math.py",), ("tests/test_kernels.py",), warmup="none"),
    # sampler: where its arrays live on a mesh (state_shardings, decode_param_shardings) changes no value,
    # only HBM traffic and collectives, which only the slow roofline tests (tests/test_decode_roofline.py)
    # measure on an abstract v6e-8: left out.
    Module(
        "sampler",
        ("trainer/sampler.py",),
        ("tests/test_sampler.py",),
        skip=tuple(f"trainer.sampler.x_{f}__mutmut_*" for f in ("state_shardings", "decode_param_shardings")),
        warmup="none",
    ),
    Module(
        "compare",
        ("orchestrator/compare.py", "orchestrator/plots.py"),
        ("tests/test_compare.py", "tests/test_compare_groups.py"),
    ),
    Module(
        "stats",
        ("orchestrator/stats.py", "orchestrator/parity.py"),
        ("tests/test_stats.py", "tests/test_compare_groups.py"),
    ),
    # recipes.py's progress-line and launch-head parsers are tested with the contract and the phase views.
    Module(
        "recipes",
        ("orchestrator/recipes.py",),
        ("tests/test_recipes.py", "tests/test_progress_contract.py", "tests/test_phase_views.py"),
    ),
    Module(
        "transport",
        ("orchestrator/transport/ssh.py", "orchestrator/transport/local.py",
         "orchestrator/transport/shell.py"),
        ("tests/test_transport_ssh.py", "tests/test_transport_local.py"),
    ),
    Module(
        "tpu_host_keys",
        ("orchestrator/targets/tpu.py", "orchestrator/cloud/sshkeys.py"),
        ("tests/test_tpu_target.py",),
        only=(
            "orchestrator.targets.tpu.xǁTpuTargetǁ_pins__mutmut_*",
            "orchestrator.targets.tpu.xǁTpuTargetǁtransports__mutmut_*",
            "orchestrator.cloud.sshkeys.x_fingerprint_of__mutmut_*",
        ),
    ),
    Module("stale", ("orchestrator/cloud/stale.py",), ("tests/test_tpu_stale.py",)),
)
BY_NAME = {m.name: m for m in MODULES}

KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def load_equivalents() -> dict[str, str]:
    """mutant name -> the one-line reason it cannot be told apart from the original."""
    out: dict[str, str] = {}
    if EQUIVALENTS.exists():
        for line in EQUIVALENTS.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def prepare(module: Module) -> Path:
    """A scratch copy of the tree with a setup.cfg that points mutmut at this module and its tests."""
    work = WORK / module.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for item in COPIED:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, work / item)
    lines = [
        "[mutmut]",
        "source_paths =\n    orchestrator\n    trainer",
        "only_mutate =\n" + "".join(f"    {s}\n" for s in module.sources).rstrip("\n"),
        "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in module.tests).rstrip("\n"),
        # -p no:randomly etc. are not installed; keep pytest quiet and the jax tests on 8 CPU devices.
        # The slow tests (trainer runs, meshes) stay out: a mutant would pay for them every time.
        "pytest_add_cli_args =\n    -q\n    -p\n    no:cacheprovider\n    -m\n    not slow"
        + "".join(f"\n    {a}" for a in module.pytest_args),
        "process_isolation = forkserver",
        f"forkserver_warmup = {module.warmup}",
        "use_git_change_detection = false",
        "timeout_multiplier = 5.0",
        "timeout_constant = 10.0",
    ]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")
    return work


def _mutmut(work: Path, args: list[str], log_name: str) -> None:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with open(work / log_name, "w") as log:
        subprocess.run([mutmut, *args], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


def recheck(module: Module, children: int) -> float:
    """Re-test the last run's survivors against the tests as they are now (after adding tests)."""
    work = WORK / module.name
    start = time.monotonic()
    _, survivors, _ = row(module, None, 0)
    if survivors:
        shutil.rmtree(work / "tests")
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        _mutmut(work, ["run", "--max-children", str(children), *survivors], "recheck.log")
    return time.monotonic() - start


def all_mutants(module: Module) -> list[str]:
    names = []
    for meta in (WORK / module.name / "mutants").rglob("*.py.meta"):
        for name in json.loads(meta.read_text()).get("exit_code_by_key", {}):
            if module.covers(name):
                names.append(name)
    return sorted(names)


def run_module(module: Module, children: int, sample: int, reuse: bool = False) -> tuple[float, int]:
    """Mutate, then test every mutant (sample 0) or an evenly spaced sample; (wall seconds, mutants)."""
    work = WORK / module.name
    start = time.monotonic()
    if not (reuse and (work / "mutants" / "mutmut-stats.json").exists()):
        work = prepare(module)
        # A filter that matches nothing: mutmut generates the mutants and records which tests reach which
        # function, then stops (it refuses an empty selection).
        _mutmut(work, ["run", "--max-children", str(children), "__generate_only__"], "generate.log")
    names = all_mutants(module)
    if sample and len(names) > sample:
        step = len(names) / sample
        names = [names[int(i * step)] for i in range(sample)]
    (work / "selected.txt").write_text("".join(f"{n}\n" for n in names))
    if names:
        _mutmut(work, ["run", "--max-children", str(children), *names], "mutmut.log")
    return time.monotonic() - start, len(names)


# mutmut's result codes (mutmut/stats.py): the pytest exit status of the mutant's run, or a marker.
STATUS_BY_CODE = {
    0: "survived", 1: "killed", 3: "killed", 5: "no tests", 33: "no tests", 34: "skipped",
    35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
    152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked",
}


def results(module: Module) -> dict[str, str]:
    """mutant name -> status, read from mutmut's per-file result files."""
    selected_file = WORK / module.name / "selected.txt"
    selected = set(selected_file.read_text().split()) if selected_file.exists() else None
    out: dict[str, str] = {}
    for meta in (WORK / module.name / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            if not module.covers(name):
                continue
            if selected is not None and name not in selected:
                continue
            status = STATUS_BY_CODE.get(code, "suspicious")
            if status not in ("not checked", "skipped"):  # not (yet) tested: neither killed nor survived
                out[name] = status
    return out


def show(module: Module, names: list[str]) -> str:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    texts = []
    for name in names:
        done = subprocess.run([mutmut, "show", name], cwd=WORK / module.name, capture_output=True, text=True)
        texts.append(done.stdout)
    return "\n".join(texts)


def format_row(name: str, counts: tuple[int, int, int, int, int], wall_s: float | None) -> str:
    """counts: (generated, tested, killed, equivalent, survived)."""
    generated, tested, killed, eq, survived = counts
    counted = tested - eq
    score = 100.0 * killed / counted if counted else 0.0
    wall = "-" if wall_s is None else f"{wall_s / 60:.1f} min"
    return f"| {name} | {generated} | {tested} | {killed} | {eq} | {survived} | {score:.1f}% | {wall} |"


def row(module: Module, wall_s: float | None, generated: int) -> tuple[str, list[str], tuple[int, ...]]:
    status = results(module)
    equivalent = load_equivalents()
    eq = [n for n in status if n in equivalent and status[n] not in KILLED]
    killed = sum(s in KILLED for s in status.values())
    survivors = sorted(n for n, s in status.items() if s not in KILLED and n not in equivalent)
    counts = (generated, len(status), killed, len(eq), len(survivors))
    return format_row(module.name, counts, wall_s), survivors, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=[], help=f"some of: {' '.join(BY_NAME)}")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--sample", type=int, default=int(os.environ.get("MUTATE_SAMPLE", "40")),
                        help="test this many evenly spaced mutants per module (0: all of them)")
    parser.add_argument("--report-only", action="store_true", help="table from the last run, run nothing")
    parser.add_argument("--recheck", action="store_true",
                        help="re-test the survivors of the last run against the current tests")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a module's generated mutants and test stats from an earlier run")
    parser.add_argument("--show", action="store_true", help="print the diffs of the surviving mutants")
    args = parser.parse_args()
    unknown = [n for n in args.modules if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {' '.join(BY_NAME)}")
    chosen = [BY_NAME[n] for n in args.modules] or list(MODULES)
    walls: dict[str, float | None] = {}
    for module in chosen:
        if args.report_only or args.show:
            walls[module.name] = None
        elif args.recheck:
            print(f"re-testing the survivors of {module.name} ...", flush=True)
            recheck(module, args.children)
            walls[module.name] = None
        else:
            print(f"mutating {module.name} ...", flush=True)
            walls[module.name], _ = run_module(module, args.children, args.sample, args.reuse)
    table = [
        "| module | mutants generated | tested | killed | equivalent | survived | score | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    left: dict[str, list[str]] = {}
    total = [0, 0, 0, 0, 0]
    for module in chosen:
        line, survivors, counts = row(module, walls[module.name], len(all_mutants(module)))
        table.append(line)
        left[module.name] = survivors
        total = [a + b for a, b in zip(total, counts, strict=True)]
        print(line, flush=True)
    if len(chosen) > 1:  # the score over every module of this run, equivalents left out
        timed = [w for w in walls.values() if w is not None]
        table.append(format_row("**all**", tuple(total), sum(timed) if timed else None))
    text = "\n".join(table)
    print(text)
    for name, survivors in left.items():
        if survivors:
            print(f"\n{name}: {len(survivors)} surviving: " + " ".join(survivors))
            if args.show:
                print(show(BY_NAME[name], survivors))
    if not (args.report_only or args.show or args.recheck):
        WORK.mkdir(exist_ok=True)
        (WORK / "report.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
