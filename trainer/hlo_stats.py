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
    computations, entry = _split_computations(hlo_text)
    if entry is None:
        return {}
    counts = _counts(computations, entry, unbounded_loops_only)
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


def _counts(computations: dict[str, list[str]], entry: str, unbounded_loops_only: bool) -> dict[str, int]:
    """{computation: times it runs per execution of the module} (see `collective_bytes`)."""
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
    return dict(counts)


# ---------------------------------------------------------------------------------------------------------
# Where a compiled program's HBM bytes go, instruction by instruction (for BENCHMARKS.md's breakdowns).
#
# XLA's cost analysis gives one total; to see which instruction reads what, this reads the compiled text:
# every top-level instruction of a non-fused computation (a fusion, a copy, a custom call, a collective)
# moves its operands and results, sized by their shapes, times how often its computation runs. Arrays
# whose layout names another memory space (`S(1)` VMEM, `S(2)`/`S(6)` flags and scalars) are on-chip and
# counted apart. Two fusion forms are counted as XLA's cost analysis counts them: an operand that the fused
# computation only dynamic-slices reads just the slices, and a fused dynamic-update-slice into an operand
# (in place) reads and writes just the update.

_NAMED = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<result>.*?)\s(?P<op>[a-z][\w\-]*)\(")
_SPACED = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](?:\{[^}]*?(?:S\((\d+)\))?\})?")
_NO_TRAFFIC = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
    "partition-id", "replica-id", "after-all", "opt-barrier", "iota",
}  # fmt: skip
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def spaced_bytes(text: str) -> tuple[int, int]:
    """(HBM bytes, on-chip bytes) of the array shapes written in `text`."""
    hbm = chip = 0
    for dtype, dims, space in _SPACED.findall(text):
        if dtype not in _BYTES:
            continue
        n = _BYTES[dtype]
        for d in filter(None, dims.split(",")):
            n *= int(d)
        if space and space != "0":
            chip += n
        else:
            hbm += n
    return hbm, chip


def _split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith(" "):
                current = m.group(1)
                computations[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        computations[current].append(line)
    return computations, entry


def _fusion_access(
    computations: dict[str, list[str]], name: str, memo: dict[str, tuple[dict[int, int], dict[int, int]]]
) -> tuple[dict[int, int], dict[int, int]]:
    """For a fused computation: {parameter index: HBM bytes read} for parameters only dynamic-sliced (here
    or in a nested fusion), and {parameter index: bytes of the update} for parameters updated in place by
    a dynamic-update-slice."""
    if name in memo:
        return memo[name]
    memo[name] = ({}, {})  # guards against a malformed, cyclic text
    params: dict[str, int] = {}
    shapes: dict[str, str] = {}
    uses: dict[str, list[tuple[str, int, str, list[str], str]]] = defaultdict(list)
    for line in computations.get(name, []):
        m = _NAMED.match(line)
        if not m:
            continue
        shapes[m.group("name")] = m.group("result")
        if m.group("op") == "parameter":
            idx = re.search(r"parameter\((\d+)\)", line)
            params[m.group("name")] = int(idx.group(1)) if idx else -1
            continue
        names = re.findall(r"%([\w.\-]+)", _operands(line, m.end() - 1))
        called = re.search(r"\bcalls=%?([\w.\-]+)", line)
        for pos, operand in enumerate(names):
            uses[operand].append((m.group("op"), pos, m.group("name"), names, called.group(1) if called else ""))
    sliced: dict[int, int] = {}
    in_place: dict[int, int] = {}
    for param, index in params.items():
        read = 0
        for op, pos, user, operands, callee in uses.get(param, []):
            if op == "dynamic-slice" and pos == 0:  # the slice is read, wherever it is written
                read += sum(spaced_bytes(shapes[user]))
            elif op == "fusion" and pos in _fusion_access(computations, callee, memo)[0]:
                read += _fusion_access(computations, callee, memo)[0][pos]
            else:
                read = -1
                break
        if uses.get(param) and read >= 0:
            sliced[index] = read
        for op, pos, _, operands, _ in uses.get(param, []):
            if op == "dynamic-update-slice" and pos == 0 and len(operands) > 1:
                in_place[index] = sum(spaced_bytes(shapes.get(operands[1], "")))
    memo[name] = (sliced, in_place)
    return memo[name]


def hbm_traffic(hlo_text: str, unbounded_loops_only: bool = False) -> list[dict[str, object]]:
    """One row per top-level instruction that moves HBM bytes: {computation, name, op, count, hbm_bytes
    (per execution of the instruction), chip_bytes, source (the JAX op it came from)}; `count` is how
    often it runs per execution of the module (see `collective_bytes` for loops and
    `unbounded_loops_only`)."""
    computations, entry = _split_computations(hlo_text)
    if entry is None:
        return []
    counts = _counts(computations, entry, unbounded_loops_only)
    # Fused computations and reducers run inside their caller's kernel: their caller's line is the traffic.
    inner = set(re.findall(r"\bto_apply=%?([\w.\-]+)", hlo_text))
    inner |= set(re.findall(r"\sfusion\(.*?\bcalls=%?([\w.\-]+)", hlo_text))
    fused_access: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
    rows: list[dict[str, object]] = []
    for comp, lines in computations.items():
        if not counts.get(comp) or comp in inner:
            continue
        shapes = {}
        for line in lines:
            m = _NAMED.match(line)
            if m:
                shapes[m.group("name")] = m.group("result")
        for line in lines:
            m = _NAMED.match(line)
            if not m or m.group("op") in _NO_TRAFFIC or m.group("op").endswith("-done"):
                continue
            op = m.group("op")
            names = re.findall(r"%([\w.\-]+)", _operands(line, m.end() - 1))
            reads = [spaced_bytes(shapes.get(n, "")) for n in names]
            out_hbm, out_chip = spaced_bytes(m.group("result"))
            if op == "fusion":
                called = re.search(r"\bcalls=%?([\w.\-]+)", line)
                sliced, in_place = _fusion_access(computations, called.group(1), fused_access) if called else ({}, {})
                for i, (hbm, chip) in enumerate(reads):
                    if i in in_place:
                        out_hbm -= min(hbm, out_hbm) if hbm else 0
                        reads[i] = (in_place[i] if hbm else 0, 0 if hbm else in_place[i])
                    elif i in sliced and hbm:
                        reads[i] = (min(sliced[i], hbm), chip)
                if in_place:
                    out_hbm += sum(in_place.values())
            if op == "dynamic-update-slice":  # in place: reads and writes the update alone
                reads, out_hbm = reads[1:2], reads[1][0] if len(reads) > 1 else 0
            if op == "dynamic-slice":  # reads the slice alone
                reads = [(out_hbm, 0)]
            if op.endswith("-start"):  # an async pair's -start returns its operands with its results
                in_hbm = sum(r[0] for r in reads)
                out_hbm = max(out_hbm - in_hbm, 0)
            source = _OP_NAME.search(line)
            rows.append({
                "computation": comp, "name": m.group("name"), "op": op, "count": counts[comp],
                "hbm_bytes": sum(r[0] for r in reads) + out_hbm,
                "chip_bytes": sum(r[1] for r in reads) + out_chip,
                "source": source.group(1) if source else "",
            })
    return rows
