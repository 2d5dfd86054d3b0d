"""The docs a maintainer keeps true: ARCHITECTURE.md's module map against the tree, links inside the repo."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "grpoctl_contract", "trainer", "grpoctl_testing")
_ENTRY = re.compile(r"^( *)(\S+?)(?: {2,}(.*))?$")


@dataclass
class Entry:
    path: str  # "orchestrator/ops/", "trainer/model.py"
    text: list[str] = field(default_factory=list)  # its description, continuation lines included


def module_map() -> dict[str, Entry]:
    """The entries of ARCHITECTURE.md's first code block: `name` at indent 0 or 2 (a folder ends in /),
    a description after two spaces, continuation lines indented further."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = doc.split("```", 2)[1].splitlines()[1:]
    entries: dict[str, Entry] = {}
    top = ""
    last: Entry | None = None
    for line in block:
        m = _ENTRY.match(line)
        indent = len(line) - len(line.lstrip(" "))
        if m is not None and indent == 0:
            top = m.group(2)
            last = entries.setdefault(top, Entry(top))
            last.text.append(m.group(3) or "")
        elif m is not None and indent == 2 and m.group(2).endswith((".py", "/")):
            last = entries.setdefault(top + m.group(2), Entry(top + m.group(2)))
            last.text.append(m.group(3) or "")
        elif line.strip() and last is not None:  # a continuation line of the last entry
            last.text.append(line.strip())
    return entries


def _modules(package: str) -> list[Path]:
    return sorted(
        p for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py" and "__pycache__" not in p.parts
    )


def test_every_module_is_in_the_map_and_every_entry_exists() -> None:
    entries = module_map()
    missing = []
    for package in PACKAGES:
        for path in _modules(package):
            rel = path.relative_to(ROOT).as_posix()
            parts = rel.split("/")
            if len(parts) == 2:  # package/module.py: an entry of its own
                if rel not in entries:
                    missing.append(rel)
                continue
            folder = "/".join(parts[:2]) + "/"  # package/sub/...: named in the sub-folder's entry
            entry = entries.get(folder)
            said = " ".join(entry.text) if entry else ""
            if entry is None or not re.search(rf"\b{re.escape(path.stem)}\b", said):
                missing.append(rel)
    assert not missing, f"modules missing from docs/ARCHITECTURE.md's map: {missing}"
    gone = [e for e in entries if not (ROOT / e.rstrip("/")).exists()]
    assert not gone, f"docs/ARCHITECTURE.md names what the tree does not have: {gone}"


def test_docs_link_only_inside_the_repo() -> None:
    docs = [ROOT / "README.md", ROOT / "TESTING.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]
    outside = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (doc.parent / target).resolve()
            if ROOT not in resolved.parents or not resolved.exists():
                outside.append(f"{doc.name}: {target}")
    assert not outside, f"links that leave the repo or point nowhere: {outside}"
