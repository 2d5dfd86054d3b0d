"""RecordingTransport: `--dry-run`. Records every call, touches nothing, answers from a script.

A `RecordingScript` holds what all workers of a dry-run target share: the rules that answer commands,
the files `get` returns, an optional printer, and one journal of calls in the order they happened.
File contents passed to `put` are never kept, printed or recorded (only path, mode and size).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

# The dry run stands in for the workers that run recipes, so it knows what a recipe is (its name).
from orchestrator.recipes import Recipe
from orchestrator.transport.base import Command, CommandResult, Transport

# (regex searched in the command, stdout, exit code); the first matching rule answers.
Rule = tuple[str, str, int]
# Called first with (command, worker name); None falls through to the rules. A command built by a
# recipe arrives as the `Recipe` itself: a responder matches `command.name`, not the shell text.
Responder = Callable[[str, str], "tuple[str, int] | None"]
Printer = Callable[[str], None]


@dataclass(frozen=True)
class RecordedCall:
    worker: str
    kind: Literal["run", "put", "get"]
    command: str | None = None  # run
    env_keys: tuple[str, ...] = ()  # run: names only
    cwd: str | None = None  # run
    timeout: float | None = None  # run
    path: str | None = None  # put / get
    mode: int | None = None  # put
    size: int | None = None  # put: bytes, never the bytes themselves
    recipe: str | None = None  # run: the recipe that built the command (orchestrator/recipes.py)


@dataclass
class RecordingScript:
    rules: Sequence[Rule] = ()
    responder: Responder | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)
    printer: Printer | None = None
    journal: list[RecordedCall] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def transport(self, name: str) -> RecordingTransport:
        return RecordingTransport(name, script=self)

    def record(self, call: RecordedCall) -> None:
        with self._lock:
            self.journal.append(call)
            if self.printer is not None:
                self.printer(describe(call))

    def answer(self, command: str, worker: str) -> tuple[str, int]:
        if self.responder is not None and (reply := self.responder(command, worker)) is not None:
            return reply
        for pattern, stdout, exit_code in self.rules:
            if re.search(pattern, command):
                return stdout, exit_code
        return "", 0

    def recipes(self, worker: str | None = None) -> list[str | None]:
        """The recipe names of the commands run so far (None for text no recipe built), in order."""
        with self._lock:
            return [c.recipe for c in self.journal if c.kind == "run" and worker in (None, c.worker)]

    def commands(self, worker: str | None = None) -> list[str]:
        """The commands run so far (on one worker, or on all), in order."""
        with self._lock:
            return [
                c.command
                for c in self.journal
                if c.kind == "run" and c.command is not None and worker in (None, c.worker)
            ]


def describe(call: RecordedCall) -> str:
    """One printable line per call: what a person would have typed, minus any secret."""
    if call.kind == "run":
        extras = []
        if call.cwd is not None:
            extras.append(f"cwd={call.cwd}")
        if call.env_keys:
            extras.append("env=" + ",".join(call.env_keys))
        suffix = f"  # {' '.join(extras)}" if extras else ""
        return f"[{call.worker}] $ {call.command}{suffix}"
    if call.kind == "put":
        return f"[{call.worker}] put {call.path} (mode {call.mode:04o}, {call.size} bytes)"
    return f"[{call.worker}] get {call.path}"


class RecordingTransport(Transport):
    """A Transport that never leaves the process: see the module docstring."""

    def __init__(self, name: str = "w0 dry-run", *, script: RecordingScript | None = None) -> None:
        self.name = name
        self.script = script if script is not None else RecordingScript()

    @property
    def calls(self) -> list[RecordedCall]:
        """This worker's calls, in order."""
        return [c for c in self.script.journal if c.worker == self.name]

    def _run(self, cmd: Command) -> CommandResult:
        command = cmd.text
        recipe = command.name if isinstance(command, Recipe) else None
        call = RecordedCall(
            self.name, "run", str(command), tuple(cmd.env or ()), cmd.cwd, cmd.timeout, recipe=recipe
        )
        self.script.record(call)
        stdout, exit_code = self.script.answer(command, self.name)
        if cmd.on_output is not None:
            for line in stdout.splitlines():
                cmd.on_output(line)
        return CommandResult(self.name, exit_code, stdout, "", 0.0)  # nothing ran: it took no time

    def put(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        self.script.record(RecordedCall(self.name, "put", path=remote_path, mode=mode, size=len(data)))

    def get(self, remote_path: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        del max_bytes, timeout  # the script's files are grpoctl's own fakes
        self.script.record(RecordedCall(self.name, "get", path=remote_path))
        if remote_path not in self.script.files:
            raise FileNotFoundError(f"{self.name}: no such file {remote_path} (dry run)")
        return self.script.files[remote_path]

    def close(self) -> None:
        """Nothing to close."""
