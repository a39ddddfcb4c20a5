"""Wrapping the enclave's session key for the hypervisor service's public key.

The paper encrypts the enclave's symmetric key with the hypervisor's RSA public key.
We use an HPKE-shaped (RFC 9180 base mode) construction instead: X25519 with a fresh
ephemeral key, HKDF-SHA256, AES-256-GCM. Why:

- The hypervisor's public key is 32 bytes, easy to pin in the IDS's configuration and
  to name in the attestation statement; RSA-3072 is 400 bytes of modulus.
- No padding oracle to get wrong (RSA-OAEP decryption errors must be handled
  uniformly); every failure here is one AEAD tag check.
- The wrap is bound to its context (session id, VM, channel suite, both public keys)
  through HKDF info and the AEAD's associated data, so a relay can't replay a wrapped
  key into another session or VM, or downgrade the suite to the unsealed experiment
  mode without the unwrap failing.
- X25519 key generation and a wrap cost tens of microseconds, so a fresh key per
  session is free. (Neither choice is post-quantum; the version byte leaves room.)

Format, 81 bytes: ``version u8 (=1) | ephemeral X25519 public key 32 | AES-256-GCM
ciphertext of the 32-byte session key 32 | tag 16``. The AEAD key is used exactly once
(fresh ephemeral secret), so the nonce is fixed at zero.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgmonitor.channel import KEY_LEN, MAX_VM_NAME, SESSION_ID_LEN, Suite
from sgmonitor.errors import SGMonitorError

__all__ = [
    "WRAPPED_KEY_LEN",
    "WRAP_VERSION",
    "InvalidWrappedKey",
    "fingerprint",
    "raw_public_key",
    "unwrap_session_key",
    "wrap_session_key",
]

WRAP_VERSION = 1
_PUB_LEN = 32
WRAPPED_KEY_LEN = 1 + _PUB_LEN + KEY_LEN + 16
_LABEL = b"sgmonitor/v1 keywrap X25519-HKDF-SHA256-AES256GCM"
_ZERO_NONCE = bytes(12)


class InvalidWrappedKey(SGMonitorError):
    """A wrapped key did not unwrap: malformed, forged, or for another context or key."""

    def __init__(self) -> None:
        super().__init__()


def _context(session_id: bytes, vm: str, suite: Suite) -> bytes:
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_LEN:
        raise ValueError(f"session_id must be {SESSION_ID_LEN} bytes")
    vm_bytes = vm.encode("utf-8")
    if not 0 < len(vm_bytes) <= MAX_VM_NAME:
        raise ValueError(f"vm name must be 1..{MAX_VM_NAME} UTF-8 bytes")
    return bytes([WRAP_VERSION, Suite(suite)]) + session_id + bytes([len(vm_bytes)]) + vm_bytes


def _kek(shared: bytes, eph_pub: bytes, hv_pub: bytes, context: bytes) -> AESGCM:
    hkdf = HKDF(hashes.SHA256(), KEY_LEN, salt=eph_pub + hv_pub, info=_LABEL + context)
    return AESGCM(hkdf.derive(shared))


def raw_public_key(public_key: X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key: how the wire and statements name it."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def wrap_session_key(
    hv_public_key: X25519PublicKey,
    session_key: bytes,
    *,
    session_id: bytes,
    vm: str,
    suite: Suite = Suite.AES256GCM_HKDF_SHA256,
) -> bytes:
    """Encrypt ``session_key`` so only the holder of the hypervisor's private key reads it."""
    if not isinstance(hv_public_key, X25519PublicKey):
        raise TypeError("hv_public_key must be an X25519PublicKey")
    if not isinstance(session_key, bytes) or len(session_key) != KEY_LEN:
        raise ValueError(f"session_key must be {KEY_LEN} bytes")
    return _wrap(
        X25519PrivateKey.generate(), hv_public_key, session_key, _context(session_id, vm, suite)
    )


def _wrap(
    ephemeral: X25519PrivateKey, hv_public_key: X25519PublicKey, session_key: bytes, context: bytes
) -> bytes:
    """The deterministic core of :func:`wrap_session_key` (fixed ephemeral: test vectors)."""
    eph_pub, hv_pub = raw_public_key(ephemeral.public_key()), raw_public_key(hv_public_key)
    shared = ephemeral.exchange(hv_public_key)
    aead = _kek(shared, eph_pub, hv_pub, context)
    sealed = aead.encrypt(_ZERO_NONCE, session_key, bytes([WRAP_VERSION]) + eph_pub + context)
    return bytes([WRAP_VERSION]) + eph_pub + sealed


def unwrap_session_key(
    hv_private_key: X25519PrivateKey,
    wrapped: bytes,
    *,
    session_id: bytes,
    vm: str,
    suite: Suite = Suite.AES256GCM_HKDF_SHA256,
) -> bytes:
    """The session key inside ``wrapped``, or :class:`InvalidWrappedKey` for any bad input."""
    if not isinstance(hv_private_key, X25519PrivateKey):
        raise TypeError("hv_private_key must be an X25519PrivateKey")
    try:
        if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_KEY_LEN:
            raise InvalidWrappedKey()
        if wrapped[0] != WRAP_VERSION:
            raise InvalidWrappedKey()
        context = _context(session_id, vm, suite)
        eph_pub = wrapped[1 : 1 + _PUB_LEN]
        hv_pub = raw_public_key(hv_private_key.public_key())
        # exchange() raises ValueError for low-order points (all-zero shared secret).
        shared = hv_private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        aead = _kek(shared, eph_pub, hv_pub, context)
        return aead.decrypt(
            _ZERO_NONCE, wrapped[1 + _PUB_LEN :], bytes([WRAP_VERSION]) + eph_pub + context
        )
    except (InvalidWrappedKey, InvalidTag, ValueError, TypeError):
        raise InvalidWrappedKey() from None


def fingerprint(public_key: X25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: how configs and statements name a key."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()
