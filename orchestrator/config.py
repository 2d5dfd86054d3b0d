"""`grpoctl.yaml`: the laptop-side configuration, declared once, typed and validated.

Lookup order: `--config-file`, then `$GRPOCTL_CONFIG`, then `./grpoctl.yaml`; with none of them the
embedded default applies (one `local` target: this machine plays the VM).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from grpoctl_contract.accelerators import parse_slice
from orchestrator.errors import UsageError

CONFIG_ENV = "GRPOCTL_CONFIG"
TARGET_ENV = "GRPOCTL_TARGET"
DEFAULT_CONFIG_NAME = "grpoctl.yaml"


# The Cloud TPU API's rules for node / queued-resource ids and for labels: checked here, before any call.
TPU_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RepoConfig(_Strict):
    url: str | None = None  # default: `git remote get-url origin` of the current repo
    branch: str | None = None  # default: the current branch
    remote_dir: str = "~/grpoctl-work"  # the checkout on each worker


class LocalTargetConfig(_Strict):
    kind: Literal["local"] = "local"
    workdir: str = ".grpoctl/local"  # plays the worker's home: checkout, logs and runs live here
    python: str | None = None  # an interpreter to use instead of bootstrapping a venv


class SshTargetConfig(_Strict):
    kind: Literal["ssh"]
    hosts: list[str] = Field(min_length=1)  # "host" or "host:port", one per worker, in worker order
    user: str = "root"
    ssh_key: str | None = None  # private key file; default: ssh-agent / ~/.ssh/id_*
    host_key_sha256: list[str] = []  # pinned "SHA256:..." fingerprints (one for all, or one per host)
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts
    accept_new_host_key: bool = False  # trust-on-first-use; off unless asked for
    python: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("hosts")
    @classmethod
    def _hosts_shape(cls, v: list[str]) -> list[str]:
        from orchestrator.targets.topology import parse_host  # the package imports this module

        for spec in v:  # "host:port" with a port in 1..65535, checked here so the error names the key
            try:
                parse_host(spec)
            except UsageError as err:
                raise ValueError(str(err)) from None
        return v


class TpuTargetConfig(_Strict):
    kind: Literal["tpu"]
    project: str
    zone: str
    name: str
    accelerator_type: str = "v6e-8"
    runtime_version: str = "v2-alpha-tpuv6e"
    # true, false, or "prefer": spot first (in every zone), on-demand when spot has no capacity (or, with
    # queued, after spot_wait_s of waiting for it)
    spot: bool | Literal["prefer"] = True
    spot_wait_s: float = Field(default=600.0, gt=0)
    # More zones, tried in order after `zone` when a create finds no capacity there (a stockout)
    zones: list[str] = []
    queued: bool = False  # provision through a queued resource (spot) instead of a plain node
    # queued resource: give up waiting after this many seconds
    valid_until_s: int | None = Field(default=None, gt=0)
    labels: dict[str, str] = {}
    internal_ip: bool = False
    user: str = "root"
    ssh_key: str = "~/.ssh/grpoctl_ed25519"  # created when missing
    host_key_sha256: list[str] = []  # pins; default: read from the node's guest attributes
    # A private or regional Cloud TPU API endpoint (default: Google's public one). A plain `http://` one is
    # a local proxy and gets anonymous credentials.
    api_endpoint: str | None = None
    python: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)
    ssh_port: int = Field(default=22, ge=1, lt=65536)  # the workers' sshd port
    # give up (and delete what `up` created) after this long
    up_timeout_s: float = Field(default=1800.0, gt=0)
    # keep retrying SSH auth this long while a new key propagates
    auth_retry_s: float = Field(default=60.0, ge=0)
    poll_s: float = Field(default=5.0, gt=0)  # API polling interval while waiting
    # A node grpoctl created deletes itself after this long without a grpoctl job (0 = never; nodes
    # grpoctl did not create never do): grpoctl_contract/watchdog.py, started by `up`.
    autodelete_after_idle_s: float = Field(default=1800.0, ge=0)

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not TPU_NAME_RE.match(v):
            raise ValueError(
                f"{v!r} is not a valid TPU name: 1-63 lowercase letters, digits and hyphens, starting with a "
                "letter and not ending with a hyphen"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _labels_shape(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
                raise ValueError(
                    f"label {key}={value!r}: keys and values are at most 63 lowercase letters, digits, "
                    "_ and -, keys start with a letter"
                )
        return v

    @field_validator("accelerator_type")
    @classmethod
    def _known_accelerator(cls, v: str) -> str:
        # The one accelerator table decides, before anything is created: a slice the trainer's preflight
        # cannot compile for (v2/v3, a size no slice has) is refused here with the same words.
        parse_slice(v)  # AcceleratorError is a ValueError: pydantic reports it under the key
        return v

    @field_validator("zone")
    @classmethod
    def _zone_shape(cls, v: str) -> str:
        parts = v.split("-")
        if len(parts) != 3 or not parts[2] or not all(p.isalnum() for p in parts):
            raise ValueError(f"zone {v!r} is not of the form region-name-zone, e.g. us-east1-d")
        return v

    @field_validator("zones")
    @classmethod
    def _zones_shape(cls, v: list[str]) -> list[str]:
        for zone in v:
            cls._zone_shape(zone)
        return v

    def all_zones(self) -> list[str]:
        """`zone`, then `zones` in order (once each): where `up` looks for capacity."""
        return list(dict.fromkeys([self.zone, *self.zones]))


class PriceConfig(_Strict):
    """USD per chip-hour (per host for `host`: local and ssh targets), for the ledger's cost estimate."""

    on_demand: float | None = Field(default=None, ge=0)
    spot: float | None = Field(default=None, ge=0)


class NotifyConfig(_Strict):
    """Where run events go (orchestrator/notify.py). The webhook URL is a secret: in the file as `webhook`,
    or named by `webhook_env` (an environment variable holding it) to keep it out of the file."""

    webhook: SecretStr | None = None  # Slack-compatible incoming webhook: POST {"text": ...}
    webhook_env: str | None = None
    command: str | None = None  # run by the shell; the message as JSON on stdin and in GRPOCTL_MESSAGE
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("webhook")
    @classmethod
    def _webhook_shape(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL (its value is not shown: it is a secret)")
        return v


TargetConfig = Annotated[
    LocalTargetConfig | SshTargetConfig | TpuTargetConfig, Field(discriminator="kind")
]


class GrpoctlConfig(_Strict):
    repo: RepoConfig = RepoConfig()
    targets: dict[str, TargetConfig] = {"local": LocalTargetConfig()}
    # Without it: the only target of the file, else `local` when there is one (see `target`).
    default_target: str | None = None
    # A RUNNING job whose log has not grown for this long shows as STALLED (stopped, hung, deadlocked).
    # The first step of a big model compiles for minutes without a word: keep it well above that.
    stall_after_s: float = Field(default=1800.0, gt=0)
    # Per accelerator family (v6e, v5e, v5p, v4; `host` for local/ssh targets): replaces the ledger's list
    # prices (orchestrator/ledger.py) in cost estimates.
    prices: dict[str, PriceConfig] = {}
    notify: NotifyConfig | None = None
    source: str = "<embedded default>"  # where this config came from (not a YAML key)

    def target(self, name: str | None = None) -> tuple[str, TargetConfig]:
        """The target `name`, else `$GRPOCTL_TARGET`, else `default_target`. An explicit name never looks
        at `default_target`, so a stale default does not get in the way of `--target`."""
        chosen = name or os.environ.get(TARGET_ENV)
        known = ", ".join(sorted(self.targets)) or "none"
        if not chosen:
            chosen = self.default_target or ("local" if "local" in self.targets else None)
            if chosen is None:
                raise UsageError(
                    f"{self.source}: {len(self.targets)} targets and no default_target: pass --target NAME "
                    f"(known: {known})"
                )
            if chosen not in self.targets:
                raise UsageError(
                    f"{self.source}: default_target {chosen!r} is not one of the targets (known: {known})"
                )
        if chosen == "local" and chosen not in self.targets:  # this machine is always a target
            return chosen, LocalTargetConfig()
        if chosen not in self.targets:
            raise UsageError(f"unknown target {chosen!r} (known: {known}) in {self.source}")
        return chosen, self.targets[chosen]


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    if first["type"] == "missing":
        return f"{source}: missing required key {key!r}"
    return f"{source}: {key}: {first['msg'].removeprefix('Value error, ')}"


def parse_config(data: Any, source: str) -> GrpoctlConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if "source" in data:
        raise UsageError(f"{source}: unknown key 'source'")
    try:
        cfg = GrpoctlConfig.model_validate({**data, "source": source})
    except ValidationError as err:
        raise UsageError(_format_validation_error(err, source)) from None
    if cfg.default_target is None and len(cfg.targets) == 1:  # one target: it is the default
        cfg = cfg.model_copy(update={"default_target": next(iter(cfg.targets))})
    return cfg


def read_text_utf8(path: Path) -> str:
    """A text file the user wrote (config, SOP); bytes that are not UTF-8 are a one-line usage error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UsageError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None


# A YAML file grpoctl reads (grpoctl.yaml, an SOP) expands to at most this many values once its aliases are
# followed: a "billion laughs" file (aliases of aliases) is refused in one line instead of filling memory.
YAML_MAX_NODES = 100_000


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that counts the values its aliases expand to while it composes the document."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.expanded: dict[int, int] = {}  # node id -> values it stands for, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        node = super().compose_node(parent, index)  # an alias returns the anchored node again
        self._size(node)
        return node

    def _size(self, node: yaml.Node) -> int:
        key = id(node)
        if key not in self.expanded:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self.expanded.get(id(k), 1) + self.expanded.get(id(v), 1)
                               for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self.expanded.get(id(v), 1) for v in node.value)
            else:
                size = 1
            self.expanded[key] = size
            if size > YAML_MAX_NODES:
                raise yaml.YAMLError(f"expands to more than {YAML_MAX_NODES} values (aliases of aliases?)")
        return self.expanded[key]


def safe_yaml(text: str, source: str) -> Any:
    """THE YAML reader for files grpoctl reads: safe tags only, aliases limited (YAML_MAX_NODES), nesting
    limited; anything else is one UsageError line naming the file."""
    try:
        return yaml.load(text, Loader=_CountingLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = "" if mark is not None else f": {err}"
        raise UsageError(f"{source}:{where} malformed YAML{problem}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> GrpoctlConfig:
    """Load and validate the config; raise `UsageError` with one line naming the key and file."""
    explicit = path or os.environ.get(CONFIG_ENV)
    if explicit:
        file = Path(explicit).expanduser()
        if not file.is_file():
            raise UsageError(f"config file {str(file)!r} not found")
    else:
        file = Path(DEFAULT_CONFIG_NAME)
        if not file.is_file():
            return GrpoctlConfig()
    return parse_config(safe_yaml(read_text_utf8(file), str(file)), str(file))
