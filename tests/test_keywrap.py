"""Key wrapping: known answers, must-fail inputs, PEM round trips.

The known answer uses RFC 7748 section 6.1's key pairs (Alice as the ephemeral key,
Bob as the hypervisor) so X25519 itself is pinned by the RFC's shared secret; the
wrapped bytes were produced once by calling X25519, HKDF and AESGCM from
``cryptography`` directly with the layout in docs/protocol.md (see
``test_kat_recomputed_independently``), not through ``sgmonitor.keywrap``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgmonitor import keywrap
from sgmonitor.channel import Suite
from sgmonitor.errors import SGMonitorError
from sgmonitor.keyfiles import KeyFileError, load_or_create
from sgmonitor.keywrap import (
    WRAPPED_KEY_LEN,
    InvalidWrappedKey,
    unwrap_session_key,
    wrap_session_key,
)

ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
SID = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
SESSION_KEY = bytes(range(32))
KAT_WRAPPED = (
    "018520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    "c8fdf12a62e1089d9777d8628ab82f639bcdf8aaa26b2730086e0bcf7fc8d5bd"
    "b338caeb0bffb2da254c69433b859122"
)


def raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_x25519_rfc7748() -> None:
    alice, bob = (X25519PrivateKey.from_private_bytes(k) for k in (ALICE, BOB))
    assert alice.exchange(bob.public_key()).hex() == RFC7748_SHARED


def test_kat_recomputed_independently() -> None:
    eph, hv = (X25519PrivateKey.from_private_bytes(k) for k in (ALICE, BOB))
    ctx = bytes([1, 1]) + SID + bytes([6]) + b"guest1"
    info = b"sgmonitor/v1 keywrap X25519-HKDF-SHA256-AES256GCM" + ctx
    kek = HKDF(hashes.SHA256(), 32, salt=raw(eph) + raw(hv), info=info).derive(
        bytes.fromhex(RFC7748_SHARED)
    )
    ad = bytes([1]) + raw(eph) + ctx
    wrapped = bytes([1]) + raw(eph) + AESGCM(kek).encrypt(bytes(12), SESSION_KEY, ad)
    assert wrapped.hex() == KAT_WRAPPED


def test_kat_through_module() -> None:
    eph, hv = (X25519PrivateKey.from_private_bytes(k) for k in (ALICE, BOB))
    ctx = keywrap._context(SID, "guest1", Suite.AES256GCM_HKDF_SHA256)
    assert keywrap._wrap(eph, hv.public_key(), SESSION_KEY, ctx).hex() == KAT_WRAPPED
    wrapped = bytes.fromhex(KAT_WRAPPED)
    assert unwrap_session_key(hv, wrapped, session_id=SID, vm="guest1") == SESSION_KEY


def test_round_trip_random() -> None:
    hv = X25519PrivateKey.generate()
    key = os.urandom(32)
    wrapped = wrap_session_key(hv.public_key(), key, session_id=SID, vm="vm-a")
    assert len(wrapped) == WRAPPED_KEY_LEN and wrapped[0] == 1
    assert unwrap_session_key(hv, wrapped, session_id=SID, vm="vm-a") == key
    other = wrap_session_key(hv.public_key(), key, session_id=SID, vm="vm-a")
    assert other != wrapped  # fresh ephemeral every time


@pytest.fixture
def wrapped_bob() -> tuple[X25519PrivateKey, bytes]:
    return X25519PrivateKey.from_private_bytes(BOB), bytes.fromhex(KAT_WRAPPED)


@pytest.mark.parametrize("bit", [0, 3, 8, 8 * 32, 8 * 33, 8 * 64, 8 * 80 + 7])
def test_bit_flip_anywhere_fails(wrapped_bob: tuple[X25519PrivateKey, bytes], bit: int) -> None:
    hv, wrapped = wrapped_bob
    forged = bytearray(wrapped)
    forged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidWrappedKey) as info:
        unwrap_session_key(hv, bytes(forged), session_id=SID, vm="guest1")
    assert str(info.value) == ""


@pytest.mark.parametrize(
    "context",
    [
        {"session_id": bytes(16), "vm": "guest1"},
        {"session_id": SID, "vm": "guest2"},
        {"session_id": SID, "vm": "guest1", "suite": Suite.UNSEALED_FOR_EXPERIMENTS_ONLY},
    ],
)
def test_wrong_context_fails(
    wrapped_bob: tuple[X25519PrivateKey, bytes], context: dict[str, object]
) -> None:
    """Replay into another session or VM, or a downgrade of the suite."""
    hv, wrapped = wrapped_bob
    with pytest.raises(InvalidWrappedKey):
        unwrap_session_key(hv, wrapped, **context)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda w: b"",
        lambda w: w[:-1],
        lambda w: w + b"\0",
        lambda w: b"\x02" + w[1:],
        lambda w: b"\x01" + bytes(32) + w[33:],  # low-order point: all-zero shared secret
        lambda w: "x" * len(w),
    ],
)
def test_malformed_fails(wrapped_bob: tuple[X25519PrivateKey, bytes], mangle) -> None:  # type: ignore[no-untyped-def]
    hv, wrapped = wrapped_bob
    with pytest.raises(InvalidWrappedKey):
        unwrap_session_key(hv, mangle(wrapped), session_id=SID, vm="guest1")


def test_wrong_private_key_fails(wrapped_bob: tuple[X25519PrivateKey, bytes]) -> None:
    _, wrapped = wrapped_bob
    with pytest.raises(InvalidWrappedKey):
        unwrap_session_key(X25519PrivateKey.generate(), wrapped, session_id=SID, vm="guest1")


def test_exceptions_are_sgmonitor_errors() -> None:
    assert issubclass(InvalidWrappedKey, SGMonitorError)
    assert issubclass(KeyFileError, SGMonitorError)


def test_wrap_rejects_bad_arguments() -> None:
    hv = X25519PrivateKey.generate()
    with pytest.raises(ValueError):
        wrap_session_key(hv.public_key(), b"short", session_id=SID, vm="g")
    with pytest.raises(ValueError):
        wrap_session_key(hv.public_key(), SESSION_KEY, session_id=b"short", vm="g")
    with pytest.raises(TypeError):
        wrap_session_key(hv, SESSION_KEY, session_id=SID, vm="g")  # type: ignore[arg-type]


def test_key_files_are_made_once_owner_only_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "hv.pem"
    hv, made = load_or_create(path, X25519PrivateKey)
    assert made and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, made = load_or_create(path, X25519PrivateKey)
    assert not made and keywrap.raw_public_key(again.public_key()) == keywrap.raw_public_key(
        hv.public_key()
    )
    wrapped = wrap_session_key(hv.public_key(), SESSION_KEY, session_id=SID, vm="g")
    assert unwrap_session_key(again, wrapped, session_id=SID, vm="g") == SESSION_KEY
    with pytest.raises(KeyFileError, match="not an Ed25519PrivateKey"):
        load_or_create(path, Ed25519PrivateKey)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="accessible by others"):
        load_or_create(path, X25519PrivateKey)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN NONSENSE-----")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="cannot load"):
        load_or_create(garbage, X25519PrivateKey)
