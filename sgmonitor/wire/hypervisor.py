"""Opening and closing hypervisor sessions (untrusted library <-> hypervisor service),
in the clear: Hello, HelloReply, OpenSession, SessionOpened, CloseSession,
SessionClosed. The sealed exchange within a session is :mod:`sgmonitor.wire.sealed`;
refusals are the shared ``Error``. Neither the enclave nor its measurement contains
this module: the library opens sessions with what ``ecall_open_session`` returns."""

from __future__ import annotations

from sgmonitor.channel import HV_NONCE_LEN, MAX_VM_NAME, SESSION_ID_LEN, Suite
from sgmonitor.wire.core import (
    HV_KEY_LEN,
    MAX_STATEMENT,
    MAX_WRAPPED_KEY,
    EnumOf,
    Message,
    Seq,
    blob,
    enum,
    fixed,
    message,
    spec,
    text,
)

__all__ = [
    "HV_NONCE_LEN",
    "CloseSession",
    "Hello",
    "HelloReply",
    "OpenSession",
    "SessionClosed",
    "SessionOpened",
]


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
