"""The enclave's launch configuration: what it is told at launch, reported as CONFIGID.

It names the enclave's mode, the one attestation service (verifier) whose key the
enclave trusts, to endorse hypervisor keys, and the remote monitor (its X25519 key) that
the enclave's reports are sealed for. The host writes it, so the enclave does not
take it on faith: the TEE reports its SHA-256 beside the code measurement (as SGX's
CONFIGID or TDX's MRCONFIGID), the verifier refuses evidence whose configuration names
another verifier, and so does every relying party that pins that verifier's key. The
code measurement stays the same for every host and every verifier key.

Format: canonical JSON ``{"format": ..., "mode": ..., "monitor_key": "<64 hex>",
"verifier_key": "<64 hex>"}`` (sorted keys, no spaces): the monitor's raw X25519 key and
the verifier's raw Ed25519 key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sgmonitor.channel import Suite
from sgmonitor.errors import SGMonitorError

__all__ = ["CONFIG_FORMAT", "MODES", "LaunchConfig", "LaunchConfigError", "raw_ed25519"]

CONFIG_FORMAT = "sgmonitor-enclave-config/3"
MODES = ("secure", "secure-plain")


class LaunchConfigError(SGMonitorError):
    """A launch configuration that does not parse or says something unexpected."""


def raw_ed25519(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key: how configs and policies name it."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class LaunchConfig:
    """Mode, trusted verifier key and remote monitor key of one enclave launch."""

    mode: str
    verifier_key: Ed25519PublicKey
    monitor_key: bytes  # raw X25519

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LaunchConfigError(f"mode must be one of {MODES}")
        if not isinstance(self.monitor_key, bytes) or len(self.monitor_key) != 32:
            raise LaunchConfigError("monitor_key must be 32 bytes (raw X25519)")

    def to_bytes(self) -> bytes:
        """The canonical bytes (their SHA-256 is the CONFIGID)."""
        doc = {
            "format": CONFIG_FORMAT,
            "mode": self.mode,
            "monitor_key": self.monitor_key.hex(),
            "verifier_key": raw_ed25519(self.verifier_key).hex(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def suite(self) -> Suite:
        """The channel suite the mode means."""
        if self.mode == "secure-plain":
            return Suite.UNSEALED_FOR_EXPERIMENTS_ONLY
        return Suite.AES256GCM_HKDF_SHA256

    @property
    def config_id(self) -> bytes:
        """SHA-256 of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> LaunchConfig:
        """Parse; anything but the canonical form of a known format is refused."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
                raise ValueError(f"format must be {CONFIG_FORMAT!r}")
            if set(doc) != {"format", "mode", "monitor_key", "verifier_key"}:
                raise ValueError(f"unexpected keys {sorted(doc)}")
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(doc["verifier_key"])))
            config = cls(str(doc["mode"]), key, bytes.fromhex(str(doc["monitor_key"])))
        except (ValueError, TypeError, LaunchConfigError) as exc:
            raise LaunchConfigError(f"bad enclave launch configuration: {exc}") from None
        if config.to_bytes() != data:
            raise LaunchConfigError("enclave launch configuration is not in canonical form")
        return config
