"""The replay's Markdown report, and the one place that spells a step as the grpoctl command a person
would type to do the same by hand (the report's step table shows it)."""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator import compare as cmp
from orchestrator import ledger as ledger_mod
from orchestrator.runs import RunRecord, utc_now_iso
from orchestrator.sop import schema
from orchestrator.sop.schema import CompareStep, RunStep, Sop, Step, members, run_overrides, step_id
from orchestrator.sop.state import ReplayState, StepState
from orchestrator.untrusted import md, md_value


def plot_path(report_dir: Path, step: CompareStep) -> Path:
    """Where a compare step's plot goes: beside the report (run names are plain file names: schema; a
    seed's run `jax/s0` becomes `jax-s0`)."""
    return report_dir / f"{step.a}_vs_{step.b}.png".replace("/", "-")


def run_ids(sop: Sop, state: ReplayState) -> dict[str, str]:
    """Run name -> run id, for the runs launched so far."""
    found = {
        s.name: state.steps.get(step_id(s), StepState()).run_id for s in sop.steps if isinstance(s, RunStep)
    }
    return {name: run_id for name, run_id in found.items() if run_id}


def command_line(
    step: Step,
    *,
    sop: Sop,
    state: ReplayState,
    target: str,
    dry_run: bool,
    overrides: Mapping[str, str],
    report_dir: Path,
) -> str:
    """The grpoctl command that does what `step` does (secrets by name only: `--secret NAME`; `-e` values
    are flags that are not secret), shell-quoted (shlex.join): pasting it runs what ran, whatever a value
    holds (`$(...)`, `;`, quotes)."""
    ids = run_ids(sop, state) if isinstance(step, schema.WaitStep | schema.FetchStep | CompareStep) else {}
    args: list[str]
    if isinstance(step, schema.UpStep | schema.DownStep):
        args = [step.kind]
    elif isinstance(step, schema.SyncStep):
        args = ["sync", *([] if step.bootstrap else ["--no-bootstrap"])]
    elif isinstance(step, schema.EnvPushStep):
        args = ["env", "push", "--file", step.file]
    elif isinstance(step, RunStep):
        args = ["run", step.config, *[a for k, v in step.env.items() for a in ("--env", f"{k}={v}")]]
        args += [a for name in step.secrets for a in ("--secret", name)]
        args += [a for k, v in run_overrides(step, overrides).items() for a in ("--set", f"{k}={v}")]
        args += ["--wait"] if step.wait else []
    elif isinstance(step, schema.WaitStep):
        args = ["status", ",".join(ids.get(n, "?") for n in members(sop, step.run)), "--watch"]
    elif isinstance(step, schema.FetchStep):
        names = (
            [n for r in step.runs for n in members(sop, r)]
            if step.runs
            else [s.name for s in sop.steps if isinstance(s, RunStep)]
        )
        args = ["fetch", *[ids.get(n, "?") for n in names]]
    else:
        assert isinstance(step, CompareStep)
        args = [
            "compare",
            *(",".join(ids.get(n, "?") for n in members(sop, ref)) for ref in (step.a, step.b)),
        ]
        args += ["--plot", str(plot_path(report_dir, step))] if step.plot else []
        args += [] if step.margin == cmp.stats.DEFAULT_MARGIN else ["--margin", f"{step.margin:g}"]
    return shlex.join(["grpoctl", *(["--dry-run"] if dry_run else []), "--target", target, *args])


def run_details(record: RunRecord) -> list[str]:
    """A run's report lines: state, files, per-worker pid and exit, last phase, identity, recoveries."""
    lines = [
        f"run id `{record.run_id}`: **{record.state}**",
        f"log `{record.log_path}`, pid file `{record.pid_path}`, exit file `{record.exit_path}`",
    ]
    for w in record.workers:
        code = "" if w.exit_code is None else f", exit {w.exit_code}"
        lines.append(f"{w.worker} ({w.host}): pid {w.pid}, {w.state}{code}")
    if record.last_progress is not None:
        lines.append(f"last phase: {md(record.last_progress.text)}")
    # config hash and W&B URL come from the worker's log: escaped, they can never open a line of their own
    lines.append(
        f"commit {md_value(record.git_commit or 'unknown', code=True)}, "
        f"config hash {md_value(record.config_hash or 'unknown', code=True)}"
        + (f", W&B {md_value(record.wandb_url)}" if record.wandb_url else "")
    )
    for i, r in enumerate(record.recoveries, 1):
        lines.append(
            f"recovery {i}: {r['kind']} ({r['reason']}) at step {r.get('step')}, "
            f"relaunched at {r['at']} with log `{r.get('log')}`"
        )
    return lines


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def sop_ledgers(
    sop: Sop, state: ReplayState, prices: Mapping[str, Any] | None = None, *, now: float | None = None
) -> tuple[dict[str, ledger_mod.Ledger], ledger_mod.Ledger]:
    """Each run's ledger, and the SOP's total: the runs, plus `up` (provisioning), `sync` and `env push`
    (bootstrap), and the rest of the replay's time while a node was up (idle: fetches, compares, waiting
    between steps)."""
    now = time.time() if now is None else now
    runs: dict[str, ledger_mod.Ledger] = {}
    for s in sop.steps:
        st = state.steps.get(step_id(s))
        if isinstance(s, RunStep) and st is not None and st.record:
            runs[s.name] = ledger_mod.run_ledger(RunRecord.from_json(st.record), now=now, prices=prices)
    extra = {"waiting_for_capacity": 0.0, "provisioning": 0.0, "bootstrap": 0.0}
    spans = []
    for s in sop.steps:
        st = state.steps.get(step_id(s))
        if st is None or st.duration_s is None:
            continue
        start = _epoch(st.started_at)
        if start is not None:
            spans.append((start, start + st.duration_s))
        if isinstance(s, schema.UpStep):
            waited = min(st.seconds.get("waiting_for_capacity", 0.0), st.duration_s)
            extra["waiting_for_capacity"] += waited
            extra["provisioning"] += st.duration_s - waited
        elif isinstance(s, schema.SyncStep | schema.EnvPushStep):
            extra["bootstrap"] += st.duration_s
    if spans:  # the replay's wall time, less what the runs and the steps above account for
        wall = max(e for _, e in spans) - min(b for b, _ in spans)
        accounted = sum(r.wall_s for r in runs.values()) + sum(extra.values())
        extra["idle"] = max(wall - accounted, 0.0)
    return runs, ledger_mod.total(runs.values(), extra)


def ledger_lines(
    runs: Mapping[str, ledger_mod.Ledger],
    total: ledger_mod.Ledger,
    summaries: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """The report's ledger table: per run and in total, with the cost of an accuracy point each run gained
    (its full sweep's accuracy after training minus before, in points)."""
    cols = ["chip-hours", "goodput", "cost (est.)", "points gained", "per point", *ledger_mod.CATEGORIES]
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def row(name: str, led: ledger_mod.Ledger, summary: Mapping[str, Any] | None) -> str:
        cost = led.cost_estimate_usd
        gained = None
        if summary:
            end, begin = summary.get(cmp.END_KEY), summary.get(cmp.START_KEY)
            if cmp.is_number(end) and cmp.is_number(begin):
                gained = (end - begin) * 100
        per = "-"
        if gained is not None and gained > 0:
            per = f"${cost / gained:.2f}" if cost is not None else f"{led.chip_hours / gained:.3g} chip-h"
        cells = [
            f"{led.chip_hours:.3g}",
            "-" if led.goodput is None else f"{led.goodput:.0%}",
            "-" if cost is None else f"${cost:.2f}",
            "-" if gained is None else f"{gained:+.1f}",
            per,
            *(ledger_mod.fmt_s(led.seconds[c]) for c in ledger_mod.CATEGORIES),
        ]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines += [row(name, led, summaries.get(name)) for name, led in runs.items()]
    lines.append(row("**SOP total**", total, None))
    note = total.price.note() if total.price is not None else "no price"
    lines += ["", f"Cost is an estimate ({note}): chip-hours x a list price, not a bill."]
    return lines


# The report, section by section: each a small function of (sop, state, dry_run) returning Markdown lines,
# so a section can change (or be escaped) without touching the others.


def header(sop: Sop, sop_path: Path, dry_run: bool) -> list[str]:
    lines = [f"# SOP `{sop.name}`{' (dry run)' if dry_run else ''}", ""]
    if dry_run:  # nothing below happened: say so before any figure can be quoted out of context
        lines += ["**Dry run: every pid, state, figure and verdict below is FABRICATED, not a result.**", ""]
    if sop.description:
        lines += [sop.description.strip(), ""]
    lines += [f"- file: `{sop_path}`", f"- default target: `{sop.target}`", f"- written: {utc_now_iso()}"]
    return lines


Ledgers = tuple[dict[str, ledger_mod.Ledger], ledger_mod.Ledger]  # sop_ledgers(): per run, and the total


def summary(state: ReplayState, dry_run: bool, ledgers: Ledgers | None) -> list[str]:
    """The verdicts, each once, first, then the key numbers and what the runs cost: what a reader pastes
    into a notebook."""
    if not state.verdict:
        return []
    title = "## Summary (dry run: FABRICATED, not results)" if dry_run else "## Summary"
    lines = ["", title, ""]
    for heading, group in cmp.grouped_verdicts(state.verdict.splitlines(), state.trajectory_lines):
        lines += [heading, "", *(f"- {line}" for line in group), ""]
    lines.pop()  # the blank line after the last group
    if state.key_numbers:
        lines += ["", "Start and end accuracy per arm (95% interval: t over runs, Wilson for one run):", ""]
        lines += [f"- {line}" for line in state.key_numbers]
    lines += cost(dry_run, ledgers)
    return [*lines, *plots(state, dry_run)]


def cost(dry_run: bool, ledgers: Ledgers | None) -> list[str]:
    """One line: the runs' chip-hours and estimated cost (the Ledger section has the split)."""
    if ledgers is None:
        return []
    runs, total = ledgers
    usd = total.cost_estimate_usd
    price = "" if usd is None else f", ${usd:.2f} estimated ({total.price.note() if total.price else ''})"
    line = f"{len(runs)} run(s), {total.chip_hours:.3g} chip-hours in all{price}; the split is under Ledger"
    return ["", f"{cmp.FABRICATED} {line}" if dry_run else line]


def _launched(sop: Sop, state: ReplayState) -> bool:
    return any(
        isinstance(s, RunStep) and (st := state.steps.get(step_id(s))) and st.record for s in sop.steps
    )


def plots(state: ReplayState, dry_run: bool) -> list[str]:
    """Each compare step's plot, embedded by a link relative to the report (the plot sits beside it)."""
    lines: list[str] = []
    for sid, name in state.plots.items():
        alt = f"{sid}: {cmp.WATERMARK}" if dry_run else sid
        lines += ["", f"![{alt}]({name})"]
    return lines


def steps_table(sop: Sop, state: ReplayState) -> list[str]:
    lines = ["", "## Steps", "", "| # | step | status | duration | command |", "|---|---|---|---|---|"]
    for i, step in enumerate(sop.steps, 1):
        st = state.steps.get(step_id(step), StepState())
        duration = "" if st.duration_s is None else f"{st.duration_s:.1f} s"
        lines.append(f"| {i} | `{step_id(step)}` | {st.status} | {duration} | `{st.command}` |")
    return lines


def preflight(state: ReplayState) -> list[str]:
    if not state.preflight:
        return []
    lines = ["", "## Preflight (compiled here for the target's TPU before `up`)", ""]
    return lines + [f"- `{name}`: {line}" for name, line in state.preflight.items()]


def step_details(sop: Sop, state: ReplayState) -> list[str]:
    lines: list[str] = []
    for i, step in enumerate(sop.steps, 1):
        st = state.steps.get(step_id(step))
        if st is None or not (st.details or st.error):
            continue
        lines += ["", f"### {i}. {step_id(step)}", ""]
        if st.remote_commands:
            lines.append(f"- {st.remote_commands} remote command(s) recorded")
        lines += [f"- {d}" for d in st.details]
        if st.error:
            lines.append(f"- **error**: {md(st.error)}")  # it may quote a worker's last log line
    return lines


def runs_table(sop: Sop, state: ReplayState) -> list[str]:
    runs = [(s.name, state.steps.get(step_id(s))) for s in sop.steps if isinstance(s, RunStep)]
    runs = [(name, st) for name, st in runs if st is not None and st.record]
    if not runs:
        return []
    lines = [
        "",
        "## Runs",
        "",
        "| run | run id | state | pid(s) | log | exit file | commit | config hash | W&B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in runs:
        rec = RunRecord.from_json(st.record or {})
        pids = ", ".join(f"{w.worker}:{w.pid}" for w in rec.workers)
        commit = md_value(rec.git_commit[:12], code=True) if rec.git_commit else ""
        config_hash = md_value(rec.config_hash, code=True) if rec.config_hash else ""
        lines.append(
            f"| {name} | `{rec.run_id}` | {rec.state} | {pids} | `{rec.log_path}` | `{rec.exit_path}` "
            f"| {commit} | {config_hash} | {md_value(rec.wandb_url or '')} |"
        )
    return lines


def observed_summary(sop: Sop, state: ReplayState, dry_run: bool) -> list[str]:
    if not state.summaries:
        return []
    names = list(state.summaries)
    title = (
        "## Made-up summary (dry run: FABRICATED figures, not results)" if dry_run else "## Observed summary"
    )
    lines = ["", title, "", "| key | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in sop.summary_keys:
        values = " | ".join(md(cmp.fmt(state.summaries[n].get(key))) for n in names)
        lines.append(f"| `{key}` | {values} |")
    return lines


def ledger(state: ReplayState, ledgers: Ledgers | None) -> list[str]:
    if ledgers is None:
        return []
    run_ledgers, total = ledgers
    return [
        "",
        "## Ledger (where the time and chip-hours went)",
        "",
        *ledger_lines(run_ledgers, total, state.summaries),
    ]


def comparison(state: ReplayState) -> list[str]:
    """The figures behind the verdicts (the verdicts themselves are in the summary, once)."""
    return (
        ["", "## Compare (the figures behind the summary)", "", state.comparison] if state.comparison else []
    )


def render(
    sop: Sop, sop_path: Path, state: ReplayState, dry_run: bool, prices: Mapping[str, Any] | None = None
) -> str:
    # The ledgers once: the summary's cost line and the Ledger section quote the same figures (one clock).
    ledgers = sop_ledgers(sop, state, prices) if _launched(sop, state) else None
    lines = [
        *header(sop, sop_path, dry_run),
        *summary(state, dry_run, ledgers),
        *steps_table(sop, state),
        *preflight(state),
        *step_details(sop, state),
        *runs_table(sop, state),
        *observed_summary(sop, state, dry_run),
        *ledger(state, ledgers),
        *comparison(state),
    ]
    return "\n".join(lines) + "\n"


def write_report(
    path: Path,
    sop: Sop,
    sop_path: Path,
    state: ReplayState,
    dry_run: bool,
    prices: Mapping[str, Any] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(sop, sop_path, state, dry_run, prices), encoding="utf-8")
