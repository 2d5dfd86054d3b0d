"""The SSH identity grpoctl uses for TPU VMs: an ed25519 key, created when missing, and its metadata line."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator.errors import UsageError
from orchestrator.transport.ssh import sha256_fingerprint


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from its first byte (O_EXCL: never clobber an existing key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_key(path: str | os.PathLike[str]) -> str:
    """The public key line (`ssh-ed25519 AAAA...`) of the key at `path`; the pair is created if missing."""
    key_path = Path(path).expanduser()
    pub_path = key_path.with_name(key_path.name + ".pub")
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_new(key_path, pem, 0o600)
        pub_path.unlink(missing_ok=True)
        _write_new(pub_path, public + b" grpoctl\n", 0o644)
    if pub_path.exists():
        return " ".join(pub_path.read_text(encoding="utf-8").split()[:2])
    try:  # a private key without its .pub: derive the public half
        loaded = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise UsageError(
            f"ssh key {key_path} cannot be read ({err}); point ssh_key at an unencrypted key"
        ) from None
    public = loaded.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


def metadata_line(user: str, public_key: str) -> str:
    """The `ssh-keys` metadata entry the VM's guest agent turns into `~user/.ssh/authorized_keys`."""
    return f"{user}:{public_key} {user}"


def fingerprint_of(b64_key: str) -> str:
    """`SHA256:...` of a base64 public key as published in the guest attributes."""
    return sha256_fingerprint(base64.b64decode(b64_key))
