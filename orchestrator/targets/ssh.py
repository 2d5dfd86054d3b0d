"""SshTarget: fixed hosts reached over SSH, one worker (and one kept connection) per host."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from orchestrator.config import RepoConfig, SshTargetConfig
from orchestrator.errors import InfraError
from orchestrator.targets.base import Target, TargetState, Worker
from orchestrator.targets.topology import parse_host, pins_per_host
from orchestrator.transport.base import Transport
from orchestrator.transport.ssh import SshTransport


class SshTarget(Target):
    def __init__(
        self, name: str, cfg: SshTargetConfig, repo_cfg: RepoConfig, *, accept_new_host_key: bool = False
    ) -> None:
        self.name = name
        self.remote_dir = repo_cfg.remote_dir
        self.python = cfg.python
        self._workers = [Worker(i, *parse_host(spec)) for i, spec in enumerate(cfg.hosts)]
        pins = pins_per_host(cfg.host_key_sha256, len(self._workers))
        self._transports = [
            SshTransport(
                w.host,
                w.port,
                user=cfg.user,
                key_file=cfg.ssh_key,
                host_key_sha256=pins[w.index],
                known_hosts=cfg.known_hosts,
                accept_new_host_key=accept_new_host_key or cfg.accept_new_host_key,
                connect_timeout=cfg.connect_timeout_s,
                name=f"{w.label} {w.host}:{w.port}",
            )
            for w in self._workers
        ]

    def workers(self) -> list[Worker]:
        return list(self._workers)

    def transports(self) -> list[Transport]:
        return list(self._transports)

    def up(self) -> None:
        """Connect to every host at once; the first failure (in worker order) is raised."""
        with ThreadPoolExecutor(len(self._transports)) as pool:
            for future in [pool.submit(t.connect) for t in self._transports]:
                future.result()

    def state(self) -> TargetState:
        unreachable = {}
        with ThreadPoolExecutor(len(self._transports)) as pool:
            futures = {t.name: pool.submit(t.connect) for t in self._transports}
            for worker, future in futures.items():
                try:
                    future.result()
                except InfraError as err:
                    unreachable[worker] = str(err)
        if unreachable:
            return TargetState("UNREACHABLE", healthy=False, details={"unreachable": unreachable})
        return TargetState("REACHABLE", healthy=True, details={"hosts": [t.name for t in self._transports]})
