"""The enclave boundary (untrusted library <-> enclave process): Call, Return and
CallFailed, carrying the ECALLs and OCALLs declared in ``sgmonitor.tee.edl``."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from sgmonitor.wire.core import (
    MAX_ERROR_TEXT,
    MAX_FRAME,
    Blob,
    Codec,
    ErrorCode,
    Message,
    Reader,
    Text,
    UInt,
    WireError,
    Writer,
    check_tuple,
    enum,
    message,
    spec,
    text,
    u64,
)

__all__ = [
    "MAX_CALL_ARGS",
    "MAX_CALL_NAME",
    "MAX_CALL_VALUE",
    "Call",
    "CallDirection",
    "CallFailed",
    "Return",
    "Value",
]

MAX_CALL_NAME = 64
MAX_CALL_ARGS = 16
MAX_CALL_VALUE = MAX_FRAME - 4096  # an OCALL carries a whole hypervisor frame


class CallDirection(IntEnum):
    """ECALL: untrusted host into the enclave. OCALL: enclave out to the host."""

    ECALL = 1
    OCALL = 2


Value = int | bytes | str

_VALUE_UINT, _VALUE_BYTES, _VALUE_STR = 1, 2, 3


class Values(Codec):
    """Tagged ECALL/OCALL values (``u8 count``, then ``1`` u64, ``2`` bytes or ``3`` str
    each), at most ``MAX_CALL_ARGS``."""

    size, types = 1, tuple
    _UINT, _BYTES, _TEXT = UInt(64), Blob(MAX_CALL_VALUE), Text(MAX_CALL_VALUE)

    def check(self, msg: str, name: str, v: Any) -> None:
        check_tuple(msg, name, v, MAX_CALL_ARGS, (int, bytes, str))
        for x in v:
            codec = (
                self._UINT
                if isinstance(x, int)
                else self._BYTES
                if isinstance(x, bytes)
                else self._TEXT
            )
            codec.check(msg, name, x)

    def put(self, w: Writer, v: tuple[Value, ...]) -> None:
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

    def get(self, r: Reader, name: str) -> tuple[Value, ...]:
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
