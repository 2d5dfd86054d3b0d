"""`grpoctl init`: a commented grpoctl.yaml to start from. It always keeps the `local` target (this
machine plays the VM: the demo), adds a `tpu` target when a project is given, and never overwrites a file.
The text is checked with the real config model before it is written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.config import DEFAULT_CONFIG_NAME, parse_config, safe_yaml
from orchestrator.errors import UsageError

DEFAULT_ZONE = "us-east1-d"
DEFAULT_ACCELERATOR = "v6e-8"


@dataclass(frozen=True)
class Answers:
    project: str | None = None  # None: only the local target (a TPU target can be added later)
    zone: str = DEFAULT_ZONE
    accelerator: str = DEFAULT_ACCELERATOR
    repo_url: str | None = None  # None: origin of the current checkout
    name: str | None = None  # the TPU node's name; default grpoctl-<accelerator>
    api_endpoint: str | None = None  # a private/regional Cloud TPU endpoint (or a local proxy)


def _q(value: str) -> str:
    """A YAML scalar, quoted only when it needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def render(a: Answers) -> str:
    repo = f"  url: {_q(a.repo_url)}" if a.repo_url else "  # url: https://github.com/you/grpoctl.git"
    lines = [
        "# grpoctl.yaml: where grpoctl runs the trainer (docs: README.md, docs/).",
        "# Check it with `grpoctl doctor`; every key is declared in orchestrator/config.py.",
        "",
        "repo:",
        "  # What the workers clone (they cannot reach a path on this laptop). Default: this checkout's",
        "  # `origin`; the local target clones this checkout itself.",
        repo,
        "  # branch: main              # default: the current branch",
        "  remote_dir: ~/grpoctl-work  # the checkout on each remote worker",
        "",
        "targets:",
        "  # This machine plays the VM (CPU, the tiny configs): `grpoctl --target local ...`, `make demo`.",
        "  local:",
        "    kind: local",
        "    workdir: .grpoctl/local   # the checkout, logs and runs live here",
    ]
    if a.project:
        name = a.name or f"grpoctl-{a.accelerator}"
        lines += [
            "",
            "  # A Cloud TPU VM, created by `grpoctl up` and deleted by `grpoctl down`.",
            "  tpu:",
            "    kind: tpu",
            f"    project: {_q(a.project)}",
            f"    zone: {_q(a.zone)}",
            f"    name: {_q(name)}          # the node's name in the project",
            f"    accelerator_type: {_q(a.accelerator)}",
            "    spot: true                # cheaper; may be preempted (`run --recover` relaunches)",
            "    # queued: true            # provision through a queued resource",
        ]
        if a.api_endpoint:
            lines.append(f"    api_endpoint: {_q(a.api_endpoint)}")
        lines += ["", "default_target: tpu         # `--target local` picks the other one"]
    else:
        lines += [
            "",
            "  # A Cloud TPU VM (`grpoctl init --project P` writes this for you):",
            "  # tpu:",
            "  #   kind: tpu",
            "  #   project: my-gcp-project",
            f"  #   zone: {DEFAULT_ZONE}",
            f"  #   name: grpoctl-{DEFAULT_ACCELERATOR}",
            f"  #   accelerator_type: {DEFAULT_ACCELERATOR}",
            "",
            "default_target: local",
        ]
    return "\n".join(lines) + "\n"


def write(a: Answers, path: str | os.PathLike[str] = DEFAULT_CONFIG_NAME) -> Path:
    """Write the file; refuse (UsageError, nothing written) when one is already there."""
    target = Path(path)
    text = render(a)
    parse_config(safe_yaml(text, str(target)), str(target))  # a bad zone or name fails here, naming the key
    try:
        with open(target, "x", encoding="utf-8", newline="\n") as fh:  # "x": never overwrite
            fh.write(text)
    except FileExistsError:
        raise UsageError(
            f"{target} already exists: edit it, or move it away and run `grpoctl init` again"
        ) from None
    return target
