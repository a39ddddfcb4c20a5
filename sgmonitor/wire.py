"""The one wire module: framing, every message type, every limit.

Nobody else turns messages into bytes. A frame on a stream socket is::

    length u32 | version u8 | type u8 | body          (length counts version..body)

All integers are big-endian; byte strings and text are ``u32 length | bytes``; lists are
``u32 count | items``. ``encode`` and ``decode`` are mirror images, and each message
validates its fields in ``__post_init__``, so the same limits hold whether a message is
built locally or parsed from a peer. Any malformed, truncated, oversized or unexpected
input raises :class:`WireError` with a message saying what was wrong, after bounded
work. The catalogue and the limits are documented in docs/protocol.md.

Six families share the format:

- hypervisor link (untrusted library <-> hypervisor service), in the clear:
  Hello, HelloReply, OpenSession, SessionOpened, CloseSession, SessionClosed,
  Request, Reply, Error;
- attestation link (untrusted library <-> attestation service), in the clear:
  ChallengeRequest, Challenge, AttestSession, StatementIssued, Error;
- hypervisor administration (operator <-> the service's admin socket): Revoke, Revoked;
- monitor link (untrusted library <-> remote monitor), in the clear around sealed
  reports and MACs: LinkHello, LinkChallenge, LinkOpen, LinkOpened, HeartbeatChallenge,
  HeartbeatAnswer, SealedReport, ReportAck, Error;
- sealed bodies (enclave <-> hypervisor, only ever inside the channel):
  ReadPages, FollowList, GetVmcoreinfo, GetRegisters, BeginScan, EndScan, Batch and
  their replies PagesReply, ListReply, VmcoreinfoReply, RegistersReply, Ack,
  BatchReply, RequestFailed;
- enclave boundary (untrusted library <-> enclave process): Call, Return, CallFailed
  carrying the ECALLs and OCALLs declared in ``sgmonitor.tee.edl``.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Self, TypeVar

from sgmonitor.channel import HV_NONCE_LEN, MAX_VM_NAME, SESSION_ID_LEN, TAG_LEN, Suite
from sgmonitor.errors import SGMonitorError

__all__ = [
    "HV_KEY_LEN",
    "HV_NONCE_LEN",
    "MAX_BATCH",
    "MAX_CALL_ARGS",
    "MAX_ENTRY_SIZE",
    "MAX_FRAME",
    "MAX_LIST_NODES",
    "MAX_PAGES_PER_REQUEST",
    "MAX_RANGES",
    "MAX_REPLY_PAGES",
    "MAX_REPORT",
    "MAX_SEALED_PAGE",
    "MAX_SEALED_REPLY",
    "MAX_SEALED_REQUEST",
    "PAGE_SIZE",
    "VERIFIER_NONCE_LEN",
    "WIRE_VERSION",
    "Ack",
    "AttestSession",
    "Batch",
    "BatchReply",
    "BeginScan",
    "Call",
    "CallDirection",
    "CallFailed",
    "Challenge",
    "ChallengeRequest",
    "CloseSession",
    "ConnectionClosed",
    "EndScan",
    "Error",
    "ErrorCode",
    "FollowList",
    "GetRegisters",
    "GetVmcoreinfo",
    "HeartbeatAnswer",
    "HeartbeatChallenge",
    "Hello",
    "HelloReply",
    "LinkChallenge",
    "LinkHello",
    "LinkOpen",
    "LinkOpened",
    "ListEnd",
    "ListReply",
    "ListWalk",
    "Message",
    "OpenSession",
    "PageEntry",
    "PageRange",
    "PageStatus",
    "PagesReply",
    "ReadPages",
    "RegistersReply",
    "Reply",
    "ReportAck",
    "Request",
    "RequestFailed",
    "Return",
    "Revoke",
    "RevokeKind",
    "Revoked",
    "SealedReport",
    "SessionClosed",
    "SessionOpened",
    "StatementIssued",
    "Value",
    "VcpuRegisters",
    "VmcoreinfoReply",
    "WireError",
    "WireTimeout",
    "connect",
    "decode",
    "encode",
    "framed",
    "parse_address",
    "pop_frame",
    "recv_encoded",
    "recv_frame",
    "send_encoded",
    "send_frame",
]

WIRE_VERSION = 1
PAGE_SIZE = 4096
MAX_FRAME = 16 * 1024 * 1024  # bytes after the length prefix
MAX_PAGES_PER_REQUEST = 1024  # pages one ReadPages may ask for
MAX_RANGES = MAX_PAGES_PER_REQUEST  # ranges in one ReadPages: scattered pages, one each
MAX_REPLY_PAGES = 2048  # page entries (and sealed pages) in one reply: ~8.4 MiB
MAX_LIST_NODES = 4096  # entries one FollowList may visit
MAX_ENTRY_SIZE = 64 * 1024  # bytes of one list entry (struct task_struct is ~10 KiB)
MAX_VCPUS = 1024
MAX_SEALED_REQUEST = 64 * 1024
MAX_SEALED_REPLY = 1024 * 1024
MAX_SEALED_PAGE = PAGE_SIZE + 256  # tag (16) or, unsealed, the clear-text AD
MAX_WRAPPED_KEY = 1024
MAX_STATEMENT = 64 * 1024
MAX_EVIDENCE = 64 * 1024
MAX_ENDORSEMENT = 1024
MAX_ENCLAVE_CONFIG = 16 * 1024
MAX_BACKEND_NAME = 32
MAX_BINDING = 256  # a session binding: 115 bytes and the VM name
MAX_REPORT = 8 * 1024 * 1024  # one sealed scan report (~100 bytes per process)
HV_KEY_LEN = 32  # a raw X25519 public key
VERIFIER_NONCE_LEN = 32
MAX_BATCH = 4  # requests in one Batch (BeginScan, FollowList, ReadPages, EndScan)
MAX_VMCOREINFO_NOTES = 16  # candidates (genuine and planted) in one reply
MAX_VMCOREINFO_NOTE = 8192  # header, name and a one-page text
MAX_ERROR_TEXT = 1024
MAX_CALL_NAME = 64
MAX_CALL_ARGS = 16
MAX_CALL_VALUE = MAX_FRAME - 4096  # an OCALL carries a whole hypervisor frame
_U64 = 2**64
_PAGE_MASK = PAGE_SIZE - 1
_U32 = struct.Struct(">I")

assert MAX_REPLY_PAGES * (MAX_SEALED_PAGE + 4) + MAX_SEALED_REPLY + 64 < MAX_CALL_VALUE
assert TAG_LEN <= MAX_SEALED_PAGE - PAGE_SIZE


class WireError(SGMonitorError):
    """Malformed, truncated, oversized or unexpected bytes on the wire."""


class WireTimeout(WireError):
    """The peer did not deliver a whole frame in time (dropped reply, stalled relay)."""


class ConnectionClosed(WireError):
    """The peer closed the connection (between frames, or mid-frame if so stated)."""


class ErrorCode(IntEnum):
    """Why a peer refused something; see docs/protocol.md."""

    BAD_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_SESSION = 3
    SESSION_EXISTS = 4
    UNKNOWN_VM = 5
    BAD_WRAPPED_KEY = 6
    SUITE_REFUSED = 7
    ATTESTATION_REQUIRED = 8
    INVALID_SEAL = 9
    BAD_REQUEST = 10
    TOO_LARGE = 11
    GUEST_UNAVAILABLE = 12
    BUSY = 13
    TIMEOUT = 14
    INTERNAL = 15
    NO_SUCH_CALL = 16
    ATTESTATION_REFUSED = 17  # the statement (or the evidence, at the verifier) is refused
    REVOKED = 18  # the operator revoked this measurement or session
    EXPIRED = 19  # the session's lifetime is over: attest again


class PageStatus(IntEnum):
    """What the hypervisor found at one guest-virtual page (authenticated in the index)."""

    PRESENT = 0  # a sealed page follows in the reply
    NOT_PRESENT = 1  # the page walk faulted
    NOT_RAM = 2  # translated outside guest RAM


class ListEnd(IntEnum):
    """Why a FollowList walk stopped."""

    HEAD_REACHED = 0  # came back to the list head: the whole list
    LIMIT = 1  # the request's limit; continue from the last entry
    FAULT = 2  # a next pointer or entry did not translate
    LOOP = 3  # an entry was seen twice without reaching the head
    REPLY_FULL = 4  # MAX_REPLY_PAGES reached; continue from the last entry


class CallDirection(IntEnum):
    """ECALL: untrusted host into the enclave. OCALL: enclave out to the host."""

    ECALL = 1
    OCALL = 2


Value = int | bytes | str

# --- byte-level reader and writer ---------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack(">B", v))

    def u16(self, v: int) -> None:
        self.parts.append(struct.pack(">H", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack(">I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack(">Q", v))

    def fixed(self, v: bytes) -> None:
        self.parts.append(v)

    def blob(self, v: bytes) -> None:
        self.u32(len(v))
        self.parts.append(v)

    def text(self, v: str) -> None:
        self.blob(v.encode("utf-8"))


class _Reader:
    def __init__(self, data: bytes, what: str, pos: int = 0) -> None:
        self.data = memoryview(data)  # no copy: fields are copied out one by one
        self.pos = pos
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise WireError(
                f"{self.what}: truncated in {field}: need {n} bytes at offset {self.pos},"
                f" have {len(self.data) - self.pos}"
            )
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def blob(self, field: str, limit: int) -> bytes:
        n = self.u32(field)
        if n > limit:
            raise WireError(f"{self.what}: {field} is {n} bytes, limit {limit}")
        return self.take(n, field)

    def blobs(self, n: int, field: str, limit: int) -> tuple[bytes, ...]:
        """``n`` blobs in a row (as ``n`` calls of :meth:`blob`, one page each)."""
        data, pos, size, out = self.data, self.pos, len(self.data), []
        unpack = _U32.unpack_from
        for _ in range(n):
            if pos + 4 > size:
                self.pos = pos
                self.u32(field)  # raises: truncated
            (length,) = unpack(data, pos)
            if length > limit:
                raise WireError(f"{self.what}: {field} is {length} bytes, limit {limit}")
            end = pos + 4 + length
            if end > size:
                self.pos = pos + 4
                self.take(length, field)  # raises: truncated
            out.append(bytes(data[pos + 4 : end]))
            pos = end
        self.pos = pos
        return tuple(out)

    def text(self, field: str, limit: int) -> str:
        raw = self.blob(field, limit)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"{self.what}: {field} is not UTF-8") from None

    def count(self, field: str, limit: int, item_size: int) -> int:
        n = self.u32(field)
        if n > limit:
            raise WireError(f"{self.what}: {n} {field}, limit {limit}")
        if n * item_size > len(self.data) - self.pos:  # cheap early reject, bounded work
            raise WireError(f"{self.what}: truncated in {field}: {n} items do not fit")
        return n

    def flag(self, field: str) -> bool:
        """A bool as one byte, 0 or 1."""
        raw = self.u8(field)
        if raw > 1:
            raise WireError(f"{self.what}: {field} flag {raw}")
        return bool(raw)

    def enum(self, cls: type[_E], field: str, raw: int) -> _E:
        try:
            return cls(raw)
        except ValueError:
            raise WireError(f"{self.what}: unknown {field} {raw}") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


_E = TypeVar("_E", bound=IntEnum)

# --- field checks (shared by local construction and decoding) -----------------------


def _uint(msg: str, field: str, v: object, bits: int = 64) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**bits:
        raise WireError(f"{msg}: {field} must be an unsigned {bits}-bit integer, got {v!r}")


def _bytes(msg: str, field: str, v: object, limit: int, exact: int | None = None) -> None:
    if not isinstance(v, bytes):
        raise WireError(f"{msg}: {field} must be bytes")
    if exact is not None and len(v) != exact:
        raise WireError(f"{msg}: {field} must be {exact} bytes, got {len(v)}")
    if len(v) > limit:
        raise WireError(f"{msg}: {field} is {len(v)} bytes, limit {limit}")


def _text(msg: str, field: str, v: object, limit: int, nonempty: bool = False) -> None:
    if not isinstance(v, str):
        raise WireError(f"{msg}: {field} must be str")
    try:
        n = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise WireError(f"{msg}: {field} is not encodable as UTF-8") from None
    if n > limit or (nonempty and n == 0):
        raise WireError(f"{msg}: {field} must be {int(nonempty)}..{limit} UTF-8 bytes")


def _enum(msg: str, field: str, v: object, cls: type[IntEnum]) -> None:
    if not isinstance(v, cls):
        raise WireError(f"{msg}: {field} must be a {cls.__name__}")


def _tuple(msg: str, field: str, v: object, limit: int, item: type | tuple[type, ...]) -> None:
    if not isinstance(v, tuple):
        raise WireError(f"{msg}: {field} must be a tuple")
    if len(v) > limit:
        raise WireError(f"{msg}: {len(v)} {field}, limit {limit}")
    for x in v:
        if not isinstance(x, item) or isinstance(x, bool):
            raise WireError(f"{msg}: {field} holds a {type(x).__name__}")


def _bool(msg: str, field: str, v: object) -> None:
    if not isinstance(v, bool):
        raise WireError(f"{msg}: {field} must be a bool")


def _aligned(msg: str, field: str, v: int, align: int) -> None:
    if v % align:
        raise WireError(f"{msg}: {field} {v:#x} is not {align}-byte aligned")


# --- messages ------------------------------------------------------------------------

_REGISTRY: dict[int, type[Message]] = {}


class Message:
    """Base of every message: a type byte and a mirror-image pair of body codecs."""

    TYPE: ClassVar[int]

    def _encode(self, w: _Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        raise NotImplementedError


_M = TypeVar("_M", bound=type[Message])


def _message(type_byte: int) -> Callable[[_M], _M]:
    def register(cls: _M) -> _M:
        assert type_byte not in _REGISTRY, f"type {type_byte:#x} registered twice"
        cls.TYPE = type_byte
        _REGISTRY[type_byte] = cls
        return cls

    return register


# --- hypervisor link (clear) --------------------------------------------------------


@_message(0x01)
@dataclass(frozen=True)
class Hello(Message):
    """Library -> hypervisor: ask for a fresh nonce for a session on ``vm``."""

    vm: str

    def __post_init__(self) -> None:
        _text("Hello", "vm", self.vm, MAX_VM_NAME, nonempty=True)

    def _encode(self, w: _Writer) -> None:
        w.text(self.vm)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.text("vm", MAX_VM_NAME))


@_message(0x02)
@dataclass(frozen=True)
class HelloReply(Message):
    """Hypervisor -> library: the nonce the attestation statement must bind (and the
    session's keys mix in), the suites offered, and the service's public key (which
    the enclave uses only once the attestation service has endorsed it)."""

    hv_nonce: bytes
    suites: tuple[Suite, ...]
    hv_key: bytes

    def __post_init__(self) -> None:
        _bytes("HelloReply", "hv_nonce", self.hv_nonce, HV_NONCE_LEN, exact=HV_NONCE_LEN)
        _tuple("HelloReply", "suites", self.suites, 8, Suite)
        _bytes("HelloReply", "hv_key", self.hv_key, HV_KEY_LEN, exact=HV_KEY_LEN)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.hv_nonce)
        w.u8(len(self.suites))
        for s in self.suites:
            w.u8(s)
        w.fixed(self.hv_key)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        nonce = r.take(HV_NONCE_LEN, "hv_nonce")
        n = r.u8("suite count")
        if n > 8:
            raise WireError(f"HelloReply: {n} suites, limit 8")
        suites = tuple(r.enum(Suite, "suite", r.u8("suite")) for _ in range(n))
        return cls(nonce, suites, r.take(HV_KEY_LEN, "hv_key"))


@_message(0x03)
@dataclass(frozen=True)
class OpenSession(Message):
    """Library -> hypervisor: register the enclave's wrapped session key for ``vm``.

    ``statement`` is the attestation service's signed statement for exactly this
    session (``sgmonitor.statement``); without a valid one the hypervisor refuses.
    """

    vm: str
    session_id: bytes
    suite: Suite
    wrapped_key: bytes
    statement: bytes = b""

    def __post_init__(self) -> None:
        _text("OpenSession", "vm", self.vm, MAX_VM_NAME, nonempty=True)
        _bytes("OpenSession", "session_id", self.session_id, SESSION_ID_LEN, SESSION_ID_LEN)
        _enum("OpenSession", "suite", self.suite, Suite)
        _bytes("OpenSession", "wrapped_key", self.wrapped_key, MAX_WRAPPED_KEY)
        _bytes("OpenSession", "statement", self.statement, MAX_STATEMENT)

    def _encode(self, w: _Writer) -> None:
        w.text(self.vm)
        w.fixed(self.session_id)
        w.u8(self.suite)
        w.blob(self.wrapped_key)
        w.blob(self.statement)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        vm = r.text("vm", MAX_VM_NAME)
        sid = r.take(SESSION_ID_LEN, "session_id")
        suite = r.enum(Suite, "suite", r.u8("suite"))
        wrapped = r.blob("wrapped_key", MAX_WRAPPED_KEY)
        statement = r.blob("statement", MAX_STATEMENT)
        return cls(vm, sid, suite, wrapped, statement)


@dataclass(frozen=True)
class _SessionOnly(Message):
    session_id: bytes

    def __post_init__(self) -> None:
        _bytes(type(self).__name__, "session_id", self.session_id, SESSION_ID_LEN, SESSION_ID_LEN)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.session_id)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.take(SESSION_ID_LEN, "session_id"))


@_message(0x04)
@dataclass(frozen=True)
class SessionOpened(_SessionOnly):
    """Hypervisor -> library: the key unwrapped; sealed requests may flow."""


@_message(0x05)
@dataclass(frozen=True)
class CloseSession(_SessionOnly):
    """Library -> hypervisor: forget this session's keys."""


@_message(0x06)
@dataclass(frozen=True)
class SessionClosed(_SessionOnly):
    """Hypervisor -> library: the session's keys are gone."""


@_message(0x07)
@dataclass(frozen=True)
class Request(Message):
    """Library -> hypervisor: one sealed request body (kind REQUEST) from the enclave.

    ``request_id`` travels in the clear so the hypervisor can rebuild the associated
    data and the library can match replies; changing it breaks the seal.
    """

    session_id: bytes
    request_id: int
    sealed: bytes

    def __post_init__(self) -> None:
        _bytes("Request", "session_id", self.session_id, SESSION_ID_LEN, SESSION_ID_LEN)
        _uint("Request", "request_id", self.request_id)
        _bytes("Request", "sealed", self.sealed, MAX_SEALED_REQUEST)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.session_id)
        w.u64(self.request_id)
        w.blob(self.sealed)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        sid = r.take(SESSION_ID_LEN, "session_id")
        return cls(sid, r.u64("request_id"), r.blob("sealed", MAX_SEALED_REQUEST))


@_message(0x08)
@dataclass(frozen=True)
class Reply(Message):
    """Hypervisor -> library: a sealed reply index (kind REPLY), then one sealed page
    (kind PAGE) per PRESENT entry of the index, in index order."""

    session_id: bytes
    request_id: int
    sealed_reply: bytes
    sealed_pages: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _bytes("Reply", "session_id", self.session_id, SESSION_ID_LEN, SESSION_ID_LEN)
        _uint("Reply", "request_id", self.request_id)
        _bytes("Reply", "sealed_reply", self.sealed_reply, MAX_SEALED_REPLY)
        _tuple("Reply", "sealed_pages", self.sealed_pages, MAX_REPLY_PAGES, bytes)
        if any(len(p) > MAX_SEALED_PAGE for p in self.sealed_pages):
            for p in self.sealed_pages:
                _bytes("Reply", "sealed page", p, MAX_SEALED_PAGE)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.session_id)
        w.u64(self.request_id)
        w.blob(self.sealed_reply)
        w.u32(len(self.sealed_pages))
        pack = _U32.pack
        for p in self.sealed_pages:
            w.parts += (pack(len(p)), p)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        sid = r.take(SESSION_ID_LEN, "session_id")
        rid = r.u64("request_id")
        sealed = r.blob("sealed_reply", MAX_SEALED_REPLY)
        n = r.count("sealed pages", MAX_REPLY_PAGES, 4)
        return cls(sid, rid, sealed, r.blobs(n, "sealed page", MAX_SEALED_PAGE))


@_message(0x0F)
@dataclass(frozen=True)
class Error(Message):
    """Either direction, in the clear and so unauthenticated: a refusal or failure.

    The enclave treats it as "the session failed", never as data about the guest.
    ``session_id`` is empty when no session is concerned; ``request_id`` 0 likewise.
    """

    code: ErrorCode
    message: str = ""
    session_id: bytes = b""
    request_id: int = 0

    def __post_init__(self) -> None:
        _enum("Error", "code", self.code, ErrorCode)
        _text("Error", "message", self.message, MAX_ERROR_TEXT)
        _bytes("Error", "session_id", self.session_id, SESSION_ID_LEN)
        _uint("Error", "request_id", self.request_id)
        if len(self.session_id) not in (0, SESSION_ID_LEN):
            raise WireError(f"Error: session_id must be empty or {SESSION_ID_LEN} bytes")

    def _encode(self, w: _Writer) -> None:
        w.u16(self.code)
        w.text(self.message)
        w.u8(len(self.session_id))
        w.fixed(self.session_id)
        w.u64(self.request_id)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        code = r.enum(ErrorCode, "error code", r.u16("code"))
        message = r.text("message", MAX_ERROR_TEXT)
        n = r.u8("session_id length")
        if n not in (0, SESSION_ID_LEN):
            raise WireError(f"Error: session_id length {n}")
        return cls(code, message, r.take(n, "session_id"), r.u64("request_id"))


# --- attestation link (library <-> attestation service), in the clear -------------


@_message(0x51)
@dataclass(frozen=True)
class ChallengeRequest(Message):
    """Library -> attestation service: a fresh nonce for evidence. For a hypervisor
    session (purpose 1), also the service's endorsement of the hypervisor key
    ``peer_key`` (refused if it is not enrolled); for a monitor link (purpose 2), the
    nonce only (the monitor checks its own key in the enclave's launch configuration)."""

    purpose: int
    peer_key: bytes

    def __post_init__(self) -> None:
        _uint("ChallengeRequest", "purpose", self.purpose, 8)
        if self.purpose not in (1, 2):
            raise WireError(f"ChallengeRequest: unknown purpose {self.purpose}")
        _bytes("ChallengeRequest", "peer_key", self.peer_key, HV_KEY_LEN, exact=HV_KEY_LEN)

    def _encode(self, w: _Writer) -> None:
        w.u8(self.purpose)
        w.fixed(self.peer_key)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        purpose = r.u8("purpose")
        return cls(purpose, r.take(HV_KEY_LEN, "peer_key"))


@_message(0x52)
@dataclass(frozen=True)
class Challenge(Message):
    """Attestation service -> library: a single-use nonce and the signed endorsement."""

    nonce: bytes
    endorsement: bytes

    def __post_init__(self) -> None:
        _bytes("Challenge", "nonce", self.nonce, VERIFIER_NONCE_LEN, exact=VERIFIER_NONCE_LEN)
        _bytes("Challenge", "endorsement", self.endorsement, MAX_ENDORSEMENT)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.nonce)
        w.blob(self.endorsement)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        nonce = r.take(VERIFIER_NONCE_LEN, "nonce")
        return cls(nonce, r.blob("endorsement", MAX_ENDORSEMENT))


@_message(0x53)
@dataclass(frozen=True)
class AttestSession(Message):
    """Library -> attestation service: the enclave's evidence for one session, with the
    launch configuration and the session binding (``sgmonitor.statement.SessionBinding``
    bytes) that its report data covers, for the service to recompute and check."""

    backend: str
    evidence: bytes
    config: bytes
    nonce: bytes
    binding: bytes

    def __post_init__(self) -> None:
        m = "AttestSession"
        _text(m, "backend", self.backend, MAX_BACKEND_NAME, nonempty=True)
        _bytes(m, "evidence", self.evidence, MAX_EVIDENCE)
        _bytes(m, "config", self.config, MAX_ENCLAVE_CONFIG)
        _bytes(m, "nonce", self.nonce, VERIFIER_NONCE_LEN, exact=VERIFIER_NONCE_LEN)
        _bytes(m, "binding", self.binding, MAX_BINDING)

    def _encode(self, w: _Writer) -> None:
        w.text(self.backend)
        w.blob(self.evidence)
        w.blob(self.config)
        w.fixed(self.nonce)
        w.blob(self.binding)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(
            r.text("backend", MAX_BACKEND_NAME),
            r.blob("evidence", MAX_EVIDENCE),
            r.blob("config", MAX_ENCLAVE_CONFIG),
            r.take(VERIFIER_NONCE_LEN, "nonce"),
            r.blob("binding", MAX_BINDING),
        )


@_message(0x54)
@dataclass(frozen=True)
class StatementIssued(Message):
    """Attestation service -> library: the signed statement for the session."""

    statement: bytes

    def __post_init__(self) -> None:
        _bytes("StatementIssued", "statement", self.statement, MAX_STATEMENT)

    def _encode(self, w: _Writer) -> None:
        w.blob(self.statement)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.blob("statement", MAX_STATEMENT))


# --- monitor link (library <-> remote monitor), in the clear, over TCP -------------


@_message(0x71)
@dataclass(frozen=True)
class LinkHello(Message):
    """Library -> monitor: IDS ``ids`` wants a link."""

    ids: str

    def __post_init__(self) -> None:
        _text("LinkHello", "ids", self.ids, MAX_VM_NAME, nonempty=True)

    def _encode(self, w: _Writer) -> None:
        w.text(self.ids)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.text("ids", MAX_VM_NAME))


@_message(0x72)
@dataclass(frozen=True)
class LinkChallenge(Message):
    """Monitor -> library: the nonce the link's statement must bind, and the monitor's
    X25519 key (the enclave uses the one its launch configuration names, not this)."""

    monitor_nonce: bytes
    monitor_key: bytes

    def __post_init__(self) -> None:
        _bytes("LinkChallenge", "monitor_nonce", self.monitor_nonce, 32, exact=32)
        _bytes("LinkChallenge", "monitor_key", self.monitor_key, HV_KEY_LEN, exact=HV_KEY_LEN)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.monitor_nonce)
        w.fixed(self.monitor_key)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.take(32, "monitor_nonce"), r.take(HV_KEY_LEN, "monitor_key"))


@_message(0x73)
@dataclass(frozen=True)
class LinkOpen(Message):
    """Library -> monitor: the enclave's wrapped link key, the verifier's statement for
    it, and the enclave's launch configuration (its hash is the statement's CONFIGID)."""

    link_id: bytes
    wrapped_key: bytes
    statement: bytes
    config: bytes

    def __post_init__(self) -> None:
        _bytes("LinkOpen", "link_id", self.link_id, SESSION_ID_LEN, exact=SESSION_ID_LEN)
        _bytes("LinkOpen", "wrapped_key", self.wrapped_key, MAX_WRAPPED_KEY)
        _bytes("LinkOpen", "statement", self.statement, MAX_STATEMENT)
        _bytes("LinkOpen", "config", self.config, MAX_ENCLAVE_CONFIG)

    def _encode(self, w: _Writer) -> None:
        w.fixed(self.link_id)
        w.blob(self.wrapped_key)
        w.blob(self.statement)
        w.blob(self.config)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(
            r.take(SESSION_ID_LEN, "link_id"),
            r.blob("wrapped_key", MAX_WRAPPED_KEY),
            r.blob("statement", MAX_STATEMENT),
            r.blob("config", MAX_ENCLAVE_CONFIG),
        )


@_message(0x74)
@dataclass(frozen=True)
class LinkOpened(_SessionOnly):
    """Monitor -> library: the link key is accepted; reports and heartbeats may flow."""


@_message(0x75)
@dataclass(frozen=True)
class HeartbeatChallenge(Message):
    """Monitor -> library: challenge ``number`` for the enclave to answer."""

    number: int
    challenge: bytes

    def __post_init__(self) -> None:
        _uint("HeartbeatChallenge", "number", self.number)
        _bytes("HeartbeatChallenge", "challenge", self.challenge, 32, exact=32)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.number)
        w.fixed(self.challenge)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.u64("number"), r.take(32, "challenge"))


@_message(0x76)
@dataclass(frozen=True)
class HeartbeatAnswer(Message):
    """Library -> monitor: the enclave's answer to challenge ``number``: its own answer
    count, its progress (scans completed) and the MAC over them and the challenge."""

    number: int
    sequence: int
    progress: int
    mac: bytes

    def __post_init__(self) -> None:
        _uint("HeartbeatAnswer", "number", self.number)
        _uint("HeartbeatAnswer", "sequence", self.sequence)
        _uint("HeartbeatAnswer", "progress", self.progress)
        _bytes("HeartbeatAnswer", "mac", self.mac, 32, exact=32)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.number)
        w.u64(self.sequence)
        w.u64(self.progress)
        w.fixed(self.mac)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.u64("number"), r.u64("sequence"), r.u64("progress"), r.take(32, "mac"))


@_message(0x77)
@dataclass(frozen=True)
class SealedReport(Message):
    """Library -> monitor: report ``seq``, sealed by the enclave for the monitor."""

    seq: int
    sealed: bytes

    def __post_init__(self) -> None:
        _uint("SealedReport", "seq", self.seq)
        _bytes("SealedReport", "sealed", self.sealed, MAX_REPORT)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.seq)
        w.blob(self.sealed)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.u64("seq"), r.blob("sealed", MAX_REPORT))


@_message(0x78)
@dataclass(frozen=True)
class ReportAck(Message):
    """Monitor -> library: report ``seq`` was opened and accepted."""

    seq: int

    def __post_init__(self) -> None:
        _uint("ReportAck", "seq", self.seq)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.seq)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.u64("seq"))


# --- hypervisor administration (operator <-> hypervisor service's admin socket) ----


class RevokeKind(IntEnum):
    """What a :class:`Revoke` names."""

    MEASUREMENT = 1  # an MRENCLAVE: its open sessions end, new ones are refused
    SESSION = 2  # one session id


@_message(0x61)
@dataclass(frozen=True)
class Revoke(Message):
    """Operator -> hypervisor service: revoke a measurement or a session, at once."""

    kind: RevokeKind
    value: bytes

    def __post_init__(self) -> None:
        _enum("Revoke", "kind", self.kind, RevokeKind)
        size = 32 if self.kind is RevokeKind.MEASUREMENT else SESSION_ID_LEN
        _bytes("Revoke", "value", self.value, size, exact=size)

    def _encode(self, w: _Writer) -> None:
        w.u8(self.kind)
        w.blob(self.value)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        kind = r.enum(RevokeKind, "kind", r.u8("kind"))
        return cls(kind, r.blob("value", 32))


@_message(0x62)
@dataclass(frozen=True)
class Revoked(Message):
    """Hypervisor service -> operator: the revocation holds; how many sessions it ended."""

    sessions_closed: int

    def __post_init__(self) -> None:
        _uint("Revoked", "sessions_closed", self.sessions_closed, 32)

    def _encode(self, w: _Writer) -> None:
        w.u32(self.sessions_closed)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.u32("sessions_closed"))


# --- sealed request bodies ----------------------------------------------------------


@dataclass(frozen=True)
class PageRange:
    """``count`` consecutive 4 KiB guest-virtual pages starting at ``address``."""

    address: int
    count: int

    def __post_init__(self) -> None:
        _uint("PageRange", "address", self.address)
        _uint("PageRange", "count", self.count, 32)
        _aligned("PageRange", "address", self.address, PAGE_SIZE)
        if self.count < 1:
            raise WireError("PageRange: count must be at least 1")
        if self.address + self.count * PAGE_SIZE > _U64:
            raise WireError(f"PageRange: {self.address:#x} + {self.count} pages wraps")


@_message(0x21)
@dataclass(frozen=True)
class ReadPages(Message):
    """Enclave -> hypervisor (sealed): read these guest-virtual pages with the vCPU's CR3."""

    ranges: tuple[PageRange, ...]

    def __post_init__(self) -> None:
        _tuple("ReadPages", "ranges", self.ranges, MAX_RANGES, PageRange)
        if not self.ranges:
            raise WireError("ReadPages: no ranges")
        total = sum(r.count for r in self.ranges)
        if total > MAX_PAGES_PER_REQUEST:
            raise WireError(f"ReadPages: {total} pages, limit {MAX_PAGES_PER_REQUEST}")

    def _encode(self, w: _Writer) -> None:
        w.u32(len(self.ranges))
        for rng in self.ranges:
            w.u64(rng.address)
            w.u32(rng.count)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        n = r.count("ranges", MAX_RANGES, 12)
        return cls(tuple(PageRange(r.u64("address"), r.u32("count")) for _ in range(n)))

    def pages(self) -> list[int]:
        """Every page address asked for, in order."""
        return [rng.address + i * PAGE_SIZE for rng in self.ranges for i in range(rng.count)]


@dataclass(frozen=True)
class ListWalk:
    """A kernel list for the trusted side to walk: the one shape of that request, from
    ``list_for_each_entry`` through ``RemoteMemory.prefetch_list``, the transport and
    the wire (:class:`FollowList`) to ``PageServer.follow_list``.

    Like ``list_for_each_entry(pos, head, member)``: start at ``*(head + next_offset)``
    (``next_offset`` is ``offsetof(struct list_head, next)``, 0 on every kernel so far),
    or at ``*(after + next_offset)`` to continue a walk that stopped at node ``after``
    (0: from the head); each node's successor is ``*(node + next_offset)``; each node's
    span is ``[node - member_offset, node - member_offset + span_size)`` (for a whole
    entry: ``member_offset = offsetof(type, member)``, ``span_size = sizeof(type)``; a
    narrower span keeps the node's ``list_head`` inside it). Stop on returning to
    ``head``, after ``limit`` nodes, or on a fault or loop.

    One sign convention: ``member_offset`` is where the node lies in its span, never
    negative (the kernel's ``container_of``). Validated here and only here.
    """

    head: int
    next_offset: int
    member_offset: int
    span_size: int
    limit: int
    after: int = 0

    def __post_init__(self) -> None:
        _uint("ListWalk", "head", self.head)
        _aligned("ListWalk", "head", self.head, 8)
        _uint("ListWalk", "next_offset", self.next_offset, 32)
        _uint("ListWalk", "member_offset", self.member_offset, 32)
        _uint("ListWalk", "span_size", self.span_size, 32)
        _uint("ListWalk", "limit", self.limit, 32)
        _uint("ListWalk", "after", self.after)
        if not 0 < self.span_size <= MAX_ENTRY_SIZE:
            raise WireError(f"ListWalk: span_size must be 1..{MAX_ENTRY_SIZE}")
        if self.member_offset + 16 > self.span_size:
            raise WireError("ListWalk: the list_head must lie inside the span")
        if self.next_offset + 8 > 16:
            raise WireError("ListWalk: next_offset must lie inside the list_head")
        if self.limit < 1:
            raise WireError("ListWalk: limit must be at least 1")

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(head, next_offset, member_offset, span_size): the list and its span."""
        return self.head, self.next_offset, self.member_offset, self.span_size

    def span_start(self, node: int) -> int:
        """Where the node's span begins: ``node - member_offset``."""
        return node - self.member_offset


@_message(0x22)
@dataclass(frozen=True)
class FollowList(Message):
    """Enclave -> hypervisor (sealed): walk a kernel ``list_head`` list (a
    :class:`ListWalk` of at most ``MAX_LIST_NODES`` nodes), return its entries. The
    reply lists node addresses and the pages covering each node's span."""

    walk: ListWalk

    def __post_init__(self) -> None:
        if not isinstance(self.walk, ListWalk):
            raise WireError("FollowList: walk must be a ListWalk")
        if self.walk.limit > MAX_LIST_NODES:
            raise WireError(f"FollowList: limit must be 1..{MAX_LIST_NODES}")

    def _encode(self, w: _Writer) -> None:
        walk = self.walk
        w.u64(walk.head)
        w.u32(walk.member_offset)
        w.u32(walk.span_size)
        w.u32(walk.limit)
        w.u32(walk.next_offset)
        w.u64(walk.after)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        head = r.u64("head")
        member_offset = r.u32("member_offset")
        span_size = r.u32("span_size")
        limit = r.u32("limit")
        next_offset = r.u32("next_offset")
        return cls(ListWalk(head, next_offset, member_offset, span_size, limit, r.u64("after")))


@dataclass(frozen=True)
class _Empty(Message):
    def _encode(self, w: _Writer) -> None:
        pass

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls()


@_message(0x23)
@dataclass(frozen=True)
class GetVmcoreinfo(_Empty):
    """Enclave -> hypervisor (sealed): the guest's VMCOREINFO note text."""


@_message(0x24)
@dataclass(frozen=True)
class GetRegisters(_Empty):
    """Enclave -> hypervisor (sealed): control registers of each vCPU (CR0/CR3/CR4/EFER)."""


@_message(0x25)
@dataclass(frozen=True)
class BeginScan(Message):
    """Enclave -> hypervisor (sealed): a scan starts. The hypervisor re-reads the vCPU
    registers and drops cached translations; with ``pause`` it also stops the guest's
    vCPUs until :class:`EndScan` (or a bounded maximum pause) so the scan sees one
    consistent state. Answered by :class:`Ack`."""

    pause: bool = False

    def __post_init__(self) -> None:
        _bool("BeginScan", "pause", self.pause)

    def _encode(self, w: _Writer) -> None:
        w.u8(int(self.pause))

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.flag("pause"))


@_message(0x26)
@dataclass(frozen=True)
class EndScan(_Empty):
    """Enclave -> hypervisor (sealed): the scan is over; resume the guest if it paused it.
    Answered by :class:`Ack`."""


@_message(0x27)
@dataclass(frozen=True)
class Batch(Message):
    """Enclave -> hypervisor (sealed): several requests served in order, in one crossing
    and under one guest lock, answered by one :class:`BatchReply` (e.g. BeginScan with a
    scan's first FollowList and the pages it is expected to need).

    At most ``MAX_BATCH`` requests among ReadPages, FollowList (at most one), BeginScan,
    EndScan and GetRegisters; together the ReadPages ask for at most
    ``MAX_PAGES_PER_REQUEST`` pages, and a FollowList in a batch gets what is left of
    ``MAX_REPLY_PAGES``. Each request travels as a nested ``version | type | body``.
    """

    requests: tuple[Message, ...]

    def __post_init__(self) -> None:
        _tuple("Batch", "requests", self.requests, MAX_BATCH, _BATCHABLE)
        if not self.requests:
            raise WireError("Batch: no requests")
        if sum(isinstance(m, FollowList) for m in self.requests) > 1:
            raise WireError("Batch: more than one FollowList")
        pages = sum(len(m.pages()) for m in self.requests if isinstance(m, ReadPages))
        if pages > MAX_PAGES_PER_REQUEST:
            raise WireError(f"Batch: {pages} pages, limit {MAX_PAGES_PER_REQUEST}")

    def _encode(self, w: _Writer) -> None:
        w.u32(len(self.requests))
        for m in self.requests:
            w.blob(encode(m))

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        n = r.count("requests", MAX_BATCH, 6)
        return cls(
            tuple(
                decode(r.blob("request", MAX_SEALED_REQUEST), expect=_BATCHABLE) for _ in range(n)
            )
        )

    def list_page_budget(self) -> int:
        """The reply pages a FollowList of this batch may fill."""
        asked = sum(len(m.pages()) for m in self.requests if isinstance(m, ReadPages))
        return MAX_REPLY_PAGES - asked


# --- sealed reply bodies ------------------------------------------------------------


@dataclass(frozen=True)
class PageEntry:
    """One page of a reply: its guest-virtual address and what the hypervisor found."""

    address: int
    status: PageStatus

    def __post_init__(self) -> None:
        a = self.address
        if type(a) is int and 0 <= a < _U64 and not a & _PAGE_MASK:  # one per page: fast
            _enum("PageEntry", "status", self.status, PageStatus)
            return
        _uint("PageEntry", "address", a)
        _aligned("PageEntry", "address", a, PAGE_SIZE)
        _enum("PageEntry", "status", self.status, PageStatus)


def _check_pages(msg: str, pages: object) -> None:
    _tuple(msg, "pages", pages, MAX_REPLY_PAGES, PageEntry)
    assert isinstance(pages, tuple)
    if len({p.address for p in pages}) != len(pages):
        raise WireError(f"{msg}: a page address appears twice")


_PAGE_ENTRY = struct.Struct(">QB")
_PAGE_STATUS = {int(s): s for s in PageStatus}


def _encode_pages(w: _Writer, pages: tuple[PageEntry, ...]) -> None:
    w.u32(len(pages))
    pack = _PAGE_ENTRY.pack
    w.parts += [pack(p.address, p.status) for p in pages]


def _decode_pages(r: _Reader) -> tuple[PageEntry, ...]:
    n = r.count("pages", MAX_REPLY_PAGES, _PAGE_ENTRY.size)
    raw = r.take(n * _PAGE_ENTRY.size, "pages")
    out = []
    for address, raw_status in _PAGE_ENTRY.iter_unpack(raw):
        status = _PAGE_STATUS.get(raw_status)
        if status is None:
            raise WireError(f"{r.what}: unknown page status {raw_status}")
        out.append(PageEntry(address, status))
    return tuple(out)


def _present(pages: tuple[PageEntry, ...]) -> list[int]:
    return [p.address for p in pages if p.status is PageStatus.PRESENT]


@_message(0x31)
@dataclass(frozen=True)
class PagesReply(Message):
    """Hypervisor -> enclave (sealed index) for ReadPages."""

    pages: tuple[PageEntry, ...]

    def __post_init__(self) -> None:
        _check_pages("PagesReply", self.pages)

    def _encode(self, w: _Writer) -> None:
        _encode_pages(w, self.pages)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(_decode_pages(r))

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return _present(self.pages)


@_message(0x32)
@dataclass(frozen=True)
class ListReply(Message):
    """Hypervisor -> enclave (sealed index) for FollowList: entries in list order."""

    entries: tuple[int, ...]
    end: ListEnd
    pages: tuple[PageEntry, ...]

    def __post_init__(self) -> None:
        _tuple("ListReply", "entries", self.entries, MAX_LIST_NODES, int)
        if not all(0 <= e < _U64 for e in self.entries):
            for e in self.entries:
                _uint("ListReply", "entry", e)
        _enum("ListReply", "end", self.end, ListEnd)
        _check_pages("ListReply", self.pages)

    def _encode(self, w: _Writer) -> None:
        w.u32(len(self.entries))
        w.fixed(struct.pack(f">{len(self.entries)}Q", *self.entries))
        w.u8(self.end)
        _encode_pages(w, self.pages)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        n = r.count("entries", MAX_LIST_NODES, 8)
        entries = struct.unpack(f">{n}Q", r.take(8 * n, "entries"))
        end = r.enum(ListEnd, "list end", r.u8("end"))
        return cls(entries, end, _decode_pages(r))

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return _present(self.pages)


@_message(0x33)
@dataclass(frozen=True)
class VmcoreinfoReply(Message):
    """Hypervisor -> enclave (sealed): every VMCOREINFO ELF note found in guest RAM.

    A hostile guest can plant copies, so the hypervisor does not choose: the enclave
    keeps the note the kernel's own ``vmcoreinfo_note`` pointer names
    (``sgmonitor.kernel.kallsyms.genuine_vmcoreinfo``).
    """

    notes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _tuple("VmcoreinfoReply", "notes", self.notes, MAX_VMCOREINFO_NOTES, bytes)
        for note in self.notes:
            _bytes("VmcoreinfoReply", "note", note, MAX_VMCOREINFO_NOTE)

    def _encode(self, w: _Writer) -> None:
        w.u32(len(self.notes))
        for note in self.notes:
            w.blob(note)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        n = r.count("notes", MAX_VMCOREINFO_NOTES, 4)
        return cls(tuple(r.blob("note", MAX_VMCOREINFO_NOTE) for _ in range(n)))


@dataclass(frozen=True)
class VcpuRegisters:
    """Control registers of one vCPU."""

    index: int
    cr0: int
    cr3: int
    cr4: int
    efer: int

    def __post_init__(self) -> None:
        _uint("VcpuRegisters", "index", self.index, 16)
        for name in ("cr0", "cr3", "cr4", "efer"):
            _uint("VcpuRegisters", name, getattr(self, name))


@_message(0x34)
@dataclass(frozen=True)
class RegistersReply(Message):
    """Hypervisor -> enclave (sealed): each vCPU's control registers."""

    vcpus: tuple[VcpuRegisters, ...]

    def __post_init__(self) -> None:
        _tuple("RegistersReply", "vcpus", self.vcpus, MAX_VCPUS, VcpuRegisters)

    def _encode(self, w: _Writer) -> None:
        w.u32(len(self.vcpus))
        for v in self.vcpus:
            w.u16(v.index)
            for x in (v.cr0, v.cr3, v.cr4, v.efer):
                w.u64(x)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        n = r.count("vcpus", MAX_VCPUS, 34)
        return cls(
            tuple(
                VcpuRegisters(
                    r.u16("index"), r.u64("cr0"), r.u64("cr3"), r.u64("cr4"), r.u64("efer")
                )
                for _ in range(n)
            )
        )


@_message(0x35)
@dataclass(frozen=True)
class Ack(Message):
    """Hypervisor -> enclave (sealed): BeginScan or EndScan done; ``paused`` says whether
    the guest's vCPUs are stopped now."""

    paused: bool = False

    def __post_init__(self) -> None:
        _bool("Ack", "paused", self.paused)

    def _encode(self, w: _Writer) -> None:
        w.u8(int(self.paused))

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.flag("paused"))


@_message(0x36)
@dataclass(frozen=True)
class BatchReply(Message):
    """Hypervisor -> enclave (sealed index) for Batch: one reply per request, in order
    (each a PagesReply, ListReply, Ack, RegistersReply or RequestFailed). The sealed
    pages of all of them follow, in reply order."""

    replies: tuple[Message, ...]

    def __post_init__(self) -> None:
        _tuple("BatchReply", "replies", self.replies, MAX_BATCH, _BATCH_REPLIES)
        if not self.replies:
            raise WireError("BatchReply: no replies")
        entries = sum(len(m.pages) for m in self.replies if isinstance(m, PagesReply | ListReply))
        if entries > MAX_REPLY_PAGES:
            raise WireError(f"BatchReply: {entries} page entries, limit {MAX_REPLY_PAGES}")

    def _encode(self, w: _Writer) -> None:
        w.u32(len(self.replies))
        for m in self.replies:
            w.blob(encode(m))

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        n = r.count("replies", MAX_BATCH, 6)
        return cls(
            tuple(
                decode(r.blob("reply", MAX_SEALED_REPLY), expect=_BATCH_REPLIES) for _ in range(n)
            )
        )

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return [
            a for m in self.replies if isinstance(m, PagesReply | ListReply) for a in m.present()
        ]


@_message(0x3F)
@dataclass(frozen=True)
class RequestFailed(Message):
    """Hypervisor -> enclave (sealed): the request was refused; authenticated, unlike Error."""

    code: ErrorCode
    message: str = ""

    def __post_init__(self) -> None:
        _enum("RequestFailed", "code", self.code, ErrorCode)
        _text("RequestFailed", "message", self.message, MAX_ERROR_TEXT)

    def _encode(self, w: _Writer) -> None:
        w.u16(self.code)
        w.text(self.message)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        code = r.enum(ErrorCode, "error code", r.u16("code"))
        return cls(code, r.text("message", MAX_ERROR_TEXT))


_BATCHABLE: tuple[type[Message], ...] = (ReadPages, FollowList, BeginScan, EndScan, GetRegisters)
_BATCH_REPLIES: tuple[type[Message], ...] = (
    PagesReply,
    ListReply,
    Ack,
    RegistersReply,
    RequestFailed,
)

# --- enclave boundary (ECALL / OCALL) -----------------------------------------------

_VALUE_UINT, _VALUE_BYTES, _VALUE_STR = 1, 2, 3


def _check_values(msg: str, field: str, values: object) -> None:
    _tuple(msg, field, values, MAX_CALL_ARGS, (int, bytes, str))
    assert isinstance(values, tuple)
    for v in values:
        if isinstance(v, int):
            _uint(msg, field, v)
        elif isinstance(v, bytes):
            _bytes(msg, field, v, MAX_CALL_VALUE)
        else:
            _text(msg, field, v, MAX_CALL_VALUE)


def _encode_values(w: _Writer, values: tuple[Value, ...]) -> None:
    w.u8(len(values))
    for v in values:
        if isinstance(v, int):
            w.u8(_VALUE_UINT)
            w.u64(v)
        elif isinstance(v, bytes):
            w.u8(_VALUE_BYTES)
            w.blob(v)
        else:
            w.u8(_VALUE_STR)
            w.text(v)


def _decode_values(r: _Reader, field: str) -> tuple[Value, ...]:
    n = r.u8(f"{field} count")
    if n > MAX_CALL_ARGS:
        raise WireError(f"{r.what}: {n} {field}, limit {MAX_CALL_ARGS}")
    out: list[Value] = []
    for _ in range(n):
        tag = r.u8("value tag")
        if tag == _VALUE_UINT:
            out.append(r.u64(field))
        elif tag == _VALUE_BYTES:
            out.append(r.blob(field, MAX_CALL_VALUE))
        elif tag == _VALUE_STR:
            out.append(r.text(field, MAX_CALL_VALUE))
        else:
            raise WireError(f"{r.what}: unknown value tag {tag}")
    return tuple(out)


@_message(0x41)
@dataclass(frozen=True)
class Call(Message):
    """An ECALL (library -> enclave) or OCALL (enclave -> library); see tee/edl.py."""

    call_id: int
    direction: CallDirection
    name: str
    args: tuple[Value, ...] = ()

    def __post_init__(self) -> None:
        _uint("Call", "call_id", self.call_id)
        _enum("Call", "direction", self.direction, CallDirection)
        _text("Call", "name", self.name, MAX_CALL_NAME, nonempty=True)
        _check_values("Call", "args", self.args)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.call_id)
        w.u8(self.direction)
        w.text(self.name)
        _encode_values(w, self.args)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        call_id = r.u64("call_id")
        direction = r.enum(CallDirection, "call direction", r.u8("direction"))
        name = r.text("name", MAX_CALL_NAME)
        return cls(call_id, direction, name, _decode_values(r, "args"))


@_message(0x42)
@dataclass(frozen=True)
class Return(Message):
    """The results of the call with the same ``call_id``."""

    call_id: int
    results: tuple[Value, ...] = ()

    def __post_init__(self) -> None:
        _uint("Return", "call_id", self.call_id)
        _check_values("Return", "results", self.results)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.call_id)
        _encode_values(w, self.results)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.u64("call_id"), _decode_values(r, "results"))


@_message(0x43)
@dataclass(frozen=True)
class CallFailed(Message):
    """The call with the same ``call_id`` failed; ``message`` is for logs."""

    call_id: int
    code: ErrorCode
    message: str = ""

    def __post_init__(self) -> None:
        _uint("CallFailed", "call_id", self.call_id)
        _enum("CallFailed", "code", self.code, ErrorCode)
        _text("CallFailed", "message", self.message, MAX_ERROR_TEXT)

    def _encode(self, w: _Writer) -> None:
        w.u64(self.call_id)
        w.u16(self.code)
        w.text(self.message)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        call_id = r.u64("call_id")
        code = r.enum(ErrorCode, "error code", r.u16("code"))
        return cls(call_id, code, r.text("message", MAX_ERROR_TEXT))


# --- encode / decode -----------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """``version | type | body``: the bytes a frame carries after its length prefix."""
    if type(msg) not in _REGISTRY.values():
        raise WireError(f"not a wire message: {type(msg).__name__}")
    w = _Writer()
    w.u8(WIRE_VERSION)
    w.u8(msg.TYPE)
    msg._encode(w)
    data = b"".join(w.parts)
    if len(data) > MAX_FRAME:
        raise WireError(f"{type(msg).__name__}: {len(data)} bytes exceeds MAX_FRAME")
    return data


_T = TypeVar("_T", bound=Message)


def decode(data: bytes, expect: tuple[type[_T], ...] | None = None) -> _T:
    """Parse one message; ``expect`` lists the types acceptable here (others: WireError)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("decode needs bytes")
    if not isinstance(data, bytes):  # a mutable buffer: parse a private copy
        data = bytes(data)
    if len(data) > MAX_FRAME:
        raise WireError(f"message of {len(data)} bytes exceeds MAX_FRAME")
    if len(data) < 2:
        raise WireError(f"message of {len(data)} bytes: too short for version and type")
    if data[0] != WIRE_VERSION:
        raise WireError(f"unsupported wire version {data[0]} (this side speaks {WIRE_VERSION})")
    cls = _REGISTRY.get(data[1])
    if cls is None:
        raise WireError(f"unknown message type {data[1]:#04x}")
    if expect is not None and cls not in expect:
        names = ", ".join(c.__name__ for c in expect)
        raise WireError(f"unexpected {cls.__name__} (expected {names})")
    r = _Reader(data, cls.__name__, 2)  # a view past version and type, not a copy
    msg = cls._decode(r)
    r.end()
    return msg  # type: ignore[return-value]


# --- stream sockets ------------------------------------------------------------------

_SMALL_FRAME = 64 * 1024


def framed(msg: Message) -> bytes:
    """``msg`` as it goes on a stream: its length, then its encoding (for non-blocking
    senders that buffer frames themselves)."""
    data = encode(msg)
    return _U32.pack(len(data)) + data


def pop_frame(buffer: bytearray) -> bytes | None:
    """The next whole frame's encoding, taken off the front of ``buffer`` (None: not all
    of it has arrived). :class:`WireError` for a length out of bounds: the stream is
    out of step, and the caller should drop the connection."""
    if len(buffer) < 4:
        return None
    (length,) = _U32.unpack_from(buffer)
    if not 2 <= length <= MAX_FRAME:
        raise WireError(f"frame length {length} out of bounds")
    if len(buffer) < 4 + length:
        return None
    data = bytes(buffer[4 : 4 + length])
    del buffer[: 4 + length]
    return data


def send_encoded(sock: socket.socket, data: bytes, timeout: float) -> None:
    """Send one already-encoded message (e.g. an opaque frame relayed for the enclave)."""
    if len(data) < 2 or len(data) > MAX_FRAME:
        raise WireError(f"refusing to send a frame of {len(data)} bytes")
    try:
        sock.settimeout(timeout)
        if len(data) <= _SMALL_FRAME:
            sock.sendall(_U32.pack(len(data)) + data)
        else:  # a large frame is not copied to prepend its length
            sock.sendall(_U32.pack(len(data)))
            sock.sendall(data)
    except TimeoutError:
        raise WireTimeout(f"send of {len(data)} bytes timed out after {timeout}s") from None
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ConnectionClosed(f"peer closed the connection during send: {exc}") from None


def send_frame(sock: socket.socket, msg: Message, timeout: float = 30.0) -> None:
    """Encode and send one message as a length-prefixed frame."""
    send_encoded(sock, encode(msg), timeout)


def _recv_exact(sock: socket.socket, n: int, deadline: float, started: bool) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WireTimeout(f"frame incomplete at the deadline ({got} of {n} bytes)")
        sock.settimeout(remaining)
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise WireTimeout(f"frame incomplete at the deadline ({got} of {n} bytes)") from None
        except ConnectionResetError as exc:
            raise ConnectionClosed(f"connection reset: {exc}") from None
        if k == 0:
            if not started and got == 0:
                raise ConnectionClosed("peer closed the connection")
            raise ConnectionClosed(f"peer closed the connection mid-frame ({got} of {n} bytes)")
        got += k
        started = True
    return bytes(buf)


def recv_encoded(sock: socket.socket, timeout: float) -> bytes:
    """Receive one frame's bytes within ``timeout`` seconds in total; never unbounded."""
    deadline = time.monotonic() + timeout
    (length,) = _U32.unpack(_recv_exact(sock, 4, deadline, started=False))
    if length < 2 or length > MAX_FRAME:
        raise WireError(f"frame length {length} outside 2..{MAX_FRAME}")
    return _recv_exact(sock, length, deadline, started=True)


def recv_frame(
    sock: socket.socket, timeout: float, expect: tuple[type[_T], ...] | None = None
) -> _T:
    """Receive and decode one message within ``timeout`` seconds in total."""
    return decode(recv_encoded(sock, timeout), expect)


def parse_address(address: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """``unix:PATH`` or ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (family, address)."""
    if address.startswith("unix:") and len(address) > 5:
        return socket.AF_UNIX, address[5:]
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise WireError(f"address {address!r} is neither unix:PATH nor HOST:PORT")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def connect(address: str, timeout: float) -> socket.socket:
    """A stream socket connected to ``address`` (see :func:`parse_address`)."""
    family, where = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    return sock
