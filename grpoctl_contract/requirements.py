"""The requirements of some extras of pyproject.toml, without the package's own base dependencies.

A worker needs the trainer, not the laptop stack (typer, paramiko, google-cloud-tpu, matplotlib) that the
base install pulls in. `sync` therefore installs the checkout with `pip install --no-deps -e .` and then
the list this module prints: `python -m grpoctl_contract.requirements trainer,tpu` from the checkout, with
any python >= 3.11 and nothing installed (tomllib is stdlib). pyproject.toml stays the one place where
the dependencies are declared.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_SELF = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*\[([^\]]*)\]\s*$")  # `grpoctl[test]`: another extra of ours


def extra_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The requirement strings of `extras`, self-references (`grpoctl[test]`) expanded, each once."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    declared: dict[str, list[str]] = project.get("optional-dependencies", {})
    name = project["name"].lower()
    out: list[str] = []
    seen: set[str] = set()

    def add(extra: str) -> None:
        if extra in seen:
            return
        if extra not in declared:
            raise ValueError(f"no extra {extra!r} in {pyproject} (known: {', '.join(sorted(declared))})")
        seen.add(extra)
        for req in declared[extra]:
            m = _SELF.match(req)
            if m and m.group(1).lower() == name:
                for inner in m.group(2).split(","):
                    add(inner.strip())
            elif req not in out:
                out.append(req)

    for extra in extras:
        add(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", help="comma-separated extras, e.g. trainer,tpu")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--out", type=Path, help="write the list here instead of stdout")
    args = parser.parse_args(argv)
    try:
        reqs = extra_requirements(args.pyproject, [e for e in args.extras.split(",") if e])
    except (OSError, ValueError, KeyError) as exc:
        print(f"requirements: {exc}", file=sys.stderr)
        return 2
    text = "".join(r + "\n" for r in reqs)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
