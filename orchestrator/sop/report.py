"""The replay's Markdown report, and the one place that spells a step as the grpoctl command a person
would type to do the same by hand (the report's step table shows it)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from orchestrator import compare as cmp
from orchestrator.ops import watch as watch_ops
from orchestrator.runs import RunRecord, utc_now_iso
from orchestrator.sop import schema
from orchestrator.sop.schema import CompareStep, RunStep, Sop, Step, step_id
from orchestrator.sop.state import ReplayState, StepState
from orchestrator.untrusted import md


def plot_path(report_dir: Path, step: CompareStep) -> Path:
    """Where a compare step's plot goes: beside the report (run names are plain file names: schema)."""
    return report_dir / f"{step.a}_vs_{step.b}.png"


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
    """The grpoctl command that does what `step` does (secrets by name only: `--secret NAME`), shell-quoted
    (shlex.join): pasting it runs what ran, whatever a value holds (`$(...)`, `;`, quotes)."""
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
        args += [a for k, v in {**step.set, **overrides}.items() for a in ("--set", f"{k}={v}")]
        args += ["--wait"] if step.wait else []
    elif isinstance(step, schema.WaitStep):
        args = ["status", ids.get(step.run, "?"), "--watch"]
    elif isinstance(step, schema.FetchStep):
        names = step.runs or [s.name for s in sop.steps if isinstance(s, RunStep)]
        args = ["fetch", *[ids.get(n, "?") for n in names]]
    else:
        assert isinstance(step, CompareStep)
        args = ["compare", ids.get(step.a, "?"), ids.get(step.b, "?")]
        args += ["--plot", str(plot_path(report_dir, step))] if step.plot else []
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
    phase = watch_ops.phase_json(record)
    if phase is not None:
        lines.append(f"last phase: {md(phase['text'])}")
    # config hash and W&B URL come from the worker's log: escaped, they can never open a line of their own
    lines.append(
        f"commit {md(record.git_commit or 'unknown')}, config hash {md(record.config_hash or 'unknown')}"
        + (f", W&B {md(record.wandb_url)}" if record.wandb_url else "")
    )
    for i, r in enumerate(record.recoveries, 1):
        lines.append(
            f"recovery {i}: {r['kind']} ({r['reason']}) at step {r.get('step')}, "
            f"relaunched at {r['at']} with log `{r.get('log')}`"
        )
    return lines


def write_report(path: Path, sop: Sop, sop_path: Path, state: ReplayState, dry_run: bool) -> None:
    lines = [f"# SOP `{sop.name}`{' (dry run)' if dry_run else ''}", ""]
    if dry_run:  # nothing below happened: say so before any figure can be quoted out of context
        lines += ["**Dry run: every pid, state, figure and verdict below is FABRICATED, not a result.**", ""]
    if sop.description:
        lines += [sop.description.strip(), ""]
    lines += [f"- file: `{sop_path}`", f"- default target: `{sop.target}`", f"- written: {utc_now_iso()}", ""]
    lines += ["## Steps", "", "| # | step | status | duration | command |", "|---|---|---|---|---|"]
    for i, step in enumerate(sop.steps, 1):
        st = state.steps.get(step_id(step), StepState())
        duration = "" if st.duration_s is None else f"{st.duration_s:.1f} s"
        lines.append(f"| {i} | `{step_id(step)}` | {st.status} | {duration} | `{st.command}` |")
    if state.preflight:
        lines += ["", "## Preflight (compiled here for the target's TPU before `up`)", ""]
        lines += [f"- `{name}`: {line}" for name, line in state.preflight.items()]
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
    runs = [(s.name, state.steps.get(step_id(s))) for s in sop.steps if isinstance(s, RunStep)]
    runs = [(name, st) for name, st in runs if st is not None and st.record]
    if runs:
        lines += [
            "",
            "## Runs",
            "",
            "| run | run id | state | pid(s) | log | exit file | commit | config hash | W&B |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, st in runs:
            rec = RunRecord.from_json(st.record or {})
            pids = ", ".join(f"{w.worker}:{w.pid}" for w in rec.workers)
            commit = md(rec.git_commit[:12]) if rec.git_commit else ""
            config_hash = md(rec.config_hash) if rec.config_hash else ""
            lines.append(
                f"| {name} | `{rec.run_id}` | {rec.state} | {pids} | `{rec.log_path}` | `{rec.exit_path}` "
                f"| {commit} | {config_hash} | {md(rec.wandb_url or '')} |"
            )
    if state.summaries:
        names = list(state.summaries)
        lines += [
            "",
            "## Made-up summary (dry run: FABRICATED figures, not results)"
            if dry_run
            else "## Observed summary",
            "",
            "| key | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for key in sop.summary_keys:
            lines.append(
                f"| `{key}` | " + " | ".join(md(cmp.fmt(state.summaries[n].get(key))) for n in names) + " |"
            )
    if state.comparison:
        lines += ["", "## Compare", "", state.comparison]
    if state.verdict:  # one line per verdict (start -> end of each run, then run vs run)
        for verdict in state.verdict.splitlines():
            lines += ["", f"**Verdict**: {verdict}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
