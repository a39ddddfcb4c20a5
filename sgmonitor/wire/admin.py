"""The hypervisor service's administration socket (operator <-> ``SOCKET.admin``):
Revoke, Revoked."""

from __future__ import annotations

from enum import IntEnum

from sgmonitor.channel import SESSION_ID_LEN
from sgmonitor.wire.core import Message, blob, check_bytes, enum, message, u32

__all__ = ["Revoke", "RevokeKind", "Revoked"]


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
        check_bytes(type(self).__name__, "value", self.value, size, exact=size)


@message(0x62)
class Revoked(Message):
    """Hypervisor service -> operator: the revocation holds; how many sessions it ended."""

    sessions_closed: int = u32()
