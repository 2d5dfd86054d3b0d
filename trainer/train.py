"""The GRPO training loop, top to bottom.

    .env -> config (python -m trainer reads the worker's .env first) -> mesh -> tokenizer, data, model,
    optimizer -> resume from the latest checkpoint (or, in a fresh run with warm_start.steps > 0, the
    supervised warm start, logged as step 0) ->
    optional full eval sweep of the start policy (eval_full_start/, logged as step 0) ->
    for each step: rollout -> rewards -> [every baseline_every_steps: the frozen start policy's rewards
    on the same prompts and keys] -> update (advantages, micro-batches) -> periodic eval -> log ->
    checkpoint -> optional full eval sweep -> summary.json

Programmatic entry point: `run(config, run_dir) -> summary dict` (python -m trainer calls it).
Every process runs the same loop on its share of the prompts; process 0 logs and writes files.
A step's sampling rng is derived from (seed, step) and the data order is checkpointed, so a run restarted
from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpoctl_contract import rundir
from trainer import grpo, hf_io, programs, sharding
from trainer.checkpoints import Checkpointer, checkpoint_dir, compile_cache_dir, enable_compile_cache
from trainer.config import Config, ConfigError, config_hash, to_dict
from trainer.data import ProblemStream, load_problems
from trainer.evaluation import OnBatch, SampledPass, full_sweep, periodic_eval, sweep_batches
from trainer.metrics import RunLogger, progress_metrics
from trainer.model import Qwen2Config, init_params
from trainer.optim import lr_schedule, optimizer_for, scale_updates
from trainer.progress import Plan, Reporter, eval_steps
from trainer.rewards import RewardBatch, RewardWeights, score_completions
from trainer.rollout import Rollout, Sampler, global_concat, global_max
from trainer.sampler import SamplingSettings
from trainer.tokenizer import TINY, load_tokenizer
from trainer.warm_start import warm_start

# ---------------------------------------------------------------------------------------------------------
# Process-level setup.


def init_distributed() -> None:
    """jax.distributed.initialize() when this is one of several processes.

    Detected from GRPOCTL_DISTRIBUTED=1 (the launcher sets it for multi-worker targets), a
    TPU_WORKER_HOSTNAMES list of several hosts, or JAX_COORDINATOR_ADDRESS. On a TPU slice JAX finds the
    rest itself; elsewhere GRPOCTL_NUM_PROCESSES and GRPOCTL_PROCESS_ID (with JAX_COORDINATOR_ADDRESS)
    give it explicitly."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if not (
        os.environ.get("GRPOCTL_DISTRIBUTED") == "1"
        or len(hosts) > 1
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
    ):
        return
    num, pid = os.environ.get("GRPOCTL_NUM_PROCESSES"), os.environ.get("GRPOCTL_PROCESS_ID")
    # Processes on CPU hosts (the rehearsal's fake TPU workers) need a cross-process collectives backend or
    # their first all-reduce fails; the setting only concerns the CPU backend, so TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        num_processes=int(num) if num else None, process_id=int(pid) if pid else None
    )


# ---------------------------------------------------------------------------------------------------------
# Building the pieces.


def build_model(
    cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh, on_bytes: hf_io.OnBytes | None = None
) -> tuple[Qwen2Config, Any]:
    """Pretrained weights (hub id or local folder) or a random-init tiny Qwen2, sharded on `mesh`."""
    dtype = programs.DTYPES[cfg.param_dtype]
    if cfg.model_init == "pretrained":
        return hf_io.load_model(cfg.model_path, param_dtype=dtype, mesh=mesh, on_bytes=on_bytes)
    model_cfg = programs.tiny_model_config(cfg, vocab_size)
    params = init_params(model_cfg, jax.random.key(cfg.seed), dtype)
    return model_cfg, sharding.shard_params(params, mesh)


def loss_config(cfg: Config) -> grpo.LossConfig:
    t = cfg.train
    return grpo.LossConfig(
        group_size=cfg.rollout.n,
        beta=t.beta,
        clip_eps_low=t.clip_eps_low,
        clip_eps_high=t.clip_eps_high,
        aggregation=t.loss_aggregation,
        advantage_scaling=t.advantage_scaling,
        max_completion_len=cfg.rollout.max_length_sample,
        temperature=cfg.rollout.temperature,
        impl=t.policy_loss_impl,
        shadow_impl=None if t.shadow_policy_loss_impl == "none" else t.shadow_policy_loss_impl,
        kernel_blocks=tuple(sorted(t.kernel_blocks.items())),
        compute_dtype=programs.DTYPES[cfg.compute_dtype],
        remat=t.remat_policy if t.remat else False,
    )


# ---------------------------------------------------------------------------------------------------------
# Jitted steps (module level, static configs by value: runs in one process share compilations).


@functools.partial(
    jax.jit, static_argnames=("model_cfg", "loss_cfg", "num_micro", "optimizer"), donate_argnums=(0, 1)
)
def update_step(params, opt_state, ref_params, batch, lr, *, model_cfg, loss_cfg, num_micro, optimizer):
    grads, metrics = grpo.step_gradients(params, ref_params, model_cfg, batch, loss_cfg, num_micro)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, scale_updates(updates, lr))
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("model_cfg", "loss_cfg", "num_micro"))
def behaviour_logprobs(params, batch, *, model_cfg, loss_cfg, num_micro):
    """Log-probs of the batch under the pre-update policy (ppo_epochs > 1), one micro-batch at a time."""
    keys = ("tokens", "positions", "attn_mask", "targets")
    micro = grpo.split_micro_batches({k: batch[k] for k in keys}, num_micro)
    logp = jax.lax.map(lambda mb: grpo.sequence_logprobs(params, model_cfg, mb, loss_cfg).logp, micro)
    return jnp.swapaxes(logp, 0, 1).reshape(batch["tokens"].shape)  # undo split_micro_batches


# ---------------------------------------------------------------------------------------------------------
# One step's host-side pieces.


def training_batch(
    rollout: Rollout, rewards: np.ndarray, seq_bucket: int, pad_id: int
) -> dict[str, np.ndarray]:
    """This process's rows, packed and trimmed to the (global) longest sequence's bucket."""
    longest = int((rollout.prompt_mask.sum(1) + rollout.completion_mask.sum(1)).max())
    length = grpo.round_up(global_max(longest), seq_bucket)
    batch = grpo.pack_sequences(
        rollout.prompt_tokens, rollout.prompt_mask, rollout.completion, rollout.completion_mask,
        seq_bucket, pad_id, length=length,
    )
    batch["rewards"] = rewards.astype(np.float32)
    batch["sample_logp"] = grpo.scatter_completion_values(
        rollout.sample_logp, batch["loss_mask"], rollout.completion_mask
    )
    return batch


def paired_correctness(policy: RewardBatch, frozen: RewardBatch) -> dict[str, float]:
    """The sampled pass rate of the policy against the frozen start policy, sample by sample: both sampled
    the same prompts with the same keys, so each row is a pair. Counts over every process's rows: pairs,
    pairs only the policy got right, pairs only the frozen start policy got right (summed over baseline
    steps they give an exact McNemar test of "GRPO raised the sampled pass rate", benchmarks/
    bench_learning.py)."""
    mine = global_concat(policy.per_func["reward_correct"]) > 0
    theirs = global_concat(frozen.per_func["reward_correct"]) > 0
    return {
        "train/baseline/pairs/n": float(mine.size),
        "train/baseline/pairs/policy_only": float(np.sum(mine & ~theirs)),
        "train/baseline/pairs/frozen_only": float(np.sum(theirs & ~mine)),
    }


def rollout_metrics(rollout: Rollout, reward_metrics: dict[str, float], seconds: float) -> dict[str, float]:
    lengths = global_concat(rollout.lengths)
    out = {f"train/{k}": v for k, v in reward_metrics.items()}
    out["train/completion_len/mean"] = float(lengths.mean())
    out["train/completion_len/max"] = float(lengths.max())
    out["train/rollout_tokens_per_s"] = float(lengths.sum()) / max(seconds, 1e-9)
    return out


def global_reward_metrics(scores: RewardBatch) -> dict[str, float]:
    """RewardBatch.metrics over the rows of every process."""
    per_func = {k: global_concat(v) for k, v in scores.per_func.items()}
    return RewardBatch(per_func=per_func, total=global_concat(scores.total)).metrics()


@dataclasses.dataclass
class StepTimer:
    """Wall-clock seconds per phase of a step (the PRINT_TRAIN_TIME_BREAKDOWN line)."""

    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Trainer:
    """Everything a step needs, built once by `setup`."""

    cfg: Config
    mesh: jax.sharding.Mesh
    model_cfg: Qwen2Config
    sampler: Sampler
    sampling: SamplingSettings  # training rollouts and the periodic eval
    sweep_sampling: SamplingSettings  # the full greedy sweep
    weights: RewardWeights
    loss_cfg: grpo.LossConfig
    num_micro: int
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    ref_params: Any  # the frozen initial policy when beta > 0, else None
    start_params: Any  # baseline_every_steps > 0: the policy before GRPO step 1 (set by `run`), else None
    stream: ProblemStream
    eval_problems: list[Any]
    checkpointer: Checkpointer
    logger: RunLogger
    reporter: Reporter
    # The start sweep (metrics + eval_full_start.jsonl text) rides in every checkpoint's meta: a run
    # resumed on a recreated VM (fresh disk, checkpoints off the VM) still pairs its end sweep with it.
    start_sweep: dict[str, Any] = dataclasses.field(default_factory=dict)

    def update_kwargs(self) -> dict[str, Any]:
        return dict(model_cfg=self.model_cfg, loss_cfg=self.loss_cfg, num_micro=self.num_micro,
                    optimizer=self.optimizer)


def setup(cfg: Config, run_dir: Path, rep: Reporter | None = None) -> tuple[Trainer, dict[str, Any], int]:
    """Builds the trainer and the train state, restored from the latest checkpoint when there is one.

    Returns (trainer, state {"params", "opt_state"}, last completed step)."""
    rep = rep or Reporter(enabled=False, watch_compiles=False)
    mesh = programs.make_mesh(cfg.mesh_shape)
    num_micro = programs.num_micro_batches(cfg, mesh)
    devices = mesh.devices.size
    rep.phase("setup", detail=f"mesh {dict(mesh.shape)} on {devices} {jax.default_backend()} device(s), "
                              f"{jax.process_count()} process(es), config hash {config_hash(cfg)}")
    source = cfg.model_path if cfg.model_init == "pretrained" else "random-init tiny Qwen2"
    rep.phase("model_load", detail=source)
    tokenizer = load_tokenizer(cfg.tokenizer_path or (TINY if cfg.model_init == "random" else cfg.model_path))
    model_cfg, params = build_model(
        cfg, len(tokenizer), mesh, on_bytes=lambda done, total: rep.bytes(done, total, detail=source)
    )
    rep.say(f"model: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab {len(tokenizer)}")
    ref_params = jax.tree.map(jnp.copy, params) if cfg.train.beta > 0 else None  # never loaded at beta 0
    optimizer = optimizer_for(cfg.optimizer)
    # Under the mesh, init's scalars (the step count) are typed on it as the update step returns them;
    # else step 2 sees another input type than step 1 and compiles the whole update step again. The
    # out_shardings of programs.optimizer_init split the state like the params (never on one chip).
    with jax.set_mesh(mesh):
        state = {"params": params, "opt_state": programs.optimizer_init(optimizer, params, mesh)(params)}

    d = cfg.data
    rep.phase("data_load", detail=f"{d.source} {d.train_split} + {cfg.eval_split}")
    train_problems = load_problems(d.source, d.train_split, size=d.train_size, difficulty=d.difficulty,
                                   seed=cfg.seed)
    eval_problems = load_problems(d.source, cfg.eval_split, size=cfg.eval_full_limit or None,
                                  difficulty=d.difficulty, seed=cfg.seed)
    stream = ProblemStream(train_problems, seed=cfg.seed)
    rep.say(f"data: {len(train_problems)} train problems, {len(eval_problems)} eval problems ({d.source})")

    checkpointer = Checkpointer(checkpoint_dir(cfg.checkpoint.dir, run_dir), keep=cfg.checkpoint.keep)
    start, run_id = 0, None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # A resumed run rebuilds its start policy from these (the init, or the init + the same warm start).
    start_params = jax.tree.map(jnp.copy, params) if cfg.baseline_every_steps else None
    restored = checkpointer.restore_latest(state, free_sharding=replicated)
    if restored is not None:
        start, state, meta = restored
        stream.restore(meta["data"])
        run_id = meta.get("wandb_run_id")
        # the rehearsal's report quotes this line (grpoctl_testing/rehearsal.py resumed_step)
        rep.phase("checkpoint", detail=f"resumed from the checkpoint of step {start}")
    logger = RunLogger(
        run_dir, config=to_dict(cfg), config_hash=config_hash(cfg), wandb_mode=cfg.wandb_mode,
        wandb_project=cfg.wandb_project, wandb_name=cfg.wandb_name, run_id=run_id,
        enabled=jax.process_index() == 0,
    )
    if restored is not None:  # a fresh disk (a recreated VM): the history comes back with the checkpoint
        logger.restore_history(meta.get("metrics"))
    start_sweep = dict(meta.get("start_sweep") or {}) if restored is not None else {}
    if start_sweep:
        restore_start_sweep(logger, run_dir, start_sweep)
    sampling = programs.rollout_settings(cfg)
    trainer = Trainer(
        cfg=cfg, mesh=mesh, model_cfg=model_cfg, sampler=Sampler(model_cfg, tokenizer, mesh),
        sampling=sampling, sweep_sampling=programs.sweep_settings(cfg),
        weights=RewardWeights.from_config(cfg.reward_weights), loss_cfg=loss_config(cfg),
        num_micro=num_micro,
        optimizer=optimizer, schedule=lr_schedule(cfg.optimizer, cfg.steps * cfg.train.ppo_epochs),
        ref_params=ref_params, start_params=start_params, stream=stream, eval_problems=eval_problems,
        checkpointer=checkpointer, logger=logger, reporter=rep, start_sweep=start_sweep,
    )
    info = {"run_id": logger.run_id, "config_hash": logger.config_hash, "git_commit": logger.git_commit}
    if logger.url:
        info["wandb_url"] = logger.url
        rep.say(f"W&B run: {logger.url}")
    rep.info(info)
    return trainer, state, start


def warm_start_policy(t: Trainer, params: Any) -> tuple[Any, dict[str, float]]:
    """The supervised warm start (warm_start.steps > 0) of a fresh run, on the train problems."""
    cfg = t.cfg
    if cfg.warm_start.batch_size % math.lcm(sharding.batch_divisor(t.mesh), jax.process_count()):
        problem = "must split over the data shards (dp x fsdp) and the processes"
        raise ConfigError("warm_start.batch_size", problem)
    rep, n = t.reporter, cfg.warm_start.steps

    def on_step(k: int, loss: jax.Array) -> None:
        if rep.due("warm_start", k, n):  # sync the device only when the line is printed
            rep.advance("warm_start", k, n, detail=f"loss {float(loss):.4f}")

    rep.advance("warm_start", 0, n)
    return warm_start(
        params, cfg.warm_start, t.model_cfg, t.sampler.tokenizer, t.stream.problems, t.mesh, seed=cfg.seed,
        pad_id=t.sampler.pad_id, compute_dtype=programs.DTYPES[cfg.compute_dtype],
        local_rows=t.sampler.local_slice(cfg.warm_start.batch_size), on_step=on_step,
    )


def train_step(t: Trainer, state: dict[str, Any], step: int, timer: StepTimer) -> tuple[dict, dict]:
    """One GRPO step: rollout -> rewards -> update (ppo_epochs optimizer steps). Returns (state, metrics)."""
    cfg = t.cfg
    rng = jax.random.fold_in(jax.random.key(cfg.seed), step)

    rollout_span = t.reporter.span()
    with timer.phase("rollout"):
        problems = t.stream.next_batch(cfg.rollout.batch_size)[t.sampler.local_slice(cfg.rollout.batch_size)]
        rollout = t.sampler.sample(state["params"], problems, cfg.rollout.n, rng, t.sampling)
    t.reporter.observe("rollout", rollout_span.seconds())  # the ETA's yardstick for eval batches

    with timer.phase("reward"):
        answers = [p.answer for p in rollout.problems]
        scores = score_completions(rollout.texts, answers, t.weights, cfg.reward_grader)
        metrics = rollout_metrics(rollout, global_reward_metrics(scores), timer.times["rollout"])

    if cfg.baseline_every_steps and step % cfg.baseline_every_steps == 0:
        with timer.phase("baseline"):  # same prompts, same keys: only the policy differs
            frozen = t.sampler.sample(t.start_params, problems, cfg.rollout.n, rng, t.sampling)
            base = score_completions(frozen.texts, answers, t.weights, cfg.reward_grader)
            metrics.update({f"train/baseline/{k}": v for k, v in global_reward_metrics(base).items()})
            metrics.update(paired_correctness(scores, base))

    with timer.phase("update"):
        host_batch = training_batch(rollout, scores.total, cfg.train.seq_bucket, t.sampler.pad_id)
        batch = sharding.shard_batch(host_batch, t.mesh)
        if cfg.train.ppo_epochs > 1:  # the sampling policy, kept fixed across the epochs
            batch["old_logp"] = behaviour_logprobs(
                state["params"], batch, model_cfg=t.model_cfg, loss_cfg=t.loss_cfg, num_micro=t.num_micro
            )
        params, opt_state = state["params"], state["opt_state"]
        epochs = []
        for epoch in range(cfg.train.ppo_epochs):
            lr = np.float32(t.schedule((step - 1) * cfg.train.ppo_epochs + epoch))
            params, opt_state, update = update_step(
                params, opt_state, t.ref_params, batch, lr, **t.update_kwargs()
            )
            epochs.append(update)
        # The last epoch's metrics; the lockstep parity's worst epoch (with ppo_epochs > 1 the later epochs
        # are the ones whose ratio != 1 makes the loss value depend on the provider's log-probs).
        update = jax.device_get(epochs[-1])
        for key in update:
            if key.startswith("parity/"):
                update[key] = worst(float(e[key]) for e in epochs)

    metrics.update({k if k == "loss" else f"train/{k}": float(v) for k, v in update.items()})
    metrics["train/lr"] = float(lr)
    row_lengths = global_concat(host_batch["attn_mask"].sum(axis=1))
    metrics["train/seq_len"] = float(host_batch["tokens"].shape[1])
    metrics["train/padding_frac"] = 1.0 - float(row_lengths.mean()) / metrics["train/seq_len"]
    return {"params": params, "opt_state": opt_state}, metrics


def worst(values: Iterable[float | None]) -> float:
    """The largest of parity differences, NaN when any is NaN (or None: a NaN read back from
    metrics.jsonl after a resume): a diverged shadow must not hide behind a finite maximum."""
    values = [math.nan if v is None else float(v) for v in values]
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def restore_start_sweep(logger: RunLogger, run_dir: Path, saved: dict[str, Any]) -> None:
    """A resumed run's start sweep from its checkpoint: into the summary, and eval_full_start.jsonl back
    into a run dir that lost it (a recreated VM's fresh disk)."""
    if not logger.enabled:
        return
    logger.latest.update(saved.get("metrics", {}))
    rows = run_dir / rundir.EVAL_FULL_START_ROWS
    if saved.get("rows") and not rows.exists():
        rows.write_text(saved["rows"])


def sweep(
    t: Trainer, params: Any, run_dir: Path, prefix: str, on_batch: OnBatch | None = None
) -> dict[str, float]:
    """The greedy full sweep of `params` -> `<prefix>/...` metrics and `run_dir/<prefix>.jsonl`."""
    cfg = t.cfg
    return full_sweep(
        t.sampler, params, t.eval_problems, batch_size=cfg.eval_full_batch_size,
        settings=t.sweep_sampling, out_path=run_dir / rundir.sweep_rows(prefix) if t.logger.enabled else None,
        grader=cfg.reward_grader, prefix=prefix, on_batch=on_batch, sampled=sampled_pass(cfg),
    )


def sampled_pass(cfg: Config) -> SampledPass | None:
    """The sweep's sampled pass (eval_full_sampled): the training rollout's n, settings and batch."""
    if not cfg.eval_full_sampled:
        return None
    return SampledPass(
        n=cfg.rollout.n, settings=programs.rollout_settings(cfg), batch_size=cfg.rollout.batch_size
    )


class Stopped(Exception):
    """The run was asked to stop (SIGTERM: spot preemption, `grpoctl stop`) and checkpointed first."""


def run(
    cfg: Config,
    run_dir: str | os.PathLike[str],
    *,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train per `cfg`, writing into `run_dir`; returns the summary (also in run_dir/summary.json).

    `on_step(step, metrics)` is called after each step is logged and checkpointed (tests use it to
    interrupt a run). When `should_stop()` turns true (python -m trainer wires it to SIGTERM), the run
    checkpoints the step it just finished and raises `Stopped`; a restart resumes from there."""
    run_dir = Path(run_dir)
    enable_compile_cache(compile_cache_dir(cfg.compile_cache_dir, cfg.checkpoint.dir, run_dir))
    init_distributed()  # the worker's .env was read before `cfg` was built (python -m trainer)
    rep = Reporter(enabled=jax.process_index() == 0)
    try:
        t, state, start = setup(cfg, run_dir, rep)
    except BaseException:
        rep.close()
        raise
    rep.plan = plan_of(cfg, start, len(t.eval_problems))
    step_times = t.logger.resume_history(start, "time/train/step_s")
    try:
        if start == 0 and cfg.warm_start.steps:  # a resumed run has it in its checkpointed params
            state["params"], warm = warm_start_policy(t, state["params"])
            t.logger.log(0, warm)  # step 0 of metrics.jsonl; kept by resume_history, so in the summary
        if cfg.baseline_every_steps:  # a copy: update_step donates the params it is given
            if start == 0:
                t.start_params = jax.tree.map(jnp.copy, state["params"])
            elif cfg.warm_start.steps:  # deterministic: the same warm start gives the same start policy
                t.start_params, _ = warm_start_policy(t, t.start_params)
        if start == 0 and cfg.eval_full_sweep and cfg.eval_full_at_start:
            # The state right before GRPO step 1: the end-of-run sweep is paired with this one.
            start_sweep = sweep(t, state["params"], run_dir, rundir.EVAL_FULL_START,
                                on_batch=functools.partial(rep.advance, "start_sweep"))
            t.logger.log(0, start_sweep)
            rows = run_dir / rundir.EVAL_FULL_START_ROWS
            t.start_sweep = {"metrics": start_sweep, "rows": rows.read_text() if rows.is_file() else ""}
            rep.say(f"start sweep: accuracy {start_sweep['eval_full_start/accuracy']:.4f} "
                    f"on {int(start_sweep['eval_full_start/num_questions'])} questions")
        rep.advance("train", start, cfg.steps)
        for step in range(start + 1, cfg.steps + 1):
            timer, t_step, span = StepTimer(), time.perf_counter(), rep.span()
            state, metrics = train_step(t, state, step, timer)
            rep.observe("train", span.seconds())  # compile-free, periodic eval apart
            rep.done_units["train"] = step

            if cfg.eval_every_steps and (step % cfg.eval_every_steps == 0 or step == cfg.steps):
                with timer.phase("eval"):
                    metrics.update(periodic_eval(
                        t.sampler, state["params"], t.eval_problems, batch_size=cfg.rollout.batch_size,
                        batches=cfg.eval_batches_per_process, n=cfg.rollout.n, settings=t.sampling,
                        weights=t.weights, rng=jax.random.fold_in(jax.random.key(cfg.seed + 1), step),
                        grader=cfg.reward_grader,
                        on_batch=functools.partial(rep.advance, "eval"),
                    ))

            for key in rundir.PARITY_KEYS:  # the summary keeps each parity metric's maximum over the run
                if key in metrics:
                    running = t.logger.latest.get(rundir.parity_max(key), 0.0)
                    metrics[rundir.parity_max(key)] = worst([metrics[key], running])

            step_times.append(time.perf_counter() - t_step)
            metrics["time/train/step_s"] = step_times[-1]
            metrics["time/train/step_avg_last10_s"] = float(np.mean(step_times[-10:]))
            metrics.update({f"time/train/{k}_s": v for k, v in timer.times.items()})
            t.logger.log(step, metrics)
            rep.step(step, progress_metrics(metrics))
            if cfg.print_time_breakdown:
                t.logger.time_breakdown(step, cfg.steps, {**timer.times, "total": step_times[-1]})

            every = cfg.checkpoint.every_steps
            stopping = should_stop is not None and should_stop()
            if step == cfg.steps or (every and step % every == 0) or stopping:
                meta = {"data": t.stream.state(), "wandb_run_id": t.logger.run_id, "step": step,
                        "start_sweep": t.start_sweep, "metrics": t.logger.history()}
                rep.phase("checkpoint", detail=f"saving step {step}")
                t.checkpointer.save(step, state, meta)
                rep.resume("train")
            if on_step is not None:
                on_step(step, metrics)
            if stopping and step < cfg.steps:
                t.checkpointer.wait()
                raise Stopped(f"stopped after step {step} of {cfg.steps}; checkpointed, restart to resume")

        t.checkpointer.wait()
        if cfg.eval_full_sweep:
            final = sweep(t, state["params"], run_dir, rundir.EVAL_FULL,
                          on_batch=functools.partial(rep.advance, "final_sweep"))
            t.logger.log(cfg.steps, final)
            rep.say(f"final sweep: accuracy {final['eval_full/accuracy']:.4f} "
                    f"on {int(final['eval_full/num_questions'])} questions")
        # where the time went: into summary.json and W&B's summary (not a metrics.jsonl row of its own)
        summary = t.logger.finish(cfg.steps, extra=ledger_metrics(rep.ledger()))
        rep.finish(str(summary))
        return dict(t.logger.latest, run_id=t.logger.run_id, config_hash=t.logger.config_hash)
    except BaseException:
        t.logger.close()
        raise
    finally:
        rep.close()
        t.checkpointer.close()


def ledger_metrics(ledger: dict[str, Any]) -> dict[str, float]:
    """This process's seconds per phase (`time/phase/<phase>_s`) and its goodput (train / all): the trainer's
    share of the ledger (`grpoctl status RUN` adds grpoctl's own steps: provisioning, recovery, ...)."""
    phase_s = ledger["phase_s"]
    out = {f"time/phase/{k}_s": float(v) for k, v in phase_s.items()}
    total = sum(phase_s.values())
    out["time/phase/goodput"] = phase_s.get("train", 0.0) / total if total > 0 else 0.0
    return out


def plan_of(cfg: Config, start: int, eval_questions: int) -> Plan:
    """What is left to do from `start` (the last finished step), in each phase's units."""
    sampled = sampled_pass(cfg)
    sweep = sweep_batches(eval_questions, cfg.eval_full_batch_size, sampled) if cfg.eval_full_sweep else 0
    rows = eval_questions * (1 + (sampled.n if sampled else 0))  # sequences one sweep samples
    return Plan(
        steps=cfg.steps,
        first_step=start + 1,
        warm_start_steps=cfg.warm_start.steps if start == 0 else 0,
        start_sweep_batches=sweep if start == 0 and cfg.eval_full_at_start else 0,
        eval_steps=eval_steps(start + 1, cfg.steps, cfg.eval_every_steps),
        eval_batches=cfg.eval_batches_per_process,
        final_sweep_batches=sweep,
        rows_per_step=cfg.rollout.batch_size * cfg.rollout.n,
        rows_per_sweep_batch=rows // max(sweep, 1) or cfg.eval_full_batch_size,
    )
