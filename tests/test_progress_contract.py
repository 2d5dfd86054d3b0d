"""The progress-line contract (grpoctl_contract/progress.py) and the trainer's ETA (trainer/progress.py),
without jax or a run: encode/decode, older trainers' lines, the orchestrator's reading of them, and the
ETA's arithmetic (compile time left out, remaining sweeps and evals counted)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from grpoctl_contract.progress import Event, decode, describe, encode, fmt_duration, human
from orchestrator import recipes
from orchestrator.runs import RunRecord
from trainer.progress import Plan, Reporter, Span, eval_steps


def test_events_round_trip_and_keep_the_original_progress_keys_first():
    step = Event("progress", "train", k=3, n=40, step=3, total=40, elapsed_s=12.5, eta_s=61.04,
                 metrics={"loss": 0.01, "train/reward/total/mean": float("nan")})
    line = encode(step)
    assert line.startswith('{"event": "progress", "step": 3, "total": 40, "elapsed_s": 12.5, "metrics": ')
    back = decode(line)
    assert back is not None and (back.phase, back.k, back.n, back.eta_s) == ("train", 3, 40, 61.0)
    assert back.metrics == {"loss": 0.01, "train/reward/total/mean": None}  # NaN is null: valid JSON
    sweep = decode(encode(Event("phase", "final_sweep", k=2, n=11, step=100, total=100, eta_s=45.0)))
    assert sweep is not None and describe(sweep) == "final sweep batch 2/11"
    load = Event("phase", "model_load", bytes_done=1_200_000_000, bytes_total=6_170_000_000, detail="Qwen")
    assert describe(decode(encode(load))) == "model load 1.2 GB/6.2 GB: Qwen"
    info = decode(encode(Event("info", "setup", info={"config_hash": "abc", "wandb_url": "https://x/y"})))
    assert info is not None and info.info == {"config_hash": "abc", "wandb_url": "https://x/y"}


def test_lines_of_older_trainers_and_garbage():
    old = decode('{"event": "progress", "step": 3, "total": 10, "elapsed_s": 6.0, "metrics": {}}')
    assert old is not None and (old.phase, old.k, old.n, old.eta_s) == ("train", 3, 10, None)
    done = decode('{"event": "done", "step": 10, "total": 10, "summary": "runs/x/summary.json"}')
    assert done is not None and done.done and done.phase == "done"
    for junk in ('{"event": broken', "step 3", '{"event": 3}', "", '{"event": "progress", "step": "x"'):
        assert decode(junk) is None


def test_orchestrator_reads_phase_k_n_and_the_trainers_eta():
    line = encode(Event("phase", "warm_start", k=40, n=400, step=0, total=40, elapsed_s=9.0))
    status = recipes.parse_status(f"PIDV=12\nALIVE=1\nPROGRESS={line}\nINFO=\n")
    p = status.progress
    assert p is not None and (p.phase, p.k, p.n, p.text) == ("warm_start", 40, 400, "warm start step 40/400")
    assert p.eta_s is None  # the trainer does not know yet: no made-up number from elapsed/step
    timed = encode(Event("progress", "train", k=40, n=40, step=40, total=40, elapsed_s=99.0, eta_s=30.0))
    assert recipes.parse_status(f"ALIVE=1\nPROGRESS={timed}\n").progress.eta_s == 30.0  # sweep still to go
    old = '{"event": "progress", "step": 2, "total": 8, "elapsed_s": 4.0, "metrics": {}}'
    assert recipes.parse_status(f"ALIVE=1\nPROGRESS={old}\n").progress.eta_s is None  # none made up either
    info = encode(Event("info", "setup", info={"config_hash": "c0ffee", "git_commit": "a" * 40}))
    assert recipes.parse_status(f"ALIVE=1\nPROGRESS={line}\nINFO={info}\n").info["config_hash"] == "c0ffee"


def test_human_lines_say_the_phase_and_never_carry_anything_but_the_event():
    ev = Event("progress", "train", k=3, n=40, step=3, total=40, elapsed_s=75.0, eta_s=61.0,
               metrics={"loss": 0.0123, "train/reward/total/mean": 0.41})
    assert human(ev) == "[trainer +1:15] train step 3/40 | reward 0.41, loss 0.0123 | eta 1:01"
    assert not human(ev).startswith('{"event": ')  # status greps JSON lines by their prefix
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(None) == "?"


def test_contract_imports_without_jax_or_typer():
    code = "import sys, grpoctl_contract.progress as p; assert not {'jax', 'typer'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


class _Watch:
    """A stand-in for the jax.monitoring compile watch: compile seconds that the test adds by hand."""

    def __init__(self) -> None:
        self.total_s, self.current, self.by_name = 0.0, None, {}


def _reporter(plan: Plan) -> Reporter:
    rep = Reporter(enabled=True, watch_compiles=False, out=io.StringIO())
    rep.plan = plan
    return rep


def test_span_leaves_compile_time_out(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr("trainer.progress.time.perf_counter", lambda: now[0])
    watch = _Watch()
    span = Span(watch)
    now[0] += 50.0
    watch.total_s += 45.0  # 45 of the 50 s were compilation
    assert span.seconds() == pytest.approx(5.0)


def test_eta_counts_steps_evals_and_the_final_sweep():
    plan = Plan(steps=10, eval_steps=eval_steps(1, 10, 5), eval_batches=2, final_sweep_batches=11,
                rows_per_step=64, rows_per_sweep_batch=128)
    assert plan.eval_steps == (5, 10)
    rep = _reporter(plan)
    assert rep.eta() is None  # no step timed yet
    rep.observe("train", 4.0)
    rep.observe("rollout", 3.0)
    rep.done_units["train"] = 1
    # 9 steps x 4 s + 2 evals x 2 batches x 3 s (a batch samples like a rollout) + 11 sweep batches x 6 s
    # (twice the rows of a rollout)
    assert rep.eta() == pytest.approx(9 * 4 + 4 * 3 + 11 * 6)
    rep.observe("final_sweep", 5.0)
    rep.done_units.update(train=10, final_sweep=4)
    assert rep.eta() == pytest.approx(7 * 5.0)  # what is left is the sweep, not "eta 0"


def test_eta_adds_the_sweeps_sampler_compile_once_it_is_known():
    plan = Plan(steps=2, final_sweep_batches=1, rows_per_step=8, rows_per_sweep_batch=8)
    rep = _reporter(plan)
    rep.observe("train", 1.0)
    rep.observe("rollout", 1.0)
    rep.done_units["train"] = 1
    rep.compile_s_of["sampler"] = 20.0  # the training sampler took 20 s to compile
    # the greedy sweep compiles its own sampler: that is real time still to come
    assert rep.eta() == pytest.approx(1.0 + 1.0 + 20.0)
    rep.done_units["final_sweep"] = 0
    rep.sweep_compiled = True
    assert rep.eta() == pytest.approx(2.0)


def test_advance_prints_first_last_and_throttled_middles(monkeypatch: pytest.MonkeyPatch):
    now = [0.0]
    monkeypatch.setattr("trainer.progress.time.perf_counter", lambda: now[0])
    rep = _reporter(Plan(steps=3))
    for k in range(0, 101):
        rep.advance("warm_start", k, 100)
        now[0] += 0.1  # 10 units a second
    lines = rep._out.getvalue().splitlines()
    events = [decode(line) for line in lines if decode(line)]
    ks = [e.k for e in events]
    assert ks[0] == 0 and ks[-1] == 100 and 8 <= len(ks) <= 14  # about one a second, not 101
    assert rep.rate("warm_start") == pytest.approx(0.1)
    humans = [line for line in lines if line.startswith("[trainer")]
    assert humans[0].endswith("warm start step 0/100") and humans[-1].endswith("warm start step 100/100")


def test_run_record_keeps_identity_fields():
    rec = RunRecord.from_json({
        "run_id": "r", "config": "c.yaml", "target": "local", "target_kind": "local", "remote_dir": "/x",
        "log_path": "l", "pid_path": "p", "exit_path": "e", "run_dir": "runs/r", "ts": "t",
        "git_commit": "a" * 40, "config_hash": "abc", "wandb_url": "https://wandb.ai/x/y/runs/z",
    })
    assert RunRecord.from_json(rec.to_json()).wandb_url == "https://wandb.ai/x/y/runs/z"


def test_model_download_reports_bytes_done_of_total(tmp_path, monkeypatch: pytest.MonkeyPatch):
    import threading

    constants = pytest.importorskip("huggingface_hub.constants", reason="trainer test: needs huggingface_hub")
    hf_io = pytest.importorskip("trainer.hf_io", reason="trainer test: needs jax")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_io, "_download_size", lambda repo_id: 1000)
    blobs = tmp_path / "models--Org--Model" / "blobs"
    seen: list[tuple[int, int]] = []
    heard = threading.Event()

    def on_bytes(done: int, total: int) -> None:
        seen.append((done, total))
        if done:
            heard.set()

    with hf_io._download_progress("Org/Model", on_bytes, every_s=0.05):
        blobs.mkdir(parents=True)
        (blobs / "abc.incomplete").write_bytes(b"x" * 400)  # a file still downloading counts
        assert heard.wait(10)
        (blobs / "abc.incomplete").rename(blobs / "abc")
        (blobs / "def").write_bytes(b"y" * 600)
    assert (400, 1000) in seen and seen[-1] == (1000, 1000)
    rep = Reporter(enabled=True, watch_compiles=False, out=io.StringIO())
    rep.bytes(400, 1000, detail="Org/Model")
    assert "model load 400 B/1.0 kB: Org/Model" in rep._out.getvalue()


def test_phase_eta_while_the_runs_eta_is_unknown(monkeypatch: pytest.MonkeyPatch):
    """A warm start (or the start sweep) runs before any GRPO step is timed: its events carry the phase's
    own ETA (what `status` shows instead of `eta ?`), and the run's ETA replaces it once known."""
    now = [0.0]
    monkeypatch.setattr("trainer.progress.time.perf_counter", lambda: now[0])
    rep = _reporter(Plan(steps=3, warm_start_steps=100))
    for k in range(0, 41):
        rep.advance("warm_start", k, 100)
        now[0] += 0.5
    last = [decode(line) for line in rep._out.getvalue().splitlines() if decode(line)][-1]
    assert last.eta_s is None and last.phase_eta_s == pytest.approx(60 * 0.5)
    assert "warm start eta 0:30" in human(last)
    rep.observe("train", 2.0)
    ev = rep._event("phase", "warm_start", k=40, n=100)
    assert ev.eta_s is not None and ev.phase_eta_s is None


def test_ledger_splits_the_trainers_time_by_phase_with_compilation_apart(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr("trainer.progress.time.perf_counter", lambda: now[0])
    rep = _reporter(Plan(steps=2, first_step=2))  # resumed after step 1
    watch = _Watch()
    rep.watch, rep._acct = watch, ("setup", 100.0, 0.0)
    now[0] += 3.0  # setup
    rep.phase("model_load")
    now[0] += 5.0
    rep.advance("train", 1, 2)
    now[0] += 30.0
    watch.total_s += 20.0  # 20 of the first step's 30 s compiled its programs
    rep.step(2, {})
    rep.advance("eval", 0, 1)
    now[0] += 4.0
    rep.phase("checkpoint")
    now[0] += 1.0
    rep.finish("runs/x/summary.json")
    done = decode(rep._out.getvalue().splitlines()[-2])
    assert done is not None and done.done
    want = {"setup": 3.0, "model_load": 5.0, "train": 10.0, "compile": 20.0, "eval": 4.0, "checkpoint": 1.0}
    assert done.ledger["phase_s"] == pytest.approx(want)
    assert sum(done.ledger["phase_s"].values()) == pytest.approx(43.0)  # = elapsed
    assert done.ledger["resumed_from"] == 1
    # a compile under way counts already (a preempted attempt's last line may be one)
    rep2 = _reporter(Plan(steps=1))
    rep2.watch, rep2._acct = watch, ("setup", now[0], watch.total_s)
    watch.current, watch._acc = ("update_step", now[0] + 1.0), 0.0
    now[0] += 11.0
    assert rep2.ledger()["phase_s"] == pytest.approx({"setup": 1.0, "compile": 10.0})
    for junk in ({"phase_s": "x"}, {"phase_s": {"train": -1, "eval": "2"}}, None):
        line = encode(Event("phase", "train", ledger={"t0": 1.0, "phase_s": {}})).replace(
            '"ledger": {"t0": 1.0, "phase_s": {}}', f'"ledger": {__import__("json").dumps(junk)}')
        back = decode(line)
        assert back is not None and back.ledger.get("phase_s", {}) == {}
