"""The enclave interface, declared once (like an SGX EDL file).

Each call has a name, a direction (ECALL into the enclave, OCALL out of it), and the
names and shapes of its arguments and results. The untrusted host checks every ECALL
it makes and every OCALL it serves against this table; the enclave checks every ECALL
it receives and every OCALL result it gets back. A call outside the table, with the
wrong direction, arity or shape, raises :class:`EdlError` on either side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sgmonitor.errors import SGMonitorError
from sgmonitor.wire.calls import MAX_CALL_VALUE, Call, CallDirection, Value

__all__ = [
    "CALLS",
    "ECALL",
    "OCALL",
    "CallSpec",
    "EdlError",
    "Param",
    "Shape",
    "check_call",
    "check_results",
    "make_call",
    "named_args",
    "named_results",
    "spec",
]

ECALL = CallDirection.ECALL
OCALL = CallDirection.OCALL


class EdlError(SGMonitorError):
    """A call that the enclave interface does not declare, or with wrong arguments."""


@dataclass(frozen=True)
class Shape:
    """A value's type and size: ``u64``, or ``bytes``/``str`` with a maximum (or exact) size."""

    kind: Literal["u64", "bytes", "str"]
    max_len: int = 0
    exact_len: int | None = None

    def check(self, where: str, value: object) -> None:
        """Raise :class:`EdlError` unless ``value`` has this shape."""
        if self.kind == "u64":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
                raise EdlError(f"{where}: expected u64, got {type(value).__name__}")
            return
        expected = bytes if self.kind == "bytes" else str
        if not isinstance(value, expected):
            raise EdlError(f"{where}: expected {self.kind}, got {type(value).__name__}")
        size = len(value.encode("utf-8")) if isinstance(value, str) else len(value)
        if self.exact_len is not None and size != self.exact_len:
            raise EdlError(f"{where}: expected exactly {self.exact_len} bytes, got {size}")
        if size > self.max_len:
            raise EdlError(f"{where}: {size} bytes exceeds {self.max_len}")


def u64() -> Shape:
    """An unsigned 64-bit integer."""
    return Shape("u64")


def blob(max_len: int) -> Shape:
    """Bytes of at most ``max_len``."""
    return Shape("bytes", max_len)


def fixed(size: int) -> Shape:
    """Bytes of exactly ``size``."""
    return Shape("bytes", size, size)


def text(max_len: int) -> Shape:
    """UTF-8 text of at most ``max_len`` bytes."""
    return Shape("str", max_len)


@dataclass(frozen=True)
class Param:
    """One named argument or result."""

    name: str
    shape: Shape


@dataclass(frozen=True)
class CallSpec:
    """One ECALL or OCALL."""

    name: str
    direction: CallDirection
    params: tuple[Param, ...]
    results: tuple[Param, ...]
    doc: str


def _p(**shapes: Shape) -> tuple[Param, ...]:
    return tuple(Param(n, s) for n, s in shapes.items())


CALLS: tuple[CallSpec, ...] = (
    CallSpec(
        "ecall_open_session",
        ECALL,
        _p(
            vm=text(64),
            hv_nonce=fixed(32),
            hv_key=fixed(32),
            hv_endorsement=blob(1024),
            verifier_nonce=fixed(32),
        ),
        _p(session_id=fixed(16), suite=u64(), wrapped_key=blob(1024), evidence=blob(64 * 1024)),
        "Check the verifier's endorsement of hv_key, make a fresh session key for vm, wrap "
        "it for hv_key, and return evidence whose report data binds that session, hv_nonce "
        "and the verifier's nonce (domain-separated: no caller-chosen report data).",
    ),
    CallSpec(
        "ecall_close_session",
        ECALL,
        _p(vm=text(64)),
        (),
        "Forget vm's session keys and cached pages.",
    ),
    CallSpec(
        "ecall_open_monitor_link",
        ECALL,
        _p(ids=text(64), monitor_nonce=fixed(32), verifier_nonce=fixed(32)),
        _p(link_id=fixed(16), wrapped_key=blob(1024), evidence=blob(64 * 1024)),
        "Make a fresh link key for the remote monitor its launch configuration names, wrap "
        "it for that monitor, and return evidence binding the link (purpose MONITOR_LINK).",
    ),
    CallSpec(
        "ecall_run_scan",
        ECALL,
        _p(vm=text(64), check=text(1024), options=blob(64 * 1024)),
        _p(report_seq=u64(), report=blob(8 * 1024 * 1024), stats=blob(64 * 1024)),
        "Run one IDS check over vm (page cache invalidated first). The report (records, "
        "findings) is sealed for the remote monitor; only the scan's status and counters "
        "come back in the clear.",
    ),
    CallSpec(
        "ecall_heartbeat",
        ECALL,
        _p(challenge=fixed(32)),
        _p(sequence=u64(), progress=u64(), mac=fixed(32)),
        "Answer the remote monitor's challenge: HMAC over it, the enclave's own answer "
        "count and its progress counter (scans completed).",
    ),
    CallSpec(
        "ocall_hv_exchange",
        OCALL,
        _p(frame=blob(MAX_CALL_VALUE), timeout_ms=u64()),
        _p(frame=blob(MAX_CALL_VALUE), shared=u64()),
        "Send one opaque, encoded wire message to the hypervisor service and return its "
        "answer. The host relays it without understanding the sealed contents. The "
        "answer comes in ``frame``, or (``shared`` > 0) as the first ``shared`` bytes of "
        "the untrusted buffer the host shares with the enclave, which the enclave copies "
        "out once before reading it.",
    ),
    CallSpec(
        "ocall_log",
        OCALL,
        _p(level=u64(), message=text(4096)),
        (),
        "A log line for the host's log. The enclave must not put guest data in it.",
    ),
)

_BY_NAME: dict[str, CallSpec] = {c.name: c for c in CALLS}
assert len(_BY_NAME) == len(CALLS)


def spec(name: str, direction: CallDirection | None = None) -> CallSpec:
    """The declaration of ``name``; :class:`EdlError` if unknown or in the other direction."""
    found = _BY_NAME.get(name)
    if found is None:
        raise EdlError(f"no such call: {name!r}")
    if direction is not None and found.direction is not direction:
        raise EdlError(f"{name} is an {found.direction.name}, not an {direction.name}")
    return found


def _check(where: str, params: tuple[Param, ...], values: tuple[Value, ...]) -> None:
    if len(values) != len(params):
        names = ", ".join(p.name for p in params) or "nothing"
        raise EdlError(f"{where}: expected {len(params)} values ({names}), got {len(values)}")
    for p, v in zip(params, values, strict=True):
        p.shape.check(f"{where}.{p.name}", v)


def check_call(call: Call, direction: CallDirection) -> CallSpec:
    """Validate an incoming or outgoing call against the table."""
    found = spec(call.name, direction)
    if call.direction is not direction:
        raise EdlError(f"{call.name}: sent as {call.direction.name}")
    _check(call.name, found.params, call.args)
    return found


def check_results(found: CallSpec, results: tuple[Value, ...]) -> None:
    """Validate a call's results against the table."""
    _check(f"{found.name} results", found.results, results)


def make_call(call_id: int, name: str, **args: Value) -> Call:
    """Build a checked :class:`Call` from keyword arguments in declaration order."""
    found = spec(name)
    missing = [p.name for p in found.params if p.name not in args]
    extra = sorted(set(args) - {p.name for p in found.params})
    if missing or extra:
        raise EdlError(f"{name}: missing {missing}, unexpected {extra}")
    call = Call(call_id, found.direction, name, tuple(args[p.name] for p in found.params))
    check_call(call, found.direction)
    return call


def named_args(found: CallSpec, call: Call) -> Mapping[str, Value]:
    """A checked call's arguments by name."""
    _check(found.name, found.params, call.args)
    return {p.name: v for p, v in zip(found.params, call.args, strict=True)}


def named_results(found: CallSpec, results: tuple[Value, ...]) -> Mapping[str, Value]:
    """A call's checked results by name."""
    check_results(found, results)
    return {p.name: v for p, v in zip(found.results, results, strict=True)}
