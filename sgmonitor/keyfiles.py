"""Private key files of the trusted services: made by the service itself, owner-only.

The hypervisor service (X25519, for session-key unwrapping) and the attestation service
(Ed25519, for statements) each make their own key on first start and keep it in a file
of mode 0600; nobody else generates or writes it. A key file readable by others is
refused, as ssh refuses one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.errors import SGMonitorError

__all__ = ["KeyFileError", "load_or_create"]

_K = TypeVar("_K", Ed25519PrivateKey, X25519PrivateKey)


class KeyFileError(SGMonitorError):
    """A key file that can't be read, is of the wrong kind, or is readable by others."""


def load_or_create(path: Path, kind: type[_K]) -> tuple[_K, bool]:
    """The private key in ``path`` (made with mode 0600 if missing), and whether it was
    made now."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path, kind), False
    except OSError as exc:
        raise KeyFileError(f"cannot create key {path}: {exc}") from None
    key = kind.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key, True


def _load(path: Path, kind: type[_K]) -> _K:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key {path} is accessible by others (mode {mode & 0o777:o})")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot load key {path}: {exc}") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"key {path} is not an {kind.__name__}")
    return key
