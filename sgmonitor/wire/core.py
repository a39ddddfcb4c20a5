"""The one wire module: framing, every message type, every limit.

Nobody else turns messages into bytes. A frame on a stream socket is::

    length u32 | version u8 | type u8 | body          (length counts version..body)

All integers are big-endian; byte strings and text are ``u32 length | bytes``; lists are
``u32 count | items``. Each message declares each field once, as a codec
(``vm: str = text(MAX_VM_NAME, nonempty=True)``): the codec checks the value when the
message is constructed, writes it and reads it back, so ``encode`` and ``decode`` are
mirror images and the same limits hold whether a message is built locally or parsed
from a peer. Any malformed, truncated, oversized or unexpected
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
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, NoReturn, Self, TypeVar

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


def _tuple(msg: str, field: str, v: object, limit: int, item: type | tuple[type, ...]) -> None:
    if not isinstance(v, tuple):
        raise WireError(f"{msg}: {field} must be a tuple")
    if len(v) > limit:
        raise WireError(f"{msg}: {len(v)} {field}, limit {limit}")
    for x in v:
        if not isinstance(x, item) or isinstance(x, bool):
            raise WireError(f"{msg}: {field} holds a {type(x).__name__}")


def _aligned(msg: str, field: str, v: int, align: int) -> None:
    if v % align:
        raise WireError(f"{msg}: {field} {v:#x} is not {align}-byte aligned")


# --- the field spec -------------------------------------------------------------------
#
# A message (or a record inside one) is a frozen dataclass whose fields each name one
# codec, once: ``vm: str = text(MAX_VM_NAME, nonempty=True)``. The codec checks the
# value (on construction, so building and parsing enforce the same limits), writes it
# and reads it back. Rules that tie fields together live in the class's ``_check``.


class Codec:
    """How one field is checked, written and read. ``size``: its fewest bytes on the
    wire (a count's cheap early reject); ``types``: what a value may be."""

    size: int = 0
    types: type | tuple[type, ...] = object

    def check(self, msg: str, name: str, v: Any) -> None:
        raise NotImplementedError

    def put(self, w: _Writer, v: Any) -> None:
        raise NotImplementedError

    def get(self, r: _Reader, name: str) -> Any:
        raise NotImplementedError


_PACK = {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}


class UInt(Codec):
    """An unsigned big-endian integer of ``bits`` bits, optionally ``align``-aligned."""

    types = int

    def __init__(self, bits: int = 64, align: int = 0) -> None:
        self.bits, self.align, self.size = bits, align, bits // 8
        self.limit, self.mask = 2**bits, (align - 1 if align else 0)
        self.pack = struct.Struct(_PACK[bits])

    def check(self, msg: str, name: str, v: Any) -> None:
        if type(v) is int and 0 <= v < self.limit and not v & self.mask:  # the usual case
            return
        _uint(msg, name, v, self.bits)
        if self.align:
            _aligned(msg, name, v, self.align)

    def put(self, w: _Writer, v: int) -> None:
        w.parts.append(self.pack.pack(v))

    def get(self, r: _Reader, name: str) -> int:
        return int(self.pack.unpack(r.take(self.size, name))[0])


class Flag(Codec):
    """A bool as one byte, 0 or 1."""

    size, types = 1, bool

    def check(self, msg: str, name: str, v: Any) -> None:
        if not isinstance(v, bool):
            raise WireError(f"{msg}: {name} must be a bool")

    def put(self, w: _Writer, v: bool) -> None:
        w.u8(int(v))

    def get(self, r: _Reader, name: str) -> bool:
        return r.flag(name)


class EnumOf(Codec):
    """An IntEnum member as an unsigned integer; ``label`` names it in decode errors."""

    def __init__(self, cls: type[IntEnum], bits: int = 8, label: str | None = None) -> None:
        self.types, self.label = cls, label
        self.int = UInt(bits)
        self.size = self.int.size

    def check(self, msg: str, name: str, v: Any) -> None:
        if not isinstance(v, self.types):
            raise WireError(f"{msg}: {name} must be a {self.types.__name__}")

    def put(self, w: _Writer, v: IntEnum) -> None:
        self.int.put(w, v)

    def get(self, r: _Reader, name: str) -> IntEnum:
        return r.enum(self.types, self.label or name, self.int.get(r, name))


class Fixed(Codec):
    """Exactly ``n`` bytes, no length on the wire."""

    types = bytes

    def __init__(self, n: int) -> None:
        self.size = n

    def check(self, msg: str, name: str, v: Any) -> None:
        _bytes(msg, name, v, self.size, exact=self.size)

    def put(self, w: _Writer, v: bytes) -> None:
        w.parts.append(v)

    def get(self, r: _Reader, name: str) -> bytes:
        return r.take(self.size, name)


class Blob(Codec):
    """``u32 length | bytes``, at most ``limit`` bytes."""

    size, types = 4, bytes

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def check(self, msg: str, name: str, v: Any) -> None:
        _bytes(msg, name, v, self.limit)

    def put(self, w: _Writer, v: bytes) -> None:
        w.blob(v)

    def get(self, r: _Reader, name: str) -> bytes:
        return r.blob(name, self.limit)


class ShortFixed(Codec):
    """``u8 length | bytes``, the length one of ``lengths`` (e.g. empty or a session id)."""

    size, types = 1, bytes

    def __init__(self, *lengths: int) -> None:
        self.lengths = lengths

    def check(self, msg: str, name: str, v: Any) -> None:
        _bytes(msg, name, v, max(self.lengths))
        if len(v) not in self.lengths:
            either = " or ".join("empty" if n == 0 else f"{n} bytes" for n in self.lengths)
            raise WireError(f"{msg}: {name} must be {either}")

    def put(self, w: _Writer, v: bytes) -> None:
        w.u8(len(v))
        w.parts.append(v)

    def get(self, r: _Reader, name: str) -> bytes:
        n = r.u8(f"{name} length")
        if n not in self.lengths:
            raise WireError(f"{r.what}: {name} length {n}")
        return r.take(n, name)


class Text(Codec):
    """``u32 length | UTF-8``, at most ``limit`` bytes (and at least one if ``nonempty``)."""

    size, types = 4, str

    def __init__(self, limit: int, nonempty: bool = False) -> None:
        self.limit, self.nonempty = limit, nonempty

    def check(self, msg: str, name: str, v: Any) -> None:
        _text(msg, name, v, self.limit, self.nonempty)

    def put(self, w: _Writer, v: str) -> None:
        w.text(v)

    def get(self, r: _Reader, name: str) -> str:
        return r.text(name, self.limit)


class Seq(Codec):
    """``count | items`` as a tuple: at most ``limit`` items of codec ``item`` (named
    ``item_name`` in errors), the count a u32 or (``count_bits=8``) a u8."""

    size, types = 4, tuple

    def __init__(
        self, item: Codec, limit: int, count_bits: int = 32, item_name: str | None = None
    ) -> None:
        self.item, self.limit, self.item_name = item, limit, item_name
        self.count = UInt(count_bits)
        self.size = self.count.size

    def check(self, msg: str, name: str, v: Any) -> None:
        _tuple(msg, name, v, self.limit, self.item.types)
        self.check_items(msg, self.item_name or name, v)

    def check_items(self, msg: str, name: str, items: tuple[Any, ...]) -> None:
        check = self.item.check
        for x in items:
            check(msg, name, x)

    def put(self, w: _Writer, v: tuple[Any, ...]) -> None:
        self.count.put(w, len(v))
        put = self.item.put
        for x in v:
            put(w, x)

    def get_count(self, r: _Reader, name: str) -> int:
        if self.count.bits == 32:
            return r.count(name, self.limit, self.item.size)
        n = self.count.get(r, f"{name} count")
        if n > self.limit:
            raise WireError(f"{r.what}: {n} {name}, limit {self.limit}")
        return n

    def get(self, r: _Reader, name: str) -> tuple[Any, ...]:
        n = self.get_count(r, name)
        get, item_name = self.item.get, self.item_name or name
        return tuple(get(r, item_name) for _ in range(n))


class Blobs(Seq):
    """A tuple of blobs, packed and parsed in bulk (a reply's sealed pages)."""

    def __init__(self, limit: int, item_limit: int, item_name: str) -> None:
        super().__init__(Blob(item_limit), limit, item_name=item_name)

    def check_items(self, msg: str, name: str, items: tuple[Any, ...]) -> None:
        limit = self.item.limit  # type: ignore[attr-defined]
        if any(len(x) > limit for x in items):
            super().check_items(msg, name, items)

    def put(self, w: _Writer, v: tuple[bytes, ...]) -> None:
        w.u32(len(v))
        pack = _U32.pack
        for x in v:
            w.parts += (pack(len(x)), x)

    def get(self, r: _Reader, name: str) -> tuple[bytes, ...]:
        n = self.get_count(r, name)
        return r.blobs(n, self.item_name or name, self.item.limit)  # type: ignore[attr-defined]


class U64s(Seq):
    """A tuple of u64s, packed and parsed in bulk."""

    def __init__(self, limit: int, item_name: str) -> None:
        super().__init__(UInt(64), limit, item_name=item_name)

    def check_items(self, msg: str, name: str, items: tuple[Any, ...]) -> None:
        if not all(0 <= x < _U64 for x in items):
            super().check_items(msg, name, items)

    def put(self, w: _Writer, v: tuple[int, ...]) -> None:
        w.u32(len(v))
        w.parts.append(struct.pack(f">{len(v)}Q", *v))

    def get(self, r: _Reader, name: str) -> tuple[int, ...]:
        n = self.get_count(r, name)
        return struct.unpack(f">{n}Q", r.take(8 * n, name))


class Nested(Codec):
    """One record (a spec'd dataclass that is not a message) inline."""

    def __init__(self, cls: type) -> None:
        self.types = cls
        self.size = sum(c.size for _, c in _spec_of(cls))

    def check(self, msg: str, name: str, v: Any) -> None:
        if not isinstance(v, self.types):
            raise WireError(f"{msg}: {name} must be a {self.types.__name__}")  # type: ignore[union-attr]

    def put(self, w: _Writer, v: Any) -> None:
        v._put(w)

    def get(self, r: _Reader, name: str) -> Any:
        return self.types._get(r)  # type: ignore[union-attr]


class Messages(Seq):
    """A tuple of whole messages of ``types``, each a nested ``version | type | body``
    blob of at most ``item_limit`` bytes (a Batch and its BatchReply)."""

    def __init__(
        self, types: tuple[type[Message], ...], limit: int, item_limit: int, item_name: str
    ) -> None:
        super().__init__(Blob(item_limit), limit, item_name=item_name)
        self.types_in = types
        self.item.size = 6  # a blob's length, version and type

    def check(self, msg: str, name: str, v: Any) -> None:
        _tuple(msg, name, v, self.limit, self.types_in)

    def put(self, w: _Writer, v: tuple[Message, ...]) -> None:
        w.u32(len(v))
        for m in v:
            w.blob(encode(m))

    def get(self, r: _Reader, name: str) -> tuple[Message, ...]:
        n = self.get_count(r, name)
        limit, item_name = self.item.limit, self.item_name or name  # type: ignore[attr-defined]
        return tuple(decode(r.blob(item_name, limit), expect=self.types_in) for _ in range(n))


_SPEC_KEY = "sgmonitor.wire"


def _field(codec: Codec, default: Any = MISSING) -> Any:
    return field(default=default, metadata={_SPEC_KEY: codec})


def u8(default: Any = MISSING) -> Any:
    return _field(UInt(8), default)


def u16(default: Any = MISSING) -> Any:
    return _field(UInt(16), default)


def u32(default: Any = MISSING) -> Any:
    return _field(UInt(32), default)


def u64(align: int = 0, default: Any = MISSING) -> Any:
    return _field(UInt(64, align), default)


def flag(default: Any = MISSING) -> Any:
    return _field(Flag(), default)


def enum(cls: type[IntEnum], bits: int = 8, label: str | None = None) -> Any:
    """An IntEnum field; ``label`` names it in decode errors (default: the field's name)."""
    return _field(EnumOf(cls, bits, label))


def fixed(n: int) -> Any:
    return _field(Fixed(n))


def blob(limit: int, default: Any = MISSING) -> Any:
    return _field(Blob(limit), default)


def text(limit: int, nonempty: bool = False, default: Any = MISSING) -> Any:
    return _field(Text(limit, nonempty), default)


def spec(codec: Codec, default: Any = MISSING) -> Any:
    """Any other codec as a field (sequences, records, short blobs)."""
    return _field(codec, default)


def _spec_of(cls: type) -> tuple[tuple[str, Codec], ...]:
    return cls._SPEC  # type: ignore[attr-defined,no-any-return]


class Record:
    """A frozen dataclass of spec'd fields (see :func:`record`): checked on construction,
    written and read in wire order."""

    _DECLARED: ClassVar[tuple[tuple[str, Codec], ...]] = ()  # in declaration order
    _SPEC: ClassVar[tuple[tuple[str, Codec], ...]] = ()  # in wire order
    _IN_ORDER: ClassVar[bool] = True
    _CHECKED: ClassVar[bool] = False  # the class has its own _check

    def __post_init__(self) -> None:
        label = type(self).__name__
        for name, codec in self._DECLARED:
            codec.check(label, name, getattr(self, name))
        if self._CHECKED:
            self._check()

    def _check(self) -> None:
        """Rules that tie fields together, after each field's own checks."""

    def _fail(self, why: str) -> NoReturn:
        raise WireError(f"{type(self).__name__}: {why}")

    def _put(self, w: _Writer) -> None:
        for name, codec in self._SPEC:
            codec.put(w, getattr(self, name))

    @classmethod
    def _get(cls, r: _Reader) -> Self:
        if cls._IN_ORDER:
            return cls(*[codec.get(r, name) for name, codec in cls._SPEC])
        return cls(**{name: codec.get(r, name) for name, codec in cls._SPEC})


_R = TypeVar("_R", bound=type[Record])


def record(order: tuple[str, ...] | None = None) -> Callable[[_R], _R]:
    """Make ``cls`` a frozen dataclass whose fields are checked, written and read as
    their codecs say, in declaration order or in ``order`` (the wire's, when it differs)."""

    def make(cls: _R) -> _R:
        cls = dataclass(frozen=True)(cls)
        codecs = {f.name: f.metadata[_SPEC_KEY] for f in fields(cls)}  # type: ignore[arg-type]
        names = order if order is not None else tuple(codecs)
        assert sorted(names) == sorted(codecs), f"{cls.__name__}: order names every field"
        cls._DECLARED = tuple(codecs.items())
        cls._SPEC = tuple((n, codecs[n]) for n in names)
        cls._IN_ORDER = names == tuple(codecs)
        cls._CHECKED = "_check" in cls.__dict__
        return cls

    return make


# --- messages ------------------------------------------------------------------------

_REGISTRY: dict[int, type[Message]] = {}


class Message(Record):
    """Base of every message: a type byte and a field spec (see :func:`message`)."""

    TYPE: ClassVar[int]


_M = TypeVar("_M", bound=type[Message])


def message(type_byte: int) -> Callable[[_M], _M]:
    """A :func:`record` with a type byte, registered for :func:`decode`."""

    def register(cls: _M) -> _M:
        assert type_byte not in _REGISTRY, f"type {type_byte:#x} registered twice"
        cls = record()(cls)
        cls.TYPE = type_byte
        _REGISTRY[type_byte] = cls
        return cls

    return register


# --- hypervisor link (clear) --------------------------------------------------------


@message(0x01)
class Hello(Message):
    """Library -> hypervisor: ask for a fresh nonce for a session on ``vm``."""

    vm: str = text(MAX_VM_NAME, nonempty=True)


@message(0x02)
class HelloReply(Message):
    """Hypervisor -> library: the nonce the attestation statement must bind (and the
    session's keys mix in), the suites offered, and the service's public key (which
    the enclave uses only once the attestation service has endorsed it)."""

    hv_nonce: bytes = fixed(HV_NONCE_LEN)
    suites: tuple[Suite, ...] = spec(Seq(EnumOf(Suite), 8, count_bits=8, item_name="suite"))
    hv_key: bytes = fixed(HV_KEY_LEN)


@message(0x03)
class OpenSession(Message):
    """Library -> hypervisor: register the enclave's wrapped session key for ``vm``.

    ``statement`` is the attestation service's signed statement for exactly this
    session (``sgmonitor.statement``); without a valid one the hypervisor refuses.
    """

    vm: str = text(MAX_VM_NAME, nonempty=True)
    session_id: bytes = fixed(SESSION_ID_LEN)
    suite: Suite = enum(Suite)
    wrapped_key: bytes = blob(MAX_WRAPPED_KEY)
    statement: bytes = blob(MAX_STATEMENT, default=b"")


@message(0x04)
class SessionOpened(Message):
    """Hypervisor -> library: the key unwrapped; sealed requests may flow."""

    session_id: bytes = fixed(SESSION_ID_LEN)


@message(0x05)
class CloseSession(Message):
    """Library -> hypervisor: forget this session's keys."""

    session_id: bytes = fixed(SESSION_ID_LEN)


@message(0x06)
class SessionClosed(Message):
    """Hypervisor -> library: the session's keys are gone."""

    session_id: bytes = fixed(SESSION_ID_LEN)


@message(0x07)
class Request(Message):
    """Library -> hypervisor: one sealed request body (kind REQUEST) from the enclave.

    ``request_id`` travels in the clear so the hypervisor can rebuild the associated
    data and the library can match replies; changing it breaks the seal.
    """

    session_id: bytes = fixed(SESSION_ID_LEN)
    request_id: int = u64()
    sealed: bytes = blob(MAX_SEALED_REQUEST)


@message(0x08)
class Reply(Message):
    """Hypervisor -> library: a sealed reply index (kind REPLY), then one sealed page
    (kind PAGE) per PRESENT entry of the index, in index order."""

    session_id: bytes = fixed(SESSION_ID_LEN)
    request_id: int = u64()
    sealed_reply: bytes = blob(MAX_SEALED_REPLY)
    sealed_pages: tuple[bytes, ...] = spec(
        Blobs(MAX_REPLY_PAGES, MAX_SEALED_PAGE, "sealed page"), default=()
    )


@message(0x0F)
class Error(Message):
    """Either direction, in the clear and so unauthenticated: a refusal or failure.

    The enclave treats it as "the session failed", never as data about the guest.
    ``session_id`` is empty when no session is concerned; ``request_id`` 0 likewise.
    """

    code: ErrorCode = enum(ErrorCode, 16, "error code")
    message: str = text(MAX_ERROR_TEXT, default="")
    session_id: bytes = spec(ShortFixed(0, SESSION_ID_LEN), default=b"")
    request_id: int = u64(default=0)


# --- attestation link (library <-> attestation service), in the clear -------------


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


# --- monitor link (library <-> remote monitor), in the clear, over TCP -------------


@message(0x71)
class LinkHello(Message):
    """Library -> monitor: IDS ``ids`` wants a link."""

    ids: str = text(MAX_VM_NAME, nonempty=True)


@message(0x72)
class LinkChallenge(Message):
    """Monitor -> library: the nonce the link's statement must bind, and the monitor's
    X25519 key (the enclave uses the one its launch configuration names, not this)."""

    monitor_nonce: bytes = fixed(32)
    monitor_key: bytes = fixed(HV_KEY_LEN)


@message(0x73)
class LinkOpen(Message):
    """Library -> monitor: the enclave's wrapped link key, the verifier's statement for
    it, and the enclave's launch configuration (its hash is the statement's CONFIGID)."""

    link_id: bytes = fixed(SESSION_ID_LEN)
    wrapped_key: bytes = blob(MAX_WRAPPED_KEY)
    statement: bytes = blob(MAX_STATEMENT)
    config: bytes = blob(MAX_ENCLAVE_CONFIG)


@message(0x74)
class LinkOpened(Message):
    """Monitor -> library: the link key is accepted; reports and heartbeats may flow."""

    session_id: bytes = fixed(SESSION_ID_LEN)


@message(0x75)
class HeartbeatChallenge(Message):
    """Monitor -> library: challenge ``number`` for the enclave to answer."""

    number: int = u64()
    challenge: bytes = fixed(32)


@message(0x76)
class HeartbeatAnswer(Message):
    """Library -> monitor: the enclave's answer to challenge ``number``: its own answer
    count, its progress (scans completed) and the MAC over them and the challenge."""

    number: int = u64()
    sequence: int = u64()
    progress: int = u64()
    mac: bytes = fixed(32)


@message(0x77)
class SealedReport(Message):
    """Library -> monitor: report ``seq``, sealed by the enclave for the monitor."""

    seq: int = u64()
    sealed: bytes = blob(MAX_REPORT)


@message(0x78)
class ReportAck(Message):
    """Monitor -> library: report ``seq`` was opened and accepted."""

    seq: int = u64()


# --- hypervisor administration (operator <-> hypervisor service's admin socket) ----


class RevokeKind(IntEnum):
    """What a :class:`Revoke` names."""

    MEASUREMENT = 1  # an MRENCLAVE: its open sessions end, new ones are refused
    SESSION = 2  # one session id


@message(0x61)
class Revoke(Message):
    """Operator -> hypervisor service: revoke a measurement or a session, at once."""

    kind: RevokeKind = enum(RevokeKind)
    value: bytes = blob(32)

    def _check(self) -> None:
        size = 32 if self.kind is RevokeKind.MEASUREMENT else SESSION_ID_LEN
        _bytes(type(self).__name__, "value", self.value, size, exact=size)


@message(0x62)
class Revoked(Message):
    """Hypervisor service -> operator: the revocation holds; how many sessions it ended."""

    sessions_closed: int = u32()


# --- sealed request bodies ----------------------------------------------------------


@record()
class PageRange(Record):
    """``count`` consecutive 4 KiB guest-virtual pages starting at ``address``."""

    address: int = u64(align=PAGE_SIZE)
    count: int = u32()

    def _check(self) -> None:
        if self.count < 1:
            self._fail("count must be at least 1")
        if self.address + self.count * PAGE_SIZE > _U64:
            self._fail(f"{self.address:#x} + {self.count} pages wraps")


@message(0x21)
class ReadPages(Message):
    """Enclave -> hypervisor (sealed): read these guest-virtual pages with the vCPU's CR3."""

    ranges: tuple[PageRange, ...] = spec(Seq(Nested(PageRange), MAX_RANGES))

    def _check(self) -> None:
        if not self.ranges:
            self._fail("no ranges")
        total = sum(r.count for r in self.ranges)
        if total > MAX_PAGES_PER_REQUEST:
            self._fail(f"{total} pages, limit {MAX_PAGES_PER_REQUEST}")

    def pages(self) -> list[int]:
        """Every page address asked for, in order."""
        return [rng.address + i * PAGE_SIZE for rng in self.ranges for i in range(rng.count)]


# on the wire: head, member_offset, span_size, limit, next_offset, after
@record(order=("head", "member_offset", "span_size", "limit", "next_offset", "after"))
class ListWalk(Record):
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

    head: int = u64(align=8)
    next_offset: int = u32()
    member_offset: int = u32()
    span_size: int = u32()
    limit: int = u32()
    after: int = u64(default=0)

    def _check(self) -> None:
        if not 0 < self.span_size <= MAX_ENTRY_SIZE:
            self._fail(f"span_size must be 1..{MAX_ENTRY_SIZE}")
        if self.member_offset + 16 > self.span_size:
            self._fail("the list_head must lie inside the span")
        if self.next_offset + 8 > 16:
            self._fail("next_offset must lie inside the list_head")
        if self.limit < 1:
            self._fail("limit must be at least 1")

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(head, next_offset, member_offset, span_size): the list and its span."""
        return self.head, self.next_offset, self.member_offset, self.span_size

    def span_start(self, node: int) -> int:
        """Where the node's span begins: ``node - member_offset``."""
        return node - self.member_offset


@message(0x22)
class FollowList(Message):
    """Enclave -> hypervisor (sealed): walk a kernel ``list_head`` list (a
    :class:`ListWalk` of at most ``MAX_LIST_NODES`` nodes), return its entries. The
    reply lists node addresses and the pages covering each node's span."""

    walk: ListWalk = spec(Nested(ListWalk))

    def _check(self) -> None:
        if self.walk.limit > MAX_LIST_NODES:
            self._fail(f"limit must be 1..{MAX_LIST_NODES}")


@message(0x23)
class GetVmcoreinfo(Message):
    """Enclave -> hypervisor (sealed): the guest's VMCOREINFO note text."""


@message(0x24)
class GetRegisters(Message):
    """Enclave -> hypervisor (sealed): control registers of each vCPU (CR0/CR3/CR4/EFER)."""


@message(0x25)
class BeginScan(Message):
    """Enclave -> hypervisor (sealed): a scan starts. The hypervisor re-reads the vCPU
    registers and drops cached translations; with ``pause`` it also stops the guest's
    vCPUs until :class:`EndScan` (or a bounded maximum pause) so the scan sees one
    consistent state. Answered by :class:`Ack`."""

    pause: bool = flag(default=False)


@message(0x26)
class EndScan(Message):
    """Enclave -> hypervisor (sealed): the scan is over; resume the guest if it paused it.
    Answered by :class:`Ack`."""


_BATCHABLE: tuple[type[Message], ...] = (ReadPages, FollowList, BeginScan, EndScan, GetRegisters)


@message(0x27)
class Batch(Message):
    """Enclave -> hypervisor (sealed): several requests served in order, in one crossing
    and under one guest lock, answered by one :class:`BatchReply` (e.g. BeginScan with a
    scan's first FollowList and the pages it is expected to need).

    At most ``MAX_BATCH`` requests among ReadPages, FollowList (at most one), BeginScan,
    EndScan and GetRegisters; together the ReadPages ask for at most
    ``MAX_PAGES_PER_REQUEST`` pages, and a FollowList in a batch gets what is left of
    ``MAX_REPLY_PAGES``. Each request travels as a nested ``version | type | body``.
    """

    requests: tuple[Message, ...] = spec(
        Messages(_BATCHABLE, MAX_BATCH, MAX_SEALED_REQUEST, "request")
    )

    def _check(self) -> None:
        if not self.requests:
            self._fail("no requests")
        if sum(isinstance(m, FollowList) for m in self.requests) > 1:
            self._fail("more than one FollowList")
        pages = sum(len(m.pages()) for m in self.requests if isinstance(m, ReadPages))
        if pages > MAX_PAGES_PER_REQUEST:
            self._fail(f"{pages} pages, limit {MAX_PAGES_PER_REQUEST}")

    def list_page_budget(self) -> int:
        """The reply pages a FollowList of this batch may fill."""
        asked = sum(len(m.pages()) for m in self.requests if isinstance(m, ReadPages))
        return MAX_REPLY_PAGES - asked


# --- sealed reply bodies ------------------------------------------------------------


@record()
class PageEntry(Record):
    """One page of a reply: its guest-virtual address and what the hypervisor found."""

    address: int = u64(align=PAGE_SIZE)
    status: PageStatus = enum(PageStatus)


_PAGE_ENTRY = struct.Struct(">QB")
_PAGE_STATUS = {int(s): s for s in PageStatus}


class PageEntries(Seq):
    """A reply index's pages, packed and parsed in bulk; no address twice."""

    def __init__(self) -> None:
        super().__init__(Nested(PageEntry), MAX_REPLY_PAGES)

    def check(self, msg: str, name: str, v: Any) -> None:
        _tuple(msg, name, v, MAX_REPLY_PAGES, PageEntry)
        if len({p.address for p in v}) != len(v):
            raise WireError(f"{msg}: a page address appears twice")

    def put(self, w: _Writer, v: tuple[PageEntry, ...]) -> None:
        w.u32(len(v))
        pack = _PAGE_ENTRY.pack
        w.parts += [pack(p.address, p.status) for p in v]

    def get(self, r: _Reader, name: str) -> tuple[PageEntry, ...]:
        n = self.get_count(r, name)
        raw = r.take(n * _PAGE_ENTRY.size, name)
        out = []
        new, setdict = object.__new__, object.__setattr__
        for address, raw_status in _PAGE_ENTRY.iter_unpack(raw):
            status = _PAGE_STATUS.get(raw_status)
            if status is None:
                raise WireError(f"{r.what}: unknown page status {raw_status}")
            if address & _PAGE_MASK:
                PageEntry(address, status)  # raises: not aligned
            # checked as PageEntry's own spec would (a u64, aligned; a PageStatus): one
            # object per page, so it is made without running the checks again
            entry = new(PageEntry)
            setdict(entry, "__dict__", {"address": address, "status": status})
            out.append(entry)
        return tuple(out)


def _present(pages: tuple[PageEntry, ...]) -> list[int]:
    return [p.address for p in pages if p.status is PageStatus.PRESENT]


@message(0x31)
class PagesReply(Message):
    """Hypervisor -> enclave (sealed index) for ReadPages."""

    pages: tuple[PageEntry, ...] = spec(PageEntries())

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return _present(self.pages)


@message(0x32)
class ListReply(Message):
    """Hypervisor -> enclave (sealed index) for FollowList: entries in list order."""

    entries: tuple[int, ...] = spec(U64s(MAX_LIST_NODES, "entry"))
    end: ListEnd = enum(ListEnd, label="list end")
    pages: tuple[PageEntry, ...] = spec(PageEntries())

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return _present(self.pages)


@message(0x33)
class VmcoreinfoReply(Message):
    """Hypervisor -> enclave (sealed): every VMCOREINFO ELF note found in guest RAM.

    A hostile guest can plant copies, so the hypervisor does not choose: the enclave
    keeps the note the kernel's own ``vmcoreinfo_note`` pointer names
    (``sgmonitor.kernel.kallsyms.genuine_vmcoreinfo``).
    """

    notes: tuple[bytes, ...] = spec(
        Seq(Blob(MAX_VMCOREINFO_NOTE), MAX_VMCOREINFO_NOTES, item_name="note")
    )


@record()
class VcpuRegisters(Record):
    """Control registers of one vCPU."""

    index: int = u16()
    cr0: int = u64()
    cr3: int = u64()
    cr4: int = u64()
    efer: int = u64()


@message(0x34)
class RegistersReply(Message):
    """Hypervisor -> enclave (sealed): each vCPU's control registers."""

    vcpus: tuple[VcpuRegisters, ...] = spec(Seq(Nested(VcpuRegisters), MAX_VCPUS))


@message(0x35)
class Ack(Message):
    """Hypervisor -> enclave (sealed): BeginScan or EndScan done; ``paused`` says whether
    the guest's vCPUs are stopped now."""

    paused: bool = flag(default=False)


@message(0x3F)
class RequestFailed(Message):
    """Hypervisor -> enclave (sealed): the request was refused; authenticated, unlike Error."""

    code: ErrorCode = enum(ErrorCode, 16, "error code")
    message: str = text(MAX_ERROR_TEXT, default="")


_BATCH_REPLIES: tuple[type[Message], ...] = (
    PagesReply,
    ListReply,
    Ack,
    RegistersReply,
    RequestFailed,
)


@message(0x36)
class BatchReply(Message):
    """Hypervisor -> enclave (sealed index) for Batch: one reply per request, in order
    (each a PagesReply, ListReply, Ack, RegistersReply or RequestFailed). The sealed
    pages of all of them follow, in reply order."""

    replies: tuple[Message, ...] = spec(
        Messages(_BATCH_REPLIES, MAX_BATCH, MAX_SEALED_REPLY, "reply")
    )

    def _check(self) -> None:
        if not self.replies:
            self._fail("no replies")
        entries = sum(len(m.pages) for m in self.replies if isinstance(m, PagesReply | ListReply))
        if entries > MAX_REPLY_PAGES:
            self._fail(f"{entries} page entries, limit {MAX_REPLY_PAGES}")

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return [
            a for m in self.replies if isinstance(m, PagesReply | ListReply) for a in m.present()
        ]


# --- enclave boundary (ECALL / OCALL) -----------------------------------------------

_VALUE_UINT, _VALUE_BYTES, _VALUE_STR = 1, 2, 3


class Values(Codec):
    """Tagged ECALL/OCALL values (``u8 count``, then ``1`` u64, ``2`` bytes or ``3`` str
    each), at most ``MAX_CALL_ARGS``."""

    size, types = 1, tuple
    _UINT, _BYTES, _TEXT = UInt(64), Blob(MAX_CALL_VALUE), Text(MAX_CALL_VALUE)

    def check(self, msg: str, name: str, v: Any) -> None:
        _tuple(msg, name, v, MAX_CALL_ARGS, (int, bytes, str))
        for x in v:
            codec = (
                self._UINT
                if isinstance(x, int)
                else self._BYTES
                if isinstance(x, bytes)
                else self._TEXT
            )
            codec.check(msg, name, x)

    def put(self, w: _Writer, v: tuple[Value, ...]) -> None:
        w.u8(len(v))
        for x in v:
            if isinstance(x, int):
                w.u8(_VALUE_UINT)
                w.u64(x)
            elif isinstance(x, bytes):
                w.u8(_VALUE_BYTES)
                w.blob(x)
            else:
                w.u8(_VALUE_STR)
                w.text(x)

    def get(self, r: _Reader, name: str) -> tuple[Value, ...]:
        n = r.u8(f"{name} count")
        if n > MAX_CALL_ARGS:
            raise WireError(f"{r.what}: {n} {name}, limit {MAX_CALL_ARGS}")
        out: list[Value] = []
        for _ in range(n):
            tag = r.u8("value tag")
            if tag == _VALUE_UINT:
                out.append(r.u64(name))
            elif tag == _VALUE_BYTES:
                out.append(r.blob(name, MAX_CALL_VALUE))
            elif tag == _VALUE_STR:
                out.append(r.text(name, MAX_CALL_VALUE))
            else:
                raise WireError(f"{r.what}: unknown value tag {tag}")
        return tuple(out)


@message(0x41)
class Call(Message):
    """An ECALL (library -> enclave) or OCALL (enclave -> library); see tee/edl.py."""

    call_id: int = u64()
    direction: CallDirection = enum(CallDirection, label="call direction")
    name: str = text(MAX_CALL_NAME, nonempty=True)
    args: tuple[Value, ...] = spec(Values(), default=())


@message(0x42)
class Return(Message):
    """The results of the call with the same ``call_id``."""

    call_id: int = u64()
    results: tuple[Value, ...] = spec(Values(), default=())


@message(0x43)
class CallFailed(Message):
    """The call with the same ``call_id`` failed; ``message`` is for logs."""

    call_id: int = u64()
    code: ErrorCode = enum(ErrorCode, 16, "error code")
    message: str = text(MAX_ERROR_TEXT, default="")


# --- encode / decode -----------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """``version | type | body``: the bytes a frame carries after its length prefix."""
    if type(msg) not in _REGISTRY.values():
        raise WireError(f"not a wire message: {type(msg).__name__}")
    w = _Writer()
    w.u8(WIRE_VERSION)
    w.u8(msg.TYPE)
    msg._put(w)
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
    msg = cls._get(r)
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
