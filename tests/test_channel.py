"""The sealing channel: known-answer vectors, must-fail vectors, counters, modes.

Known answers. The AES-256-GCM primitive is pinned by McGrew & Viega's GCM test cases
13 and 14 (AES-256, all-zero key and IV). The channel vectors below were produced once
by a script independent of ``sgmonitor.channel``: HKDF-SHA256 and AESGCM from
``cryptography`` called directly, the nonce and associated data written byte by byte
from docs/protocol.md. ``test_vectors_recomputed_independently`` repeats that script,
so a change to the channel's layout cannot silently move both sides at once.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgmonitor.channel import (
    MAX_MESSAGES,
    TAG_LEN,
    Channel,
    ChannelClosed,
    ChannelExhausted,
    Direction,
    InvalidSeal,
    Kind,
    SessionExpired,
    SessionKeys,
    Side,
    Suite,
    UnsealedChannelForExperimentsOnly,
    associated_data,
    make_channel,
    nonce,
)
from sgmonitor.errors import SGMonitorError

SESSION_KEY = bytes(range(32))
SESSION_ID = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
HV_NONCE = bytes(range(0x40, 0x60))
VM = "guest1"
PAGE = bytes(i % 251 for i in range(4096))
PAGE_ADDR = 0xFFFFFFFF81000000

KAT_H2E = "109feee77f003bb6a4cf315f66aea2a03c9cd2bd09c7521fe9eb49d14c4a5e4f"
KAT_E2H = "1d1b67cdc81ca0d7c8181e7c3b59fbc4d8eabc33b754ecd56a8e6b788f18fd39"
KAT_PAGE_AD = (
    "01010103a0a1a2a3a4a5a6a7a8a9aaabacadaeaf00000000000000070000000000000000"
    "ffffffff810000000000100006677565737431"
)
KAT_PAGE_CT_SHA256 = "d018d58cd3fd7278c22ed9ca4d4bf5cd8f327496794731cd3fd94abefcbcc509"
KAT_PAGE_TAG = "4b2119c4802bd735b5302f7bcce4b071"
KAT_REQ_AD = (
    "01010201a0a1a2a3a4a5a6a7a8a9aaabacadaeaf00000000000000070000000000000000"
    "00000000000000000000000506677565737431"
)
KAT_REQ_CT = "9f83b6477e7e9df5956207dba33ab6147bea2f1e80"
# The fields of KAT_PAGE_AD.
PAGE_AD_FIELDS: dict[str, object] = dict(
    version=1,
    suite=Suite.AES256GCM_HKDF_SHA256,
    session_id=SESSION_ID,
    direction=Direction.HV_TO_ENCLAVE,
    kind=Kind.PAGE,
    request_id=7,
    sequence=0,
    vm=VM,
    address=PAGE_ADDR,
    length=4096,
)


def pair(**kw: object) -> tuple[Channel, Channel]:
    keys = SessionKeys.derive(SESSION_KEY, SESSION_ID, HV_NONCE)
    return Channel(keys, Side.ENCLAVE, VM, **kw), Channel(keys, Side.HYPERVISOR, VM, **kw)  # type: ignore[arg-type]


# --- known answers ------------------------------------------------------------------


def test_aes256gcm_primitive_mcgrew_viega_13_14() -> None:
    aead = AESGCM(bytes(32))
    assert aead.encrypt(bytes(12), b"", None).hex() == "530f8afbc74536b9a963b4f1c4cb738b"
    assert aead.encrypt(bytes(12), bytes(16), None).hex() == (
        "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
    )


def test_hkdf_rfc5869_case1() -> None:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=42,
        salt=bytes(range(13)),
        info=bytes(range(0xF0, 0xFA)),
    ).derive(b"\x0b" * 22)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_vectors_recomputed_independently() -> None:
    def key(direction: int) -> bytes:
        info = b"sgmonitor/v1 channel key " + bytes([1, direction]) + SESSION_ID
        salt = SESSION_ID + HV_NONCE
        return HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(SESSION_KEY)

    assert key(1).hex() == KAT_H2E
    assert key(2).hex() == KAT_E2H
    ad = bytes.fromhex(KAT_PAGE_AD)
    ct = AESGCM(key(1)).encrypt((1).to_bytes(4, "big") + bytes(8), PAGE, ad)
    assert hashlib.sha256(ct).hexdigest() == KAT_PAGE_CT_SHA256
    ct2 = AESGCM(key(2)).encrypt(
        (2).to_bytes(4, "big") + bytes(8), b"hello", bytes.fromhex(KAT_REQ_AD)
    )
    assert ct2.hex() == KAT_REQ_CT


def test_key_schedule_kat() -> None:
    keys = SessionKeys.derive(SESSION_KEY, SESSION_ID, HV_NONCE)
    assert keys.hv_to_enclave.hex() == KAT_H2E
    assert keys.enclave_to_hv.hex() == KAT_E2H
    assert "109f" not in repr(keys)  # keys never printed


def test_ad_and_nonce_kat() -> None:
    ad = associated_data(**PAGE_AD_FIELDS)  # type: ignore[arg-type]
    assert ad.hex() == KAT_PAGE_AD
    assert nonce(Direction.ENCLAVE_TO_HV, 1).hex() == "000000020000000000000001"


def test_channel_seal_kat() -> None:
    enclave, hv = pair()
    assert enclave.seal(Kind.REQUEST, 7, b"hello").hex() == KAT_REQ_CT
    sealed = hv.seal(Kind.PAGE, 7, PAGE, address=PAGE_ADDR)
    assert hashlib.sha256(sealed).hexdigest() == KAT_PAGE_CT_SHA256
    assert sealed[-TAG_LEN:].hex() == KAT_PAGE_TAG
    assert enclave.open(Kind.PAGE, 7, sealed, address=PAGE_ADDR, length=4096) == PAGE


# --- round trips and counters --------------------------------------------------------


def test_round_trip_both_directions() -> None:
    enclave, hv = pair()
    for rid in range(1, 4):
        req = enclave.seal(Kind.REQUEST, rid, b"read %d" % rid)
        assert hv.open(Kind.REQUEST, rid, req) == b"read %d" % rid
        idx = hv.seal(Kind.REPLY, rid, b"index")
        page = hv.seal(Kind.PAGE, rid, PAGE, address=PAGE_ADDR + rid * 4096)
        assert enclave.open(Kind.REPLY, rid, idx) == b"index"
        assert enclave.open(Kind.PAGE, rid, page, address=PAGE_ADDR + rid * 4096) == PAGE
    assert (enclave.sent, enclave.received, hv.sent, hv.received) == (3, 6, 6, 3)
    assert PAGE not in page  # ciphertext, not the page


def test_direction_keys_differ_and_reflection_fails() -> None:
    enclave, _ = pair()
    req = enclave.seal(Kind.REQUEST, 1, b"x")
    with pytest.raises(InvalidSeal):  # reflecting the enclave's own message back to it
        enclave.open(Kind.REQUEST, 1, req)


def test_exhaustion_raises_before_wrap() -> None:
    enclave, hv = pair(limit=3)
    for _ in range(3):
        hv.open(Kind.REQUEST, 1, enclave.seal(Kind.REQUEST, 1, b"x"))
    with pytest.raises(ChannelExhausted):
        enclave.seal(Kind.REQUEST, 1, b"x")
    with pytest.raises(ValueError):
        Channel(
            SessionKeys.derive(SESSION_KEY, SESSION_ID, HV_NONCE),
            Side.ENCLAVE,
            VM,
            limit=MAX_MESSAGES + 1,
        )
    with pytest.raises(ChannelExhausted):
        nonce(Direction.HV_TO_ENCLAVE, 2**64)


def test_expiry_uses_the_given_clock() -> None:
    enclave, hv = pair(not_after=1000.0)
    sealed = enclave.seal(Kind.REQUEST, 1, b"x", now=999.0)
    with pytest.raises(SessionExpired):
        hv.open(Kind.REQUEST, 1, sealed, now=1000.5)
    assert hv.open(Kind.REQUEST, 1, sealed, now=1000.0) == b"x"
    with pytest.raises(SessionExpired):
        enclave.seal(Kind.REQUEST, 2, b"y", now=2000.0)


def test_closed_channel_refuses() -> None:
    enclave, _ = pair()
    enclave.close()
    with pytest.raises(ChannelClosed):
        enclave.seal(Kind.REQUEST, 1, b"x")


def test_bad_key_material_rejected() -> None:
    with pytest.raises(ValueError):
        SessionKeys.derive(SESSION_KEY[:31], SESSION_ID, HV_NONCE)
    with pytest.raises(ValueError):
        SessionKeys.derive(SESSION_KEY, SESSION_ID[:8], HV_NONCE)
    with pytest.raises(TypeError):
        SessionKeys.derive("k" * 32, SESSION_ID, HV_NONCE)  # type: ignore[arg-type]


# --- must-fail vectors ---------------------------------------------------------------


def _fresh_page() -> tuple[Channel, bytes]:
    enclave, hv = pair()
    return enclave, hv.seal(Kind.PAGE, 7, PAGE, address=PAGE_ADDR)


@pytest.mark.parametrize("bit", [0, 7, 8 * 100, 8 * 4095 + 3, 8 * 4096, 8 * (4096 + TAG_LEN) - 1])
def test_bit_flip_anywhere_fails(bit: int) -> None:
    enclave, sealed = _fresh_page()
    forged = bytearray(sealed)
    forged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidSeal) as info:
        enclave.open(Kind.PAGE, 7, bytes(forged), address=PAGE_ADDR)
    assert str(info.value) == ""  # message-less: no oracle about which check failed
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    "change",
    [
        {"kind": Kind.REPLY},
        {"request_id": 8},
        {"address": PAGE_ADDR + 4096},
        {"length": 4095},
    ],
)
def test_wrong_expected_field_fails(change: dict[str, object]) -> None:
    enclave, sealed = _fresh_page()
    args: dict[str, object] = {"kind": Kind.PAGE, "request_id": 7, "address": PAGE_ADDR}
    args.update(change)
    with pytest.raises(InvalidSeal):
        enclave.open(args.pop("kind"), args.pop("request_id"), sealed, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["session", "vm", "suite_version"])
def test_wrong_context_fails(field: str) -> None:
    keys = SessionKeys.derive(SESSION_KEY, SESSION_ID, HV_NONCE)
    hv = Channel(keys, Side.HYPERVISOR, VM)
    sealed = hv.seal(Kind.PAGE, 7, PAGE, address=PAGE_ADDR)
    if field == "session":  # same key material, other session id: other keys and AD
        other = Channel(SessionKeys.derive(SESSION_KEY, bytes(16), HV_NONCE), Side.ENCLAVE, VM)
    elif field == "vm":  # page moved to another VM's channel
        other = Channel(keys, Side.ENCLAVE, "guest2")
    else:  # same keys, other direction role: the AD direction and keys both differ
        other = Channel(keys, Side.HYPERVISOR, VM)
    with pytest.raises(InvalidSeal):
        other.open(Kind.PAGE, 7, sealed, address=PAGE_ADDR)


def test_ad_fields_each_change_the_bytes() -> None:
    changes = dict(
        version=2,
        suite=Suite.UNSEALED_FOR_EXPERIMENTS_ONLY,
        session_id=bytes(16),
        direction=Direction.ENCLAVE_TO_HV,
        kind=Kind.REPLY,
        request_id=8,
        sequence=1,
        vm="guest2",
        address=PAGE_ADDR + 4096,
        length=4095,
    )
    assert set(changes) == set(PAGE_AD_FIELDS)
    ref = associated_data(**PAGE_AD_FIELDS)  # type: ignore[arg-type]
    for name, value in changes.items():
        assert associated_data(**{**PAGE_AD_FIELDS, name: value}) != ref, name  # type: ignore[arg-type]


def test_replay_fails() -> None:
    enclave, hv = pair()
    first = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR)
    enclave.open(Kind.PAGE, 1, first, address=PAGE_ADDR)
    hv.seal(Kind.PAGE, 2, PAGE, address=PAGE_ADDR)
    with pytest.raises(InvalidSeal):
        enclave.open(Kind.PAGE, 2, first, address=PAGE_ADDR)


def test_reorder_fails_and_kills_the_channel() -> None:
    enclave, hv = pair()
    a = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR)
    b = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR + 4096)
    with pytest.raises(InvalidSeal):
        enclave.open(Kind.PAGE, 1, b, address=PAGE_ADDR + 4096)
    with pytest.raises(InvalidSeal):  # the right one afterwards: channel is dead
        enclave.open(Kind.PAGE, 1, a, address=PAGE_ADDR)
    with pytest.raises(ChannelClosed):
        enclave.seal(Kind.REQUEST, 2, b"x")


def test_drop_fails() -> None:
    enclave, hv = pair()
    hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR)  # dropped by the relay
    b = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR + 4096)
    with pytest.raises(InvalidSeal):
        enclave.open(Kind.PAGE, 1, b, address=PAGE_ADDR + 4096)


@pytest.mark.parametrize("cut", [1, TAG_LEN - 1, TAG_LEN, TAG_LEN + 1, 4096, 4096 + TAG_LEN])
def test_truncation_fails(cut: int) -> None:
    enclave, sealed = _fresh_page()
    with pytest.raises(InvalidSeal):
        enclave.open(Kind.PAGE, 7, sealed[: len(sealed) - cut], address=PAGE_ADDR)


def test_extension_fails() -> None:
    enclave, sealed = _fresh_page()
    with pytest.raises(InvalidSeal):
        enclave.open(Kind.PAGE, 7, sealed + b"\x00", address=PAGE_ADDR)


def test_invalid_seal_is_an_sgmonitor_error() -> None:
    assert issubclass(InvalidSeal, SGMonitorError)


# --- the explicit experiment mode ---------------------------------------------------


def unsealed_pair() -> tuple[UnsealedChannelForExperimentsOnly, UnsealedChannelForExperimentsOnly]:
    return (
        UnsealedChannelForExperimentsOnly(SESSION_ID, Side.ENCLAVE, VM),
        UnsealedChannelForExperimentsOnly(SESSION_ID, Side.HYPERVISOR, VM),
    )


def test_unsealed_round_trip_is_plaintext() -> None:
    enclave, hv = unsealed_pair()
    msg = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR)
    assert msg.endswith(PAGE)  # nothing hidden: experiments only
    assert enclave.open(Kind.PAGE, 1, msg, address=PAGE_ADDR, length=4096) == PAGE


@pytest.mark.parametrize("attack", ["replay", "reorder", "move", "request", "truncate"])
def test_unsealed_still_catches_naive_replay_reorder_move(attack: str) -> None:
    enclave, hv = unsealed_pair()
    a = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR)
    b = hv.seal(Kind.PAGE, 1, PAGE, address=PAGE_ADDR + 4096)
    with pytest.raises(InvalidSeal):
        if attack == "replay":
            enclave.open(Kind.PAGE, 1, a, address=PAGE_ADDR)
            enclave.open(Kind.PAGE, 1, a, address=PAGE_ADDR + 4096)
        elif attack == "reorder":
            enclave.open(Kind.PAGE, 1, b, address=PAGE_ADDR + 4096)
        elif attack == "move":
            enclave.open(Kind.PAGE, 1, a, address=PAGE_ADDR + 8192)
        elif attack == "request":
            enclave.open(Kind.PAGE, 2, a, address=PAGE_ADDR)
        else:
            enclave.open(Kind.PAGE, 1, a[:-1], address=PAGE_ADDR, length=4096)


def test_make_channel_refuses_unsealed_unless_allowed() -> None:
    with pytest.raises(ValueError):
        make_channel(
            SESSION_KEY, SESSION_ID, HV_NONCE, Suite.UNSEALED_FOR_EXPERIMENTS_ONLY, Side.ENCLAVE, VM
        )
    ch = make_channel(
        SESSION_KEY,
        SESSION_ID,
        HV_NONCE,
        Suite.UNSEALED_FOR_EXPERIMENTS_ONLY,
        Side.ENCLAVE,
        VM,
        allow_unsealed=True,
    )
    assert isinstance(ch, UnsealedChannelForExperimentsOnly)
    sealed = make_channel(
        SESSION_KEY, SESSION_ID, HV_NONCE, Suite.AES256GCM_HKDF_SHA256, Side.ENCLAVE, VM
    )
    assert isinstance(sealed, Channel)
    with pytest.raises(ValueError):  # no way to get an unsealed Channel
        Channel(
            SessionKeys.derive(
                SESSION_KEY, SESSION_ID, HV_NONCE, Suite.UNSEALED_FOR_EXPERIMENTS_ONLY
            ),
            Side.ENCLAVE,
            VM,
        )


@pytest.mark.parametrize(
    "attack", ["none", "reorder", "address", "request", "short", "drop", "flip", "splice"]
)
def test_a_reply_block_of_pages_opens_whole_or_not_at_all(attack: str) -> None:
    """A reply's pages travel as one PAGE message (the first page's address, their total
    length): a relay that cuts, reorders or splices pages inside it, or a receiver that
    expects another first address, request or length, gets InvalidSeal."""
    enc, hv = pair()
    pages = [bytes([i]) * 4096 for i in range(4)]
    sealed = hv.seal(Kind.PAGE, 9, b"".join(pages), address=0x1000)
    other = hv.seal(Kind.PAGE, 10, bytes(4096 * 4), address=0x1000)
    rid, address, length = 9, 0x1000, 4 * 4096
    if attack == "reorder":
        sealed = sealed[4096:8192] + sealed[:4096] + sealed[8192:]
    elif attack == "address":
        address = 0x2000
    elif attack == "request":
        rid = 10
    elif attack == "short":
        length = 3 * 4096
    elif attack == "drop":
        sealed = sealed[4096:]
    elif attack == "flip":
        sealed = sealed[:5000] + bytes([sealed[5000] ^ 1]) + sealed[5001:]
    elif attack == "splice":  # a genuine page of another reply spliced in
        sealed = sealed[:4096] + other[4096:8192] + sealed[8192:]
    else:
        assert enc.open(Kind.PAGE, rid, sealed, address=address, length=length) == b"".join(pages)
        return
    with pytest.raises(InvalidSeal):
        enc.open(Kind.PAGE, rid, sealed, address=address, length=length)
    with pytest.raises(InvalidSeal):  # the channel is dead
        enc.open(Kind.PAGE, 9, hv.seal(Kind.PAGE, 9, pages[0], address=0x1000))


def test_hypervisor_nonce_makes_the_keys_new() -> None:
    """A replayed session key (same key, same id) under a fresh hypervisor nonce gives
    other keys, so the same plaintext is never sealed twice under one key and nonce."""
    first = SessionKeys.derive(SESSION_KEY, SESSION_ID, HV_NONCE)
    again = SessionKeys.derive(SESSION_KEY, SESSION_ID, bytes(32))
    assert first.hv_to_enclave != again.hv_to_enclave
    assert first.enclave_to_hv != again.enclave_to_hv
    with pytest.raises(ValueError):
        SessionKeys.derive(SESSION_KEY, SESSION_ID, HV_NONCE[:16])
