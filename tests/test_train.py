"""The training loop end to end on CPU: it learns, it resumes exactly after a crash, the CLI writes the run
files of the contract, and an 8-device fsdp mesh computes the same loss as one device.

Runs in this module share compiled programs (same shapes, static configs compared by value), so each
extra run costs only its steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpoctl_contract import progress as progress_contract
from grpoctl_contract.rundir import SOP_KEYS
from trainer import config as C
from trainer import grpo, sharding
from trainer.model import Qwen2Config, init_params
from trainer.train import Stopped, run, setup

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
# A quiet tiny run: no periodic eval, no full sweep, no W&B, no checkpoints unless a test asks, and no
# supervised warm start (tests/test_sft.py covers it; these tests are about the GRPO loop). The rollout
# shape, temperature and reward weights of the from-scratch calibration below are pinned here: the demo
# config now runs 16 prompts at temperature 0.7 with correctness-heavy weights after its warm start.
QUIET = ("eval_every_steps=0", "eval_full_sweep=false", "wandb_mode=disabled", "checkpoint.every_steps=0",
         "warm_start.steps=0", "baseline_every_steps=0", "rollout.batch_size=8", "rollout.temperature=1.0",
         "reward_weights=[1.0,0.5,0.5]")


def tiny(*overrides: str) -> C.Config:
    return C.load(TINY, [*QUIET, *overrides], environ={})


def rewards(run_dir: Path, key: str = "train/reward/total/mean") -> np.ndarray:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([row[key] for row in rows if key in row])


# ---------------------------------------------------------------------------------------------------------
# Learning.

LEARN_STEPS = 30
# GRPO from scratch: QUIET turns the warm start off, and these are the learning rates of the from-scratch
# calibration (tiny_cpu.yaml runs 3e-4 after its warm start). From random init the only signal GRPO
# can climb in 30 steps is the layout (tag and format rewards), which makes a large, clean gain; after the
# warm start the correctness gain over 30 steps is small next to its seed-to-seed noise.
FROM_SCRATCH = ("optimizer.lr=1e-2", "optimizer.end_lr=1e-3")
# Last-10 minus first-10 mean total reward (max 2.0). Observed here: seeds 0-3 gain 0.145, 0.116, 0.150,
# 0.101; the same run with lr 0 (dead gradient) +0.009; with the update's sign flipped -0.032.
MIN_GAIN = 0.06


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_config_learns_the_answer_layout(tmp_path, seed):
    """From random init the policy learns to emit the format tags: the reward clearly rises."""
    run(tiny(*FROM_SCRATCH, f"steps={LEARN_STEPS}", f"seed={seed}"), tmp_path)
    total, tags = rewards(tmp_path), rewards(tmp_path, "train/reward/func/reward_tag_count/mean")
    assert len(total) == LEARN_STEPS
    gain = total[-10:].mean() - total[:10].mean()
    assert gain > MIN_GAIN, f"seed {seed}: reward {total[:10].mean():.3f} -> {total[-10:].mean():.3f}"
    assert tags[-10:].mean() > tags[:10].mean() + 0.1


@pytest.mark.slow
def test_a_sign_error_fails_the_learning_criterion(tmp_path):
    """The same run with the update's sign flipped (ascending the loss) must not pass the bar above."""
    cfg = tiny(*FROM_SCRATCH, f"steps={LEARN_STEPS}")
    # model_copy skips validation on purpose: a negative learning rate is no config a user may write
    optimizer = cfg.optimizer.model_copy(update={"lr": -cfg.optimizer.lr, "end_lr": -cfg.optimizer.end_lr})
    flipped = cfg.model_copy(update={"optimizer": optimizer})
    run(flipped, tmp_path)
    total = rewards(tmp_path)
    assert total[-10:].mean() - total[:10].mean() < MIN_GAIN / 2


def test_beta_zero_loads_no_reference_model_and_beta_positive_freezes_a_copy(tmp_path):
    trainer, state, start = setup(tiny(), tmp_path / "a")
    trainer.checkpointer.close()
    assert trainer.ref_params is None and start == 0
    trainer, state, _ = setup(tiny("train.beta=0.05"), tmp_path / "b")
    trainer.checkpointer.close()
    ref, params = jax.tree.leaves(trainer.ref_params), jax.tree.leaves(state["params"])
    assert all(np.array_equal(r, p) for r, p in zip(ref, params, strict=True))
    assert all(r is not p for r, p in zip(ref, params, strict=True))  # a copy: updates never reach it


@pytest.mark.slow
def test_ppo_epochs_reuse_the_sampling_policy_log_probs(tmp_path):
    """With 2 epochs the second update sees ratio != 1 against the kept old log-probs (and a KL > 0)."""
    run(tiny("steps=2", "train.ppo_epochs=2", "train.beta=0.05"), tmp_path)
    ratio, kl = rewards(tmp_path, "train/ratio_mean"), rewards(tmp_path, "train/kl")
    assert np.all(np.isfinite(ratio)) and np.all(np.abs(ratio - 1.0) > 1e-6)
    assert np.all(kl > 0)


@pytest.mark.slow
def test_start_sweep_and_frozen_baseline_see_the_policy_right_before_grpo_step_1(tmp_path):
    """eval_full_start.jsonl is the sweep of the warm-started policy (not the random init): with a learning
    rate too small to change a greedy token, start and end sweeps agree row for row, the sampled pass's
    counts too (its keys are fixed: the same dice at the start and the end). At step 1 the frozen
    start policy IS the sampling policy, so on the same prompts and keys its rewards equal the policy's."""
    cfg = tiny("steps=1", "warm_start.steps=150", "eval_full_sweep=true", "eval_full_limit=16",
               "eval_full_batch_size=16", "optimizer.lr=1e-12", "optimizer.end_lr=0",
               "baseline_every_steps=1", "eval_full_sampled=true")
    summary = run(cfg, tmp_path)
    start, end = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                  for name in ("eval_full_start.jsonl", "eval_full.jsonl"))
    assert len(start) == 16 and start == end
    assert any(row["prediction"] is not None for row in start)  # the warm start taught the answer layout
    assert summary["eval_full_start/accuracy"] == summary["eval_full/accuracy"]
    # the sampled pass: rollout.n samples a question at the rollout's settings, its rate the rows' mean
    assert {row["samples"] for row in start} == {cfg.rollout.n}
    right = [row["sampled_correct"] for row in start]
    assert 0 < sum(right) < 16 * cfg.rollout.n and len(set(right)) > 1  # sampled, not one greedy answer x n
    assert summary["eval_full/sampled_accuracy"] == sum(right) / (16 * cfg.rollout.n)
    assert summary["eval_full_start/sampled_accuracy"] == summary["eval_full/sampled_accuracy"]
    assert summary["eval_full_start/num_questions"] == 16
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    [step1] = [row for row in rows if "train/reward/total/mean" in row]
    for key in ("reward/total/mean", "reward/func/reward_correct/mean", "reward/func/reward_format/mean"):
        assert step1[f"train/baseline/{key}"] == step1[f"train/{key}"], key


# ---------------------------------------------------------------------------------------------------------
# Resume.


class Crash(Exception):
    pass


RESUME = ("steps=6", "checkpoint.every_steps=3")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The 6-step run that is never interrupted: what resumed runs must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(tiny(*RESUME), run_dir)
    return run_dir


def assert_same_steps(run_dir: Path, reference: Path) -> None:
    """Same params, optimizer state, data order and rng: every float of every step equals the reference."""
    for key in ("loss", "train/grad_norm", "train/entropy", "train/reward/total/mean"):
        np.testing.assert_array_equal(rewards(run_dir, key), rewards(reference, key), err_msg=key)


@pytest.mark.slow
def test_resume_after_a_crash_continues_at_the_saved_step_with_the_same_state(tmp_path, straight_run):
    cfg = tiny(*RESUME)

    def crash_after_4(step: int, metrics: dict) -> None:
        if step == 4:  # step 3 is checkpointed, step 4 is lost with the process
            raise Crash

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        run(cfg, resumed, on_step=crash_after_4)
    seen = []
    summary = run(cfg, resumed, on_step=lambda step, m: seen.append(step))
    assert seen == [4, 5, 6]  # continued at the saved step, not from scratch and not from the crash
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the lost step 4 was logged once, not twice
    assert_same_steps(resumed, straight_run)
    assert summary["run_id"] == json.loads((resumed / "summary.json").read_text())["run_id"]


@pytest.mark.slow
def test_a_run_resumed_on_a_recreated_vm_keeps_its_whole_history(tmp_path, straight_run):
    """Issue 20: the VM (and its run dir) is gone after a preemption; checkpoints live in checkpoint.dir.
    The resumed run's metrics.jsonl has every step and its summary the keys of a run never interrupted."""
    cfg = tiny(*RESUME, f"checkpoint.dir={tmp_path / 'bucket'}")

    def crash_after_4(step: int, metrics: dict) -> None:
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "vm1" / "run", on_step=crash_after_4)
    fresh = tmp_path / "vm2" / "run"  # same run name (the run id), a new disk
    run(cfg, fresh)
    def steps(run_dir: Path) -> list[int]:
        return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert steps(fresh) == steps(straight_run) and steps(fresh)[:6] == [1, 2, 3, 4, 5, 6]  # every row once
    keys = set(json.loads((straight_run / "summary.json").read_text())) - {"run_id"}
    assert keys <= set(json.loads((fresh / "summary.json").read_text()))
    assert_same_steps(fresh, straight_run)


@pytest.mark.slow
def test_a_stop_request_checkpoints_the_current_step_and_the_restart_resumes_there(tmp_path, straight_run):
    """SIGTERM (spot preemption) in python -m trainer sets should_stop: the step just finished is saved."""
    cfg = tiny(*RESUME)
    finished: list[int] = []
    with pytest.raises(Stopped, match="after step 2 of 6"):
        run(cfg, tmp_path, on_step=lambda s, m: finished.append(s), should_stop=lambda: len(finished) >= 1)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    seen = []
    run(cfg, tmp_path, on_step=lambda step, m: seen.append(step))
    assert seen == [3, 4, 5, 6]
    assert_same_steps(tmp_path, straight_run)


# ---------------------------------------------------------------------------------------------------------
# The CLI and the run directory contract.


@pytest.mark.slow
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(commands, cwd: Path, timeout: float) -> list[tuple[str, str]]:
    """Starts the commands at once; if one fails (or time runs out) the others are killed, since a peer
    would wait forever in a collective. Returns [(stdout, stderr)], asserting every exit code is 0."""
    logs = [(cwd / f"proc{i}.out", cwd / f"proc{i}.err") for i in range(len(commands))]
    procs = []
    for (args, env), (out, err) in zip(commands, logs, strict=True):
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=o, stderr=e))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
        time.sleep(0.2)
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.slow
def test_cli_runs_offline_as_two_processes_and_writes_the_run_files(tmp_path):
    """`python -m trainer --config configs/tiny_cpu.yaml --run-dir DIR` as two JAX processes (what two TPU
    hosts do): jax.distributed, one global batch over both, process 0 alone logs and writes the files.
    The worker's `.env` (what `grpoctl env push` writes) holds a secret and the seed's env flags: it is
    read before the config is built, so its EVAL_FULL_SWEEP=1 wins over `eval_full_sweep=false`."""
    run_dir = tmp_path / "runs" / "r1"
    secret = "sk-test-DO-NOT-PRINT-0123456789"
    (tmp_path / ".env").write_text(
        f"WANDB_API_KEY={secret}\nEVAL_FULL_SWEEP=1\nPRINT_TRAIN_TIME_BREAKDOWN=1\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "XLA_FLAGS": "", "GRPOCTL_NUM_PROCESSES": "2",  # the trainer picks gloo itself
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}"}
    for key in ("WANDB_API_KEY", "EVAL_FULL_SWEEP", "PRINT_TRAIN_TIME_BREAKDOWN"):  # from .env alone
        env.pop(key, None)
    args = [
        sys.executable, "-m", "trainer", "--config", str(TINY), "--run-dir", str(run_dir),
        "--set", "eval_full_sweep=false", "--set", "steps=3", "--set", "eval_every_steps=2",
        "--set", "eval_full_limit=16",
        "--set", "eval_full_batch_size=16", "--set", "checkpoint.every_steps=0", "--set", "mesh_shape=auto",
        "--set", "warm_start.steps=2", "--set", "warm_start.batch_size=4",  # each process packs its 2 rows
    ]
    outputs = _run_together(
        [(args, {**env, "GRPOCTL_PROCESS_ID": str(i)}) for i in range(2)], cwd=tmp_path, timeout=400
    )
    stdout = outputs[0][0]
    assert progress_contract.PREFIX not in outputs[1][0]  # only process 0 reports

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (*SOP_KEYS, "run_id", "config_hash", "git_commit", "steps"):
        assert key in summary, key
    assert 0.0 <= summary["eval_full/accuracy"] <= 1.0 and summary["steps"] == 3
    assert summary["warm_start/loss"] > 0 and summary["time/warm_start_s"] > 0
    assert len(summary["git_commit"]) == 40  # the checkout's commit, though the cwd is elsewhere
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["print_time_breakdown"] is True and cfg["steps"] == 3  # .env flag and overrides recorded
    assert cfg["eval_full_sweep"] is True  # EVAL_FULL_SWEEP=1 in .env, over --set eval_full_sweep=false
    assert summary["config_hash"] == C.config_hash(C.from_dict(cfg))

    sweep = [json.loads(line) for line in (run_dir / "eval_full.jsonl").read_text().splitlines()]
    # tiny_cpu.yaml sweeps with a sampled pass too (eval_full_sampled): its rows hold both
    assert len(sweep) == 16 and set(sweep[0]) == {"id", "answer", "prediction", "correct", "samples",
                                                   "sampled_correct"}
    assert summary["eval_full/accuracy"] == pytest.approx(np.mean([r["correct"] for r in sweep]))
    assert summary["eval_full/sampled_accuracy"] == pytest.approx(
        sum(r["sampled_correct"] for r in sweep) / sum(r["samples"] for r in sweep))  # both processes' rows
    start = [json.loads(line) for line in (run_dir / "eval_full_start.jsonl").read_text().splitlines()]
    assert [r["id"] for r in start] == [r["id"] for r in sweep]  # eval_full_at_start is on by default
    assert summary["eval_full_start/accuracy"] == pytest.approx(np.mean([r["correct"] for r in start]))

    events = [json.loads(line) for line in stdout.splitlines() if line.startswith(progress_contract.PREFIX)]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3] and all(e["total"] == 3 for e in progress)
    assert "train/reward/total/mean" in progress[0]["metrics"]
    done = {"event": "done", "step": 3, "total": 3, "summary": str(run_dir / "summary.json"), "phase": "done"}
    assert events[-1].items() >= done.items() and events[-1]["eta_s"] == 0
    assert sum(line.startswith("time step ") for line in stdout.splitlines()) == 3

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(summary["run_id"])  # W&B offline, same id as summary
    # The .env secret reached the environment but none of the output or files.
    assert secret not in "".join(out + err for out, err in outputs)
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".txt", ".yaml"):
            assert secret not in path.read_text(errors="ignore"), path


# ---------------------------------------------------------------------------------------------------------
# Mesh.


def test_fsdp8_mesh_gives_the_same_loss_and_gradients_as_one_device():
    assert len(jax.devices()) >= 8, "conftest sets --xla_force_host_platform_device_count=8"
    model = Qwen2Config.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=8)
    loss_cfg = grpo.LossConfig(group_size=4, compute_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    b = 16
    prompt = rng.integers(3, 128, size=(b, 6)).astype(np.int32)
    comp = rng.integers(3, 128, size=(b, 10)).astype(np.int32)
    cmask = np.arange(10)[None] < rng.integers(1, 11, size=b)[:, None]
    batch = grpo.pack_sequences(prompt, np.ones_like(prompt, bool), comp, cmask, seq_bucket=8)
    batch["rewards"] = rng.uniform(0, 2, size=b).astype(np.float32)
    params = init_params(model, jax.random.key(0))
    step = jax.jit(grpo.step_gradients, static_argnums=(2, 4, 5))

    one = sharding.make_mesh("1,1,1", jax.devices()[:1])
    p1, b1 = sharding.shard_params(params, one), sharding.shard_batch(batch, one)
    g1, m1 = step(p1, None, model, b1, loss_cfg, 2)
    eight = sharding.make_mesh("1,8,1", jax.devices()[:8])
    p8 = sharding.shard_params(params, eight)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(p8)), "fsdp=8 splits params"
    g8, m8 = step(p8, None, model, sharding.shard_batch(batch, eight), loss_cfg, 2)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5, abs=1e-7)
    for a, c in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_run_resumed_on_a_fresh_disk_keeps_its_start_sweep(tmp_path):
    """Found by the rehearsal: a run resumed on a recreated VM (fresh disk, checkpoints in a bucket) lost
    eval_full_start.jsonl and eval_full_start/accuracy, so its start -> end test could not be made."""
    cfg = tiny("steps=2", "checkpoint.every_steps=1", "eval_full_sweep=true", "eval_full_at_start=true",
               "eval_full_limit=8", "eval_full_batch_size=8", f"checkpoint.dir=file://{tmp_path / 'bucket'}")

    def crash_after_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise Crash

    first_disk = tmp_path / "vm1" / "run"
    with pytest.raises(Crash):
        run(cfg, first_disk, on_step=crash_after_2)
    rows = (first_disk / "eval_full_start.jsonl").read_text()
    fresh_disk = tmp_path / "vm2" / "run"  # same run name, so the same checkpoint folder in the bucket
    summary = run(cfg, fresh_disk)
    assert (fresh_disk / "eval_full_start.jsonl").read_text() == rows
    start = json.loads((first_disk / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["eval_full_start/accuracy"] == start["eval_full_start/accuracy"]
    assert "eval_full/accuracy" in summary


def test_paired_correctness_counts_the_samples_only_one_policy_got_right():
    """baseline_every_steps: the policy and the frozen start policy sample the same prompts with the same
    keys, so row i of each is a pair; the counts feed an exact McNemar on the sampled pass rate."""
    from trainer.rewards import RewardBatch
    from trainer.train import paired_correctness

    def batch(correct: list[float]) -> RewardBatch:
        return RewardBatch(per_func={"reward_correct": np.array(correct)}, total=np.zeros(len(correct)))

    counts = paired_correctness(batch([1.0, 0.0, 1.0, 1.0, 0.0]), batch([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert counts == {"train/baseline/pairs/n": 5.0, "train/baseline/pairs/policy_only": 2.0,
                      "train/baseline/pairs/frozen_only": 1.0}
