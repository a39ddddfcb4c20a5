"""The monitor link (untrusted library <-> remote monitor), in the clear around sealed
reports and MACs, over TCP: LinkHello, LinkChallenge, LinkOpen, LinkOpened,
HeartbeatChallenge, HeartbeatAnswer, SealedReport, ReportAck; refusals are the shared
``Error``. The enclave makes the link's keys, reports and MACs
(``sgmonitor.monitorlink``) but not these messages: the library frames them."""

from __future__ import annotations

from sgmonitor.channel import MAX_VM_NAME, SESSION_ID_LEN
from sgmonitor.wire.core import (
    HV_KEY_LEN,
    MAX_ENCLAVE_CONFIG,
    MAX_STATEMENT,
    MAX_WRAPPED_KEY,
    Message,
    blob,
    fixed,
    message,
    text,
    u64,
)

__all__ = [
    "MAX_REPORT",
    "HeartbeatAnswer",
    "HeartbeatChallenge",
    "LinkChallenge",
    "LinkHello",
    "LinkOpen",
    "LinkOpened",
    "ReportAck",
    "SealedReport",
]

MAX_REPORT = 8 * 1024 * 1024  # one sealed scan report (~100 bytes per process)


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
