"""The monitor link's crypto: sealed reports in order, heartbeat MACs, the key schedule;
and the JSON lines the monitor writes reports to, and reading them while it appends."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.attestation.policy import Policy
from sgmonitor.channel import InvalidSeal
from sgmonitor.local import read_json_lines
from sgmonitor.monitor.service import MonitorConfig, MonitorService, _Link
from sgmonitor.monitorlink import (
    LinkKeys,
    ReportOpener,
    ReportProblem,
    ReportRejected,
    ReportSealer,
    check_heartbeat,
    heartbeat_mac,
)
from sgmonitor.wire.core import decode
from sgmonitor.wire.monitor import ReportAck, SealedReport

KEY, LINK, NONCE = bytes(range(32)), bytes(range(16)), bytes(range(32, 64))


def pair(ids: str = "web") -> tuple[ReportSealer, ReportOpener]:
    keys = LinkKeys.derive(KEY, LINK, NONCE)
    return ReportSealer(keys, ids), ReportOpener(keys, ids)


def test_reports_in_order_open() -> None:
    sealer, opener = pair()
    for i in range(3):
        seq, sealed = sealer.seal(f"report {i}".encode())
        assert seq == i and b"report" not in sealed
        assert opener.open(seq, sealed) == (f"report {i}".encode(), 0)


def rejected(opener: ReportOpener, seq: int, sealed: bytes) -> ReportProblem:
    with pytest.raises(ReportRejected) as caught:
        opener.open(seq, sealed)
    return caught.value.problem


def test_replayed_edited_and_moved_reports_are_rejected() -> None:
    sealer, opener = pair()
    first = sealer.seal(b"a")
    opener.open(*first)
    assert rejected(opener, *first) is ReportProblem.REPLAYED
    seq, sealed = sealer.seal(b"b")
    edited = bytes([sealed[0] ^ 1]) + sealed[1:]
    assert rejected(opener, seq, edited) is ReportProblem.FORGED
    assert rejected(opener, seq + 1, sealed) is ReportProblem.FORGED  # renumbered
    other_ids = pair("db")[1]
    other_ids.expected = seq
    assert rejected(other_ids, seq, sealed) is ReportProblem.FORGED  # another IDS's link
    assert opener.open(seq, sealed) == (b"b", 0)  # the genuine one still opens


def test_a_dropped_report_is_counted_and_the_next_accepted() -> None:
    sealer, opener = pair()
    sealer.seal(b"lost")
    sealer.seal(b"lost too")
    seq, sealed = sealer.seal(b"kept")
    assert opener.open(seq, sealed) == (b"kept", 2)


def test_fresh_monitor_nonce_gives_fresh_keys() -> None:
    a = LinkKeys.derive(KEY, LINK, NONCE)
    b = LinkKeys.derive(KEY, LINK, os.urandom(32))
    assert a.report_key != b.report_key and a.heartbeat_key != b.heartbeat_key
    assert KEY.hex() not in repr(a)


def test_heartbeat_mac_binds_challenge_sequence_and_progress() -> None:
    keys = LinkKeys.derive(KEY, LINK, NONCE)
    challenge = os.urandom(32)
    mac = heartbeat_mac(keys, challenge, 3, 7)
    check_heartbeat(keys, challenge, 3, 7, mac)
    for args in ((os.urandom(32), 3, 7), (challenge, 4, 7), (challenge, 3, 8)):
        with pytest.raises(InvalidSeal):
            check_heartbeat(keys, *args, mac)
    with pytest.raises(InvalidSeal):
        check_heartbeat(LinkKeys.derive(os.urandom(32), LINK, NONCE), challenge, 3, 7, mac)


def test_a_half_written_json_line_is_left_for_the_next_read(tmp_path: Path) -> None:
    """The monitor appends a report of a few hundred processes in more than one write: a
    reader must not parse the line before its newline is there."""
    path = tmp_path / "reports.jsonl"
    assert read_json_lines(path) == []
    whole = json.dumps({"seq": 0, "report": {"records": [[1, "init"]] * 2000}})
    with path.open("w") as stream:
        stream.write(whole + "\n")
        stream.write(whole[:8192])
        stream.flush()
        assert read_json_lines(path) == [json.loads(whole)]
        stream.write(whole[8192:] + "\n")
        stream.flush()
        assert read_json_lines(path) == [json.loads(whole)] * 2


def test_the_monitor_stores_each_report_on_one_line_and_acknowledges_it(tmp_path: Path) -> None:
    """The monitor stores the report's own text (it no longer dumps it again): still one
    line when that JSON has line breaks between its tokens; then it acknowledges it."""
    config = MonitorConfig(
        listen="127.0.0.1:0",
        key=tmp_path / "monitor.pem",
        verifier_key=Ed25519PrivateKey.generate().public_key(),
        policy=Policy(frozenset({bytes(32)}), frozenset()),
    )
    stored = io.StringIO()
    service = MonitorService(config, X25519PrivateKey.generate(), out=io.StringIO(), reports=stored)
    ours, theirs = socket.socketpair()
    keys = LinkKeys.derive(KEY, LINK, NONCE)
    link = _Link(ours, "test", ids="web", link_id=LINK, keys=keys, opener=ReportOpener(keys, "web"))
    sealer = ReportSealer(keys, "web")
    report = {"vm": "guest", "records": [[1, "init\nname"], [2, "kthreadd"]], "findings": []}
    text = json.dumps(report, indent=1)  # line breaks between tokens, one escaped in a string
    assert "\n" in text and text.count("\n") > 3
    service._report(link, SealedReport(*sealer.seal(text.encode())))
    lines = stored.getvalue().split("\n")
    assert len(lines) == 2 and lines[1] == ""
    assert json.loads(lines[0]) == {"ids": "web", "link": LINK.hex(), "seq": 0, "report": report}
    assert decode(theirs.recv(1024)[4:]) == ReportAck(0)
    ours.close()
    theirs.close()
