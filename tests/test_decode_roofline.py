"""The decode-step roofline of the preflight: collective bytes parsed from compiled HLO, and the sampler's
own decode step compiled alone for an abstract v6e-8 (tiny shapes; the 3B figures are in BENCHMARKS.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from grpoctl_contract.accelerators import CHIPS
from trainer import config as C
from trainer import hlo_stats, preflight, programs
from trainer.sampler import _generate, decode_step

# A compiled module in the text form XLA prints, with known sizes: a 36-trip while loop whose body gathers
# 512 KiB and all-reduces (async) 16 KiB; the entry reduce-scatters 64 KiB into 8 KiB, does a 4 KiB
# all-to-all and a collective-permute (async) of 1 KiB; a reduce's to_apply holds no collective.
SNIPPET = """HloModule jit_step, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body.1 (p: (s32[], bf16[16,2048])) -> (s32[], bf16[16,2048]) {
  %p = (s32[], bf16[16,2048]{1,0}) parameter(0)
  %x = bf16[16,2048]{1,0:T(8,128)(2,1)} get-tuple-element((s32[], bf16[16,2048]{1,0}) %p), index=1
  %all-gather.3 = bf16[128,2048]{1,0:T(8,128)} all-gather(bf16[16,2048]{1,0} %x), dimensions={0}
  %y = f32[16,256]{1,0} parameter(1)
  %all-reduce-start.2 = f32[16,256]{1,0} all-reduce-start(f32[16,256]{1,0} %y), channel_id=2, to_apply=%add
  %all-reduce-done.2 = f32[16,256]{1,0} all-reduce-done(f32[16,256]{1,0} %all-reduce-start.2)
  ROOT %t = (s32[], bf16[16,2048]{1,0}) tuple(s32[] %i, bf16[16,2048]{1,0} %x)
}

%cond.1 (p: (s32[], bf16[16,2048])) -> pred[] {
  %p = (s32[], bf16[16,2048]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main.9 (a: bf16[16,2048], b: f32[8,2048]) -> f32[1,2048] {
  %a = bf16[16,2048]{1,0} parameter(0)
  %w = (s32[], bf16[16,2048]) while(%i), condition=%cond.1, body=%body.1,\
 backend_config={"known_trip_count":{"n":"36"}}
  %b = f32[8,2048]{1,0} parameter(1)
  %rs = f32[1,2048]{1,0} reduce-scatter(f32[8,2048]{1,0} %b), channel_id=3, dimensions={0}, to_apply=%add
  %a2a = bf16[8,256]{1,0} all-to-all(bf16[8,256]{1,0} %c), channel_id=4, dimensions={0}
  %cp = (bf16[512]{0}, bf16[512]{0}, u32[], u32[]) collective-permute-start(bf16[512]{0} %d), channel_id=5
  %cpd = bf16[512]{0} collective-permute-done((bf16[512]{0}, bf16[512]{0}, u32[], u32[]) %cp)
  %r = f32[] reduce(f32[8,2048]{1,0} %b, f32[] %z), dimensions={0,1}, to_apply=%add
  ROOT %out = f32[1,2048]{1,0} copy(f32[1,2048]{1,0} %rs)
}
"""


def test_collective_bytes_by_kind_with_loop_trip_counts():
    assert hlo_stats.collective_bytes(SNIPPET) == {
        "all-gather": 36 * 128 * 2048 * 2,  # the result of each of the 36 iterations
        "all-reduce": 36 * 16 * 256 * 4,
        "reduce-scatter": 8 * 2048 * 4,  # the operand
        "all-to-all": 8 * 256 * 2,
        "collective-permute": 1024 + 8,  # the -start tuple less its operand: the result and two u32 flags
    }
    assert hlo_stats.array_bytes("(bf16[2,3]{1,0}, f32[4], token[], s32[])") == 12 + 16 + 4
    # Without a known trip count the loop is the sampler's decode loop: its body alone, once.
    unbounded = SNIPPET.replace(', backend_config={"known_trip_count":{"n":"36"}}', "")
    assert unbounded != SNIPPET
    assert hlo_stats.collective_bytes(unbounded, unbounded_loops_only=True) == {
        "all-gather": 128 * 2048 * 2, "all-reduce": 16 * 256 * 4,
    }
    assert hlo_stats.collective_bytes(SNIPPET, unbounded_loops_only=True) == {}
    # A compiled TPU module keeps no known_trip_count: the count is read from a condition `i < constant`.
    counted = unbounded.replace(
        "  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT",
        "  %n = s32[]{:T(128)} constant(36)\n  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT",
    )
    assert counted != unbounded
    assert hlo_stats.collective_bytes(counted) == hlo_stats.collective_bytes(SNIPPET)
    assert hlo_stats.collective_bytes(counted, unbounded_loops_only=True) == {}
    assert hlo_stats.collective_bytes("no module here") == {}


# A tiny model over the 8 chips of a v6e-8 (mesh auto: fsdp=8), 16 rows, with long rows (a 256-token prompt
# bucket + 256 new tokens) so that, as at 3B, one layer's KV cache outweighs its weights.
SMALL = [
    "rollout.batch_size=4", "rollout.n=4", "rollout.global_length=256", "rollout.max_length_sample=256",
    "train.seq_bucket=512", "train.micro_batch_size=16", "tiny_model.num_hidden_layers=2",
    "tiny_model.hidden_size=128", "tiny_model.intermediate_size=256", "mesh_shape=auto",
]  # fmt: skip
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def decode_report():
    pytest.importorskip("libtpu", reason="libtpu (the dev extra) compiles for TPU on this host")
    cfg = C.load(TINY, SMALL, environ={})
    return cfg, preflight.run(cfg, "v6e-8", only=("prefill", "decode_step"))


@pytest.mark.slow
def test_decode_step_entry_on_an_abstract_v6e_8(decode_report):
    cfg, result = decode_report
    by_name = {f["name"]: f for f in result["functions"]}
    assert set(by_name) == {"prefill", "decode_step"}
    step = by_name["decode_step"]
    chip = CHIPS["v6e"]
    # flops and HBM bytes read off the compiled text, every loop trip (the layer scan) counted: above XLA's
    # own cost analysis, which counts the scan's body once.
    assert step["hbm_bytes"] > 0 and step["flops"] > 0 and step["bytes_accessed"] > 0
    assert step["flops"] > step["xla_flops"] * 0.5 and step["data_loop"] is None  # no data-dependent loop
    assert step["collective_bytes"] == sum(step["collectives"].values())
    assert set(step["collectives"]) <= set(hlo_stats.KINDS)
    assert math.isclose(
        step["estimated_s"],
        max(step["flops"] / chip.peak_flops, step["hbm_bytes"] / chip.hbm_bytes_per_s)
        + step["collective_bytes"] / chip.ici_bytes_per_s,
    )
    assert math.isclose(
        step["xla_estimated_s"],
        max(step["xla_flops"] / chip.peak_flops, step["bytes_accessed"] / chip.hbm_bytes_per_s)
        + step["collective_bytes"] / chip.ici_bytes_per_s,
    )
    d = result["decode_estimate"]
    assert d["tokens"] == cfg.rollout.max_length_sample == 256
    assert math.isclose(d["rollout_s"], by_name["prefill"]["estimated_s"] + 256 * step["estimated_s"])


@pytest.mark.slow
def test_the_sampler_keeps_its_kv_cache_on_the_mesh_at_every_decode_step(decode_report):
    """The whole sampler program, compiled as a run compiles it: with the mesh its decode loop moves a
    fraction of what it moved without (Sampler.sample passed no mesh before: nothing pinned the loop
    state; at 3B GSPMD gathered the KV cache), and it moves what the preflight's decode_step entry says."""
    cfg, result = decode_report
    assert programs.decode_step_program.__wrapped__ is decode_step
    devices = preflight.tpu_devices(preflight.parse_accelerator("v6e-8"))
    progs, _ = preflight.programs_for(cfg, devices)
    (whole,) = [p for p in progs if p.name == "sampler"]
    assert whole.fn is _generate and whole.args[-1] is not None

    def per_step(mesh):
        text = whole.fn.lower(*whole.args[:-1], mesh).compile().as_text()
        return sum(hlo_stats.collective_bytes(text, unbounded_loops_only=True).values())

    pinned, unpinned = per_step(whole.args[-1]), per_step(None)
    assert unpinned > 5 * pinned > 0
    # The loop's body moves what the decode_step entry moves (compiled alone, same function, same layout).
    (step,) = [f for f in result["functions"] if f["name"] == "decode_step"]
    assert math.isclose(step["collective_bytes"], pinned, rel_tol=0.01)


# A 36-trip loop over a [36, 16, 1024] bf16 cache (1152 KiB; 32 KiB a layer) as the decode step's layer
# scan runs it: per trip a fusion slices one layer into VMEM (S(1)), a matmul reads it with a 2 MiB weight
# from HBM, and a fused dynamic-update-slice writes one layer's new values in place; the entry changes the
# cache's layout once (a whole copy).
TRAFFIC = """HloModule jit_step, entry_computation_layout={()->()}

%fused_slice (p0: bf16[36,16,1024], p1: s32[]) -> bf16[16,1024] {
  %p0 = bf16[36,16,1024]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,16,1024]{2,1,0:T(8,128)(2,1)S(1)} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,16,\
1024}
  ROOT %b = bf16[16,1024]{1,0:T(8,128)(2,1)S(1)} bitcast(%ds)
}

%fused_dot (p0: bf16[16,1024], p1: bf16[1024,1024]) -> bf16[16,1024] {
  %p0 = bf16[16,1024]{1,0:S(1)} parameter(0)
  %p1 = bf16[1024,1024]{1,0} parameter(1)
  ROOT %d = bf16[16,1024]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (p0: bf16[36,16,1024], p1: bf16[1,16,1024], p2: s32[]) -> bf16[36,16,1024] {
  %p0 = bf16[36,16,1024]{2,1,0} parameter(0)
  %p1 = bf16[1,16,1024]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = bf16[36,16,1024]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %z, %z)
}

%body (p: (s32[], bf16[36,16,1024], bf16[1024,1024])) -> (s32[], bf16[36,16,1024], bf16[1024,1024]) {
  %p = (s32[], bf16[36,16,1024]{2,1,0}, bf16[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %cache = bf16[36,16,1024]{2,1,0} get-tuple-element(%p), index=1
  %w = bf16[1024,1024]{1,0} get-tuple-element(%p), index=2
  %slice = bf16[16,1024]{1,0:T(8,128)(2,1)S(1)} fusion(%cache, %i), kind=kLoop, calls=%fused_slice
  %y = bf16[16,1024]{1,0} fusion(%slice, %w), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(f)/dot"}
  %new = bf16[1,16,1024]{2,1,0} bitcast(%y)
  %upd = bf16[36,16,1024]{2,1,0} fusion(%cache, %new, %i), kind=kLoop, calls=%fused_update
  ROOT %t = (s32[], bf16[36,16,1024]{2,1,0}, bf16[1024,1024]{1,0}) tuple(%i, %upd, %w)
}

%cond (p: (s32[], bf16[36,16,1024], bf16[1024,1024])) -> pred[] {
  %p = (s32[], bf16[36,16,1024]{2,1,0}, bf16[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(36)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[36,16,1024], b: bf16[1024,1024]) -> bf16[36,16,1024] {
  %a = bf16[36,16,1024]{2,1,0} parameter(0)
  %b = bf16[1024,1024]{1,0} parameter(1)
  %c = bf16[36,16,1024]{1,2,0:T(8,128)(2,1)} copy(%a)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[36,16,1024]{2,1,0}, bf16[1024,1024]{1,0}) tuple(%zero, %c, %b)
  %loop = (s32[], bf16[36,16,1024]{2,1,0}, bf16[1024,1024]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[36,16,1024]{2,1,0} get-tuple-element(%loop), index=1
}
"""


def test_hbm_traffic_per_instruction_with_slices_in_place_updates_and_vmem():
    rows = {r.name: r for r in hlo_stats.hbm_traffic(TRAFFIC)}
    layer, cache, weight = 16 * 1024 * 2, 36 * 16 * 1024 * 2, 1024 * 1024 * 2
    assert set(rows) == {"c", "slice", "y", "upd"}  # parameters, tuples, bitcasts, the loop: no traffic
    assert rows["c"][3:6] == (1, 2 * cache, 0)  # a whole copy: read + written
    assert rows["slice"][3:6] == (36, layer, layer + 4)  # one layer read from HBM into VMEM (+ the index)
    assert rows["y"][3:6] == (36, weight + layer, layer)  # the weight read, the result written; slice in VMEM
    assert rows["upd"][3:6] == (36, 2 * layer, 4)  # in place: the update read and written, nothing else
    assert rows["y"].source == "jit(f)/dot" and rows["upd"].source == ""
