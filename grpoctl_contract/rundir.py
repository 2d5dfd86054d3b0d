"""Where a run's files live on a worker: the job's files under the checkout (`RunPaths`: log, pid, exit,
env) and what the run directory (`runs/<run-id>/` on worker 0) holds (file names and summary keys).

The launch recipe and the trainer write these files; the orchestrator polls, fetches, fakes (dry run) and
compares them. Both import the names from here, so renaming a file is one edit. Stdlib only, like the rest
of this package.
"""

from __future__ import annotations

from dataclasses import dataclass

SUMMARY = "summary.json"  # latest value of every metric + run id, config hash, git commit, steps
METRICS = "metrics.jsonl"  # one JSON object per logged step: {"step": N, "<metric>": value, ...}
CONFIG = "config.json"  # the effective trainer config of the run
EVAL_FULL = "eval_full"  # the full sweep after training: metrics prefix and per-question rows file stem
EVAL_FULL_START = "eval_full_start"  # the same sweep of the start policy, before the first GRPO step
# W&B's own summary file (online mode writes it; offline does not), under the run dir's wandb folder.
WANDB_SUMMARY = "wandb-summary.json"
WANDB_SUMMARY_GLOB = f"wandb/run-*/files/{WANDB_SUMMARY}"


def sweep_rows(prefix: str) -> str:
    """The per-question rows file of a sweep: {"id", "answer", "prediction", "correct"} per line."""
    return f"{prefix}.jsonl"


EVAL_FULL_ROWS = sweep_rows(EVAL_FULL)
EVAL_FULL_START_ROWS = sweep_rows(EVAL_FULL_START)
# What `grpoctl fetch` copies back to the laptop (when present), in this order.
RESULT_FILES = (SUMMARY, EVAL_FULL_ROWS, EVAL_FULL_START_ROWS, METRICS, CONFIG)

# The five summary keys the seed SOP reads from each run and `compare` puts side by side.
SOP_KEYS = (
    "eval_full/accuracy",
    "eval/reward/func/reward_correct/mean",
    "eval/reward/total/mean",
    "time/train/step_avg_last10_s",
    "time/eval_full/step_s",
)

# Lockstep parity of the loss provider (trainer config train.shadow_policy_loss_impl): logged every GRPO
# step by a run that has a shadow provider; the summary also keeps each key's maximum over the run, under
# `parity_max(key)`. grad_rel_diff is ||g_main - g_shadow|| / ||g_main|| for the gradient of the policy loss
# w.r.t. the loss head's inputs (final hidden states and LM head), not w.r.t. every parameter.
PARITY_KEYS = (
    "train/parity/logp_max_abs_diff",
    "train/parity/logp_mean_abs_diff",
    "train/parity/grad_rel_diff",
    "train/parity/loss_abs_diff",
)


def parity_max(key: str) -> str:
    """The summary key holding the run's maximum of a PARITY_KEYS metric."""
    return f"{key}_max"


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files live on every worker, relative to the checkout."""

    log: str
    pid: str
    exit: str
    run_dir: str

    @property
    def run_id(self) -> str:
        return self.run_dir.rstrip("/").rsplit("/", 1)[-1]

    @property
    def env(self) -> str:
        """The run's `-e` values (0600, read by the job launcher; `logs` redacts with it). Named by run
        id, not by log stamp: a retried launch in the same second must not overwrite another run's."""
        return f"logs/{self.run_id}.env"

    @property
    def env_loader(self) -> str:
        """A copy of grpoctl_contract/envfile.py (ENVFILE_SOURCE) that loads `env` for the job: the job
        needs no grpoctl installed on the worker, whatever interpreter the target names."""
        return f"logs/{self.run_id}.loader.py"

    PID_GLOB = "logs/nohup_*.pid"  # every run's pid file (and the _latest links), relative to the checkout

    @staticmethod
    def for_run(config_stem: str, ts: str, run_id: str) -> RunPaths:
        base = f"logs/nohup_{config_stem}_{ts}"
        return RunPaths(log=f"{base}.log", pid=f"{base}.pid", exit=f"{base}.exit", run_dir=f"runs/{run_id}")

    @staticmethod
    def latest(config_stem: str, ext: str) -> str:
        """The symlink to the newest run's `log`, `pid` or `exit` file of a config."""
        return f"logs/nohup_{config_stem}_latest.{ext}"
