"""`compare --plot` and the SOP report's plot: reward and loss curves per run (the mean of an arm's seeds
thick), start/end greedy accuracy with intervals and, when every run's sweeps sampled, start/end sampled
pass rate. matplotlib is the `plot` extra, not a base dependency."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator import stats
from orchestrator.compare import (
    WATERMARK,
    ArmStats,
    RunFiles,
    as_runs,
    is_number,
    label_of,
    run_accuracy,
    sampled_rate,
)
from orchestrator.errors import UsageError

# Per arm, for "start" and "end": each run's value and the arm's interval (None: no bar).
StartEnd = tuple[str, dict[str, tuple[list[float], stats.Interval | None]]]

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


def _greedy(arm: ArmStats) -> StartEnd:
    """Greedy accuracy: t interval across runs, Wilson for one run (ArmStats.interval)."""
    return arm.label, {which: (arm.values(which), arm.interval(which)) for which in ("start", "end")}


def _sampled(label: str, runs: Sequence[RunFiles]) -> StartEnd | None:
    """Sampled pass rate when every run has both sampled passes: t interval across runs (one run: none,
    its samples are not independent draws)."""
    values = {
        "start": [sampled_rate(r.sampled_start) for r in runs],
        "end": [sampled_rate(r.sampled) for r in runs],
    }
    if any(v is None for vs in values.values() for v in vs):
        return None
    out = {}
    for which, vs in values.items():
        try:
            out[which] = (vs, stats.mean_interval(vs))
        except stats.StatsUnavailable:
            out[which] = (vs, None)
    return label, out


def _draw_start_end(ax: Any, arms: Sequence[StartEnd]) -> bool:
    """Start and end per arm: each run a dot, the arm's mean with its interval as an error bar."""
    drawn = False
    for i, ((label, by_which), color) in enumerate(zip(arms, ("tab:blue", "tab:orange"), strict=True)):
        shift = -0.08 if i == 0 else 0.08
        for x, which in ((0, "start"), (1, "end")):
            values, ci = by_which[which]
            if not values:
                continue
            mean = math.fsum(values) / len(values)
            ax.scatter([x + shift] * len(values), values, color=color, alpha=0.4, s=14)
            yerr = None if ci is None else [[mean - ci.low], [ci.high - mean]]
            ax.errorbar(
                [x + shift],
                [mean],
                yerr=yerr,
                fmt="o",
                color=color,
                capsize=4,
                label=label if x == 0 or not by_which["start"][0] else None,
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
    arms = ((label_a, runs_a), (label_b, runs_b))
    sampled = [_sampled(label, runs) for label, runs in arms]
    panels = 4 if all(sampled) else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    for ax, title, candidates in ((axes[0], "reward", REWARD_KEYS), (axes[1], "loss", LOSS_KEYS)):
        ax.set_title(title)
        ax.set_xlabel("step")
        if _draw_curves(ax, arms, candidates, names):
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", transform=ax.transAxes)
    accuracy = axes[2]
    accuracy.set_title("greedy accuracy (95% interval)")
    greedy = [_greedy(ArmStats(label, [run_accuracy(r) for r in runs])) for label, runs in arms]
    if _draw_start_end(accuracy, greedy):
        accuracy.legend(fontsize=7)
    else:
        accuracy.text(0.5, 0.5, "no eval_full accuracy", ha="center", transform=accuracy.transAxes)
    if panels == 4:
        axes[3].set_title("sampled pass rate (95% t interval over runs)")
        if _draw_start_end(axes[3], [arm for arm in sampled if arm]):
            axes[3].legend(fontsize=7)
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
