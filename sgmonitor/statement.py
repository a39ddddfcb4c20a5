"""Attestation tokens: what the verifier signs and what relying parties check.

The words are RFC 9334's: the enclave is the *attester*, the attestation service the
*verifier*, the hypervisor service (and the remote monitor) *relying parties*.

- :class:`SessionBinding` is what one session is: its purpose (a hypervisor session, or
  the link to the remote monitor), guest (or IDS name), session id, suite, the hash of
  the wrapped session key, and the relying party's nonce and key (the hypervisor's or
  the monitor's). The enclave's evidence binds it (:func:`session_report_data`,
  domain-separated, with the verifier's nonce), and the verifier's statement repeats
  it, so a statement is good for one session with one relying party only.
- :class:`Statement` is the verifier's signed word that evidence for that session came
  from an enclave its policy accepts (measurement, signer, version, debug flag, launch
  configuration), valid until ``not_after``.
- :class:`HypervisorEndorsement` is the verifier's signed word that an X25519 key is an
  enrolled hypervisor service's: the enclave wraps its session key only for such a key,
  so a stand-in the host runs can't read the session.

Tokens are ``magic | version | body | Ed25519 signature``; the signature covers a
domain label and the body, so no token can pass for another. Verification checks the
signature first and reads fields after (``_unverified`` names say which is which);
every failure raises :class:`InvalidToken` with a reason for the operator. Time is a
parameter (``now``), so expiry is testable without sleeping.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sgmonitor.channel import HV_NONCE_LEN, MAX_VM_NAME, SESSION_ID_LEN, Suite
from sgmonitor.errors import SGMonitorError
from sgmonitor.tee.backend import REPORT_DATA_LEN, EnclaveIdentity

__all__ = [
    "HV_KEY_LEN",
    "MAX_LIFETIME",
    "PEER_KEY_LEN",
    "VERIFIER_NONCE_LEN",
    "HypervisorEndorsement",
    "InvalidToken",
    "Purpose",
    "SessionBinding",
    "Statement",
    "session_report_data",
]

PEER_KEY_LEN = HV_KEY_LEN = 32  # raw X25519 public key of the relying party
VERIFIER_NONCE_LEN = 32
MAX_LIFETIME = 24 * 3600.0  # no token is believed for longer, whatever it says
_VERSION = 1
_SIG_LEN = 64
_STATEMENT_MAGIC = b"SGMS"
_ENDORSEMENT_MAGIC = b"SGME"
_STATEMENT_DOMAIN = b"sgmonitor/v1 attestation statement\0"
_ENDORSEMENT_DOMAIN = b"sgmonitor/v1 hypervisor endorsement\0"
_REPORT_DOMAIN = b"sgmonitor/v1 report data: session\0"
# magic | version | issued_at_ms | not_after_ms
_HEADER = struct.Struct(">4sBQQ")
# mrenclave | mrsigner | isv_prod_id | isv_svn | flags (bit 0: debug) | config_id
_IDENTITY = struct.Struct(">32s32sHHB32s")
# purpose | session_id | wrapped_key_sha256 | peer_nonce | peer_key | suite | vm length, vm
_BINDING = struct.Struct(f">B{SESSION_ID_LEN}s32s{HV_NONCE_LEN}s{PEER_KEY_LEN}sBB")
_FLAG_DEBUG = 1


class InvalidToken(SGMonitorError):
    """A statement or endorsement failed verification; the message says which check."""


class Purpose(IntEnum):
    """Which relying party a session is with: its statement is good for that one only."""

    HYPERVISOR_SESSION = 1  # guest pages from the hypervisor service
    MONITOR_LINK = 2  # sealed reports and heartbeats with the remote monitor


def _ms(t: float) -> int:
    return round(t * 1000)


@dataclass(frozen=True)
class SessionBinding:
    """The values that make one session: the evidence and the statement bind all of them."""

    vm: str
    session_id: bytes
    suite: Suite
    wrapped_key_sha256: bytes
    peer_nonce: bytes
    peer_key: bytes
    purpose: Purpose = Purpose.HYPERVISOR_SESSION

    def __post_init__(self) -> None:
        vm = self.vm.encode("utf-8") if isinstance(self.vm, str) else b""
        if not 0 < len(vm) <= MAX_VM_NAME:
            raise ValueError(f"vm must be 1..{MAX_VM_NAME} UTF-8 bytes")
        for name, value, size in (
            ("session_id", self.session_id, SESSION_ID_LEN),
            ("wrapped_key_sha256", self.wrapped_key_sha256, 32),
            ("peer_nonce", self.peer_nonce, HV_NONCE_LEN),
            ("peer_key", self.peer_key, PEER_KEY_LEN),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"{name} must be {size} bytes")
        Suite(self.suite)
        Purpose(self.purpose)

    @classmethod
    def for_wrapped_key(
        cls,
        vm: str,
        session_id: bytes,
        suite: Suite,
        wrapped_key: bytes,
        peer_nonce: bytes,
        peer_key: bytes,
        purpose: Purpose = Purpose.HYPERVISOR_SESSION,
    ) -> SessionBinding:
        """The binding of a session whose wrapped key is ``wrapped_key``."""
        digest = hashlib.sha256(wrapped_key).digest()
        return cls(vm, session_id, Suite(suite), digest, peer_nonce, peer_key, purpose)

    def encode(self) -> bytes:
        """The binding's bytes, as the statement and the report data carry them."""
        vm = self.vm.encode("utf-8")
        fixed = _BINDING.pack(
            int(self.purpose),
            self.session_id,
            self.wrapped_key_sha256,
            self.peer_nonce,
            self.peer_key,
            int(self.suite),
            len(vm),
        )
        return fixed + vm

    @classmethod
    def decode(cls, data: bytes) -> tuple[SessionBinding, int]:
        """A binding from the front of ``data``, and how many bytes it took."""
        if len(data) < _BINDING.size:
            raise InvalidToken("session binding truncated")
        purpose, sid, wrapped, nonce, key, suite, n = _BINDING.unpack_from(data)
        end = _BINDING.size + n
        if len(data) < end:
            raise InvalidToken("session binding truncated")
        try:
            vm = data[_BINDING.size : end].decode("utf-8")
            return cls(vm, sid, Suite(suite), wrapped, nonce, key, Purpose(purpose)), end
        except ValueError as exc:
            raise InvalidToken(f"session binding malformed: {exc}") from None


def session_report_data(binding: SessionBinding, verifier_nonce: bytes) -> bytes:
    """The 64 bytes of report data a session's evidence carries: SHA-512 over a domain
    label, the verifier's nonce and the session binding. Evidence made for anything
    else (another label, another nonce, another session) can't pass for it."""
    if not isinstance(verifier_nonce, bytes) or len(verifier_nonce) != VERIFIER_NONCE_LEN:
        raise ValueError(f"verifier nonce must be {VERIFIER_NONCE_LEN} bytes")
    out = hashlib.sha512(_REPORT_DOMAIN + verifier_nonce + binding.encode()).digest()
    assert len(out) == REPORT_DATA_LEN
    return out


def _sign(key: Ed25519PrivateKey, domain: bytes, body: bytes) -> bytes:
    return body + key.sign(domain + body)


def _verified_body(
    data: bytes,
    domain: bytes,
    magic: bytes,
    trusted: Sequence[Ed25519PublicKey],
    what: str,
) -> bytes:
    """The body of a token signed by one of ``trusted``; structure checked after."""
    if not isinstance(data, bytes) or len(data) < _HEADER.size + _SIG_LEN:
        raise InvalidToken(f"{what} is missing or truncated")
    if data[:4] != magic:
        raise InvalidToken(f"not a {what}")
    unverified_body, signature = data[:-_SIG_LEN], data[-_SIG_LEN:]
    for key in trusted:
        try:
            key.verify(signature, domain + unverified_body)
        except InvalidSignature:
            continue
        return unverified_body
    raise InvalidToken(f"{what} is not signed by a trusted attestation service")


def _check_times(issued_ms: int, not_after_ms: int, now: float | None, what: str) -> None:
    now = time.time() if now is None else now
    if not_after_ms <= issued_ms or not_after_ms - issued_ms > _ms(MAX_LIFETIME):
        raise InvalidToken(f"{what} has an impossible lifetime")
    if _ms(now) >= not_after_ms:
        raise InvalidToken(f"{what} expired {now - not_after_ms / 1000:.0f}s ago")
    if issued_ms > _ms(now) + 60_000:
        raise InvalidToken(f"{what} is issued in the future")


@dataclass(frozen=True)
class Statement:
    """The verifier's signed word: this enclave, accepted by policy, for this session."""

    identity: EnclaveIdentity
    binding: SessionBinding
    issued_at: float
    not_after: float

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        """The token, signed by the attestation service's key."""
        ident = self.identity
        body = (
            _HEADER.pack(_STATEMENT_MAGIC, _VERSION, _ms(self.issued_at), _ms(self.not_after))
            + _IDENTITY.pack(
                ident.mrenclave,
                ident.mrsigner,
                ident.isv_prod_id,
                ident.isv_svn,
                _FLAG_DEBUG if ident.debug else 0,
                ident.config_id,
            )
            + self.binding.encode()
        )
        return _sign(key, _STATEMENT_DOMAIN, body)

    @classmethod
    def verify(
        cls,
        data: bytes,
        trusted: Sequence[Ed25519PublicKey],
        *,
        now: float | None = None,
    ) -> Statement:
        """A statement signed by one of ``trusted`` and not expired at ``now``; what it
        binds is the relying party's to compare."""
        body = _verified_body(data, _STATEMENT_DOMAIN, _STATEMENT_MAGIC, trusted, "statement")
        _, version, issued_ms, not_after_ms = _HEADER.unpack_from(body)
        if version != _VERSION:
            raise InvalidToken(f"statement version {version} is not supported")
        at = _HEADER.size
        if len(body) < at + _IDENTITY.size:
            raise InvalidToken("statement truncated")
        mre, mrs, prod, svn, flags, config_id = _IDENTITY.unpack_from(body, at)
        if flags & ~_FLAG_DEBUG:
            raise InvalidToken(f"statement has unknown flags {flags:#x}")
        binding, used = SessionBinding.decode(body[at + _IDENTITY.size :])
        if at + _IDENTITY.size + used != len(body):
            raise InvalidToken("statement has trailing bytes")
        _check_times(issued_ms, not_after_ms, now, "statement")
        identity = EnclaveIdentity(mre, mrs, prod, svn, bool(flags & _FLAG_DEBUG), config_id)
        return cls(identity, binding, issued_ms / 1000, not_after_ms / 1000)


@dataclass(frozen=True)
class HypervisorEndorsement:
    """The verifier's signed word that ``hv_key`` is the enrolled hypervisor ``name``'s."""

    name: str
    hv_key: bytes
    issued_at: float
    not_after: float

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        """The token, signed by the attestation service's key."""
        name = self.name.encode("utf-8")
        if not 0 < len(name) <= 255 or len(self.hv_key) != HV_KEY_LEN:
            raise ValueError("endorsement needs a 1..255-byte name and a 32-byte key")
        body = (
            _HEADER.pack(_ENDORSEMENT_MAGIC, _VERSION, _ms(self.issued_at), _ms(self.not_after))
            + self.hv_key
            + bytes([len(name)])
            + name
        )
        return _sign(key, _ENDORSEMENT_DOMAIN, body)

    @classmethod
    def verify(
        cls,
        data: bytes,
        trusted: Sequence[Ed25519PublicKey],
        *,
        now: float | None = None,
    ) -> HypervisorEndorsement:
        """An endorsement signed by one of ``trusted`` and not expired at ``now``."""
        body = _verified_body(
            data, _ENDORSEMENT_DOMAIN, _ENDORSEMENT_MAGIC, trusted, "hypervisor endorsement"
        )
        _, version, issued_ms, not_after_ms = _HEADER.unpack_from(body)
        if version != _VERSION:
            raise InvalidToken(f"endorsement version {version} is not supported")
        at = _HEADER.size
        if (
            len(body) < at + HV_KEY_LEN + 1
            or len(body) != at + HV_KEY_LEN + 1 + body[at + HV_KEY_LEN]
        ):
            raise InvalidToken("endorsement malformed")
        hv_key = body[at : at + HV_KEY_LEN]
        try:
            name = body[at + HV_KEY_LEN + 1 :].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidToken("endorsement name is not UTF-8") from None
        _check_times(issued_ms, not_after_ms, now, "hypervisor endorsement")
        return cls(name, hv_key, issued_ms / 1000, not_after_ms / 1000)
