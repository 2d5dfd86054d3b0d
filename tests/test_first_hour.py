"""A new user's first hour: `init`, `doctor`, `--version`, mistakes caught on the laptop before anything
remote, a dry run that never compiles, and the laptop's platform differences (paths, tools, locale)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grpoctl_testing.fake_tpu import FakeTpuApi
from orchestrator import preflight as pf
from orchestrator.cli import app
from orchestrator.runs import RunStore

REPO = Path(__file__).resolve().parents[1]  # this checkout: its configs/, sops/ and trainer schema


def invoke(*args: str, code: int | None = 0):
    result = CliRunner().invoke(app, list(args))
    if code is not None:
        assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def in_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This checkout as the cwd, with a local target whose workdir is a fresh temp folder."""
    monkeypatch.chdir(REPO)
    config = tmp_path / "grpoctl.yaml"
    config.write_text(f"targets:\n  local: {{kind: local, workdir: {tmp_path / 'wd'}}}\n")
    return config


# ------------------------------------------------------------------------------------- init, --version


def test_version_and_init_writes_a_commented_config_once(folder: Path) -> None:
    assert invoke("--version").stdout.strip().startswith("grpoctl 0.")
    invoke(
        "init",
        "--project",
        "my-proj",
        "--zone",
        "europe-west4-a",
        "--accelerator",
        "v5litepod-8",
        "--repo-url",
        "https://example.com/me/grpoctl.git",
    )
    text = (folder / "grpoctl.yaml").read_text()
    assert text.startswith("# grpoctl.yaml")
    data = yaml.safe_load(text)
    assert data["targets"]["local"]["kind"] == "local"  # the demo target stays defined
    assert data["targets"]["tpu"]["zone"] == "europe-west4-a"
    assert data["targets"]["tpu"]["accelerator_type"] == "v5litepod-8"
    assert data["repo"]["url"] == "https://example.com/me/grpoctl.git"
    before = (folder / "grpoctl.yaml").read_bytes()
    line = invoke("init", "--project", "other", code=2).stderr
    assert "already exists" in line and (folder / "grpoctl.yaml").read_bytes() == before
    # the default target is the TPU, and `--target local` still picks this machine
    listed = invoke("--target", "local", "--json", "status").stdout
    assert json.loads(listed) == []


def test_local_target_exists_even_when_the_config_does_not_name_it(folder: Path) -> None:
    (folder / "grpoctl.yaml").write_text("targets:\n  lab: {kind: ssh, hosts: [127.0.0.1]}\n")
    assert json.loads(invoke("--target", "local", "--json", "status").stdout) == []
    invoke("init", "--local-only", code=2)  # never overwrites
    assert "ok    local: tools: bash, setsid, flock" in invoke("--target", "local", "doctor").stdout


def test_init_refuses_a_bad_zone_and_writes_nothing(folder: Path) -> None:
    line = invoke("init", "--project", "p", "--zone", "nowhere", code=2).stderr
    assert "zone" in line and not (folder / "grpoctl.yaml").exists()


# --------------------------------------------------------------------------------------------- doctor


def _tpu_config(folder: Path, endpoint: str | None) -> None:
    extra = ["--api-endpoint", endpoint] if endpoint else []
    invoke("init", "--project", "proj", "--zone", "us-east1-d", "--accelerator", "v6e-8", *extra)


def test_doctor_without_credentials_fails_with_the_fix(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(folder))  # no gcloud ADC file here
    monkeypatch.delenv("CLOUDSDK_CONFIG", raising=False)
    _tpu_config(folder, None)
    result = invoke("doctor", "--json", code=1)
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert checks["tpu: credentials"]["status"] == "fail"
    assert "gcloud auth application-default login" in checks["tpu: credentials"]["fix"]
    assert checks["tpu: Cloud TPU API"]["status"] == "skip"  # never asked Google without credentials
    assert checks["repo"]["status"] == "fail"  # a temp folder: no origin, no repo.url


def test_doctor_on_the_fake_api_passes_every_applicable_check(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = _served_repo(tmp_path_factory.mktemp("served"))
    with FakeTpuApi() as fake, served as url:
        _tpu_config(folder, fake.endpoint)
        text = (
            (folder / "grpoctl.yaml")
            .read_text()
            .replace("  # url: https://github.com/you/grpoctl.git", f"  url: {url}")
        )
        (folder / "grpoctl.yaml").write_text(text)
        (folder / ".env").write_text("WANDB_API_KEY=x\n")
        monkeypatch.setattr(pf, "probe", lambda *a, **k: pf.Probe("py", "0.1", "0.1", "t", True))
        ok = json.loads(invoke("--target", "tpu", "doctor", "--json").stdout)
        assert ok["ok"] is True, ok
        statuses = {c["name"]: c["status"] for c in ok["checks"]}
        for name in ("tpu: credentials", "tpu: Cloud TPU API", "tpu: accelerator", "repo", ".env"):
            assert statuses[name] == "ok", (name, ok)
        assert statuses["tpu: permissions"] == "skip"  # the v2 API has no testIamPermissions: said so
        assert any(r.path.endswith("/acceleratorTypes") for r in fake.requests)
        # a zone that does not offer the chip
        fake.script.offered_accelerator_types = {"v5litepod-8"}
        bad = invoke("--target", "tpu", "doctor", code=1).stdout
        assert "fail  tpu: accelerator: v6e-8 not offered in us-east1-d -> pick one of: v5litepod-8" in bad


class _served_repo:
    """A bare repo served over dumb HTTP on 127.0.0.1 (what `git ls-remote` reaches, no network)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> str:
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        bare = self.root / "repo.git"
        subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
        work = self.root / "work"
        subprocess.run(["git", "init", "-q", str(work)], check=True)
        subprocess.run(
            [
                "git",
                "-C",
                str(work),
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "x",
            ],
            check=True,
        )
        subprocess.run(["git", "-C", str(work), "push", "-q", str(bare), "HEAD:refs/heads/main"], check=True)
        subprocess.run(["git", "-C", str(bare), "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
        subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Quiet, directory=str(self.root))
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/repo.git"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_doctor_finds_a_missing_wandb_key_and_a_local_path_repo(folder: Path) -> None:
    (folder / "grpoctl.yaml").write_text(
        "repo: {url: /home/me/grpoctl}\n"
        "targets:\n  lab: {kind: ssh, hosts: [127.0.0.1], ssh_key: /nonexistent/key}\n"
    )
    (folder / "trainer").mkdir()
    (folder / "trainer" / "config.py").write_text("")  # the schema is this checkout's
    (folder / "online.yaml").write_text("wandb_mode: online\n")
    out = invoke("doctor", "--config", "online.yaml", code=1).stdout
    assert "fail  .env: .env is missing; online.yaml logs to W&B online -> put WANDB_API_KEY" in out
    assert "fail  repo: /home/me/grpoctl is a path on this machine" in out
    assert "fail  lab: ssh key: /nonexistent/key not found" in out


# ---------------------------------------------------------------------- mistakes found before launching


def test_unknown_set_key_exits_2_in_one_line_leaving_nothing(in_repo: Path, tmp_path: Path) -> None:
    result = invoke(
        "--config-file", str(in_repo), "run", "configs/tiny_cpu.yaml", "--set", "nosuch.key=1", code=2
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpoctl: error: --set nosuch.key=1: ")
    assert RunStore().list() == []  # no run record
    assert not (tmp_path / "wd").exists()  # nothing ran on the "worker": not even its folder


def test_misspelt_key_gets_did_you_mean_and_the_whole_list(in_repo: Path) -> None:
    line = invoke(
        "--config-file",
        str(in_repo),
        "run",
        "configs/tiny_cpu.yaml",
        "--set",
        "train.polcy_loss_impl=pallas",
        code=2,
    ).stderr
    assert "did you mean 'train.policy_loss_impl'?" in line
    from trainer.config import TrainConfig  # jax-free (imported here: this module is a laptop-side test)

    assert line.rstrip().endswith(", ".join(sorted(TrainConfig.model_fields)) + ")")  # the whole list
    bad_value = invoke(
        "--config-file", str(in_repo), "run", "configs/tiny_cpu.yaml", "--set", "train.beta=high", code=2
    ).stderr
    assert "train.beta: expected a number, got 'high'" in bad_value


def test_a_run_config_is_read_as_every_grpoctl_yaml_is_bounded_and_one_line() -> None:
    """The run's config goes through config.safe_yaml: malformed YAML names its line, and an alias bomb
    is refused before it fills memory."""
    from orchestrator import validate
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError, match=r"^config c\.yaml: line \d+ malformed YAML$"):
        validate.check_schema("c.yaml", "train:\n  beta: [1\n", {}, {})
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdef", "bcdefg", strict=True)
    )
    with pytest.raises(UsageError, match="config c.yaml: malformed YAML: expands to more than"):
        validate.check_schema("c.yaml", bomb, {}, {})


def test_backslash_config_path_is_normalised(in_repo: Path, tmp_path: Path) -> None:
    """PowerShell completes `configs\\tiny_cpu.yaml`: the workers get `configs/tiny_cpu.yaml` and the run
    is named after its stem (here the dry run shows the launch without starting anything)."""
    result = invoke("--config-file", str(in_repo), "--dry-run", "run", "configs\\tiny_cpu.yaml")
    run_id = result.stdout.split()[0]
    assert run_id.startswith("tiny_cpu-") and "\\" not in run_id
    assert "configs/tiny_cpu.yaml" in result.stderr and "configs\\" not in result.stderr


def test_a_config_missing_from_the_synced_commit_is_refused(in_repo: Path) -> None:
    line = invoke("--config-file", str(in_repo), "run", "configs/no_such.yaml", code=2).stderr
    assert "no_such.yaml" in line and "grpoctl: error:" in line


def test_run_before_sync_says_sync_first(in_repo: Path) -> None:
    line = invoke("--config-file", str(in_repo), "run", "configs/tiny_cpu.yaml", code=2).stderr
    assert "run `grpoctl sync` first" in line
    assert RunStore().list() == []


def test_the_laptop_side_imports_where_windows_lacks_posix_modules() -> None:
    """Windows has no SIGKILL, fcntl, pwd, grp, termios or resource: the CLI's modules must import
    without them (they are only ever used by what runs on Linux workers or the local target)."""
    code = (
        "import signal, sys\n"
        "del signal.SIGKILL\n"
        "for m in ('fcntl', 'pwd', 'grp', 'termios', 'resource'):\n"
        "    sys.modules[m] = None\n"
        "import orchestrator.cli, orchestrator.doctor, orchestrator.initfile, orchestrator.render\n"
        "import orchestrator.sop.replay, orchestrator.validate\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_the_schema_imports_without_jax() -> None:
    """The laptop-only install has no jax: the orchestrator still checks configs with the trainer's own
    schema (kernel tile sizes included)."""
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "from trainer import config as c\n"
        "import orchestrator.cli, orchestrator.validate, orchestrator.doctor, orchestrator.initfile\n"
        "try:\n"
        "    c.from_dict({'train': {'kernel_blocks': {'block_tokens': 12}}})\n"
        "except c.ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "train.kernel_blocks: block_tokens must be a positive multiple of 8" in out.stdout


# ------------------------------------------------------------------------------------------- dry runs


def test_seed_sop_dry_run_never_compiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`grpoctl --dry-run sop replay` of the 3B seed SOP with an empty state folder: no compile is started
    (it took > 600 s); each run's `grpoctl preflight` command is printed instead."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path / "empty-state"))

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run started a compile")

    monkeypatch.setattr(pf, "_spawn", no_compile)
    report = tmp_path / "report.md"
    result = invoke(
        "--dry-run", "sop", "replay", "sops/grpo_gsm8k_pallas_vs_jax.yaml", "--report", str(report)
    )
    assert (
        "grpoctl preflight configs/grpo_gsm8k_qwen25_3b_bs128_steps100.yaml --accelerator v6e-8"
        in result.stderr
    )


def test_dry_run_uses_a_cached_preflight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    probe = pf.Probe("py", "0.1", "0.1", None, True)
    monkeypatch.setattr(pf, "probe", lambda *a, **k: probe)
    config = "configs/tiny_cpu.yaml"
    key = pf.cache_key((REPO / config).read_bytes(), [], "v6e-8", pf.DEFAULT_HEADROOM, False, probe)
    raw = {"fits": True, "accelerator": "v6e-8", "functions": [{"name": "update_step", "peak_bytes": 1}]}
    pf._write(pf.cache_dir() / f"{key}.json", json.dumps(raw))
    said: list[str] = []
    gate = pf.gate(config, accelerator="v6e-8", say=said.append, dry_run=True)
    assert gate.report is not None and gate.report.cached


# ------------------------------------------------------------------------------------ the laptop's OS


def _path_without(tmp_path: Path, missing: set[str]) -> str:
    """A PATH with links to everything a launch uses except `missing`."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (
        "bash",
        "git",
        "setsid",
        "flock",
        "env",
        "mkdir",
        "cat",
        "sed",
        "cut",
        "seq",
        "sleep",
        "ln",
        "rm",
        "tr",
        "grep",
        "nohup",
        "ls",
        "dirname",
        "mv",
        "date",
        "kill",
        "ps",
    ):
        found = shutil.which(tool)
        if found and tool not in missing:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_local_target_without_flock_or_setsid_is_one_line(
    in_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a synced checkout, so that only the tools are missing
    invoke("--config-file", str(in_repo), "sync")
    monkeypatch.setenv("PATH", _path_without(tmp_path, {"flock", "setsid"}))
    line = invoke("--config-file", str(in_repo), "run", "configs/tiny_cpu.yaml", code=2).stderr
    assert line.strip() == (
        "grpoctl: error: the local target needs a Linux/macOS host with bash, setsid and flock "
        "(missing here: setsid, flock)"
    )
    assert RunStore().list() == []


def test_local_target_without_bash_is_one_line(in_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.errors import UsageError
    from orchestrator.transport.local import LocalTransport

    with pytest.raises(UsageError, match="needs a Linux/macOS host with bash, setsid and flock"):
        LocalTransport(shell="/nonexistent/bash").run("true")


def test_laptop_only_install_says_jax_is_missing_before_launching(
    in_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.targets import local

    invoke("--config-file", str(in_repo), "sync")
    monkeypatch.setattr(local, "has_jax", lambda: False)
    line = invoke("--config-file", str(in_repo), "run", "configs/tiny_cpu.yaml", code=2).stderr
    assert "which has no jax" in line and "pip install -e '.[trainer]'" in line
    assert RunStore().list() == []


def test_files_we_write_are_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    """LC_ALL=C without UTF-8 mode: Python's default file encoding is ASCII (a cp1252 Windows is alike).
    A dry-run replay of an SOP whose description is not ASCII writes its report and state as UTF-8 (it
    crashed and left report.md at 0 bytes), and `init` writes a non-ASCII repo URL read from nowhere but
    its own text."""
    env = {
        **os.environ,
        "LC_ALL": "C",
        "LANG": "C",
        "PYTHONIOENCODING": "ascii:replace",
        "PYTHONUTF8": "0",
        "PYTHONPATH": str(REPO),
        "GRPOCTL_STATE_DIR": str(tmp_path / "state"),
    }
    check = "import locale, sys; assert locale.getpreferredencoding(False).lower() != 'utf-8'"
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    sop = (REPO / "sops" / "local_pallas_vs_jax.yaml").read_text(encoding="utf-8")
    sop = sop.replace("GRPO on GSM8K-style data", "GRPO sur des données GSM8K (≈ café)", 1)
    sop_file = tmp_path / "sop_utf8.yaml"
    sop_file.write_text(sop, encoding="utf-8")
    report = tmp_path / "report.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--dry-run",
            "sop",
            "replay",
            str(sop_file),
            "--report",
            str(report),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert "données GSM8K (≈ café)" in report.read_text(encoding="utf-8")


# ------------------------------------------------------------------ status, run --wait, logs, fetch


def _record(run_id: str, state: str, progress: dict | None = None, codes: tuple[int, ...] = ()):
    from orchestrator.runs import RunRecord, WorkerRun

    workers = [WorkerRun(f"w{i}", f"host{i}", state="FAILED", exit_code=c) for i, c in enumerate(codes)]
    return RunRecord(
        run_id,
        "configs/x.yaml",
        "v6e",
        "tpu",
        "~/w",
        "logs/x.log",
        "logs/x.pid",
        "logs/x.exit",
        f"runs/{run_id}",
        "20261207_140000",
        state=state,
        last_progress=progress,
        workers=workers or [WorkerRun("w0", "host0")],
    )


def test_status_fits_80_columns_one_line_a_run() -> None:
    from rich.console import Console

    from orchestrator import render

    long_id = "grpo_gsm8k_qwen25_3b_bs128_steps100_pallas-20261207_140000-ab12"
    warm = {
        "phase": "warm_start",
        "k": 12,
        "n": 200,
        "eta_s": None,
        "phase_eta_s": 95.0,
        "text": "warm start step 12/200",
    }
    records = [
        _record(long_id, "RUNNING", warm),
        _record("tiny_cpu-20261207_140000-cd34", "FAILED", {"step": 2, "total": 4}, codes=(143, 3)),
        _record("tiny_cpu-20261207_140001-ef56", "FAILED", {"step": 2, "total": 4}, codes=(143,)),
    ]
    console = Console(width=80, record=True, force_terminal=False)
    console.print(render.runs_table(records, width=console.width))
    lines = console.export_text().rstrip("\n").splitlines()
    assert len(lines) == 1 + len(records), lines  # a header, then one line a run: nothing wraps
    assert all(len(line) <= 80 for line in lines)
    assert long_id in lines[1]  # the id is never cut: every command takes it
    assert "FAILED(3)" in lines[2]  # the cause, not the peer that was stopped because of it
    assert "STOPPED" in lines[3]
    assert render.progress_text(records[0]) == "warm start step 12/200 phase eta 1:35"
    detail = "\n".join(render.details(records[1]))
    assert "w0:FAILED(143)@host0 w1:FAILED(3)@host1" in detail and "log: logs/x.log" in detail


@pytest.fixture
def standin(local_lab):
    """A clone of the stand-in trainer's repo as the cwd, a local target, synced."""
    _, config = local_lab

    def cli(*args: str, code: int | None = 0):
        return invoke("--config-file", config, *args, code=code)

    cli("sync")
    return cli


def test_run_wait_ends_with_accuracy_and_next_step_fetch_takes_the_latest_finished(standin) -> None:
    waited = standin("run", "configs/ok.yaml", "--wait", "--interval", "0.1")
    run_id = waited.stdout.split()[0]
    assert waited.stdout.strip() == f"{run_id} SUCCEEDED"  # what scripts read, unchanged
    said = waited.stderr.strip().splitlines()
    assert said[-2].startswith(f"{run_id}: accuracy 0.") and said[-1] == f"next: grpoctl fetch {run_id}"
    failed = standin("run", "configs/fail3.yaml", "--wait", "--interval", "0.1", code=1)
    assert "next:" not in failed.stderr
    fetched = standin("fetch").stdout  # the latest run failed: fetch takes the latest that finished
    assert fetched.startswith(f"{run_id} -> runs/{run_id}/")
    assert "[trainer" not in standin("logs", run_id, "--events").stdout
    assert '"event": "done"' in standin("logs", run_id, "--events").stdout
    assert '"event"' not in standin("logs", run_id).stdout


def test_fetch_without_a_finished_run_says_so(standin) -> None:
    standin("run", "configs/fail3.yaml", "--wait", "--interval", "0.1", code=1)
    line = standin("fetch", code=2).stderr
    assert "no finished run to fetch" in line and "FAILED" in line


def test_a_stopped_run_shows_stopped(standin) -> None:
    run_id = standin("run", "configs/slow.yaml").stdout.strip()
    assert standin("stop", run_id).stdout.strip() == f"{run_id}: STOPPED"
    listing = standin("status").stdout
    assert "STOPPED" in listing and "FAILED(143)" not in listing


def test_preflight_command_dry_run_prints_the_command_and_never_compiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(pf, "_spawn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    said = invoke("--dry-run", "preflight", "configs\\tiny_cpu.yaml", "--accelerator", "v6e-8").stderr
    assert "`grpoctl preflight configs/tiny_cpu.yaml --accelerator v6e-8` compiles it" in said


def test_git_missing_is_one_line(standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_without(tmp_path, {"git"}))
    line = standin("sync", code=2).stderr
    assert line.strip() == (
        "grpoctl: error: git is not installed (or not on PATH): "
        "grpoctl reads this checkout with it; install git"
    )


def test_state_folder_is_the_platforms_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import platformdirs

    from orchestrator import runs

    monkeypatch.delenv("GRPOCTL_STATE_DIR")
    asked: list[str] = []
    monkeypatch.setattr(platformdirs, "user_state_dir", lambda app, **kw: asked.append(app) or str(tmp_path))
    assert runs.state_dir() == tmp_path and asked == ["grpoctl"]
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path / "mine"))  # the explicit folder still wins
    assert runs.state_dir() == tmp_path / "mine"


def test_preflight_says_libtpu_is_linux_x86_64_only_elsewhere() -> None:
    mac = pf.Probe("python3", None, None, "trainer", True, machine="arm64", system="Darwin")
    assert (
        mac.unavailable_reason()
        == "python3 has no jax, and libtpu ships for Linux x86_64 only (this is Darwin arm64)"
    )
    mac_jax = pf.Probe("python3", "0.10.2", None, "trainer", True, machine="arm64", system="Darwin")
    assert "libtpu ships for Linux x86_64 only" in (mac_jax.unavailable_reason() or "")
    linux = pf.Probe("python3", "0.10.2", None, "trainer", True, machine="x86_64", system="Linux")
    assert "pip install -e '.[tpu]'" in (linux.unavailable_reason() or "")


def test_tpu_extra_is_marked_for_linux_x86_64_only() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert all("sys_platform == 'linux'" in r and "platform_machine == 'x86_64'" in r for r in extras["tpu"])


def test_sop_replay_finds_a_missing_env_file_before_up(in_repo: Path, tmp_path: Path) -> None:
    """The .env an SOP pushes is checked before `up`: nothing is provisioned, no step runs."""
    sop = {
        "name": "needs_env",
        "target": "local",
        "steps": [
            "up",
            "sync",
            {"env_push": {"file": "missing.env"}},
            {"run": {"name": "a", "config": "configs\\tiny_cpu.yaml"}},
        ],
    }
    sop_file = tmp_path / "sop.yaml"
    sop_file.write_text(yaml.safe_dump(sop))
    report = tmp_path / "report.md"
    args = ["--config-file", str(in_repo), "sop", "replay", str(sop_file), "--report", str(report)]
    line = invoke(*args, code=2).stderr.strip().splitlines()[-1]
    assert line.startswith("grpoctl: error: before `up` (nothing paid for yet): .env: no missing.env")
    assert not (tmp_path / "wd").exists()  # `up` (which makes the local target's folder) never ran
    # a --set typo in an SOP is refused there too, naming the key
    line = invoke(*args, "--set", "train.polcy_loss_impl=jax", code=2).stderr.strip().splitlines()[-1]
    assert "did you mean 'train.policy_loss_impl'?" in line


def test_up_without_a_config_says_it_uses_the_local_target(folder: Path) -> None:
    said = invoke("up").stderr
    assert "no grpoctl.yaml here: using the built-in `local` target (`grpoctl init` writes one)" in said
