"""Pure helpers about where workers are: host strings, host-key pins per host, TPU slice shapes."""

from __future__ import annotations

from collections.abc import Sequence

from grpoctl_contract.accelerators import AcceleratorError, Slice, family, parse_slice
from orchestrator.errors import UsageError

# What `sync` installs into a TPU VM's venv (pyproject.toml extras): the trainer, and libtpu to drive chips.
TPU_BOOTSTRAP_EXTRAS = ("trainer", "tpu")


def parse_host(spec: str, default_port: int = 22) -> tuple[str, int]:
    """'host', 'host:port', '[v6::addr]:port' -> (host, port)."""
    host, port = spec, default_port
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise UsageError(f"host {spec!r}: missing ']'")
        host, rest = spec[1:end], spec[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"host {spec!r}: expected [address]:port")
            port = _port(spec, rest[1:])
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
        port = _port(spec, port_text)
    if not host:
        raise UsageError(f"host {spec!r}: empty host name")
    return host, port


def _port(spec: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"host {spec!r}: port {text!r} is not a number in 1..65535")
    return int(text)


def pins_per_host(pins: Sequence[str], n_hosts: int) -> list[tuple[str, ...]]:
    """No pins; one pin for every host; or one pin per host, in host order."""
    for pin in pins:
        if not pin.startswith("SHA256:"):
            raise UsageError(f"host_key_sha256 {pin!r} must look like 'SHA256:<base64>' (ssh-keygen -lf)")
    if not pins:
        return [()] * n_hosts
    if len(pins) == 1:
        return [(pins[0],)] * n_hosts
    if len(pins) == n_hosts:
        return [(pin,) for pin in pins]
    raise UsageError(f"host_key_sha256 has {len(pins)} entries for {n_hosts} hosts: give 1 or {n_hosts}")


def _slice(accelerator_type: str) -> Slice:
    """The slice the one accelerator table (grpoctl_contract/accelerators.py) makes of the name; a one-line
    UsageError for what it does not know (v2/v3, a malformed name, a size no slice has)."""
    try:
        return parse_slice(accelerator_type)
    except AcceleratorError as err:
        raise UsageError(f"accelerator_type: {err}") from None


def hosts_for_accelerator(accelerator_type: str) -> int:
    """How many VMs (workers) a TPU slice has: v6e-8 -> 1, v6e-16 -> 4, v4-32 -> 4."""
    return _slice(accelerator_type).hosts


def chips_for_accelerator(accelerator_type: str) -> int:
    """How many chips a TPU slice has (what is billed): v6e-8 -> 8, v4-8 -> 4 (v4/v5p types count cores)."""
    return _slice(accelerator_type).num_chips


def accelerator_family(accelerator_type: str) -> str:
    """The price table's key: v6e-8 -> v6e, v5litepod-16 -> v5e (unchecked: old run records keep theirs)."""
    return family(accelerator_type)
