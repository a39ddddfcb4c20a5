"""The core of the wire format: framing, the declarative field spec, the messages every
link shares (``Error``), the registry behind :func:`decode`, and stream-socket I/O.

A frame on a stream socket is::

    length u32 | version u8 | type u8 | body          (length counts version..body)

All integers are big-endian; byte strings and text are ``u32 length | bytes``; lists are
``u32 count | items``. Each message declares each field once, as a codec
(``vm: str = text(MAX_VM_NAME, nonempty=True)``): the codec checks the value when the
message is constructed, writes it and reads it back, so ``encode`` and ``decode`` are
mirror images and the same limits hold whether a message is built locally or parsed
from a peer. Rules that tie fields together live in the class's ``_check``. Any
malformed, truncated, oversized or unexpected input raises :class:`WireError` with a
message saying what was wrong, after bounded work. The catalogue and the limits are
documented in docs/protocol.md.

The messages are declared by family, one module each, and a family registers its types
when it is imported (:func:`decode` knows only the families its process imported):

- :mod:`sgmonitor.wire.sealed`: the enclave <-> hypervisor exchange the enclave frames
  itself (Request, Reply) and the sealed bodies inside it;
- :mod:`sgmonitor.wire.calls`: the enclave boundary (Call, Return, CallFailed);
- :mod:`sgmonitor.wire.hypervisor`: opening and closing hypervisor sessions (library
  <-> hypervisor service);
- :mod:`sgmonitor.wire.attestation`: the attestation link (library <-> verifier);
- :mod:`sgmonitor.wire.monitor`: the monitor link (library <-> remote monitor);
- :mod:`sgmonitor.wire.admin`: the hypervisor service's admin socket.

The enclave measures and imports only this module, ``sealed`` and ``calls``
(``sgmonitor.tee.boot.ENCLAVE_SOURCES``).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, NoReturn, Self, TypeVar, dataclass_transform, overload

from sgmonitor.errors import SGMonitorError

__all__ = [
    "HV_KEY_LEN",
    "MAX_ENCLAVE_CONFIG",
    "MAX_ERROR_TEXT",
    "MAX_FRAME",
    "MAX_STATEMENT",
    "MAX_WRAPPED_KEY",
    "SESSION_ID_LEN",
    "TAG_LEN",
    "U32",
    "U64_END",
    "WIRE_VERSION",
    "Blob",
    "BlobView",
    "Codec",
    "ConnectionClosed",
    "EnumOf",
    "Error",
    "ErrorCode",
    "Fixed",
    "Flag",
    "Message",
    "Messages",
    "Nested",
    "Reader",
    "Record",
    "Seq",
    "ShortFixed",
    "Text",
    "U64s",
    "UInt",
    "WireError",
    "WireTimeout",
    "Writer",
    "blob",
    "check_aligned",
    "check_bytes",
    "check_text",
    "check_tuple",
    "check_uint",
    "connect",
    "decode",
    "encode",
    "enum",
    "fixed",
    "flag",
    "framed",
    "message",
    "parse_address",
    "pop_frame",
    "record",
    "recv_encoded",
    "recv_frame",
    "send_encoded",
    "send_frame",
    "spec",
    "text",
    "u8",
    "u16",
    "u32",
    "u64",
]

# Sizes the sealed channel (sgmonitor/channel.py) fills and the messages carry. They
# live here, not there, so that reading the wire (a kernel list helper, the traditional
# path) does not import the cryptography.
SESSION_ID_LEN = 16
TAG_LEN = 16  # AES-GCM's tag

WIRE_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024  # bytes after the length prefix
MAX_WRAPPED_KEY = 1024
MAX_STATEMENT = 64 * 1024
MAX_ENCLAVE_CONFIG = 16 * 1024
MAX_ERROR_TEXT = 1024
HV_KEY_LEN = 32  # a raw X25519 public key (the hypervisor's, the monitor's)
U64_END = 2**64
U32 = struct.Struct(">I")


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


# --- byte-level reader and writer ---------------------------------------------------


class Writer:
    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []

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


class Reader:
    def __init__(self, data: bytes, what: str, pos: int = 0) -> None:
        # No copy: fields are copied out one by one, or are views (BlobView) of
        # ``data``, which must therefore be immutable bytes (decode sees to it).
        self.data = memoryview(data)
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

    def blob_view(self, field: str, limit: int) -> memoryview:
        """:meth:`blob` as a view of the message (megabytes of sealed pages are opened
        where they are, not copied out first): :func:`decode` parses immutable bytes
        only, copying a mutable buffer first, so the view cannot change."""
        n = self.u32(field)
        if n > limit:
            raise WireError(f"{self.what}: {field} is {n} bytes, limit {limit}")
        end = self.pos + n
        if end > len(self.data):
            self.take(n, field)  # raises: truncated
        out = self.data[self.pos : end]
        self.pos = end
        return out

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


def check_uint(msg: str, field: str, v: object, bits: int = 64) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**bits:
        raise WireError(f"{msg}: {field} must be an unsigned {bits}-bit integer, got {v!r}")


def check_bytes(msg: str, field: str, v: object, limit: int, exact: int | None = None) -> None:
    if not isinstance(v, bytes):
        raise WireError(f"{msg}: {field} must be bytes")
    if exact is not None and len(v) != exact:
        raise WireError(f"{msg}: {field} must be {exact} bytes, got {len(v)}")
    if len(v) > limit:
        raise WireError(f"{msg}: {field} is {len(v)} bytes, limit {limit}")


def check_text(msg: str, field: str, v: object, limit: int, nonempty: bool = False) -> None:
    if not isinstance(v, str):
        raise WireError(f"{msg}: {field} must be str")
    try:
        n = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise WireError(f"{msg}: {field} is not encodable as UTF-8") from None
    if n > limit or (nonempty and n == 0):
        raise WireError(f"{msg}: {field} must be {int(nonempty)}..{limit} UTF-8 bytes")


def check_tuple(msg: str, field: str, v: object, limit: int, item: type | tuple[type, ...]) -> None:
    if not isinstance(v, tuple):
        raise WireError(f"{msg}: {field} must be a tuple")
    if len(v) > limit:
        raise WireError(f"{msg}: {len(v)} {field}, limit {limit}")
    for x in v:
        if not isinstance(x, item) or isinstance(x, bool):
            raise WireError(f"{msg}: {field} holds a {type(x).__name__}")


def check_aligned(msg: str, field: str, v: int, align: int) -> None:
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

    def put(self, w: Writer, v: Any) -> None:
        raise NotImplementedError

    def get(self, r: Reader, name: str) -> Any:
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
        check_uint(msg, name, v, self.bits)
        if self.align:
            check_aligned(msg, name, v, self.align)

    def put(self, w: Writer, v: int) -> None:
        w.parts.append(self.pack.pack(v))

    def get(self, r: Reader, name: str) -> int:
        return int(self.pack.unpack(r.take(self.size, name))[0])


class Flag(Codec):
    """A bool as one byte, 0 or 1."""

    size, types = 1, bool

    def check(self, msg: str, name: str, v: Any) -> None:
        if not isinstance(v, bool):
            raise WireError(f"{msg}: {name} must be a bool")

    def put(self, w: Writer, v: bool) -> None:
        w.u8(int(v))

    def get(self, r: Reader, name: str) -> bool:
        return r.flag(name)


class EnumOf(Codec):
    """An IntEnum member as an unsigned integer; ``label`` names it in decode errors."""

    def __init__(self, cls: type[IntEnum], bits: int = 8, label: str | None = None) -> None:
        self.types, self.enum_class, self.label = cls, cls, label
        self.int = UInt(bits)
        self.size = self.int.size

    def check(self, msg: str, name: str, v: Any) -> None:
        if not isinstance(v, self.types):
            raise WireError(f"{msg}: {name} must be a {self.enum_class.__name__}")

    def put(self, w: Writer, v: IntEnum) -> None:
        self.int.put(w, v)

    def get(self, r: Reader, name: str) -> IntEnum:
        return r.enum(self.enum_class, self.label or name, self.int.get(r, name))


class Fixed(Codec):
    """Exactly ``n`` bytes, no length on the wire."""

    types = bytes

    def __init__(self, n: int) -> None:
        self.size = n

    def check(self, msg: str, name: str, v: Any) -> None:
        check_bytes(msg, name, v, self.size, exact=self.size)

    def put(self, w: Writer, v: bytes) -> None:
        w.parts.append(v)

    def get(self, r: Reader, name: str) -> bytes:
        return r.take(self.size, name)


class Blob(Codec):
    """``u32 length | bytes``, at most ``limit`` bytes."""

    size, types = 4, bytes

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def check(self, msg: str, name: str, v: Any) -> None:
        check_bytes(msg, name, v, self.limit)

    def put(self, w: Writer, v: bytes) -> None:
        w.blob(v)

    def get(self, r: Reader, name: str) -> bytes:
        return r.blob(name, self.limit)


class BlobView(Blob):
    """A :class:`Blob` decoded as a view of the message (:meth:`Reader.blob_view`)."""

    types = (bytes, memoryview)  # type: ignore[assignment]

    def check(self, msg: str, name: str, v: Any) -> None:
        if isinstance(v, memoryview):  # a view of a decoded message: bytes by construction
            if len(v) > self.limit:
                raise WireError(f"{msg}: {name} is {len(v)} bytes, limit {self.limit}")
            return
        check_bytes(msg, name, v, self.limit)

    def get(self, r: Reader, name: str) -> memoryview:  # type: ignore[override]
        return r.blob_view(name, self.limit)


class ShortFixed(Codec):
    """``u8 length | bytes``, the length one of ``lengths`` (e.g. empty or a session id)."""

    size, types = 1, bytes

    def __init__(self, *lengths: int) -> None:
        self.lengths = lengths

    def check(self, msg: str, name: str, v: Any) -> None:
        check_bytes(msg, name, v, max(self.lengths))
        if len(v) not in self.lengths:
            either = " or ".join("empty" if n == 0 else f"{n} bytes" for n in self.lengths)
            raise WireError(f"{msg}: {name} must be {either}")

    def put(self, w: Writer, v: bytes) -> None:
        w.u8(len(v))
        w.parts.append(v)

    def get(self, r: Reader, name: str) -> bytes:
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
        check_text(msg, name, v, self.limit, self.nonempty)

    def put(self, w: Writer, v: str) -> None:
        w.text(v)

    def get(self, r: Reader, name: str) -> str:
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
        check_tuple(msg, name, v, self.limit, self.item.types)
        self.check_items(msg, self.item_name or name, v)

    def check_items(self, msg: str, name: str, items: tuple[Any, ...]) -> None:
        check = self.item.check
        for x in items:
            check(msg, name, x)

    def put(self, w: Writer, v: tuple[Any, ...]) -> None:
        self.count.put(w, len(v))
        put = self.item.put
        for x in v:
            put(w, x)

    def get_count(self, r: Reader, name: str) -> int:
        if self.count.bits == 32:
            return r.count(name, self.limit, self.item.size)
        n = self.count.get(r, f"{name} count")
        if n > self.limit:
            raise WireError(f"{r.what}: {n} {name}, limit {self.limit}")
        return n

    def get(self, r: Reader, name: str) -> tuple[Any, ...]:
        n = self.get_count(r, name)
        get, item_name = self.item.get, self.item_name or name
        return tuple(get(r, item_name) for _ in range(n))


class U64s(Seq):
    """A tuple of u64s, packed and parsed in bulk."""

    def __init__(self, limit: int, item_name: str) -> None:
        super().__init__(UInt(64), limit, item_name=item_name)

    def check_items(self, msg: str, name: str, items: tuple[Any, ...]) -> None:
        if not all(0 <= x < U64_END for x in items):
            super().check_items(msg, name, items)

    def put(self, w: Writer, v: tuple[int, ...]) -> None:
        w.u32(len(v))
        w.parts.append(struct.pack(f">{len(v)}Q", *v))

    def get(self, r: Reader, name: str) -> tuple[int, ...]:
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

    def put(self, w: Writer, v: Any) -> None:
        v._put(w)

    def get(self, r: Reader, name: str) -> Any:
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
        check_tuple(msg, name, v, self.limit, self.types_in)

    def put(self, w: Writer, v: tuple[Message, ...]) -> None:
        w.u32(len(v))
        for m in v:
            w.blob(encode(m))

    def get(self, r: Reader, name: str) -> tuple[Message, ...]:
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

    def _put(self, w: Writer) -> None:
        for name, codec in self._SPEC:
            codec.put(w, getattr(self, name))

    @classmethod
    def _get(cls, r: Reader) -> Self:
        if cls._IN_ORDER:
            return cls(*[codec.get(r, name) for name, codec in cls._SPEC])
        return cls(**{name: codec.get(r, name) for name, codec in cls._SPEC})


_R = TypeVar("_R", bound=type[Record])


@dataclass_transform(
    frozen_default=True,
    field_specifiers=(u8, u16, u32, u64, flag, enum, fixed, blob, text, spec),
)
def record(wire_order: tuple[str, ...] | None = None) -> Callable[[_R], _R]:
    """Make ``cls`` a frozen dataclass whose fields are checked, written and read as
    their codecs say, in declaration order or in ``wire_order`` (when it differs)."""

    def make(cls: _R) -> _R:
        dataclass(frozen=True)(cls)  # in place: the class itself, made a dataclass
        codecs = {f.name: f.metadata[_SPEC_KEY] for f in fields(cls)}  # type: ignore[arg-type]
        names = wire_order if wire_order is not None else tuple(codecs)
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


@dataclass_transform(
    frozen_default=True,
    field_specifiers=(u8, u16, u32, u64, flag, enum, fixed, blob, text, spec),
)
def message(type_byte: int) -> Callable[[_M], _M]:
    """A :func:`record` with a type byte, registered for :func:`decode`."""

    def register(cls: _M) -> _M:
        assert type_byte not in _REGISTRY, f"type {type_byte:#x} registered twice"
        cls = record()(cls)
        cls.TYPE = type_byte
        _REGISTRY[type_byte] = cls
        return cls

    return register


# --- the message every link shares -------------------------------------------------


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


# --- encode / decode -----------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """``version | type | body``: the bytes a frame carries after its length prefix."""
    if type(msg) not in _REGISTRY.values():
        raise WireError(f"not a wire message: {type(msg).__name__}")
    w = Writer()
    w.u8(WIRE_VERSION)
    w.u8(msg.TYPE)
    msg._put(w)
    data = b"".join(w.parts)
    if len(data) > MAX_FRAME:
        raise WireError(f"{type(msg).__name__}: {len(data)} bytes exceeds MAX_FRAME")
    return data


_T = TypeVar("_T", bound=Message)


@overload
def decode(data: bytes) -> Message: ...
@overload
def decode(data: bytes, expect: tuple[type[_T], ...]) -> _T: ...
@overload
def decode(data: bytes, expect: None) -> Message: ...


def decode(data: bytes, expect: tuple[type[Message], ...] | None = None) -> Message:
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
    r = Reader(data, cls.__name__, 2)  # a view past version and type, not a copy
    msg = cls._get(r)
    r.end()
    return msg


# --- stream sockets ------------------------------------------------------------------

_SMALL_FRAME = 64 * 1024


def framed(msg: Message) -> bytes:
    """``msg`` as it goes on a stream: its length, then its encoding (for non-blocking
    senders that buffer frames themselves)."""
    data = encode(msg)
    return U32.pack(len(data)) + data


def pop_frame(buffer: bytearray) -> bytes | None:
    """The next whole frame's encoding, taken off the front of ``buffer`` (None: not all
    of it has arrived). :class:`WireError` for a length out of bounds: the stream is
    out of step, and the caller should drop the connection."""
    if len(buffer) < 4:
        return None
    (length,) = U32.unpack_from(buffer)
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
            sock.sendall(U32.pack(len(data)) + data)
        else:  # a large frame is not copied to prepend its length
            sock.sendall(U32.pack(len(data)))
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
    (length,) = U32.unpack(_recv_exact(sock, 4, deadline, started=False))
    if length < 2 or length > MAX_FRAME:
        raise WireError(f"frame length {length} outside 2..{MAX_FRAME}")
    return _recv_exact(sock, length, deadline, started=True)


@overload
def recv_frame(sock: socket.socket, timeout: float) -> Message: ...
@overload
def recv_frame(sock: socket.socket, timeout: float, expect: tuple[type[_T], ...]) -> _T: ...


def recv_frame(
    sock: socket.socket, timeout: float, expect: tuple[type[Message], ...] | None = None
) -> Message:
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
