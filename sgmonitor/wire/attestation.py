"""The attestation link (untrusted library <-> attestation service), in the clear:
ChallengeRequest, Challenge, AttestSession, StatementIssued; refusals are the shared
``Error``."""

from __future__ import annotations

from sgmonitor.wire.core import (
    HV_KEY_LEN,
    MAX_ENCLAVE_CONFIG,
    MAX_STATEMENT,
    Message,
    blob,
    fixed,
    message,
    text,
    u8,
)

__all__ = [
    "MAX_BACKEND_NAME",
    "MAX_BINDING",
    "MAX_ENDORSEMENT",
    "MAX_EVIDENCE",
    "VERIFIER_NONCE_LEN",
    "AttestSession",
    "Challenge",
    "ChallengeRequest",
    "StatementIssued",
]

VERIFIER_NONCE_LEN = 32
MAX_EVIDENCE = 64 * 1024
MAX_ENDORSEMENT = 1024
MAX_BACKEND_NAME = 32
MAX_BINDING = 256  # a session binding: 115 bytes and the VM name


@message(0x51)
class ChallengeRequest(Message):
    """Library -> attestation service: a fresh nonce for evidence. For a hypervisor
    session (purpose 1), also the service's endorsement of the hypervisor key
    ``peer_key`` (refused if it is not enrolled); for a monitor link (purpose 2), the
    nonce only (the monitor checks its own key in the enclave's launch configuration)."""

    purpose: int = u8()
    peer_key: bytes = fixed(HV_KEY_LEN)

    def _check(self) -> None:
        if self.purpose not in (1, 2):
            self._fail(f"unknown purpose {self.purpose}")


@message(0x52)
class Challenge(Message):
    """Attestation service -> library: a single-use nonce and the signed endorsement."""

    nonce: bytes = fixed(VERIFIER_NONCE_LEN)
    endorsement: bytes = blob(MAX_ENDORSEMENT)


@message(0x53)
class AttestSession(Message):
    """Library -> attestation service: the enclave's evidence for one session, with the
    launch configuration and the session binding (``sgmonitor.statement.SessionBinding``
    bytes) that its report data covers, for the service to recompute and check."""

    backend: str = text(MAX_BACKEND_NAME, nonempty=True)
    evidence: bytes = blob(MAX_EVIDENCE)
    config: bytes = blob(MAX_ENCLAVE_CONFIG)
    nonce: bytes = fixed(VERIFIER_NONCE_LEN)
    binding: bytes = blob(MAX_BINDING)


@message(0x54)
class StatementIssued(Message):
    """Attestation service -> library: the signed statement for the session."""

    statement: bytes = blob(MAX_STATEMENT)
