"""`compare --plot` and the SOP report's plot: reward and loss curves per run (the mean of an arm's seeds
thick) and start/end accuracy with intervals. matplotlib is the `plot` extra, not a base dependency."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.compare import WATERMARK, ArmStats, RunFiles, as_runs, is_number, label_of, run_accuracy
from orchestrator.errors import UsageError

REWARD_KEYS = ("train/reward/total/mean", "reward/total/mean", "train/reward/mean", "reward")
LOSS_KEYS = ("loss", "train/loss", "train/policy_loss")


def _series(metrics: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> tuple[str, list, list] | None:
    for key in candidates:
        points = [(m["step"], m[key]) for m in metrics if is_number(m.get(key)) and "step" in m]
        if points:
            return key, [p[0] for p in points], [p[1] for p in points]
    return None


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_plot_path(out: str | Path) -> Path:
    """A plot goes into a folder that exists (we never create folders for it: a typo such as
    `/no/such/dir/p.png` must not leave directories at the filesystem root) with a known image suffix."""
    out = Path(out)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {str(out)!r}: use a file name ending in {', '.join(PLOT_SUFFIXES)}")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"--plot {str(out)!r}: folder {str(parent)!r} does not exist (create it first)")
    if out.is_dir():
        raise UsageError(f"--plot {str(out)!r} is a folder")
    return out


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the file-only backend; matplotlib is the `plot` extra, not a base dependency."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "plots need matplotlib, which this install lacks: pip install 'grpoctl[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: Sequence[tuple[list, list]]) -> tuple[list, list]:
    """The mean over runs at each step that every run logged (seeds of one config log the same steps)."""
    by_run = [dict(zip(steps, values, strict=True)) for steps, values in curves]
    common = sorted(set.intersection(*(set(d) for d in by_run)))
    return common, [math.fsum(d[s] for d in by_run) / len(by_run) for s in common]


def _draw_curves(
    ax: Any,
    arms: Sequence[tuple[str, list[RunFiles]]],
    candidates: Sequence[str],
    names: Mapping[str, str] | None = None,
) -> bool:
    """Per-run curves (thin; one per seed) and, for an arm of several runs, their mean (thick)."""
    drawn = False
    for (label, runs), style, color in zip(arms, ("-", "--"), ("tab:blue", "tab:orange"), strict=True):
        curves = []
        for run in runs:
            series = _series(run.metrics, candidates)
            if series is None:
                continue
            key, steps, values = series
            curves.append((steps, values))
            thin = len(runs) > 1
            ax.plot(
                steps,
                values,
                style,
                color=color,
                alpha=0.35 if thin else 1.0,
                linewidth=0.8 if thin else 1.5,
                label=f"{(names or {}).get(run.run_id, run.run_id)} ({key})",
            )
            drawn = True
        if len(curves) > 1:
            steps, mean = _mean_curve(curves)
            ax.plot(steps, mean, style, color=color, linewidth=2.2, label=f"{label}: mean of {len(curves)}")
    return drawn


def _draw_accuracy(ax: Any, arms: Sequence[ArmStats]) -> bool:
    """Start and end accuracy per arm: each run a dot, the arm's mean with its interval (t across runs,
    Wilson for one run) as an error bar."""
    drawn = False
    for i, (arm, color) in enumerate(zip(arms, ("tab:blue", "tab:orange"), strict=True)):
        shift = -0.08 if i == 0 else 0.08
        for x, which in ((0, "start"), (1, "end")):
            values = arm.values(which)
            mean, ci = arm.mean(which), arm.interval(which)
            if mean is None:
                continue
            ax.scatter([x + shift] * len(values), values, color=color, alpha=0.4, s=14)
            yerr = None if ci is None else [[mean - ci.low], [ci.high - mean]]
            ax.errorbar(
                [x + shift],
                [mean],
                yerr=yerr,
                fmt="o",
                color=color,
                capsize=4,
                label=arm.label if x == 0 or arm.mean("start") is None else None,
            )
            drawn = True
    ax.set_xticks([0, 1], ["start", "end"])
    ax.set_xlim(-0.5, 1.5)
    return drawn


def plot(
    a: RunFiles | Sequence[RunFiles],
    b: RunFiles | Sequence[RunFiles],
    out: str | Path,
    *,
    labels: tuple[str, str] | None = None,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Reward and loss curves (per run, and the mean of an arm's seeds) and start/end accuracy with
    intervals, in one image; a dry run's is watermarked. See `check_plot_path` for `out`."""
    out = check_plot_path(out)
    runs_a, runs_b = as_runs(a), as_runs(b)
    label_a, label_b = labels or (label_of(runs_a), label_of(runs_b))
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    arms = ((label_a, runs_a), (label_b, runs_b))
    for ax, title, candidates in ((axes[0], "reward", REWARD_KEYS), (axes[1], "loss", LOSS_KEYS)):
        ax.set_title(title)
        ax.set_xlabel("step")
        if _draw_curves(ax, arms, candidates, names):
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", transform=ax.transAxes)
    accuracy = axes[2]
    accuracy.set_title("greedy accuracy (95% interval)")
    stats_arms = [ArmStats(label, [run_accuracy(r) for r in runs]) for label, runs in arms]
    if _draw_accuracy(accuracy, stats_arms):
        accuracy.legend(fontsize=7)
    else:
        accuracy.text(0.5, 0.5, "no eval_full accuracy", ha="center", transform=accuracy.transAxes)
    fig.tight_layout()
    if any(r.fabricated for r in (*runs_a, *runs_b)):  # a made-up figure must not pass for a result
        fig.text(
            0.5,
            0.5,
            WATERMARK,
            ha="center",
            va="center",
            rotation=20,
            fontsize=44,
            color="red",
            alpha=0.35,
            weight="bold",
        )
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
