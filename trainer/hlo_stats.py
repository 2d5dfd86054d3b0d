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
from typing import NamedTuple

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
_ROOT_LT = re.compile(
    r"^\s*ROOT\s+%?[\w.\-]+\s*=\s*pred\[\]\S*\s+compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),"
    r"\s*direction=LT"
)


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
    """(HBM bytes, on-chip bytes) of the array shapes written in `text` (scalars live on chip)."""
    hbm = chip = 0
    for dtype, dims, space in _SPACED.findall(text):
        if dtype not in _BYTES:
            continue
        n = _BYTES[dtype]
        for d in filter(None, dims.split(",")):
            n *= int(d)
        if (space and space != "0") or not dims:
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


class Traffic(NamedTuple):
    """One top-level instruction of a compiled program and the bytes it moves per execution."""

    computation: str
    name: str
    op: str
    count: int  # executions per execution of the module (loop trip counts multiplied in)
    hbm_bytes: int
    chip_bytes: int  # operands/results in on-chip memory (VMEM, SMEM, sync flags)
    source: str  # the JAX op it came from (metadata op_name), "" when the compiler made it


def _instructions(lines: list[str]) -> list[tuple[str, str, str, list[str], str]]:
    """(name, result text, op, operand names, whole line) of each instruction of a computation."""
    out = []
    for line in lines:
        m = _NAMED.match(line)
        if m:
            operands = re.findall(r"%([\w.\-]+)", _operands(line, m.end() - 1))
            out.append((m.group("name"), m.group("result"), m.group("op"), operands, line))
    return out


def _fusion_access(
    computations: dict[str, list[str]], name: str, memo: dict[str, tuple[dict[int, int], dict[int, int]]]
) -> tuple[dict[int, int], dict[int, int]]:
    """For a fused computation: {parameter index: bytes read} for parameters only sliced or gathered from
    (here or in a nested fusion), and {parameter index: bytes of the update} for parameters a
    dynamic-update-slice updates in place."""
    if name in memo:
        return memo[name]
    memo[name] = ({}, {})  # guards against a malformed, cyclic text
    instructions = _instructions(computations.get(name, []))
    shapes = {n: result for n, result, *_ in instructions}
    params = {
        n: int(re.search(r"parameter\((\d+)\)", line).group(1))
        for n, _, op, _, line in instructions
        if op == "parameter" and re.search(r"parameter\((\d+)\)", line)
    }
    uses: dict[str, list[tuple[str, int, str, list[str], str]]] = defaultdict(list)
    for n, _, op, operands, line in instructions:
        callee = re.search(r"\bcalls=%?([\w.\-]+)", line)
        for pos, operand in enumerate(operands):
            uses[operand].append((op, pos, n, operands, callee.group(1) if callee else ""))
    sliced: dict[int, int] = {}
    in_place: dict[int, int] = {}
    for param, index in params.items():
        read = 0
        for op, pos, user, operands, callee in uses.get(param, []):
            nested = _fusion_access(computations, callee, memo)[0] if op == "fusion" else {}
            if op in ("dynamic-slice", "gather") and pos == 0:  # the slice is read, wherever it goes
                read += sum(spaced_bytes(shapes[user]))
            elif pos in nested:
                read += nested[pos]
            elif op == "dynamic-update-slice" and pos == 0 and len(operands) > 1:
                in_place[index] = sum(spaced_bytes(shapes.get(operands[1], "")))
            else:
                read = -1
                break
        if uses.get(param) and read >= 0 and index not in in_place:
            sliced[index] = read
    memo[name] = (sliced, in_place)
    return memo[name]


def hbm_traffic(hlo_text: str, unbounded_loops_only: bool = False) -> list[Traffic]:
    """Every top-level instruction that moves HBM bytes, with how often it runs (see `collective_bytes` for
    loops and `unbounded_loops_only`); sum `hbm_bytes * count` for a program's HBM traffic."""
    computations, entry = _split_computations(hlo_text)
    if entry is None:
        return []
    counts = _counts(computations, entry, unbounded_loops_only)
    # Fused computations and reducers run inside their caller's kernel: their caller's line is the traffic.
    inner = set(re.findall(r"\bto_apply=%?([\w.\-]+)", hlo_text))
    inner |= set(re.findall(r"\sfusion\(.*?\bcalls=%?([\w.\-]+)", hlo_text))
    memo: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
    rows: list[Traffic] = []
    for comp, lines in computations.items():
        if not counts.get(comp) or comp in inner:
            continue
        instructions = _instructions(lines)
        shapes = {n: result for n, result, *_ in instructions}
        for name, result, op, operands, line in instructions:
            if op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            reads = [spaced_bytes(shapes.get(n, "")) for n in operands]
            out_hbm, out_chip = spaced_bytes(result)
            callee = re.search(r"\bcalls=%?([\w.\-]+)", line)
            sliced, in_place = (
                _fusion_access(computations, callee.group(1), memo) if op == "fusion" and callee else ({}, {})
            )
            if op in ("dynamic-slice", "gather"):
                sliced = {0: out_hbm + out_chip}
            elif op == "dynamic-update-slice" and len(reads) > 1:
                in_place = {0: sum(reads[1])}
            for i, (hbm, chip) in enumerate(reads):
                if i in in_place and hbm:  # updated where it lies: only the update is written, nothing read
                    reads[i] = (0, chip)
                    out_hbm = max(out_hbm - hbm, 0) + in_place[i]
                elif i in sliced and hbm:
                    reads[i] = (min(sliced[i], hbm), chip)
            if op.endswith("-start"):  # an async pair's -start returns its operands with its results
                out_hbm = max(out_hbm - sum(r[0] for r in reads), 0)
            moved = sum(r[0] for r in reads) + out_hbm
            if moved:
                source = _OP_NAME.search(line)
                chip = sum(r[1] for r in reads) + out_chip
                label = source.group(1) if source else ""
                rows.append(Traffic(comp, name, op, counts[comp], moved, chip, label))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Matmul flops, every loop trip counted.
#
# XLA's cost analysis counts a while body once, so a layer scan, a micro-batch loop or a decode loop is
# under-counted by its trip count. This reads the compiled text instead: on TPU every matmul is a
# `convolution` (or `dot`), wherever it sits (a fusion, a loop body), and its computation's count says how
# often it runs. flops = 2 x result elements x the contracted size (the kernel's input-feature dim times
# its window). A Pallas kernel (tpu_custom_call) counts what its CostEstimate declares. Elementwise work
# is left out: next to the matmuls of a transformer it is noise, and on the MXU-bound side it overlaps.

_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_CUSTOM_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{[^}]*?"flops"\s*:\s*"?(\d+)')


_WINDOW = re.compile(r"window=\{([^}]*)\}")


def _valid_taps(n: int, size: int, stride: int, lo: int, hi: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Over every output position of one window dim, the taps that land on an input element (not on
    padding, not on a hole of a dilated input): what a convolution's multiply-adds really touch. TPU HLO
    writes batched matmuls as convolutions whose padded, dilated windows mostly hit nothing."""
    dilated = (n - 1) * lhs_dilate + 1
    span = (size - 1) * rhs_dilate + 1
    out = (lo + dilated + hi - span) // stride + 1
    if out * size > 4_000_000:  # never in a transformer; bound the work on a malformed text
        return out * size
    count = 0
    for p in range(max(out, 0)):
        for t in range(size):
            x = p * stride + t * rhs_dilate - lo
            count += 0 <= x < dilated and x % lhs_dilate == 0
    return count


def _conv_flops(line: str, result: str, lhs: list[int], rhs: list[int]) -> float:
    """2 x multiply-adds of one convolution: per output element of the non-window dims, the kernel's input
    features x the valid taps of every window dim."""
    labels = _DIM_LABELS.search(line)
    if not labels or len(labels.group(1)) != len(lhs) or len(labels.group(2)) != len(rhs):
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    out_elems, out_dims = _elements(result)
    if len(out_labels) != len(out_dims):
        return 0.0
    fields: dict[str, str] = {}
    window = _WINDOW.search(line)
    if window:
        fields = dict(kv.split("=", 1) for kv in window.group(1).split() if "=" in kv)
    spatial = sorted(c for c in rhs_labels if c.isdigit())

    def per_dim(key: str, default: int) -> list[int]:
        values = [int(x) for x in fields.get(key, "").split("x") if x]
        return values if len(values) == len(spatial) else [default] * len(spatial)

    sizes = [rhs[rhs_labels.index(c)] for c in spatial]
    strides, lhs_dil, rhs_dil = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pads = [tuple(int(v) for v in x.split("_")) for x in fields.get("pad", "").split("x") if "_" in x]
    pads = pads if len(pads) == len(spatial) else [(0, 0)] * len(spatial)
    macs = float(rhs[rhs_labels.index("i")]) if "i" in rhs_labels else 1.0
    outer = float(out_elems)
    for k, c in enumerate(spatial):
        n = lhs[lhs_labels.index(c)] if c in lhs_labels else 1
        outer /= max(out_dims[out_labels.index(c)], 1) if c in out_labels else 1
        macs *= _valid_taps(n, sizes[k], strides[k], *pads[k], lhs_dil[k], rhs_dil[k])
    return 2.0 * outer * macs


def _elements(shape_text: str) -> tuple[int, list[int]]:
    """(elements, dims) of the first array shape in `shape_text` (0, [] if none)."""
    m = _ARRAY.search(shape_text)
    if not m:
        return 0, []
    dims = [int(d) for d in filter(None, m.group(2).split(","))]
    n = 1
    for d in dims:
        n *= d
    return n, dims


def matmul_flops(hlo_text: str, unbounded_loops_only: bool = False) -> float:
    """Flops of every matmul (and Pallas kernel) in a compiled module, times how often it runs (loop trip
    counts multiplied in; see `collective_bytes` for loops and `unbounded_loops_only`)."""
    computations, entry = _split_computations(hlo_text)
    if entry is None:
        return 0.0
    counts = _counts(computations, entry, unbounded_loops_only)
    total = 0.0
    for comp, lines in computations.items():
        times = counts.get(comp, 0)
        if not times:
            continue
        instructions = _instructions(lines)
        shapes = {n: result for n, result, *_ in instructions}
        for _, result, op, operands, line in instructions:
            if op == "custom-call":
                m = _CUSTOM_FLOPS.search(line)
                total += float(m.group(1)) * times if m else 0.0
                continue
            if op not in ("convolution", "dot") or len(operands) < 2:
                continue
            out, _ = _elements(result)
            if op == "dot":
                _, lhs = _elements(shapes.get(operands[0], ""))
                m = _CONTRACTING.search(line)
                contracted = 1
                for d in filter(None, m.group(1).split(",")) if m else ():
                    contracted *= lhs[int(d)] if int(d) < len(lhs) else 1
            else:
                _, lhs = _elements(shapes.get(operands[0], ""))
                _, rhs = _elements(shapes.get(operands[1], ""))
                total += _conv_flops(line, result, lhs, rhs) * times
                continue
            total += 2.0 * out * contracted * times
    return total
