"""grpoctl: a thin Typer app over `orchestrator.api`: each command parses its options, calls one api action
and renders the typed result.

Results go to stdout (a table, a run id, or JSON with --json); progress, warnings and dry-run commands go
to stderr. Expected errors print one line to stderr and exit with their code (errors.py); no traceback.
"""

from __future__ import annotations

import functools
import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from grpoctl_contract import preflight_table
from orchestrator import api, initfile, recipes, render, untrusted, validate
from orchestrator import compare as cmp
from orchestrator import preflight as pf
from orchestrator.errors import GrpoctlError, UsageError
from orchestrator.lifecycle.recovery import RecoveryPolicy, final_error
from orchestrator.lifecycle.states import RunState
from orchestrator.phaseview import PhaseView
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring

# click's UsageError, the class of every command-line mistake (NoSuchOption, MissingParameter, BadParameter
# ...), reached through typer's public re-export of BadParameter (a UsageError, as click documents): the
# same class whether typer uses the installed click (0.25 and older) or its own copy of it (0.26.8 and
# newer), with no private import.
_CLICK_USAGE_ERROR: Any = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "UsageError")

# Options of the root callback that may also follow the command (`grpoctl up --target lab`).
_GLOBAL_FLAGS = frozenset({"--dry-run", "--json", "-v", "--verbose", "--accept-new-host-key"})
_GLOBAL_VALUED = frozenset({"--target", "--config-file"})


def hoist_global_options(root: Any, args: list[str]) -> list[str]:
    """Move global options found after the command in front of it, where click parses them. The
    command's own options keep their values (`-e --json` stays the value of `-e`); `--` ends the scan."""
    front: list[str] = []
    rest: list[str] = []
    command, i = root, 0
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        if token == "--":
            rest += args[i:]
            break
        if command is not root and (token in _GLOBAL_FLAGS or name in _GLOBAL_VALUED):
            width = 2 if name in _GLOBAL_VALUED and "=" not in token else 1
            front += args[i : i + width]
            i += width
            continue
        if token.startswith("-") and token != "-":
            option = next((p for p in command.params if name in getattr(p, "opts", ())), None)
            valued = option is not None and not getattr(option, "is_flag", True) and not option.count
            width = 2 if valued and "=" not in token else 1
            rest += args[i : i + width]
            i += width
            continue
        subcommands = getattr(command, "commands", None)
        if subcommands is not None and token in subcommands:  # a group's first word picks the command
            command = subcommands[token]
        rest.append(token)
        i += 1
    return front + rest


class _RootGroup(TyperGroup):
    """Global options anywhere; command-line mistakes (unknown option, bad value, missing argument) as
    one line and exit 2, like every other error, instead of click's boxed usage message."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _one_line_usage_errors():
            return super().parse_args(ctx, hoist_global_options(self, args))

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():  # the command's own options are parsed in here
            return super().invoke(ctx)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _CLICK_USAGE_ERROR as err:
        # `grpoctl` or `grpoctl env` alone (click >= 8.2): the help text. By name, as typer itself tells it.
        if type(err).__name__ == "NoArgsIsHelpError":
            raise
        where = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
        message = " ".join(err.format_message().split())
        print(f"grpoctl: error: {message}{where}", file=sys.stderr)
        raise typer.Exit(2) from None


app = typer.Typer(
    cls=_RootGroup,
    name="grpoctl",
    help="Run GRPO experiments on Cloud TPU VMs (or SSH hosts, or this machine) from a laptop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
env_app = typer.Typer(help="Secrets for the trainer (.env).", no_args_is_help=True)
sop_app = typer.Typer(help="Standard operating procedures as data.", no_args_is_help=True)
app.add_typer(env_app, name="env")
app.add_typer(sop_app, name="sop")


@dataclass
class Globals:
    dry_run: bool = False
    json: bool = False
    verbose: bool = False
    target: str | None = None
    config_file: str | None = None
    accept_new_host_key: bool = False
    tpu_wiring: TpuWiring = REAL_TPU_VM  # a real VM's, unless `main(tpu_wiring=...)` runs on a stand-in

    def __post_init__(self) -> None:
        # Piped output is for grep and logs: wide tables, never wrapped ids or paths.
        self.out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def debug(self, line: str) -> None:
        """Only with -v."""
        if self.verbose:
            self.say(line)

    def say(self, line: str) -> None:
        # Progress lines may quote a worker (an unreachable worker's error, a job's stage): inert text.
        self.err.print(untrusted.clean_text(line, 20_000), markup=False)

    def sessions(self, *, stall_after_s: float | None = None, attach_any: bool = False) -> api.Sessions:
        """The command's sessions (one per target it touches), closed when the command ends."""
        return api.Sessions(
            config_file=self.config_file,
            target=self.target,
            dry_run=self.dry_run,
            accept_new_host_key=self.accept_new_host_key,
            say=self.say,
            stall_after_s=stall_after_s,
            attach_any=attach_any,
            tpu_wiring=self.tpu_wiring,
        )

    def emit_json(self, data: Any) -> None:
        # Plain print: rich would wrap long lines of JSON.
        # Strict JSON: a NaN or Infinity (from a worker's files, or an empty sweep's accuracy) becomes null.
        print(json.dumps(untrusted.strict_json(data), indent=1, default=str, allow_nan=False))


def _globals(ctx: typer.Context) -> Globals:
    return ctx.find_root().obj


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """GrpoctlError -> one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GrpoctlError as err:
            # Messages may quote a worker (its last log line, its stderr): never terminal control.
            message = untrusted.clean(" ".join(str(err).split()) or type(err).__name__)
            print(f"grpoctl: error: {message}", file=sys.stderr)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:  # a local file we could not read or write: say which, no traceback
            print(f"grpoctl: error: {err}", file=sys.stderr)
            raise typer.Exit(3) from None
        except UnicodeDecodeError as err:  # a local text file that is not UTF-8 (the known ones say which)
            print(f"grpoctl: error: a local file is not UTF-8 text ({err.reason})", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:  # jobs run detached on the workers: stopping grpoctl never stops them
            print("grpoctl: interrupted (remote jobs keep running: grpoctl status)", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from orchestrator.doctor import version

        print(f"grpoctl {version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print every remote command; touch nothing.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="More detail on stderr.")] = False,
    target: Annotated[
        str | None, typer.Option("--target", envvar="GRPOCTL_TARGET", help="Target name.")
    ] = None,
    config_file: Annotated[
        str | None, typer.Option("--config-file", envvar="GRPOCTL_CONFIG", help="Default: ./grpoctl.yaml.")
    ] = None,
    accept_new_host_key: Annotated[
        bool, typer.Option("--accept-new-host-key", help="Trust an unknown SSH host key on first use.")
    ] = False,
) -> None:
    del version  # handled by its callback
    # click's `obj`, when the caller passed one (`main(tpu_wiring=...)`, `CliRunner.invoke(..., obj=...)`),
    # is how a stand-in Cloud TPU service says what its VMs are like; a user's grpoctl passes none.
    wiring = ctx.obj if isinstance(ctx.obj, TpuWiring) else REAL_TPU_VM
    ctx.obj = Globals(dry_run, json_out, verbose, target, config_file, accept_new_host_key, wiring)


# ------------------------------------------------------------------------------------- options

AttachAny = Annotated[
    bool,
    typer.Option(
        "--attach-any", help="Attach to an existing TPU node of another type or spot-ness (with a warning)."
    ),
]
_STALL_OPTION = typer.Option(
    "--stall-after",
    min=1,
    help="Seconds a live job's log may stay silent before it shows STALLED (default: stall_after_s).",
)
# The recovery options of `run`, `recover` and `sop replay`, declared once; defaults are RecoveryPolicy's.
RecoverOnExitCode = Annotated[
    list[int], typer.Option("--recover-on-exit-code", help="Also relaunch when a job exits with this.")
]
MaxPreemptions = Annotated[int, typer.Option(min=0, help="Preemption recoveries allowed per run.")]
MaxFailures = Annotated[int, typer.Option(help="Relaunches per run for --recover-on-exit-code.")]
RetryWait = Annotated[
    float, typer.Option(min=0, help="Seconds between tries to recreate a node (API errors, no capacity).")
]
_MAX_PREEMPTIONS, _MAX_FAILURES = RecoveryPolicy.max_preemptions, RecoveryPolicy.max_failures
_RETRY_WAIT = RecoveryPolicy.retry_wait_s


def _policy(
    recover: bool, exit_codes: list[int], max_preemptions: int, max_failures: int, retry_wait: float
) -> RecoveryPolicy | None:
    if not recover and exit_codes:
        raise UsageError("--recover-on-exit-code needs --recover")
    if not recover:
        return None
    return RecoveryPolicy(max_preemptions, max_failures, frozenset(exit_codes), retry_wait_s=retry_wait)


def _parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _secrets(names: list[str]) -> dict[str, str]:
    """`--secret NAME` values: the environment, ./.env, else a prompt without echo (on a terminal only)."""
    from orchestrator.ops import env as env_ops

    def ask(name: str) -> str:
        return getpass.getpass(f"{name} (not echoed): ")

    return env_ops.resolve_secrets(names, prompt=ask if sys.stdin.isatty() else None)


def _keys(keys: str | None) -> list[str]:
    return [k for k in (keys or "").split(",") if k]


def _confirm(question: str) -> None:
    """Ask on a terminal; without one, refuse (scripts pass --yes)."""
    if not sys.stdin.isatty():
        raise UsageError(f"{question} Not a terminal: pass --yes to confirm")
    if not typer.confirm(question, default=False):
        raise UsageError("cancelled: nothing deleted")


# ------------------------------------------------------------------------------------- commands


@app.command()
@handle_errors
def init(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="GCP project of the TPU target (else asked).")] = None,
    zone: Annotated[str | None, typer.Option(help=f"Zone (default {initfile.DEFAULT_ZONE}).")] = None,
    accelerator: Annotated[
        str | None, typer.Option(help=f"Accelerator type (default {initfile.DEFAULT_ACCELERATOR}).")
    ] = None,
    repo_url: Annotated[str | None, typer.Option(help="What the VMs clone (default: origin).")] = None,
    name: Annotated[str | None, typer.Option(help="The TPU node's name (default grpoctl-ACCEL).")] = None,
    api_endpoint: Annotated[str | None, typer.Option(help="A private Cloud TPU API endpoint.")] = None,
    local_only: Annotated[bool, typer.Option("--local-only", help="Only the local target.")] = False,
) -> None:
    """Write a commented grpoctl.yaml (the `local` target, plus a TPU target); never overwrites one."""
    g = _globals(ctx)
    path = g.config_file or "grpoctl.yaml"
    if Path(path).exists():  # before asking anything
        raise UsageError(f"{path} already exists: edit it, or move it away and run `grpoctl init` again")
    ask = sys.stdin.isatty() and not local_only
    if project is None and ask:
        project = typer.prompt("GCP project of a TPU target (empty: local target only)", default="") or None
    if project and ask:
        zone = zone or typer.prompt("zone", default=initfile.DEFAULT_ZONE)
        accelerator = accelerator or typer.prompt("accelerator type", default=initfile.DEFAULT_ACCELERATOR)
        repo_url = repo_url or typer.prompt("repo URL the VM clones (empty: origin)", default="") or None
    answers = initfile.Answers(
        project=None if local_only else project,
        zone=zone or initfile.DEFAULT_ZONE,
        accelerator=accelerator or initfile.DEFAULT_ACCELERATOR,
        repo_url=repo_url,
        name=name,
        api_endpoint=api_endpoint,
    )
    written = initfile.write(answers, path)
    if g.json:
        g.emit_json({"written": str(written), "targets": ["local", *(["tpu"] if answers.project else [])]})
        return
    g.out.print(f"wrote {written}")
    g.say("next: grpoctl doctor")


@app.command()
@handle_errors
def doctor(
    ctx: typer.Context,
    config: Annotated[
        list[str], typer.Option("--config", "-c", help="Trainer configs to check .env against (repeatable).")
    ] = [],  # noqa: B006
    env_file: Annotated[str, typer.Option(help="The .env to check.")] = ".env",
    json_out: Annotated[bool, typer.Option("--json", help="Same as the global --json.")] = False,
) -> None:
    """Check this laptop, the config and each target (credentials, API, accelerator, SSH key, .env, repo,
    libtpu, jax): one line each with the fix; exit 0 only when nothing fails."""
    from orchestrator import doctor as doc

    g = _globals(ctx)
    checks = doc.doctor(g.config_file, g.target, env_file=env_file, configs=config)
    if g.json or json_out:
        g.emit_json(doc.to_json(checks))
    else:
        for check in checks:
            g.out.print(check.line(), markup=False)
    bad = doc.failed(checks)
    if bad:
        if not (g.json or json_out):
            g.say(f"{len(bad)} check(s) failed")
        raise typer.Exit(1)


@app.command()
@handle_errors
def up(ctx: typer.Context, attach_any: AttachAny = False) -> None:
    """Make the target exist and be reachable (provision a TPU, or just connect)."""
    g = _globals(ctx)
    with g.sessions(attach_any=attach_any) as sessions:
        session = sessions.get()
        if session.config.source == "<embedded default>" and not g.target:
            g.say("no grpoctl.yaml here: using the built-in `local` target (`grpoctl init` writes one)")
        t = api.up(session)
    if g.json:
        g.emit_json({"target": t.target, "state": t.state, "details": t.details})
    else:
        g.out.print(f"{t.target}: {t.state} ({t.workers} worker(s))")


@app.command()
@handle_errors
def down(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete a TPU node without asking.")] = False,
) -> None:
    """Release what `up` provisioned: delete a TPU node or queued resource (nothing for fixed hosts). Runs
    still in flight on it are named first; they end STOPPED, and whoever waits for them recreates nothing."""
    g = _globals(ctx)
    with g.sessions() as sessions:
        session = sessions.get()
        runs = api.in_flight(session)
        named = ", ".join(f"{r.run_id} ({r.state})" for r in runs)
        if session.kind == "tpu" and not yes and not g.dry_run:
            extra = f" In flight on it: {named}: they stop and nothing recreates the node." if runs else ""
            node = f"{session.target_name} ({session.target_cfg.name})"
            _confirm(f"delete TPU {node} and all on its disks?{extra}")
        api.down(session, stop=runs)
    for r in runs:
        g.say(f"{r.run_id}: STOPPED (resume from its last checkpoint: grpoctl recover {r.run_id})")
    g.emit_json({"target": session.target_name, "down": True}) if g.json else g.out.print(
        f"{session.target_name}: down"
    )


@app.command()
@handle_errors
def gc(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    list_only: Annotated[bool, typer.Option("--list", help="Only list what would be deleted.")] = False,
) -> None:
    """Delete grpoctl's leftovers: PREEMPTED/TERMINATED nodes, FAILED/SUSPENDED queued resources."""
    g = _globals(ctx)
    found = api.find_leftovers(g.config_file, g.target, tpu_wiring=g.tpu_wiring)
    if g.json:
        g.emit_json([{"kind": x.kind, "name": x.name, "state": x.state, "zone": x.zone} for _, x in found])
    else:
        for _, x in found:
            g.out.print(f"{x.kind} {x.name} ({x.zone}): {x.state}")
        if not found:
            g.out.print("nothing to collect")
    if not found or list_only or g.dry_run:
        return
    if not yes:
        _confirm(f"delete these {len(found)} leftover(s)?")
    for tpu_api, x in found:
        api.delete_leftover(tpu_api, x)
        g.say(f"deleted {x.kind} {x.name}")


@app.command()
@handle_errors
def sync(
    ctx: typer.Context,
    bootstrap: Annotated[
        bool, typer.Option(help="Create the worker venv (skipped when python is set).")
    ] = True,
) -> None:
    """Git-sync the repo on every worker (clone/fetch/reset/clean), then bootstrap the venv."""
    g = _globals(ctx)
    with g.sessions() as sessions, render.BootstrapBar(g.err, enabled=not g.json) as bar:
        session = sessions.get()
        result = api.sync(session, bootstrap=bootstrap, on_stage=bar.on_stage)
    g.debug(f"{result.url} @ {result.branch} -> {session.remote_dir} on {len(result.heads)} worker(s)")
    for worker, python in result.pythons.items():
        g.debug(f"{worker}: python {python}")
    if g.json:
        keys = ("url", "branch", "heads", "warnings")
        g.emit_json({**{k: getattr(result, k) for k in keys}, "python": result.pythons})
        return
    for worker, head in result.heads.items():
        g.out.print(f"{worker}: HEAD {head[:12]} ({result.branch})")


@env_app.command("push")
@handle_errors
def env_push(
    ctx: typer.Context,
    file: Annotated[str, typer.Option("--file", "-f", help="The local .env to upload.")] = ".env",
) -> None:
    """Upload .env to every worker (mode 0600, atomic); print each key with its value's LENGTH."""
    g = _globals(ctx)
    with g.sessions() as sessions:
        result = api.push_env(sessions.get(), file)
    assert result is not None  # not optional: a missing file is an error
    if g.json:
        keys = ("remote_path", "mode", "lengths", "workers")
        g.emit_json({k: getattr(result, k) for k in keys})
        return
    g.out.print(f"{result.remote_path} (mode {result.mode}) on {len(result.workers)} worker(s)")
    for key, length in result.lengths.items():
        g.out.print(f"  {key}_len={length}")


@app.command()
@handle_errors
def run(
    ctx: typer.Context,
    config: Annotated[str, typer.Argument(help="Trainer config, relative to the checkout.")],
    env: Annotated[
        list[str],
        typer.Option(
            "--env", "-e", help="KEY=VALUE for the job, NOT secret (stored, shown in reports): e.g. flags."
        ),
    ] = [],  # noqa: B006
    secret: Annotated[
        list[str],
        typer.Option(
            "--secret", help="NAME of a secret for the job: its value from the environment, .env or a prompt "
            "(never on a command line; a 0600 file on the worker, stored by name only).",
        ),
    ] = [],  # noqa: B006
    set_: Annotated[list[str], typer.Option("--set", help="Trainer override key=value.")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run with a progress bar.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Launch even if the worker is busy.")] = False,
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls with --wait.")] = 2.0,
    recover: Annotated[
        bool, typer.Option("--recover", help="Wait, and recreate + relaunch (same run id) on preemption.")
    ] = False,
    recover_on_exit_code: RecoverOnExitCode = [],  # noqa: B006
    max_preemptions: MaxPreemptions = _MAX_PREEMPTIONS,
    max_failures: MaxFailures = _MAX_FAILURES,
    retry_wait: RetryWait = _RETRY_WAIT,
    no_preflight: Annotated[
        bool, typer.Option("--no-preflight", help="TPU targets: launch without compiling it here first.")
    ] = False,
    stall_after: Annotated[float | None, _STALL_OPTION] = None,
    attach_any: AttachAny = False,
) -> None:
    """Launch the trainer on every worker; print the run id at once."""
    g = _globals(ctx)
    policy = _policy(recover, recover_on_exit_code, max_preemptions, max_failures, retry_wait)
    wait = wait or policy is not None
    flags, overrides = _parse_pairs(env, "--env"), _parse_pairs(set_, "--set")
    secrets = _secrets(secret)
    with g.sessions(stall_after_s=stall_after, attach_any=attach_any) as sessions:
        session = sessions.get()
        record = api.launch(
            session, config, env=secrets, flags=flags, overrides=overrides, force=force, gate=not no_preflight
        )
        g.debug(f"target {session.target_name} ({session.kind}): {record.remote_dir}, python {record.python}")
        for w in record.workers:
            g.debug(f"{w.worker} {w.host}: pid {w.pid}")
        if not wait:
            if g.json:
                g.emit_json(record.to_json())
            else:
                g.out.print(record.run_id)
                g.say(f"log: {record.log_path}  pid: {record.pid_path}  exit: {record.exit_path}")
            return
        g.say(f"{record.run_id}: log {record.log_path}")
        view, on_poll = render.run_bar(g.err, record, enabled=not g.json)
        try:
            with view:
                api.wait(session, record, policy, interval=interval, on_poll=on_poll)
        finally:
            if g.json:
                g.emit_json(render.status_json(record, session.config.prices))
            else:
                made_up = " (made up by --dry-run)" if g.dry_run else ""
                g.out.print(f"{record.run_id} {record.state}{made_up}", markup=False)  # what scripts read
                accuracy = render.accuracy_text(api.final_summary(session, record))
                if accuracy:
                    g.say(f"{record.run_id}: {accuracy}{made_up}")
                if record.state is RunState.SUCCEEDED:
                    g.say(f"next: grpoctl fetch {record.run_id}")


@app.command()
@handle_errors
def status(
    ctx: typer.Context,
    run_id: Annotated[
        str | None, typer.Argument(help="A run id (or unique prefix); default: all runs.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until the run(s) end.")] = False,
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between refreshes with --watch.")] = 2.0,
    limit: Annotated[int, typer.Option(min=1, help="How many runs to list.")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Same as the global --json.")] = False,
    stall_after: Annotated[float | None, _STALL_OPTION] = None,
) -> None:
    """Show runs: STARTING, RUNNING, STALLED, SUCCEEDED, FAILED(code), LOST, PREEMPTED, STOPPED or
    RECOVERING, step k/N and ETA."""
    g = _globals(ctx)
    g.json = g.json or json_out
    live = Live(console=g.out, auto_refresh=False) if watch and g.out.is_terminal and not g.json else None

    def show(round_: api.StatusRound) -> None:
        records = round_.records
        prices = sessions.get().config.prices
        if g.json:
            g.emit_json(
                [render.status_json(r, prices) for r in records]
                if not run_id
                else render.status_json(records[0], prices)
            )
        else:
            parts = [round_.machine] if round_.machine else []
            identity = []
            if run_id:
                lines = render.details(records[0]) + render.run_ledger(records[0], prices).lines()
                identity = [Text(line) for line in lines]
            bars = g.out.is_terminal and g.out.width >= 120  # 80 columns: one line a run, no bars
            table = render.runs_table(records, bars=bars, width=g.out.width)
            view = Group(*parts, table, *identity)
            if live is not None:  # a terminal: redraw in place
                live.update(view, refresh=True)
            else:
                g.out.print(view)
        for line in round_.unreachable:
            g.say(f"unreachable (will retry): {line}")

    with g.sessions(stall_after_s=stall_after) as sessions:
        records = sessions.runs(run_id, limit=limit)
        if live is not None:
            live.start()
        try:
            api.watch_status(sessions, records, watch=watch, interval=interval, on_round=show)
        finally:
            if live is not None:
                live.stop()
    ended = final_error(records[0]) if run_id and watch else None
    if ended is not None:
        raise ended


@app.command()
@handle_errors
def recover(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="A run to re-attach to, e.g. one left PREEMPTED.")],
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls.")] = 15.0,
    recover_on_exit_code: RecoverOnExitCode = [],  # noqa: B006
    max_preemptions: MaxPreemptions = _MAX_PREEMPTIONS,
    max_failures: MaxFailures = _MAX_FAILURES,
    retry_wait: RetryWait = _RETRY_WAIT,
    secret: Annotated[
        list[str], typer.Option("--secret", help="The run's --secret NAMEs again (values are never stored).")
    ] = [],  # noqa: B006
    attach_any: AttachAny = False,
) -> None:
    """Wait for a run as `run --recover` would: a PREEMPTED one is recreated and relaunched at once,
    with the same run id (it resumes from its checkpoints)."""
    g = _globals(ctx)
    secrets = _secrets(secret)
    policy = _policy(True, recover_on_exit_code, max_preemptions, max_failures, retry_wait)
    assert policy is not None
    with g.sessions(attach_any=attach_any) as sessions:
        session, record = sessions.for_run(run_id)
        api.reattach(record, secrets)  # refuses before anything is recreated
        view, on_poll = render.run_bar(g.err, record, enabled=not g.json)
        try:
            with view:
                api.wait(session, record, policy, interval=interval, on_poll=on_poll)
        finally:
            g.emit_json(record.to_json()) if g.json else g.out.print(f"{record.run_id} {record.state}")


@app.command()
@handle_errors
def logs(
    ctx: typer.Context,
    run_id: Annotated[str | None, typer.Argument(help="Default: the latest run.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the run ends.")] = False,
    worker: Annotated[int, typer.Option("--worker", "-w", help="Worker index.")] = 0,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Lines of tail without --follow.")] = 200,
    env_file: Annotated[str, typer.Option(help="Values from this file are redacted.")] = ".env",
    events: Annotated[
        bool, typer.Option("--events", help="The trainer's JSON event lines instead of the human lines.")
    ] = False,
) -> None:
    """Print a worker's log of a run: the human lines (values from the local .env redacted)."""
    g = _globals(ctx)
    with g.sessions() as sessions:
        session, record = sessions.for_run(run_id)
        if follow:
            emit = functools.partial(g.out.out, end="")
            state = api.follow_log(session, record, emit, worker=worker, env_file=env_file, events=events)
            g.say(f"{record.run_id} on w{worker}: {state}")
        else:
            text = api.log_text(session, record, worker=worker, lines=lines, env_file=env_file, events=events)
            sys.stdout.write(text)


@app.command()
@handle_errors
def stop(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to stop on every worker.")],
) -> None:
    """Stop a run on every worker (TERM, then KILL); its exit file records the signal."""
    g = _globals(ctx)
    with g.sessions() as sessions:
        session, record = sessions.for_run(run_id)
        said = api.stop(session, record)
    g.emit_json({"run_id": record.run_id, "workers": said, "state": record.state}) if g.json else g.out.print(
        f"{record.run_id}: {render.state_text(record)}"
    )


@app.command()
@handle_errors
def fetch(
    ctx: typer.Context,
    run_ids: Annotated[
        list[str], typer.Argument(help="Run ids (default: the latest run that SUCCEEDED).")
    ] = None,  # type: ignore[assignment]
    dest: Annotated[str, typer.Option(help="Local folder for runs/<run-id>/.")] = "runs",
    keys: Annotated[str | None, typer.Option(help="Comma-separated summary keys to print.")] = None,
) -> None:
    """Copy summary.json, eval_full*.jsonl, metrics.jsonl, config.json (+ W&B summary) to runs/<id>/."""
    g = _globals(ctx)
    chosen = _keys(keys) or list(cmp.SOP_KEYS)
    with g.sessions() as sessions:
        results = [api.fetch(*sessions.for_run(run_id, finished=True), dest) for run_id in run_ids or [None]]
    if g.json:
        g.emit_json(
            [
                {
                    "run_id": r.run_id,
                    "folder": str(r.folder),
                    "previous": None if r.previous is None else str(r.previous),
                    "files": r.files,
                    "fabricated": bool(r.summary.get("dry_run")),
                    "summary": {k: r.summary.get(k) for k in chosen},
                }
                for r in results
            ]
        )
        return
    for r in results:
        g.out.print(f"{r.run_id} -> {r.folder}/ ({', '.join(r.files)})")
        if r.previous is not None:
            g.say(f"{r.run_id}: the earlier, different copy is kept in {r.previous}/")
        made_up = f" ({cmp.WATERMARK})" if r.summary.get("dry_run") else ""
        for k in chosen:
            g.out.print(f"  {k} = {cmp.fmt(r.summary.get(k))}{made_up}")


@app.command()
@handle_errors
def compare(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(help="Arm A: run id or fetched folder, or a comma-separated group.")],
    b: Annotated[str, typer.Argument(help="Arm B: run id or fetched folder, or a comma-separated group.")],
    keys: Annotated[str | None, typer.Option(help="Comma-separated keys (default: the SOP's five).")] = None,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write curves and start/end accuracy to this image.")
    ] = None,
    dest: Annotated[str, typer.Option(help="Where fetched runs live.")] = "runs",
    margin: Annotated[
        float, typer.Option(help="Equivalence margin on mean end accuracy (TOST), e.g. 0.03 = 3 points.")
    ] = cmp.stats.DEFAULT_MARGIN,
) -> None:
    """Two arms (runs, or groups of seeds: `compare s0,s1,s2 p0,p1,p2`): the verdicts first (kernel parity,
    each run's start -> end, the method verdict over runs, McNemar per pair), then the summaries."""
    g = _globals(ctx)
    with g.sessions() as sessions:
        done = api.compare(sessions, a, b, keys=_keys(keys), plot=plot, dest=dest, margin=margin)
    result = done.result
    if g.json:
        g.emit_json({**result.to_json(), "plot": plot})
        return
    for line in result.summary_lines():  # the verdicts first: what a reader quotes
        g.out.print(line, markup=False)
    table = Table(box=None, pad_edge=False)
    several = max(len(done.a), len(done.b)) > 1
    for col in ("key", f"A {result.a}", f"B {result.b}", "delta (B-A)"):
        table.add_column(col)
    for row in result.rows:
        table.add_row(row.key, cmp.fmt(row.a), cmp.fmt(row.b), cmp.fmt_delta(row))
    g.out.print(table)
    if several:
        g.out.print("(keys: the mean over each arm's runs)")
    for line in result.key_lines():
        g.out.print(line, markup=False)
    if result.fabricated:
        g.out.print(f"{cmp.FABRICATED} every figure above comes from --dry-run's made-up files", markup=False)
    if plot:
        g.out.print(f"plot: {plot}")


@app.command()
@handle_errors
def preflight(
    ctx: typer.Context,
    config: Annotated[str, typer.Argument(help="Trainer config, relative to this checkout.")],
    accelerator: Annotated[
        str | None,
        typer.Option(help="e.g. v6e-8; default: the tpu target's accelerator_type, else v6e-8."),
    ] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Trainer override key=value.")] = [],  # noqa: B006
    env: Annotated[
        list[str], typer.Option("--env", "-e", help="The run's KEY=VALUE flags (EVAL_FULL_SWEEP=1...).")
    ] = [],  # noqa: B006
    headroom: Annotated[float, typer.Option(help="HBM fraction to keep free.")] = pf.DEFAULT_HEADROOM,
    suggest: Annotated[bool, typer.Option("--suggest", help="Also propose the largest micro-batch.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Compile again even if cached.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="The trainer's report object.")] = False,
) -> None:
    """Compile the run's functions for the TPU on this machine; exit 2 if one does not fit in HBM."""
    g = _globals(ctx)
    config = validate.normalise_config_path(config)
    overrides, flags = _parse_pairs(set_, "--set"), _parse_pairs(env, "--env")
    accelerator = accelerator or api.accelerator_for(g.config_file, g.target)
    try:
        report = pf.run(
            config,
            overrides=overrides,
            env=flags,
            accelerator=accelerator,
            headroom=headroom,
            suggest=suggest,
            use_cache=not no_cache,
            say=g.say,
            cached_only=g.dry_run,  # a dry run never compiles (minutes for a 3B model)
        )
    except pf.PreflightUnavailable as err:  # NotCached: a dry run found nothing cached
        if not g.dry_run:
            raise
        why = "nothing cached" if isinstance(err, pf.NotCached) else str(err)
        g.say(f"dry run: {why}; `{pf.command(config, accelerator, overrides, flags)}` compiles it")
        return
    if g.json or json_out:
        g.emit_json(report.to_json())
    else:
        for line in preflight_table.render(report):  # the trainer prints the same (one renderer)
            g.out.print(line, markup=False)
    if not report.fits:
        raise UsageError(pf.not_fitting_message(config, report))


@sop_app.command("replay")
@handle_errors
def sop_replay(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="SOP YAML file.")],
    from_step: Annotated[
        str | None, typer.Option("--from", help="Start at this step (id or number).")
    ] = None,
    report: Annotated[str | None, typer.Option(help="Markdown report path (state file beside it).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore the saved state: run every step.")] = False,
    recover: Annotated[
        bool, typer.Option("--recover", help="Recreate + relaunch (same run id) runs hit by preemption.")
    ] = False,
    recover_on_exit_code: RecoverOnExitCode = [],  # noqa: B006
    max_preemptions: MaxPreemptions = _MAX_PREEMPTIONS,
    max_failures: MaxFailures = _MAX_FAILURES,
    retry_wait: RetryWait = _RETRY_WAIT,
    set_: Annotated[
        list[str], typer.Option("--set", help="Trainer override key=value for every run step.")
    ] = [],  # noqa: B006
    no_preflight: Annotated[
        bool, typer.Option("--no-preflight", help="TPU runs: skip compiling them here before `up`.")
    ] = False,
) -> None:
    """Replay an SOP: resumable (finished steps are skipped), writes a Markdown report."""
    from orchestrator import sop

    g = _globals(ctx)
    result = sop.replay(
        file,
        config_file=g.config_file,
        target=g.target,
        dry_run=g.dry_run,
        from_step=from_step,
        report_path=report,
        fresh=fresh,
        accept_new_host_key=g.accept_new_host_key,
        say=g.say,
        overrides=_parse_pairs(set_, "--set"),
        recover=_policy(recover, recover_on_exit_code, max_preemptions, max_failures, retry_wait),
        run_preflight=not no_preflight,
        view=lambda label: PhaseView(g.err, label, enabled=not g.json),
        tpu_wiring=g.tpu_wiring,
    )
    if g.json:
        g.emit_json(result.to_json())
    else:
        g.out.print(f"report: {result.report_path}")
        if result.verdict:
            _print_verdicts(g, result.verdict.splitlines(), result.state.trajectory_lines)
        for line in result.state.key_numbers:  # each arm's start -> end with its interval
            g.out.print(line, markup=False)


def _print_verdicts(g: Globals, lines: list[str], trajectory: list[str]) -> None:
    for heading, group in cmp.grouped_verdicts(lines, trajectory):
        g.out.print(heading, markup=False)
        for line in group:
            g.out.print(f"  {line}", markup=False)


def main(tpu_wiring: TpuWiring = REAL_TPU_VM) -> None:
    app(obj=tpu_wiring)


if __name__ == "__main__":
    main()


__all__ = ["app", "main", "recipes"]
