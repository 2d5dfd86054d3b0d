"""Run one function per worker, in parallel (one thread each), and keep results in worker order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from orchestrator.errors import GrpoctlError, InfraError
from orchestrator.transport.base import Transport

T = TypeVar("T")


@dataclass(frozen=True)
class PerWorker(Generic[T]):
    index: int
    worker: str  # the transport's name, e.g. "w1 10.0.0.6:2222"
    value: T | None
    error: GrpoctlError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def fan_out(transports: Sequence[Transport], fn: Callable[[int, Transport], T]) -> list[PerWorker[T]]:
    """`fn(i, transport)` on every worker at once; errors are kept per worker, never raised here."""

    def one(i: int, t: Transport) -> PerWorker[T]:
        try:
            return PerWorker(i, t.name, fn(i, t), None)
        except GrpoctlError as err:
            return PerWorker(i, t.name, None, _named(err, t.name))
        except OSError as err:  # sockets, SFTP: what a transport did not already turn into InfraError
            return PerWorker(i, t.name, None, InfraError(f"{t.name}: {err}"))

    if len(transports) == 1:
        return [one(0, transports[0])]
    with ThreadPoolExecutor(max_workers=len(transports), thread_name_prefix="worker") as pool:
        futures = [pool.submit(one, i, t) for i, t in enumerate(transports)]
        return [f.result() for f in futures]


def values(results: Sequence[PerWorker[T]]) -> list[T]:
    """Every worker's value, or the first worker's error (after all workers finished)."""
    for r in results:
        if r.error is not None:
            raise r.error
    return [r.value for r in results]  # type: ignore[misc]


def _named(err: GrpoctlError, worker: str) -> GrpoctlError:
    label = worker.split()[0]
    if label in str(err):
        return err
    named = type(err)(f"{worker}: {err}")
    named.__cause__ = err
    return named
