"""What every TEE backend offers, and what an attestation service verifies.

A backend (simulation today; Gramine on SGX, or configfs-tsm for SEV-SNP/TDX later)
checks the enclave's measurement against its signer's signature, produces evidence
binding 64 bytes of report data (which the enclave program only ever fills with its own,
domain-separated values), and seals data to the enclave's identity. Code outside a
backend module depends only on these interfaces and must read ``protects_against_root``
instead of assuming.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sgmonitor.errors import SGMonitorError
from sgmonitor.tee.boot import ENCLAVE_SOURCES  # re-exported: the measured launch owns the list

__all__ = [
    "ENCLAVE_SOURCES",
    "REPORT_DATA_LEN",
    "EnclaveIdentity",
    "EnclaveLoadError",
    "EvidenceClaims",
    "EvidenceVerifier",
    "InvalidEvidence",
    "SealedDataError",
    "TeeBackend",
]

REPORT_DATA_LEN = 64


class InvalidEvidence(SGMonitorError):
    """Evidence failed verification; the message says which check, for the operator."""


class EnclaveLoadError(SGMonitorError):
    """The enclave's measured code does not match its signature: refuse to start it."""


class SealedDataError(SGMonitorError):
    """Sealed data did not unseal (other enclave, other platform, or tampered)."""

    def __init__(self) -> None:
        super().__init__()


@dataclass(frozen=True)
class EnclaveIdentity:
    """Who the enclave is: code measurement, signer, the signer's version numbers, and
    the hash of its launch configuration (SGX's CONFIGID, TDX's MRCONFIGID): the code
    measurement stays the same for every host and verifier key; the configuration,
    which names the verifier the enclave trusts, is reported beside it."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    config_id: bytes


@dataclass(frozen=True)
class EvidenceClaims:
    """What verified evidence says; an attestation policy decides if that is enough."""

    backend: str
    version: int
    identity: EnclaveIdentity
    report_data: bytes
    timestamp: float


class TeeBackend(ABC):
    """One TEE technology as seen from inside the enclave."""

    name: ClassVar[str]
    protects_against_root: ClassVar[bool]

    @classmethod
    @abstractmethod
    def launch(
        cls,
        *,
        mrenclave: bytes,
        config: bytes,
        sigstruct: bytes,
        options: Mapping[str, str],
    ) -> TeeBackend:
        """Start as the enclave whose code measured ``mrenclave`` at launch (see
        ``sgmonitor.tee.boot``), if the signer's ``sigstruct`` vouches for that
        measurement (EINIT); else :class:`EnclaveLoadError`. ``config`` is the launch
        configuration, reported as the CONFIGID. ``options`` are backend-specific."""

    @classmethod
    @abstractmethod
    def sign(
        cls,
        signing_key: Ed25519PrivateKey,
        *,
        mrenclave: bytes,
        isv_prod_id: int,
        isv_svn: int,
        debug: bool,
    ) -> bytes:
        """The signer's tool (like ``gramine-sgx-sign``): the signature structure over
        the code measurement and attributes that :meth:`launch` checks."""

    @classmethod
    @abstractmethod
    def signed_identity(cls, sigstruct: bytes) -> EnclaveIdentity:
        """The identity a signature structure vouches for, once its signature checks
        (``config_id`` empty): what an operator pins in a policy."""

    @abstractmethod
    def identity(self) -> EnclaveIdentity:
        """The running enclave's measured identity."""

    @abstractmethod
    def evidence(self, report_data: bytes, *, now: float | None = None) -> bytes:
        """Evidence (a quote or report) binding exactly ``REPORT_DATA_LEN`` bytes."""

    @abstractmethod
    def seal_data(self, data: bytes, aad: bytes = b"") -> bytes:
        """Encrypt ``data`` so only this enclave identity on this platform can unseal it."""

    @abstractmethod
    def unseal_data(self, blob: bytes, aad: bytes = b"") -> bytes:
        """Inverse of :meth:`seal_data`; :class:`SealedDataError` on any failure."""


class EvidenceVerifier(ABC):
    """Checks one backend's evidence: signature first, then fields."""

    backend: ClassVar[str]

    @abstractmethod
    def verify(
        self, evidence: bytes, *, report_data: bytes, now: float | None = None
    ) -> EvidenceClaims:
        """The claims, or :class:`InvalidEvidence`. Policy (allow-lists) is the caller's."""
