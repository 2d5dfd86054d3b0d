"""Preflight: compile the run for its TPU on this machine before paying for a node.

The trainer does the compiling (`python -m trainer.preflight --json`, trainer/preflight.py: the real
jitted functions AOT-compiled for an abstract TPU topology, no TPU, no weights); this module runs it with
the laptop's interpreter, parses its one JSON object into typed results and caches them under the state
folder. The cache key covers everything that can change the answer: the config file's bytes, the
overrides (`--set` and the run's env flags that switch config keys), the accelerator, the headroom, the
jax and libtpu versions and the trainer's own source, so editing the trainer (say, its remat policy) is
never answered from a stale result.

The report's schema, its exit codes and its one rendering live in grpoctl_contract (preflight.py,
preflight_table.py), shared with the trainer. Exit codes of the trainer side: 0 everything fits, 2
something does not fit (or a bad config), 4 the preflight cannot run on this host (no jax/libtpu, e.g.
macOS or ARM). Here: not fitting and bad configs
raise `UsageError` (2); an unusable host raises `PreflightUnavailable` (3), which `run` and `sop replay`
turn into one line and go on; a preflight that crashes raises `InfraError` (3).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from grpoctl_contract.envflags import ENV_FLAGS
from grpoctl_contract.preflight import (
    DEFAULT_ACCELERATOR,
    DEFAULT_HEADROOM,
    EXIT_DOES_NOT_FIT,
    EXIT_FITS,
    EXIT_UNAVAILABLE,
    Report,
    gib,
)
from grpoctl_contract.progress import PREFLIGHT_COMPILED
from orchestrator.errors import InfraError, UsageError
from orchestrator.runs import state_dir

PYTHON_ENV = "GRPOCTL_PREFLIGHT_PYTHON"  # an interpreter with the trainer extra + libtpu (README)
CACHE_VERSION = 1  # bump when the cached layout changes

# Runs in the preflight interpreter, from the same folder as the preflight itself (same sys.path): which
# jax/libtpu it would use and where its `trainer` package lives. importlib.metadata: no jax import.
_PROBE = r"""
import importlib.metadata as md, importlib.util as iu, json, platform
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
import os
if os.path.isdir("trainer"):  # the checkout's own trainer decides, never an installed one it shadows
    folder = os.path.abspath("trainer")
    has = os.path.isfile(os.path.join(folder, "preflight.py"))
else:
    spec = iu.find_spec("trainer")
    locs = list(spec.submodule_search_locations or []) if spec else []
    folder = locs[0] if locs else None
    has = bool(folder) and iu.find_spec("trainer.preflight") is not None
print(json.dumps({"jax": version("jax"), "libtpu": version("libtpu"), "trainer": folder,
                  "has_preflight": has, "machine": platform.machine(), "system": platform.system()}))
"""


class PreflightUnavailable(InfraError):
    """This host cannot compile for a TPU (no jax/libtpu, an unsupported platform, an old trainer)."""


class NotCached(PreflightUnavailable):
    """`--dry-run`: no cached report, and a dry run never compiles (a 3B model takes many minutes)."""


@dataclass(frozen=True)
class Probe:
    """The preflight interpreter, as seen from inside it."""

    python: str
    jax: str | None
    libtpu: str | None
    trainer: str | None
    has_preflight: bool
    machine: str = ""
    system: str = ""

    def unavailable_reason(self) -> str | None:
        where = f"{self.system} {self.machine}".strip()
        linux_x86 = (self.system, self.machine) == ("Linux", "x86_64")
        if self.jax is None:
            if not linux_x86 and self.system:  # the laptop-only install on macOS / Windows / ARM
                return f"{self.python} has no jax, and libtpu ships for Linux x86_64 only (this is {where})"
            return f"{self.python} has no jax (pip install -e '.[trainer,tpu]')"
        if self.libtpu is None:
            hint = "libtpu ships for Linux x86_64 only" if not linux_x86 else "pip install -e '.[tpu]'"
            return f"no libtpu for {self.python} on {where} ({hint})"
        if not self.has_preflight:
            return f"the trainer at {self.trainer} has no preflight (trainer/preflight.py)"
        return None


def interpreter() -> str:
    """$GRPOCTL_PREFLIGHT_PYTHON, else this interpreter (grpoctl installed with the trainer extra)."""
    return os.environ.get(PYTHON_ENV) or sys.executable


def probe(python: str | None = None, cwd: str | Path | None = None) -> Probe:
    python = python or interpreter()
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE], cwd=cwd, capture_output=True, text=True, timeout=60, env=_child_env()
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PreflightUnavailable(f"preflight unavailable: cannot run {python}: {err}") from None
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PreflightUnavailable(f"preflight unavailable: {python} did not answer the probe") from None
    return Probe(
        python=python,
        **{k: data.get(k) for k in ("jax", "libtpu", "trainer")},
        has_preflight=bool(data.get("has_preflight")),
        machine=data.get("machine", ""),
        system=data.get("system", ""),
    )


def effective_overrides(overrides: Mapping[str, str], env: Mapping[str, str] | None = None) -> list[str]:
    """`key=value` for the trainer: the `--set` overrides, then what the run's env flags switch on
    (the trainer applies env flags last and they only switch on, so appending reproduces its order)."""
    out = [f"{k}={v}" for k, v in overrides.items()]
    for flag, key in ENV_FLAGS.items():
        if (env or {}).get(flag, "").strip().lower() in ("1", "true", "yes"):
            out.append(f"{key}=true")
    return out


def _source_digest(folder: str | None) -> str:
    """The trainer's code: a change there must not be answered from the cache."""
    h = hashlib.sha256()
    if folder:
        root = Path(folder)
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(
    config_bytes: bytes, args: Sequence[str], accelerator: str, headroom: float, suggest: bool, p: Probe
) -> str:
    parts = {
        "v": CACHE_VERSION,
        "config": hashlib.sha256(config_bytes).hexdigest(),
        "set": list(args),
        "accelerator": accelerator,
        "headroom": round(headroom, 6),
        "suggest": suggest,
        "jax": p.jax,
        "libtpu": p.libtpu,
        "trainer": _source_digest(p.trainer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    return state_dir() / "preflight"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for flag in ENV_FLAGS:  # the laptop's shell must not switch config keys the run will not have
        env.pop(flag, None)
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # parallel preflights must not fight over libtpu's lock file
    return env


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def run(
    config: str,
    *,
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    accelerator: str = DEFAULT_ACCELERATOR,
    headroom: float = DEFAULT_HEADROOM,
    suggest: bool = False,
    python: str | None = None,
    cwd: str | Path | None = None,
    use_cache: bool = True,
    timeout_s: float | None = None,
    say: Callable[[str], None] = lambda _: None,
    cached_only: bool = False,
) -> Report:
    """The preflight report of `config` (a path relative to `cwd`, the laptop's checkout), fitting or not.
    With `cached_only` (a dry run) nothing compiles: a cached report or `NotCached`.

    Raises `UsageError` for a bad config or accelerator (the trainer's one line), `PreflightUnavailable`
    when this host cannot compile for a TPU, `InfraError` when the preflight itself breaks.
    """
    if not 0 <= headroom < 1:
        raise UsageError(f"--headroom {headroom}: expected a fraction in [0, 1)")
    folder = Path(cwd) if cwd is not None else Path.cwd()
    config_path = folder / config
    if not config_path.is_file():
        raise UsageError(f"config {config!r} not found in {folder}")
    p = probe(python, folder)
    reason = p.unavailable_reason()
    if reason:
        raise PreflightUnavailable(f"preflight unavailable: {reason}")
    args = effective_overrides(overrides or {}, env)
    key = cache_key(config_path.read_bytes(), args, accelerator, headroom, suggest, p)
    cached = cache_dir() / f"{key}.json"
    refused = cached.with_suffix(".refused")  # XLA's own "no": no report, but just as definite
    if use_cache and refused.is_file():
        raise UsageError(refused.read_text(encoding="utf-8").strip() + " [cached]")
    if use_cache and cached.is_file():
        try:
            return Report.from_json(json.loads(cached.read_text(encoding="utf-8")), cached=True)
        except (ValueError, KeyError, TypeError):
            pass  # a torn or old entry: compile again
    if cached_only:
        raise NotCached(f"no cached preflight of {config} for {accelerator}")
    argv = [
        p.python,
        "-m",
        "trainer.preflight",
        "--config",
        config,
        "--accelerator",
        accelerator,
        "--headroom",
        str(headroom),
        "--json",
    ]
    argv += ["--compile-cache", str(cache_dir() / "programs")]  # unchanged programs are not compiled again
    argv += [a for kv in args for a in ("--set", kv)]
    argv += ["--suggest"] if suggest else []
    say(f"preflight: compiling {config} for {accelerator} (jax {p.jax}, libtpu {p.libtpu}; then cached)")
    try:
        code, stdout, err_line = _spawn(argv, folder, timeout_s, say)
    except subprocess.TimeoutExpired:
        raise InfraError(f"preflight of {config} took longer than {timeout_s:.0f} s") from None
    except OSError as err:
        raise PreflightUnavailable(f"preflight unavailable: cannot run {p.python}: {err}") from None
    if code == EXIT_UNAVAILABLE:
        raise PreflightUnavailable(f"preflight unavailable: {err_line or 'this host cannot compile for TPU'}")
    report = _parse(stdout)
    if report is None and "RESOURCE_EXHAUSTED" in err_line:
        # XLA's own HBM check refused to compile (temp alone above HBM): as definite a "no" as any.
        message = f"preflight of {config}: does not fit a {accelerator} chip: {_xla_oom(err_line)}"
        _write(refused, message)
        raise UsageError(message)
    if report is None:
        if code == EXIT_DOES_NOT_FIT:  # no report: the config (or accelerator) was refused
            raise UsageError(f"preflight of {config}: {err_line or 'bad config'}")
        raise InfraError(
            f"preflight of {config} failed (exit {code}): {err_line or 'no output'}"
            " (grpoctl run --no-preflight skips it)"
        )
    if code not in (EXIT_FITS, EXIT_DOES_NOT_FIT) or report.fits != (code == EXIT_FITS):
        raise InfraError(f"preflight of {config}: exit {code} disagrees with its report")
    _write(cached, json.dumps(report.to_json()))
    return report


def _write(path: Path, text: str) -> None:
    """Atomically: a preflight running beside this one never reads half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _xla_oom(line: str) -> str:
    """XLA's out-of-memory line, in GiB, without the exception class."""
    m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", line)
    if m:
        return f"XLA refused to compile it: temporaries alone need {m[1]} GiB, HBM holds {m[2]} GiB"
    return line.split("RESOURCE_EXHAUSTED: ", 1)[-1]


PROGRESS_PREFIX = PREFLIGHT_COMPILED  # the trainer's per-function progress line on stderr


def _spawn(
    argv: list[str], cwd: Path, timeout_s: float | None, say: Callable[[str], None]
) -> tuple[int, str, str]:
    """Run the trainer preflight: (exit code, stdout, last stderr line). Its per-function progress goes to
    `say` as it comes (a 3B compile takes minutes); libtpu's start-up noise on a CPU host does not."""
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env()
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""))
    reader.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    killer = threading.Timer(timeout_s, kill) if timeout_s else None
    if killer is not None:
        killer.start()
    last = ""
    try:
        for raw in proc.stderr or []:
            line = raw.strip()
            if line:
                last = line
            if line.startswith(PROGRESS_PREFIX):
                say("  " + line.removeprefix("preflight: "))
        code = proc.wait()
        reader.join()
    finally:
        if killer is not None:
            killer.cancel()
        if proc.poll() is None:  # interrupted: never leave a compiler running behind us
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(argv, timeout_s or 0)
    return code, "".join(out), last


def _parse(stdout: str) -> Report | None:
    text = stdout.strip()
    if not text:
        return None
    for candidate in (text, _last_line(text)):  # one object; tolerate stray lines printed before it
        try:
            return Report.from_json(json.loads(candidate))
        except (ValueError, KeyError, TypeError):
            continue
    return None


def not_fitting_message(config: str, report: Report) -> str:
    """One line for exit 2: the trainer's reason (function, T, GiB) or ours from the numbers."""
    if report.reason:
        return f"preflight of {config}: {report.reason.removeprefix('preflight: ')}"
    bad = [f for f in report.functions if not f.fits] or list(filter(None, [report.largest]))
    f = bad[0]
    at = f" at T={f.seq_len}" if f.seq_len else ""
    return (
        f"preflight of {config}: {f.name}{at} needs {gib(f.peak_bytes)} GiB per chip, "
        f"{report.accelerator} has {gib(f.capacity_bytes)} GiB"
    )


@dataclass(frozen=True)
class Gate:
    """What `gate` decided to let through: the report, or None when no preflight could run."""

    report: Report | None
    line: str  # what was said, for the SOP report


def command(config: str, accelerator: str, overrides: Mapping[str, str], env: Mapping[str, str]) -> str:
    """The `grpoctl preflight` line that reproduces a gate by hand."""
    args = [f"--set {kv}" for kv in effective_overrides(overrides, env)]
    return " ".join(["grpoctl preflight", config, "--accelerator", accelerator, *args])


def gate(
    config: str,
    *,
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    accelerator: str,
    say: Callable[[str], None] = lambda _: None,
    cwd: str | Path | None = None,
    dry_run: bool = False,
) -> Gate:
    """Before paying for a node: the report when the run fits; `UsageError` (exit 2, nothing remote
    touched) when it cannot; no report, after one line, when this host cannot run the preflight (or the
    config is not in this folder: a run may name a config that only the remote checkout has). A dry run
    never compiles: it takes a cached report, else says the `grpoctl preflight` command it would run."""
    folder = Path(cwd) if cwd is not None else Path.cwd()
    if not (folder / config).is_file():
        line = f"preflight skipped: {config} is not in {folder.resolve()}; going on without it"
        say(line)
        return Gate(None, line)
    try:
        report = run(
            config,
            overrides=overrides,
            env=env,
            accelerator=accelerator,
            say=say,
            cwd=folder,
            cached_only=dry_run,
        )
    except NotCached:
        by_hand = command(config, accelerator, overrides or {}, env or {})
        line = f"preflight not run (a dry run never compiles; nothing cached): `{by_hand}` compiles it"
        say(line)
        return Gate(None, line)
    except PreflightUnavailable as err:
        by_hand = command(config, accelerator, overrides or {}, env or {})
        where = f" (`{by_hand}` compiles it on a host with libtpu)" if dry_run else ""  # a dry run says how
        line = f"{err}{where}; going on without it"
        say(line)
        return Gate(None, line)
    if not report.fits:
        raise UsageError(not_fitting_message(config, report))
    line = f"preflight {config}: {report.line()}"
    say(line)
    return Gate(report, line)
