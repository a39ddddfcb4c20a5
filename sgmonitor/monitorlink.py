"""The link between the enclave and the remote monitor: sealed reports, heartbeat MACs.

The enclave makes the link key and wraps it for the monitor's X25519 key, which its
launch configuration names (``keywrap``, with the link id and the IDS name as context);
the monitor accepts the key only with the verifier's statement for that link
(``sgmonitor.statement``, purpose MONITOR_LINK). Both sides then derive, with the
monitor's fresh nonce as salt (so a replayed link never repeats a key):

- the **report key** (AES-256-GCM, enclave -> monitor). Report ``n`` is sealed under
  nonce ``n`` with associated data ``version | link id | seq | IDS name``; the monitor
  opens report ``n`` only as the next after ``n - 1``, so a dropped, reordered,
  replayed or edited report is seen (:class:`ReportOpener` says which);
- the **heartbeat key** (HMAC-SHA256): the answer to a challenge is
  ``HMAC(key, label | link id | challenge | enclave sequence | progress)``, where the
  enclave counts its answers and ``progress`` is the number of scans it completed, so a
  live heartbeat beside a frozen scan loop shows, and an old answer can't be replayed.

Any forgery raises the message-less :class:`~sgmonitor.channel.InvalidSeal`.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgmonitor.channel import KEY_LEN, InvalidSeal
from sgmonitor.errors import SGMonitorError

__all__ = [
    "CHALLENGE_LEN",
    "LINK_ID_LEN",
    "MAC_LEN",
    "LinkKeys",
    "ReportOpener",
    "ReportProblem",
    "ReportRejected",
    "ReportSealer",
    "check_heartbeat",
    "heartbeat_mac",
]

LINK_ID_LEN = 16
CHALLENGE_LEN = 32
MAC_LEN = 32
_VERSION = 1
_LABEL = b"sgmonitor/v1 monitor link "
_MAC_LABEL = b"sgmonitor/v1 heartbeat\0"
_MAX_REPORTS = 2**32  # AES-GCM usage bound per key, as for the channel


class ReportProblem(StrEnum):
    """Why a report was not accepted (the monitor's alert says it)."""

    DROPPED = "dropped"  # a later report came first: one or more are missing
    REPLAYED = "replayed"  # a sequence number seen already
    FORGED = "forged"  # did not authenticate (edited, or not from this link)


class ReportRejected(SGMonitorError):
    """A report the monitor did not accept, and why."""

    def __init__(self, problem: ReportProblem, expected: int, got: int) -> None:
        super().__init__(f"report {problem.value}: expected sequence {expected}, got {got}")
        self.problem = problem
        self.expected = expected
        self.got = got


@dataclass(frozen=True, repr=False)
class LinkKeys:
    """The two keys of one monitor link."""

    link_id: bytes
    report_key: bytes
    heartbeat_key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"LinkKeys(link_id={self.link_id.hex()})"

    @classmethod
    def derive(cls, link_key: bytes, link_id: bytes, monitor_nonce: bytes) -> LinkKeys:
        """HKDF-SHA256(ikm=link key, salt=link id | monitor nonce, info=label | purpose)."""
        if len(link_key) != KEY_LEN or len(link_id) != LINK_ID_LEN or len(monitor_nonce) != 32:
            raise ValueError("link key, link id or monitor nonce has the wrong length")

        def one(purpose: bytes) -> bytes:
            hkdf = HKDF(
                hashes.SHA256(), KEY_LEN, salt=link_id + monitor_nonce, info=_LABEL + purpose
            )
            return hkdf.derive(link_key)

        return cls(link_id, one(b"report"), one(b"heartbeat"))


def _report_ad(keys: LinkKeys, seq: int, ids: str) -> bytes:
    return struct.pack(">B16sQ", _VERSION, keys.link_id, seq) + ids.encode("utf-8")


def _nonce(seq: int) -> bytes:
    return bytes(4) + seq.to_bytes(8, "big")


class ReportSealer:
    """The enclave's end: seals reports 0, 1, 2, ... for the monitor."""

    def __init__(self, keys: LinkKeys, ids: str) -> None:
        self._keys, self._ids = keys, ids
        self._aead = AESGCM(keys.report_key)
        self.next_seq = 0

    def seal(self, report: bytes) -> tuple[int, bytes]:
        """(sequence number, ciphertext | tag) of the next report."""
        seq = self.next_seq
        if seq >= _MAX_REPORTS:
            raise SGMonitorError("monitor link exhausted: open a new one")
        self.next_seq += 1
        return seq, self._aead.encrypt(_nonce(seq), report, _report_ad(self._keys, seq, self._ids))


class ReportOpener:
    """The monitor's end: opens each report exactly once, in order."""

    def __init__(self, keys: LinkKeys, ids: str) -> None:
        self._keys, self._ids = keys, ids
        self._aead = AESGCM(keys.report_key)
        self.expected = 0

    def open(self, seq: int, sealed: bytes) -> tuple[bytes, int]:
        """(the report, how many reports before it never came). :class:`ReportRejected`
        for a replayed or forged one. A genuine later report is accepted: the ones
        skipped are gone (dropped), which the caller reports."""
        if not 0 <= seq < _MAX_REPORTS:
            raise ReportRejected(ReportProblem.FORGED, self.expected, seq)
        if seq < self.expected:
            raise ReportRejected(ReportProblem.REPLAYED, self.expected, seq)
        try:
            plain = self._aead.decrypt(_nonce(seq), sealed, _report_ad(self._keys, seq, self._ids))
        except (InvalidTag, ValueError):
            raise ReportRejected(ReportProblem.FORGED, self.expected, seq) from None
        dropped, self.expected = seq - self.expected, seq + 1
        return plain, dropped


def heartbeat_mac(keys: LinkKeys, challenge: bytes, sequence: int, progress: int) -> bytes:
    """The enclave's answer to ``challenge`` (the monitor recomputes and compares)."""
    if len(challenge) != CHALLENGE_LEN:
        raise ValueError(f"challenge must be {CHALLENGE_LEN} bytes")
    message = _MAC_LABEL + keys.link_id + challenge + struct.pack(">QQ", sequence, progress)
    return hmac.new(keys.heartbeat_key, message, "sha256").digest()


def check_heartbeat(
    keys: LinkKeys, challenge: bytes, sequence: int, progress: int, mac: bytes
) -> None:
    """Raise :class:`InvalidSeal` unless ``mac`` answers ``challenge`` for this link."""
    if not hmac.compare_digest(heartbeat_mac(keys, challenge, sequence, progress), mac):
        raise InvalidSeal()
