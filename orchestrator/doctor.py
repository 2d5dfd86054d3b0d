"""`grpoctl doctor`: what stands between this laptop and a run, one check a line, each with its fix.

Every check returns a `Check` (ok / warn / fail / skip, what was seen, how to fix it). `doctor` runs them
all; `sop replay` runs the cheap ones that apply to its steps (`preflight_checks`) before `up`, so a
missing `.env` or a repo a VM cannot clone is found before anything is paid for.

Nothing here asks Google for credentials: the credentials check looks for what Application Default
Credentials would read (the env variable's file, gcloud's ADC file); only when one is there (or the
endpoint is a plain-http proxy, anonymous) does `doctor` call the Cloud TPU API.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.config import (
    GrpoctlConfig,
    LocalTargetConfig,
    SshTargetConfig,
    TargetConfig,
    TpuTargetConfig,
    load_config,
    read_text_utf8,
    safe_yaml,
)
from orchestrator.errors import GrpoctlError, UsageError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
MIN_PYTHON = (3, 11)
LS_REMOTE_TIMEOUT_S = 20.0
ADC_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
# What a run needs in `.env` (the worker's environment) when its config says so.
WANDB_KEY = "WANDB_API_KEY"


@dataclass(frozen=True)
class Check:
    name: str  # "python", "config", "v6e: credentials"
    status: str  # ok / warn / fail / skip
    detail: str  # what was seen
    fix: str = ""  # what to do about it (fail / warn)

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix and self.status in (FAIL, WARN) else ""
        return f"{self.status:<4}  {self.name}: {self.detail}{fix}"


def version() -> str:
    try:
        return importlib.metadata.version("grpoctl")
    except importlib.metadata.PackageNotFoundError:
        return __version__


# ------------------------------------------------------------------------------------------- the laptop


def check_python() -> Check:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({platform.system()} {platform.machine()})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check("python", FAIL, text, "grpoctl needs Python >= 3.11")
    return Check("python", OK, text)


def check_version() -> Check:
    return Check("grpoctl", OK, version())


def check_git() -> Check:
    if shutil.which("git") is None:
        return Check("git", FAIL, "git is not installed", "install git (sync reads this checkout with it)")
    return Check("git", OK, shutil.which("git") or "git")


def load(config_file: str | None) -> tuple[GrpoctlConfig | None, Check]:
    try:
        cfg = load_config(config_file)
    except UsageError as err:
        return None, Check("config", FAIL, str(err), "fix the file (docs: README, grpoctl init)")
    names = ", ".join(f"{n} ({t.kind})" for n, t in cfg.targets.items())
    if cfg.source == "<embedded default>":
        return cfg, Check("config", WARN, f"no grpoctl.yaml: the built-in target {names}", "grpoctl init")
    return cfg, Check("config", OK, f"{cfg.source}: targets {names}")


# ----------------------------------------------------------------------------------------- the .env file


def wandb_online(config: str, overrides: Mapping[str, str], env: Mapping[str, str]) -> bool | None:
    """Whether a run of `config` logs to W&B online (its YAML + overrides + env flags); None when the
    file or the schema is not here."""
    path = Path(config.replace("\\", "/"))
    if not path.is_file() or not Path("trainer/config.py").is_file():
        return None
    try:
        from orchestrator.preflight import effective_overrides
        from trainer import config as schema

        data = safe_yaml(read_text_utf8(path), config) or {}
        cfg = schema.from_dict(schema.apply_overrides(data, effective_overrides(overrides, env)))
    except Exception:  # a bad config is `run`'s to report, with its key
        return None
    mode = env.get("WANDB_MODE") or cfg.wandb_mode
    return mode == "online"


def check_env_file(
    file: str = ".env", runs: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]] = ()
) -> Check:
    """`.env` is there and holds what the runs need: WANDB_API_KEY when one logs to W&B online."""
    from orchestrator.ops.env import read_dotenv

    try:
        values = read_dotenv(file)
    except GrpoctlError as err:
        return Check(".env", FAIL, str(err), "fix the line it names (KEY=VALUE)")
    online = [c for c, o, e in runs if wandb_online(c, o, e)]
    present = Path(file).is_file()
    if online and WANDB_KEY not in values:
        where = "holds no WANDB_API_KEY" if present else "is missing"
        return Check(
            ".env",
            FAIL,
            f"{file} {where}; {online[0]} logs to W&B online",
            f"put WANDB_API_KEY=... in {file} (or --set wandb_mode=offline)",
        )
    if not present:
        return Check(
            ".env",
            WARN,
            f"no {file} (secrets for the trainer: WANDB_API_KEY, HF_TOKEN)",
            f"create {file} with KEY=VALUE lines when a run needs secrets",
        )
    keys = ", ".join(sorted(values)) or "no keys"
    return Check(".env", OK, f"{file}: {keys}")


# ------------------------------------------------------------------------------------------------- repo


def is_local_url(url: str) -> bool:
    """A path on this laptop (a VM cannot clone it): `/x`, `./x`, `file://`, `C:\\x`."""
    if url.startswith("file://") or url.startswith(("/", "./", "../", "~")):
        return True
    if len(url) > 2 and url[1] == ":" and url[2] in "\\/":
        return True
    return "://" not in url and ":" not in url  # `some/folder`: scp-style URLs have `host:`


def repo_url(cfg: GrpoctlConfig) -> str | None:
    if cfg.repo.url:
        return cfg.repo.url
    from orchestrator.validate import git

    found = git(Path.cwd(), "remote", "get-url", "origin")
    return found.strip() if found else None


def check_repo(cfg: GrpoctlConfig, *, reach: bool = True, local_path: str = FAIL) -> Check:
    """repo.url (else origin) is something a VM can clone: not a path here, and answering `git ls-remote`.
    A path is `local_path` (`sop replay` says it and goes on: VMs sharing this disk, as in the rehearsal,
    can clone it)."""
    url = repo_url(cfg)
    if url is None:
        return Check(
            "repo",
            FAIL,
            "no repo.url and no git remote 'origin' here",
            "set repo.url in grpoctl.yaml (an https URL the VM can reach)",
        )
    if is_local_url(url):
        return Check(
            "repo",
            local_path,
            f"{url} is a path on this machine: a VM cannot clone it",
            "push the repo to a host the VM reaches and set repo.url",
        )
    if not reach:
        return Check("repo", OK, f"{url} (not contacted)")
    if shutil.which("git") is None:
        return Check("repo", SKIP, f"{url}: git is not installed here")
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "GIT_SSH_COMMAND": "ssh -oBatchMode=yes",
    }
    try:
        proc = subprocess.run(
            ["git", "ls-remote", "--exit-code", url, "HEAD"],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=LS_REMOTE_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check(
            "repo",
            FAIL,
            f"{url}: no answer in {LS_REMOTE_TIMEOUT_S:.0f} s",
            "check the URL and that the host is reachable",
        )
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        return Check(
            "repo",
            FAIL,
            f"{url}: git ls-remote failed ({said})",
            "a private repo needs credentials on the VM: a public URL, or a token in the URL",
        )
    note = " (a VM needs its own SSH key for this URL)" if url.startswith(("git@", "ssh://")) else ""
    return Check(
        "repo",
        WARN if note else OK,
        f"{url} answers{note}",
        "prefer an https URL the VM can read" if note else "",
    )


# ---------------------------------------------------------------------------------------------- targets


def check_local(name: str, cfg: LocalTargetConfig) -> list[Check]:
    from orchestrator.targets.local import missing_tools
    from orchestrator.transport.local import LOCAL_TOOLS_NEEDED

    out = []
    missing = missing_tools()
    if missing:
        out.append(Check(f"{name}: tools", FAIL, f"missing here: {', '.join(missing)}", LOCAL_TOOLS_NEEDED))
    else:
        out.append(Check(f"{name}: tools", OK, "bash, setsid, flock"))
    if cfg.python:
        ok = Path(cfg.python).expanduser().is_file()
        out.append(Check(f"{name}: python", OK if ok else FAIL, cfg.python, "" if ok else "fix `python`"))
    elif importlib.util.find_spec("jax") is None:
        ours = Path("trainer/config.py").is_file()  # this checkout's trainer needs jax; another may not
        out.append(
            Check(
                f"{name}: jax",
                FAIL if ours else WARN,
                f"{sys.executable} has no jax (a laptop-only install)",
                "pip install -e '.[trainer]' (the local target runs the trainer here)",
            )
        )
    else:
        out.append(Check(f"{name}: jax", OK, importlib.metadata.version("jax")))
    return out


def check_ssh(name: str, cfg: SshTargetConfig) -> list[Check]:
    if cfg.ssh_key:
        key = Path(cfg.ssh_key).expanduser()
        if not key.is_file():
            return [Check(f"{name}: ssh key", FAIL, f"{cfg.ssh_key} not found", "fix ssh_key")]
        return [Check(f"{name}: ssh key", OK, cfg.ssh_key)]
    defaults = [p for p in ("id_ed25519", "id_ecdsa", "id_rsa") if (Path.home() / ".ssh" / p).is_file()]
    if defaults or os.environ.get("SSH_AUTH_SOCK"):
        return [Check(f"{name}: ssh key", OK, ", ".join(defaults) or "ssh-agent")]
    return [
        Check(
            f"{name}: ssh key",
            FAIL,
            "no ssh_key, no ~/.ssh/id_*, no ssh-agent",
            "ssh-keygen -t ed25519, or set ssh_key",
        )
    ]


def adc_file() -> Path:
    """gcloud's application-default credentials file (where `gcloud auth application-default login`
    writes it)."""
    if os.name == "nt":
        return (
            Path(os.environ.get("APPDATA", "~")).expanduser()
            / "gcloud"
            / "application_default_credentials.json"
        )
    config = os.environ.get("CLOUDSDK_CONFIG")
    root = Path(config).expanduser() if config else Path.home() / ".config" / "gcloud"
    return root / "application_default_credentials.json"


def check_credentials(name: str, cfg: TpuTargetConfig) -> Check:
    what = f"{name}: credentials"
    if cfg.api_endpoint and cfg.api_endpoint.startswith("http://"):
        return Check(what, OK, f"anonymous ({cfg.api_endpoint} is a plain-http proxy or the fake API)")
    explicit = os.environ.get(ADC_ENV)
    if explicit:
        if Path(explicit).expanduser().is_file():
            return Check(what, OK, f"{ADC_ENV}={explicit}")
        return Check(what, FAIL, f"{ADC_ENV}={explicit}: no such file", f"point {ADC_ENV} at a key file")
    if adc_file().is_file():
        return Check(what, OK, f"application default credentials ({adc_file()})")
    return Check(
        what,
        FAIL,
        "no Google credentials found (ADC file or GOOGLE_APPLICATION_CREDENTIALS)",
        "gcloud auth application-default login",
    )


def check_tpu(name: str, cfg: TpuTargetConfig, *, api: bool = True) -> list[Check]:
    creds = check_credentials(name, cfg)
    out = [creds]
    if not api:
        return out
    if creds.status != OK:
        return [*out, Check(f"{name}: Cloud TPU API", SKIP, "not asked: no credentials")]
    out += _api_checks(name, cfg)
    out.append(
        Check(
            f"{name}: permissions",
            SKIP,
            "the Cloud TPU v2 API has no testIamPermissions: `up` finds out "
            "(needs tpu.nodes.create/delete, e.g. roles/tpu.admin)",
        )
    )
    out.append(
        Check(
            f"{name}: quota", SKIP, "not readable through the Cloud TPU API (console: IAM & Admin > Quotas)"
        )
    )
    key = Path(cfg.ssh_key).expanduser()
    out.append(
        Check(f"{name}: ssh key", OK, f"{cfg.ssh_key}" + ("" if key.is_file() else " (created at `up`)"))
    )
    return out


def _api_checks(name: str, cfg: TpuTargetConfig) -> list[Check]:
    from google.api_core import exceptions as gexc

    from orchestrator.cloud.client import api_error, build_client

    parent = f"projects/{cfg.project}/locations/{cfg.zone}"
    try:
        client = build_client(cfg.api_endpoint)
        offered = sorted(t.type_ for t in client.list_accelerator_types(parent=parent, timeout=30))
    except gexc.GoogleAPICallError as err:
        text = str(err)
        if "SERVICE_DISABLED" in text or "has not been used" in text:
            fix = f"gcloud services enable tpu.googleapis.com --project {cfg.project}"
        elif isinstance(err, gexc.Forbidden | gexc.Unauthorized):
            fix = "check the project and that your account may use Cloud TPU (roles/tpu.admin)"
        else:
            fix = "check project and zone"
        return [
            Check(
                f"{name}: Cloud TPU API",
                FAIL,
                str(api_error(err, f"list accelerator types in {parent}")),
                fix,
            )
        ]
    except (GrpoctlError, OSError, ValueError) as err:  # no route, a bad endpoint
        return [
            Check(f"{name}: Cloud TPU API", FAIL, f"unreachable: {err}", "check the network / api_endpoint")
        ]
    out = [Check(f"{name}: Cloud TPU API", OK, f"reachable and enabled ({parent})")]
    if cfg.accelerator_type in offered:
        out.append(Check(f"{name}: accelerator", OK, f"{cfg.accelerator_type} offered in {cfg.zone}"))
    else:
        listing = ", ".join(offered[:12]) + (" ..." if len(offered) > 12 else "") or "none"
        out.append(
            Check(
                f"{name}: accelerator",
                FAIL,
                f"{cfg.accelerator_type} not offered in {cfg.zone}",
                f"pick one of: {listing} (or another zone)",
            )
        )
    return out


def check_preflight(name: str, cfg: TpuTargetConfig) -> Check:
    """libtpu for the preflight (compiling a run for the chip here, before a node is paid for)."""
    from orchestrator import preflight as pf

    try:
        reason = pf.probe().unavailable_reason()
    except pf.PreflightUnavailable as err:
        reason = str(err)
    if reason:
        return Check(f"{name}: preflight", WARN, reason, "runs go on without it (the run itself finds out)")
    return Check(f"{name}: preflight", OK, f"can compile for {cfg.accelerator_type} here (libtpu)")


def check_target(name: str, cfg: TargetConfig, *, api: bool = True) -> list[Check]:
    if isinstance(cfg, LocalTargetConfig):
        return check_local(name, cfg)
    if isinstance(cfg, SshTargetConfig):
        return check_ssh(name, cfg)
    return [*check_tpu(name, cfg, api=api), *([check_preflight(name, cfg)] if api else [])]


# ------------------------------------------------------------------------------------------------- runs


def doctor(
    config_file: str | None = None,
    target: str | None = None,
    *,
    env_file: str = ".env",
    configs: Sequence[str] = (),
) -> list[Check]:
    """Every check, in order: the laptop, the config, the `.env`, then each target (or just `target`)."""
    checks = [check_python(), check_version(), check_git()]
    cfg, loaded = load(config_file)
    checks.append(loaded)
    checks.append(check_env_file(env_file, [(c, {}, {}) for c in configs]))
    if cfg is None:
        return checks
    try:
        chosen = [cfg.target(target)] if target else list(cfg.targets.items())
    except UsageError as err:
        return [*checks, Check("target", FAIL, str(err), "pass a --target the config defines")]
    if any(t.kind != "local" for _, t in chosen):
        checks.append(check_repo(cfg))
    for name, target_cfg in chosen:
        checks += check_target(name, target_cfg)
    return checks


def before_up(
    targets: Mapping[str, TargetConfig],
    cfg: GrpoctlConfig,
    *,
    env_files: Sequence[tuple[str, bool]],
    runs: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]],
    syncs_remote: bool,
    reach: bool = True,
) -> list[Check]:
    """The cheap checks an SOP's steps need, run before its `up` (`sop replay`): the `.env` files it pushes
    (with what its runs need), a repo a VM can clone when it syncs a remote target, a configured SSH key,
    the local target's tools and jax. No cloud API call: `up` finds missing credentials at no cost."""
    checks = []
    for file, optional in env_files:
        check = check_env_file(file, runs)
        if check.status == WARN and not Path(file).is_file():
            if optional:  # an optional file that is absent: nothing to say
                continue
            check = Check(
                ".env",
                FAIL,
                f"no {file}: the SOP's env_push step pushes it",
                f"create {file} (KEY=VALUE lines), or make the step `env_push: {{optional: true}}`",
            )
        checks.append(check)
    if syncs_remote:
        checks.append(check_repo(cfg, reach=reach, local_path=WARN))
    for name, target in targets.items():
        if isinstance(target, LocalTargetConfig) and runs:
            checks += check_local(name, target)
        elif isinstance(target, SshTargetConfig) and target.ssh_key:
            checks += check_ssh(name, target)
    return checks


def failed(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.status == FAIL]


def to_json(checks: Sequence[Check]) -> dict[str, Any]:
    return {"ok": not failed(checks), "version": version(), "checks": [asdict(c) for c in checks]}
