"""Bytes moved by collectives in a compiled (SPMD-partitioned) HLO module, per chip and by kind.

XLA's cost analysis reports flops and HBM bytes but nothing about the inter-chip links, and a decode step
that gathers its KV cache looks as cheap there as one that does not. So the preflight reads the compiled
program's text: every all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute (sync, or
the `-start` half of an async pair), sized by its operands and results. After partitioning, the shapes in
the text are one chip's shards, so the figures are per chip.

An instruction inside a loop body runs once per iteration: a computation's count is the sum over its call
sites of the caller's count, times the trip count for a while body (`known_trip_count` in its backend
config, or read from a condition of the counted form `i < N`; 1 when the condition depends on data, as
the sampler's decode loop does: the figure is then per iteration).
"""

from __future__ import annotations

import re
from collections import defaultdict

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
    "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.*?)\s(?P<op>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*[su]\d+\[\]\S*\s+constant\((\d+)\)")
_ROOT_LT = re.compile(r"^\s*ROOT\s+%?[\w.\-]+\s*=\s*pred\[\]\S*\s+compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),"
                      r"\s*direction=LT")


def _counted_loop(lines: list[str]) -> int | None:
    """The trip count of a while condition of XLA's counted form, `ROOT compare(i, constant N), LT` (a
    compiled TPU module keeps no known_trip_count; scans and windowed einsums have this form), else None:
    a data-dependent condition such as the sampler's "steps left and some row not done"."""
    constants = {}
    for line in lines:
        m = _CONSTANT.match(line)
        if m:
            constants[m.group(1)] = int(m.group(2))
    for line in lines:
        m = _ROOT_LT.match(line)
        if m and m.group(2) in constants:
            return constants[m.group(2)]
    return None


def array_bytes(text: str) -> int:
    """Total bytes of every `dtype[dims]` array shape written in `text` (tokens and tuples count 0)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def _operands(line: str, open_at: int) -> str:
    """The text between the parenthesis at `open_at` and its match."""
    depth = 0
    for i in range(open_at, len(line)):
        if line[i] == "(":
            depth += 1
        elif line[i] == ")":
            depth -= 1
            if depth == 0:
                return line[open_at + 1 : i]
    return line[open_at + 1 :]


def collective_bytes(hlo_text: str, unbounded_loops_only: bool = False) -> dict[str, int]:
    """{kind: bytes per chip per execution of the module} for every kind that occurs.

    `unbounded_loops_only`: count only what runs inside a while loop whose trip count XLA does not know,
    once per iteration: in the whole sampler's program that is one step of its decode loop (which stops
    when every row is done), so a decode step can be measured inside the program that really runs it.

    One collective's bytes: the larger of its operands and its results (an all-gather's result, a
    reduce-scatter's operand, an all-reduce's either). The `-start` of an async pair returns its operands
    along with its results, so there the results are what exceeds the operands."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith(" "):
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        computations[current].append(line)
    if entry is None:
        return {}

    # Call graph: caller -> [(callee, times per call, whether it enters a loop of unknown trip count)].
    edges: dict[str, list[tuple[str, int, bool]]] = defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            known = _TRIP.search(line)
            trip = int(known.group(1)) if known else None
            if trip is None and " while(" in line:
                cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
                trip = _counted_loop(computations.get(cond.group(1), [])) if cond else None
            for role, callee in _CALLS.findall(line):
                loop = role in ("body", "condition")
                times = trip if loop and trip is not None else 1
                edges[name].append((callee, times, loop and trip is None))
            for group in _BRANCHES.findall(line):
                for callee in filter(None, (c.strip().lstrip("%") for c in group.split(","))):
                    edges[name].append((callee, 1, False))
    counts: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int, unbounded: bool, depth: int = 0) -> None:
        if depth > 64:  # HLO call graphs are acyclic; this only guards against a malformed text
            return
        if unbounded or not unbounded_loops_only:
            counts[name] += times
        for callee, k, enters in edges.get(name, ()):
            visit(callee, times * k, unbounded or enters, depth + 1)

    visit(entry, 1, False)
    out: dict[str, int] = defaultdict(int)
    for name, lines in computations.items():
        if not counts.get(name):
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            operands = array_bytes(_operands(line, m.end() - 1))
            result = array_bytes(m.group("result"))
            if m.group("start"):
                result = max(result - operands, 0)
            out[m.group("op")] += max(operands, result) * counts[name]
    return dict(out)
