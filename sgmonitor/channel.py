"""The sealing channel between the enclave and the hypervisor service.

One small API in the spirit of Fernet and Noise's CipherState: a :class:`Channel` per
side owns both direction keys and both sequence counters, builds the associated data
for the caller from named fields, and fails closed. Every forged, replayed, reordered,
moved or truncated message raises the same message-less :class:`InvalidSeal`, so no
caller can ignore a failure or learn which check failed; after one failure the channel
is dead and the session must be replaced.

Wire layout of a sealed message: ``ciphertext || tag`` (AES-256-GCM, 16-byte tag).
Nothing else travels: the sequence number, and with it the nonce, is implicit (each
side counts), and the associated data is rebuilt by the receiver from what it expects,
so the untrusted relay never sees the addresses a page belongs to.

:class:`UnsealedChannelForExperimentsOnly` is the explicit, insecure ``secure-plain``
mode: same counters and same associated-data checks, no encryption and no integrity
against an active relay. There is no other path to plaintext.
"""

from __future__ import annotations

import hmac
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgmonitor.errors import SGMonitorError
from sgmonitor.wire.core import SESSION_ID_LEN, TAG_LEN

__all__ = [
    "HV_NONCE_LEN",
    "KEY_LEN",
    "MAX_MESSAGES",
    "MAX_VM_NAME",
    "NONCE_LEN",
    "PROTOCOL_VERSION",
    "SESSION_ID_LEN",
    "TAG_LEN",
    "Channel",
    "ChannelClosed",
    "ChannelExhausted",
    "Direction",
    "InvalidSeal",
    "Kind",
    "SealingChannel",
    "SessionExpired",
    "SessionKeys",
    "Side",
    "Suite",
    "UnsealedChannelForExperimentsOnly",
    "associated_data",
    "make_channel",
    "nonce",
]

PROTOCOL_VERSION = 1
KEY_LEN = 32
HV_NONCE_LEN = 32  # the hypervisor's fresh contribution to each session's keys
NONCE_LEN = 12
MAX_VM_NAME = 64
MAX_REQUEST_ID = 2**64 - 1
MAX_ADDRESS = 2**64 - 1
MAX_LENGTH = 2**32 - 1
# Per direction and key. Counter nonces never repeat below 2**64, but AES-GCM's
# confidentiality bound wants far fewer blocks per key: 2**32 messages of <= 4 KiB
# pages keeps the distinguishing advantage near 2**-48.
MAX_MESSAGES = 2**32

_HKDF_LABEL = b"sgmonitor/v1 channel key "


class InvalidSeal(SGMonitorError):
    """A sealed message did not authenticate (forged, replayed, reordered, moved, cut)."""

    def __init__(self) -> None:
        super().__init__()


class ChannelExhausted(SGMonitorError):
    """A direction used up its message budget: open a new session before sealing more."""


class ChannelClosed(SGMonitorError):
    """The channel failed or was closed earlier; only a new session can continue."""


class SessionExpired(SGMonitorError):
    """The session's validity period (from its attestation statement) is over."""


class Suite(IntEnum):
    """What protects the payload; bound into keys, associated data and the key wrap."""

    AES256GCM_HKDF_SHA256 = 1
    # Loudly named on purpose: the experiment mode of issue 4 ("secure-plain").
    UNSEALED_FOR_EXPERIMENTS_ONLY = 0xFE


class Direction(IntEnum):
    """Who sealed the message: each direction has its own key and counter."""

    HV_TO_ENCLAVE = 1
    ENCLAVE_TO_HV = 2


class Side(IntEnum):
    """Which end of the channel this object is."""

    ENCLAVE = 1
    HYPERVISOR = 2


class Kind(IntEnum):
    """What a sealed message is, so one can't be opened as another."""

    REQUEST = 1  # enclave -> hypervisor: ReadPages, FollowList, ...
    REPLY = 2  # hypervisor -> enclave: the reply index (statuses, list nodes, blobs)
    # hypervisor -> enclave: a reply's present pages, concatenated in index order, sealed
    # as one message; the AD's address is the first page's, its length their total
    PAGE = 3


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The two direction keys of one session, derived from the enclave's session key."""

    session_id: bytes
    suite: Suite
    hv_to_enclave: bytes
    enclave_to_hv: bytes

    def __repr__(self) -> str:  # never print key material
        return f"SessionKeys(session_id={self.session_id.hex()}, suite={self.suite.name})"

    @classmethod
    def derive(
        cls,
        session_key: bytes,
        session_id: bytes,
        hv_nonce: bytes,
        suite: Suite = Suite.AES256GCM_HKDF_SHA256,
    ) -> SessionKeys:
        """HKDF-SHA256(ikm=session key, salt=session id | hypervisor nonce,
        info=label|suite|direction|session id).

        The hypervisor's nonce is fresh randomness of the trusted side's own, used for
        one session only: whatever a relay replays (a whole recorded OpenSession after
        a restart included), the keys are new, so no (key, nonce) pair repeats."""
        _check_bytes("session_key", session_key, KEY_LEN)
        _check_bytes("session_id", session_id, SESSION_ID_LEN)
        _check_bytes("hv_nonce", hv_nonce, HV_NONCE_LEN)
        suite = Suite(suite)
        salt = session_id + hv_nonce

        def one(direction: Direction) -> bytes:
            info = _HKDF_LABEL + bytes([suite, direction]) + session_id
            hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt, info=info)
            return hkdf.derive(session_key)

        return cls(
            session_id=session_id,
            suite=suite,
            hv_to_enclave=one(Direction.HV_TO_ENCLAVE),
            enclave_to_hv=one(Direction.ENCLAVE_TO_HV),
        )

    def key(self, direction: Direction) -> bytes:
        """The key of one direction."""
        if direction is Direction.HV_TO_ENCLAVE:
            return self.hv_to_enclave
        return self.enclave_to_hv


def _nonces(direction: Direction) -> Callable[[int], bytes]:
    """The one nonce format: 4-byte direction, 8-byte big-endian sequence number
    (``OverflowError`` outside 0..2**64-1). Keys differ per direction already; the
    direction field is defence in depth."""
    prefix = int(direction).to_bytes(4, "big")

    def build(sequence: int) -> bytes:
        return prefix + sequence.to_bytes(8, "big")

    return build


_NONCES = {d: _nonces(d) for d in Direction}


def nonce(direction: Direction, sequence: int) -> bytes:
    """The nonce of message ``sequence`` of ``direction`` (see :func:`_nonces`)."""
    try:
        return _NONCES[direction](sequence)
    except OverflowError:
        raise ChannelExhausted(f"sequence {sequence} out of range") from None


# The associated data: what one direction of one session fixes, then the per-message
# fields, then the VM name (length-prefixed). Big-endian, no padding between parts.
_AD_FIXED = struct.Struct(">BBBB16s")  # version, suite, direction, kind, session id
_AD_MESSAGE = struct.Struct(">QQQI")  # request id, sequence, address, length


class _Framing:
    """The associated data and nonces of one direction of one session: the one builder
    of both (:func:`associated_data` and :func:`nonce` use it too).

    ``ad(kind, request_id, sequence, address, length)`` and ``nonce(sequence)`` are
    closures over what the session and direction fix, packed once (they run once per
    message). ``struct`` rejects out-of-range integers (``struct.error``); ``kind`` is
    checked against the enum.
    """

    __slots__ = ("ad", "direction", "nonce", "size")

    def __init__(
        self,
        suite: Suite,
        session_id: bytes,
        direction: Direction,
        vm: str,
        *,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self.direction = Direction(direction)
        vm_bytes = _vm_bytes(vm)
        suffix = bytes([len(vm_bytes)]) + vm_bytes
        fixed = {k: _AD_FIXED.pack(version, suite, self.direction, k, session_id) for k in Kind}
        pack = _AD_MESSAGE.pack

        def ad(kind: Kind, request_id: int, sequence: int, address: int, length: int) -> bytes:
            head = fixed.get(kind)
            if head is None:
                raise ValueError(f"unknown kind {kind!r}")
            return head + pack(request_id, sequence, address, length) + suffix

        self.ad: Callable[[Kind, int, int, int, int], bytes] = ad
        self.nonce: Callable[[int], bytes] = _NONCES[self.direction]
        self.size = _AD_FIXED.size + _AD_MESSAGE.size + len(suffix)  # every message's


def associated_data(
    *,
    version: int,
    suite: Suite,
    session_id: bytes,
    direction: Direction,
    kind: Kind,
    request_id: int,
    sequence: int,
    vm: str,
    address: int,
    length: int,
) -> bytes:
    """The associated data of one sealed message, from named fields (see docs/protocol.md).

    ``version u8 | suite u8 | direction u8 | kind u8 | session_id 16 | request_id u64 |
    sequence u64 | address u64 | length u32 | vm_len u8 | vm utf-8``, big-endian.
    """
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request_id {request_id} out of range")
    if not 0 <= address <= MAX_ADDRESS:
        raise ValueError(f"address {address:#x} out of range")
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"length {length} out of range")
    framing = _Framing(suite, session_id, direction, vm, version=version)
    return framing.ad(kind, request_id, sequence, address, length)


class SealingChannel(Protocol):
    """What the enclave and hypervisor code use; sealed and unsealed modes both fit."""

    session_id: bytes
    suite: Suite

    def seal(
        self,
        kind: Kind,
        request_id: int,
        plaintext: bytes,
        *,
        address: int = 0,
        now: float | None = None,
    ) -> bytes: ...

    def open(
        self,
        kind: Kind,
        request_id: int,
        sealed: bytes | memoryview,
        *,
        address: int = 0,
        length: int | None = None,
        now: float | None = None,
    ) -> bytes: ...

    def close(self) -> None: ...


class _Counters:
    """Both directions' sequence numbers, the expiry and the one-failure-kills rule."""

    def __init__(
        self,
        session_id: bytes,
        suite: Suite,
        side: Side,
        vm: str,
        not_after: float | None,
        limit: int,
    ) -> None:
        _check_bytes("session_id", session_id, SESSION_ID_LEN)
        if not 0 < limit <= MAX_MESSAGES:
            raise ValueError(f"limit must be in 1..{MAX_MESSAGES}")
        self.session_id = session_id
        self.suite = suite
        self.suite_byte = int(suite)
        self.side = Side(side)
        self.vm = vm
        self.not_after = not_after
        self.limit = limit
        self.send_direction = (
            Direction.ENCLAVE_TO_HV if side is Side.ENCLAVE else Direction.HV_TO_ENCLAVE
        )
        self.recv_direction = (
            Direction.HV_TO_ENCLAVE if side is Side.ENCLAVE else Direction.ENCLAVE_TO_HV
        )
        self.send = _Framing(suite, session_id, self.send_direction, vm)
        self.recv = _Framing(suite, session_id, self.recv_direction, vm)
        self.sent = 0
        self.received = 0
        self.failed = False
        self.closed = False

    def check_usable(self, now: float | None) -> None:
        if self.closed or self.failed:
            raise ChannelClosed("channel is closed or failed; open a new session")
        if self.not_after is not None:
            if now is None:
                now = time.time()
            if now > self.not_after:
                raise SessionExpired(f"session expired at {self.not_after}")

    def check_openable(self, now: float | None) -> None:
        """:meth:`check_usable` for the receiving side: a failed channel is a forgery."""
        if self.failed:
            raise InvalidSeal()
        self.check_usable(now)

    def next_send(self) -> int:
        if self.sent >= self.limit:  # raise before the counter could wrap
            raise ChannelExhausted("send budget used up; open a new session")
        return self.sent


# Everything a receiver turns into InvalidSeal (and a dead channel).
_FORGERY = (InvalidSeal, InvalidTag, ValueError, TypeError, OverflowError, struct.error)


class _ChannelBase:
    """Counters, properties and closing shared by the sealed and unsealed channels."""

    def __init__(self, state: _Counters) -> None:
        self._state = state
        self.session_id = state.session_id
        self.suite = state.suite

    @property
    def sent(self) -> int:
        """Messages sealed so far (the next send sequence number)."""
        return self._state.sent

    @property
    def received(self) -> int:
        """Messages opened so far (the next expected receive sequence number)."""
        return self._state.received

    def close(self) -> None:
        """Later calls raise :class:`ChannelClosed`."""
        self._state.closed = True


class Channel(_ChannelBase):
    """AES-256-GCM channel, one per side per session; fails closed.

    ``seal`` uses the next send sequence number; ``open`` accepts only the next
    expected receive sequence number, so replays, reorders and drops fail. Any
    failure to open kills the channel (later calls raise :class:`InvalidSeal` or
    :class:`ChannelClosed`): a session that saw a forgery is not trusted again.
    """

    def __init__(
        self,
        keys: SessionKeys,
        side: Side,
        vm: str,
        *,
        not_after: float | None = None,
        limit: int = MAX_MESSAGES,
    ) -> None:
        if keys.suite is not Suite.AES256GCM_HKDF_SHA256:
            raise ValueError(f"Channel needs an AEAD suite, not {keys.suite.name}")
        super().__init__(_Counters(keys.session_id, keys.suite, side, vm, not_after, limit))
        self._send: AESGCM | None = AESGCM(keys.key(self._state.send_direction))
        self._recv: AESGCM | None = AESGCM(keys.key(self._state.recv_direction))

    def seal(
        self,
        kind: Kind,
        request_id: int,
        plaintext: bytes,
        *,
        address: int = 0,
        now: float | None = None,
    ) -> bytes:
        """Encrypt and authenticate ``plaintext`` as the next message of this direction."""
        st = self._state
        st.check_usable(now)
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise TypeError("plaintext must be bytes")
        seq = st.next_send()
        ad = _checked(st.send.ad, kind, request_id, seq, address, len(plaintext))
        assert self._send is not None
        sealed = self._send.encrypt(st.send.nonce(seq), plaintext, ad)
        st.sent = seq + 1
        return sealed

    def open(
        self,
        kind: Kind,
        request_id: int,
        sealed: bytes | memoryview,
        *,
        address: int = 0,
        length: int | None = None,
        now: float | None = None,
    ) -> bytes:
        """Authenticate and decrypt the next expected message, or raise :class:`InvalidSeal`.

        ``kind``, ``request_id``, ``address`` and (if given) ``length`` are what the
        caller expects; any difference from what was sealed is a forgery.
        """
        st = self._state
        st.check_openable(now)
        seq = st.received
        body = len(sealed) - TAG_LEN
        try:
            if body < 0 or (length is not None and body != length) or seq >= st.limit:
                raise InvalidSeal()
            ad = st.recv.ad(kind, request_id, seq, address, body)
            assert self._recv is not None
            plaintext = self._recv.decrypt(st.recv.nonce(seq), sealed, ad)
        except _FORGERY:
            st.failed = True
            raise InvalidSeal() from None
        st.received = seq + 1
        return plaintext

    def close(self) -> None:
        """Drop the keys; later calls raise :class:`ChannelClosed`."""
        super().close()
        self._send = self._recv = None


class UnsealedChannelForExperimentsOnly(_ChannelBase):
    """INSECURE: the ``secure-plain`` experiment mode. No encryption, no integrity.

    Measures the cost of the secure path without cryptography. Each message is sent as
    ``associated_data || plaintext`` and the receiver compares the associated data with
    what it expects, so accidental replay, reorder and moves are still caught; a relay
    that rewrites headers defeats it, and the relay sees every page in the clear.
    The hypervisor must refuse this suite unless its operator enabled it explicitly.
    """

    def __init__(
        self,
        session_id: bytes,
        side: Side,
        vm: str,
        *,
        not_after: float | None = None,
        limit: int = MAX_MESSAGES,
    ) -> None:
        suite = Suite.UNSEALED_FOR_EXPERIMENTS_ONLY
        super().__init__(_Counters(session_id, suite, side, vm, not_after, limit))

    def seal(
        self,
        kind: Kind,
        request_id: int,
        plaintext: bytes,
        *,
        address: int = 0,
        now: float | None = None,
    ) -> bytes:
        """Prefix the associated data; the payload stays in the clear."""
        st = self._state
        st.check_usable(now)
        seq = st.next_send()
        ad = _checked(st.send.ad, kind, request_id, seq, address, len(plaintext))
        st.sent = seq + 1
        return ad + bytes(plaintext)

    def open(
        self,
        kind: Kind,
        request_id: int,
        sealed: bytes | memoryview,
        *,
        address: int = 0,
        length: int | None = None,
        now: float | None = None,
    ) -> bytes:
        """Check the clear-text associated data against expectations; no authentication."""
        st = self._state
        st.check_openable(now)
        seq = st.received
        try:
            if seq >= st.limit:
                raise InvalidSeal()
            ad_len = st.recv.size  # depends only on the VM name
            body = len(sealed) - ad_len
            if body < 0 or (length is not None and body != length):
                raise InvalidSeal()
            expected = st.recv.ad(kind, request_id, seq, address, body)
            if not hmac.compare_digest(bytes(sealed[:ad_len]), expected):
                raise InvalidSeal()
        except _FORGERY:
            st.failed = True
            raise InvalidSeal() from None
        st.received = seq + 1
        return bytes(sealed[ad_len:])


def make_channel(
    session_key: bytes,
    session_id: bytes,
    hv_nonce: bytes,
    suite: Suite,
    side: Side,
    vm: str,
    *,
    not_after: float | None = None,
    allow_unsealed: bool = False,
) -> SealingChannel:
    """The channel for a negotiated suite; the unsealed one only if explicitly allowed."""
    suite = Suite(suite)
    if suite is Suite.UNSEALED_FOR_EXPERIMENTS_ONLY:
        if not allow_unsealed:
            raise ValueError("unsealed suite refused: it is for experiments only")
        _check_bytes("session_key", session_key, KEY_LEN)
        return UnsealedChannelForExperimentsOnly(session_id, side, vm, not_after=not_after)
    keys = SessionKeys.derive(session_key, session_id, hv_nonce, suite)
    return Channel(keys, side, vm, not_after=not_after)


def _checked(ad: Callable[..., bytes], *args: int) -> bytes:
    """Build associated data for sealing; out-of-range fields are the caller's ValueError."""
    try:
        return ad(*args)
    except struct.error as exc:
        raise ValueError(f"associated data field out of range: {exc}") from None


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")


def _vm_bytes(vm: str) -> bytes:
    if not isinstance(vm, str):
        raise TypeError("vm must be str")
    data = vm.encode("utf-8")
    if not 0 < len(data) <= MAX_VM_NAME:
        raise ValueError(f"vm name must be 1..{MAX_VM_NAME} UTF-8 bytes")
    return data
