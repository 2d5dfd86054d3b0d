"""Errors that carry the CLI exit code they map to.

0 ok, 1 job failed, 2 usage or config error, 3 infrastructure error (unreachable, preempted, API).
Every message is one line and never contains a secret value.
"""

from __future__ import annotations


class GrpoctlError(Exception):
    """Base class: `str(err)` is the one-line message the CLI prints."""

    exit_code: int = 3


class UsageError(GrpoctlError):
    """Bad command line, missing or malformed config, unknown key or target."""

    exit_code = 2


class InfraError(GrpoctlError):
    """A host, the network or the cloud API let us down; nothing about the job itself."""

    exit_code = 3


class WorkerReadError(InfraError):
    """A worker's file was refused: not a regular file (a device, FIFO or socket), past its size cap, or
    not read within its time limit (orchestrator/untrusted.py)."""


class HostKeyError(InfraError):
    """The server's host key is unknown or does not match the pinned fingerprint."""


class AuthError(InfraError):
    """The SSH server refused every key we offered (the key not there yet, the wrong user, root refused
    by the image, OS Login)."""


class PreemptedError(InfraError):
    """The TPU node was preempted (or vanished) under a running job."""


class JobFailed(GrpoctlError):
    """The job ran and exited non-zero (or was lost)."""

    exit_code = 1


class RunStopped(InfraError):
    """A person stopped the run's machine (deleted or stopped the node): nothing is recreated."""
