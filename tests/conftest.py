"""Test-wide guards: no network beyond loopback, no hub look-ups, W&B offline, 8 CPU devices for meshes."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import ipaddress
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

# Set before anything imports jax / transformers / wandb.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
# libtpu (dev extra) takes a lock file per process; the preflight tests and their subprocesses may load it
# while another test process does.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
os.environ["NO_GCE_CHECK"] = "true"  # google-auth: never probe the metadata server (lowercase!)
# ...nor read a gcloud ADC file (this also holds in the CLI subprocesses tests start).
os.environ["CLOUDSDK_CONFIG"] = "/nonexistent/grpoctl-tests-have-no-gcloud-config"
# grpoctl_testing (the fakes, not in the wheel) is imported from the checkout, also by the processes tests
# start from another folder (`python -m grpoctl_testing.fake_tpu_cli`).
_CHECKOUT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([_CHECKOUT, *filter(None, [os.environ.get("PYTHONPATH")])])

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only_connect(sock: socket.socket, address):  # type: ignore[no-untyped-def]
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.gethostbyname(host)) if host == "localhost" else None
        if ip is None or not ip.is_loopback:
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {address!r}")
    return _real_connect(sock, address)


socket.socket.connect = _loopback_only_connect  # type: ignore[method-assign]


# --- the laptop-only install (`pip install -e '.[test]'`: no jax, torch, transformers) ---------------------


def _extras_modules() -> frozenset[str]:
    """Import names of what grpoctl's extras add to the base install, read from the installed package's
    metadata (pyproject.toml is the one list): `orbax-checkpoint` -> `orbax_checkpoint`, `jax[tpu]` ->
    `jax`."""
    import re
    from importlib import metadata

    try:
        requires = metadata.requires("grpoctl") or []
    except metadata.PackageNotFoundError:
        return frozenset()
    names = (re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires if "extra ==" in r)  # type: ignore[union-attr]
    return frozenset(n.lower().replace("-", "_").replace(".", "_") for n in names)


_EXTRAS = _extras_modules()


def _missing_extra(err: BaseException | None) -> str | None:
    """The extra's module whose absence made a test module fail to import, or None for any other error."""
    while err is not None:
        if isinstance(err, ModuleNotFoundError) and err.name:
            top = err.name.split(".")[0].lower()
            # `orbax` is distributed as orbax-checkpoint: a module name may be a prefix of its distribution's
            if any(dist == top or dist.startswith(top + "_") for dist in _EXTRAS):
                return err.name
            return None
        err = err.__cause__ or err.__context__
    return None


# Every trainer module needs jax (some only inside their functions): without it, the trainer half is out.
_NO_TRAINER = importlib.util.find_spec("jax") is None
_INSTALL_HINT = "which the laptop-only install lacks (pip install -e '.[trainer,dev]', or `make venv`)"


def _uses_trainer(module: object) -> bool:
    """Whether a test module imported anything from the `trainer` package (a module, class or function)."""
    for value in vars(module).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(name, str) and (name == "trainer" or name.startswith("trainer.")):
            return True
    return False


class _TestModule(pytest.Module):
    """A trainer test module is skipped, with the reason, where the trainer's packages are absent (the
    laptop-only install): whether importing it fails on one of them, or it imports the trainer's jax-free
    parts and would fail in its tests. Any other import error still fails collection."""

    def collect(self):  # type: ignore[no-untyped-def]
        try:
            items = super().collect()
        except self.CollectError as err:
            missing = _missing_extra(err.__cause__)
            if missing is None:
                raise
            pytest.skip(f"{self.path.name} is a trainer test: needs {missing}, {_INSTALL_HINT}")
        if _NO_TRAINER and _uses_trainer(self.obj):
            pytest.skip(f"{self.path.name} tests the trainer: needs jax, {_INSTALL_HINT}")
        return items


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
    return _TestModule.from_parent(parent, path=module_path)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own grpoctl state folder (run records) so tests never see each other's runs."""
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _no_google_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test looks up Google credentials: a client built without the fake's `http://` endpoint gets the
    product's one-line no-credentials error instead of reaching Google (and the socket guard above refuses
    any non-loopback address anyway)."""
    import google.auth  # a base dependency (google-cloud-tpu): there on the laptop-only install too
    from google.auth.exceptions import DefaultCredentialsError

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise DefaultCredentialsError("tests never look up Google credentials")

    monkeypatch.setattr(google.auth, "default", refuse)


@pytest.fixture(scope="session")
def standin_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One stand-in repo for the whole session: (file:// URL of the bare origin, work clone)."""
    from standin import make_standin_repo

    repo = make_standin_repo(tmp_path_factory.mktemp("standin"))
    return repo.url, repo.work


@pytest.fixture
def local_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standin_repo: tuple[str, Path]
) -> tuple[Path, str]:
    """A fresh clone of the stand-in repo as the cwd, and a grpoctl.yaml (its path) with one local target
    working in `tmp_path/wd`: (clone, config file)."""
    url, _ = standin_repo
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True)
    config = tmp_path / "grpoctl.yaml"
    config.write_text(f"targets:\n  local: {{kind: local, workdir: {tmp_path / 'wd'}}}\n")
    monkeypatch.chdir(work)
    return work, str(config)


# --- what other users of this machine can see ------------------------------------------------------------


def ps_args() -> str:
    """Every process's full command line, as any user of this machine can list them."""
    return subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout


def sample_during(action: Callable[[], object], probe: Callable[[], None]) -> None:
    """Runs `probe` in a loop on another thread while `action` runs (at least once)."""
    done = threading.Event()

    def loop() -> None:
        probe()
        while not done.is_set():
            probe()

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        action()
    finally:
        done.set()
        thread.join()


def ps_during(action: Callable[[], object]) -> str:
    """Everything `ps` showed while `action` ran (sampled in a loop, at least once)."""
    samples: list[str] = []
    sample_during(action, lambda: samples.append(ps_args()))
    return "\n".join(samples)


def modes_during(folder: Path, action: Callable[[], object]) -> dict[str, set[int]]:
    """The permission bits of every file that appeared in `folder` while `action` ran, sampled in a loop
    from another thread (a temp file that is 0644 for a moment is readable by others for that moment)."""
    seen: dict[str, set[int]] = {}

    def probe() -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                with contextlib.suppress(FileNotFoundError):
                    seen.setdefault(entry.name, set()).add(stat.S_IMODE(entry.stat().st_mode))

    sample_during(action, probe)
    return seen


# --- the CLI: one-line errors --------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder (the cwd) for commands that read ./grpoctl.yaml."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_error(*args: str, code: int) -> str:
    """`grpoctl ARGS` in-process: exit `code`, exactly one line on stderr (ours), no traceback anywhere."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (args, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpoctl: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- SSH: private sshd servers on 127.0.0.1 (grpoctl_testing/sshd.py) -----------------------------
# They run as the current user on this machine, so a test's "remote" paths are local paths: always
# point remote_dir / put / get at a tmp_path, never at ~ (that is the real home of whoever runs the tests).


def _require_sshd() -> None:
    from grpoctl_testing.sshd import SSHD, sshd_available

    if sshd_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{SSHD} is missing but CI is set: SSH tests must run in CI (see .ci/run)", pytrace=False)
    pytest.skip(f"{SSHD} not installed (apt-get install openssh-server); CI installs it and never skips")


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`sshd_factory(**LoopbackSshd options)` -> a started LoopbackSshd; all stopped when the session ends.

    For tests that stop or restart a server: take a fresh one instead of the shared `sshd`.
    """
    from grpoctl_testing.sshd import LoopbackSshd

    _require_sshd()
    started: list[LoopbackSshd] = []

    def make(**options) -> LoopbackSshd:  # type: ignore[no-untyped-def]
        server = LoopbackSshd(tmp_path_factory.mktemp("sshd"), **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def sshd(sshd_factory):  # type: ignore[no-untyped-def]
    """One shared server for the whole session: do not stop or restart it."""
    return sshd_factory()


@pytest.fixture(scope="session")
def sshd_pair(sshd_factory):  # type: ignore[no-untyped-def]
    """Two servers on two ports that accept the same client key: a two-worker target."""
    first = sshd_factory()
    return first, sshd_factory(client_key=first.client_key)


def ssh_target_fields(*servers, **overrides) -> dict:  # type: ignore[no-untyped-def]
    """The `ssh` target entry (as YAML would give it) with one worker per server, host keys pinned per
    host and a known_hosts file private to the first server; `overrides` replace or add keys."""
    fields = {
        "kind": "ssh",
        "hosts": [s.address for s in servers],
        "user": servers[0].user,
        "ssh_key": str(servers[0].client_key),
        "host_key_sha256": [s.host_key_sha256 for s in servers],
        "known_hosts": str(servers[0].root / "client_known_hosts"),
        "connect_timeout_s": 5.0,
    }
    return {**fields, **overrides}


@pytest.fixture
def ssh_target_config():  # type: ignore[no-untyped-def]
    """`ssh_target_config(*servers, **overrides)` -> SshTargetConfig built from `ssh_target_fields`."""
    from orchestrator.config import SshTargetConfig

    def make(*servers, **overrides) -> SshTargetConfig:  # type: ignore[no-untyped-def]
        return SshTargetConfig(**ssh_target_fields(*servers, **overrides))

    return make
