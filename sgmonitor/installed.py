"""Where the installed enclave's signature, its development signer and the simulated
platform's key live: ``$SGMONITOR_HOME`` (default ``~/.local/share/sgmonitor``).

``sgmonitor enclave sign`` writes the SIGSTRUCT for the code as installed (the signer's
step, as ``gramine-sgx-sign`` is); ``sgmonitor enclave platform`` makes the simulated
platform's quoting key. The untrusted library only reads the SIGSTRUCT and passes the
platform key's path to the enclave: it generates no key and writes nothing the enclave
or a verifier trusts.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sgmonitor.keyfiles import load_or_create
from sgmonitor.tee.backend import EnclaveLoadError

__all__ = [
    "home",
    "installed_sigstruct",
    "platform_key_path",
    "platform_public_key",
    "signer_key_path",
    "sigstruct_path",
]


def home() -> Path:
    """The directory of the installed enclave's artifacts (made on demand, 0700)."""
    path = Path(os.environ.get("SGMONITOR_HOME") or Path.home() / ".local/share/sgmonitor")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def sigstruct_path() -> Path:
    """The installed enclave's SIGSTRUCT."""
    return home() / "enclave.sig"


def signer_key_path() -> Path:
    """The development signer's Ed25519 key (a vendor keeps its own elsewhere)."""
    return home() / "enclave-signer.pem"


def platform_key_path() -> Path:
    """The simulated platform's quoting key (the sim backend's 'hardware')."""
    return home() / "sim-platform.pem"


def platform_public_key() -> Ed25519PublicKey:
    """The simulated platform's public quoting key, which a verifier is told to trust
    (the platform makes its key on first use, as a TEE comes with one)."""
    key, _ = load_or_create(platform_key_path(), Ed25519PrivateKey)
    return key.public_key()


def installed_sigstruct() -> bytes:
    """The installed SIGSTRUCT, or a clear error saying how to make one."""
    try:
        return sigstruct_path().read_bytes()
    except OSError:
        raise EnclaveLoadError(
            f"no enclave signature at {sigstruct_path()}: run 'sgmonitor enclave sign'"
        ) from None
