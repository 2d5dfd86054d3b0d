"""DryRunTarget: any target's shape (names, worker count, remote_dir) with RecordingTransports."""

from __future__ import annotations

from orchestrator.targets.base import Target, TargetState, Worker
from orchestrator.transport.base import Transport
from orchestrator.transport.recording import RecordingScript, RecordingTransport


class DryRunTarget(Target):
    """Never touches the network, the disk or a cloud API; `script.journal` holds what would have run."""

    def __init__(
        self,
        name: str,
        kind: str,
        workers: list[Worker],
        remote_dir: str,
        python: str | None,
        script: RecordingScript,
        *,
        bootstrap_extras: tuple[str, ...] = Target.bootstrap_extras,
    ) -> None:
        self.name = name
        self.bootstrap_extras = bootstrap_extras  # the real target's, so the journal shows what it installs
        self.kind = kind
        self.remote_dir = remote_dir
        self.python = python
        self.script = script
        self._workers = workers
        self._transports: list[Transport] = [
            RecordingTransport(f"{w.label} {w.host}" + (f":{w.port}" if kind == "ssh" else ""), script=script)
            for w in workers
        ]

    def workers(self) -> list[Worker]:
        return list(self._workers)

    def transports(self) -> list[Transport]:
        return self._transports

    def state(self) -> TargetState:
        return TargetState("DRY_RUN", healthy=True, details={"kind": self.kind})
