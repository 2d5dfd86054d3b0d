"""Test-wide guards: no network beyond loopback, no hub look-ups, W&B offline, 8 CPU devices for mesh tests."""

from __future__ import annotations

import ipaddress
import os
import socket

# Set before anything imports jax / transformers / wandb.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
os.environ["NO_GCE_CHECK"] = "True"  # google-auth: never probe the metadata server

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only_connect(sock: socket.socket, address):  # type: ignore[no-untyped-def]
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.gethostbyname(host)) if host == "localhost" else None
        if ip is None or not ip.is_loopback:
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {address!r}")
    return _real_connect(sock, address)


socket.socket.connect = _loopback_only_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own grpoctl state folder (run records) so tests never see each other's runs."""
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
