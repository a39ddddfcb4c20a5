"""The wire bytes of every message type, pinned: golden encodings captured from the
wire module before its declarative rewrite and split (issue 10), so any change of layout
fails here; and the malformed variants that were refused then are refused now."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from sgmonitor.channel import Suite
from sgmonitor.wire import admin, attestation, calls, core, hypervisor, monitor, sealed

FAMILIES = (core, sealed, calls, hypervisor, attestation, monitor, admin)
# every family's names, as the one wire module offered them before the split
wire = SimpleNamespace(**{n: getattr(m, n) for m in FAMILIES for n in m.__all__})

w = wire


def _instances() -> list[tuple[str, wire.Message]]:
    """(name, message): a representative instance of every message type."""
    SID = bytes(range(16))
    K = bytes(range(32, 64))
    PE = w.PageEntry
    S = w.PageStatus
    walk = w.ListWalk(0xFFFF888000123400, 8, 0x4F8, 0x2580, 300, 0xFFFF888000999900, 0x40)
    pages = w.PageIndex.of(
        (
            PE(0xFFFF888000001000, S.PRESENT),
            PE(0xFFFF888000002000, S.NOT_PRESENT),
            PE(0x3000, S.NOT_RAM),
        )
    )
    return [
        ("Hello", w.Hello("guest-é")),
        (
            "HelloReply",
            w.HelloReply(
                K, (Suite.AES256GCM_HKDF_SHA256, Suite.UNSEALED_FOR_EXPERIMENTS_ONLY), K[::-1]
            ),
        ),
        (
            "OpenSession",
            w.OpenSession(
                "g1", SID, Suite.AES256GCM_HKDF_SHA256, b"\x01" * 81, b"SGMS" + bytes(20)
            ),
        ),
        ("SessionOpened", w.SessionOpened(SID)),
        ("CloseSession", w.CloseSession(SID)),
        ("SessionClosed", w.SessionClosed(SID)),
        ("Request", w.Request(SID, 0x0102030405060708, b"\xaa" * 40)),
        ("Reply", w.Reply(SID, 9, b"index-bytes", b"p1" * 10 + b"p3")),
        ("Reply-nopages", w.Reply(SID, 2**64 - 1, b"")),
        ("Error", w.Error(w.ErrorCode.ATTESTATION_REFUSED, "no statement ✗", SID, 77)),
        ("Error-bare", w.Error(w.ErrorCode.BAD_FRAME)),
        ("ChallengeRequest", w.ChallengeRequest(1, K)),
        ("ChallengeRequest-monitor", w.ChallengeRequest(2, K)),
        ("Challenge", w.Challenge(K, b"SGME-endorsement")),
        ("AttestSession", w.AttestSession("sim", b"quote" * 3, b"{}", K, b"binding")),
        ("StatementIssued", w.StatementIssued(b"SGMS-statement")),
        ("LinkHello", w.LinkHello("ids-1")),
        ("LinkChallenge", w.LinkChallenge(K, K[::-1])),
        ("LinkOpen", w.LinkOpen(SID, b"wrapped", b"statement", b"config")),
        ("LinkOpened", w.LinkOpened(SID)),
        ("HeartbeatChallenge", w.HeartbeatChallenge(5, K)),
        ("HeartbeatAnswer", w.HeartbeatAnswer(5, 6, 7, K)),
        ("SealedReport", w.SealedReport(3, b"sealed-report")),
        ("ReportAck", w.ReportAck(3)),
        ("Revoke-measurement", w.Revoke(w.RevokeKind.MEASUREMENT, K)),
        ("Revoke-session", w.Revoke(w.RevokeKind.SESSION, SID)),
        ("Revoked", w.Revoked(4)),
        ("ReadPages", w.ReadPages((w.PageRange(0xFFFF888000001000, 3), w.PageRange(0x8000, 1)))),
        ("FollowList", w.FollowList(walk, then=600)),
        ("GetVmcoreinfo", w.GetVmcoreinfo()),
        ("GetRegisters", w.GetRegisters()),
        ("BeginScan", w.BeginScan(True)),
        ("BeginScan-nopause", w.BeginScan()),
        ("EndScan", w.EndScan()),
        (
            "Batch",
            w.Batch(
                (
                    w.BeginScan(True),
                    w.FollowList(walk),
                    w.ReadPages((w.PageRange(0x1000, 2),)),
                    w.EndScan(),
                )
            ),
        ),
        ("PagesReply", w.PagesReply(pages)),
        ("ListReply", w.ListReply((0xFFFF888000123400, 0xFFFF888000200000), w.ListEnd.LOOP, pages)),
        ("VmcoreinfoReply", w.VmcoreinfoReply((b"VMCOREINFO\0OSRELEASE=6.1", b""))),
        (
            "RegistersReply",
            w.RegistersReply(
                (
                    w.VcpuRegisters(0, 0x80050033, 0x1234000, 0x3506F0, 0xD01),
                    w.VcpuRegisters(1, 1, 2, 3, 4),
                )
            ),
        ),
        ("Ack", w.Ack(True)),
        ("Ack-running", w.Ack()),
        (
            "BatchReply",
            w.BatchReply(
                (
                    w.Ack(True),
                    w.ListReply((8,), w.ListEnd.HEAD_REACHED),
                    w.PagesReply(pages),
                    w.RegistersReply(()),
                )
            ),
        ),
        ("BatchReply-failed", w.BatchReply((w.RequestFailed(w.ErrorCode.TOO_LARGE, "x"),))),
        ("RequestFailed", w.RequestFailed(w.ErrorCode.BAD_REQUEST, "bad")),
        ("Call", w.Call(1, w.CallDirection.ECALL, "ecall_open_session", (5, b"bytes", "text"))),
        ("Call-ocall", w.Call(2**63, w.CallDirection.OCALL, "ocall_log")),
        ("Return", w.Return(1, (b"\x00" * 5, 2**64 - 1, ""))),
        ("CallFailed", w.CallFailed(1, w.ErrorCode.NO_SUCH_CALL, "no such call")),
    ]


# encode(message).hex(), captured from the implementation of commit 97f8bfa
GOLDEN = {
    "Hello": "01010000000867756573742dc3a9",
    "HelloReply": (
        "0102202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f0201"
        "fe3f3e3d3c3b3a393837363534333231302f2e2d2c2b2a29282726252423222120"
    ),
    "OpenSession": (
        "0103000000026731000102030405060708090a0b0c0d0e0f010000005101010101010101"
        "010101010101010101010101010101010101010101010101010101010101010101010101"
        "010101010101010101010101010101010101010101010101010101010101010101010101"
        "01010000001853474d530000000000000000000000000000000000000000"
    ),
    "SessionOpened": "0104000102030405060708090a0b0c0d0e0f",
    "CloseSession": "0105000102030405060708090a0b0c0d0e0f",
    "SessionClosed": "0106000102030405060708090a0b0c0d0e0f",
    "Request": (
        "0107000102030405060708090a0b0c0d0e0f010203040506070800000028aaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    ),
    # the pages as one sealed blob since the block seal (issue 10); before, a count and
    # a blob per page
    "Reply": (
        "0108000102030405060708090a0b0c0d0e0f00000000000000090000000b696e6465782d"
        "62797465730000001670317031703170317031703170317031703170317033"
    ),
    "Reply-nopages": ("0108000102030405060708090a0b0c0d0e0fffffffffffffffff0000000000000000"),
    "Error": (
        "010f0011000000106e6f2073746174656d656e7420e29c9710000102030405060708090a"
        "0b0c0d0e0f000000000000004d"
    ),
    "Error-bare": "010f000100000000000000000000000000",
    "ChallengeRequest": ("015101202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"),
    "ChallengeRequest-monitor": (
        "015102202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    ),
    "Challenge": (
        "0152202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f0000"
        "001053474d452d656e646f7273656d656e74"
    ),
    "AttestSession": (
        "01530000000373696d0000000f71756f746571756f746571756f7465000000027b7d2021"
        "22232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f000000076269"
        "6e64696e67"
    ),
    "StatementIssued": "01540000000e53474d532d73746174656d656e74",
    "LinkHello": "0171000000056964732d31",
    "LinkChallenge": (
        "0172202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f3f3e"
        "3d3c3b3a393837363534333231302f2e2d2c2b2a29282726252423222120"
    ),
    "LinkOpen": (
        "0173000102030405060708090a0b0c0d0e0f000000077772617070656400000009737461"
        "74656d656e7400000006636f6e666967"
    ),
    "LinkOpened": "0174000102030405060708090a0b0c0d0e0f",
    "HeartbeatChallenge": (
        "01750000000000000005202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    ),
    "HeartbeatAnswer": (
        "017600000000000000050000000000000006000000000000000720212223242526272829"
        "2a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    ),
    "SealedReport": "017700000000000000030000000d7365616c65642d7265706f7274",
    "ReportAck": "01780000000000000003",
    "Revoke-measurement": (
        "01610100000020202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    ),
    "Revoke-session": "01610200000010000102030405060708090a0b0c0d0e0f",
    "Revoked": "016200000004",
    "ReadPages": "012100000002ffff88800000100000000003000000000000800000000001",
    "FollowList": (
        "0122ffff888000123400000004f8000025800000012c00000008ffff8880009999000000004000000258"
    ),
    "GetVmcoreinfo": "0123",
    "GetRegisters": "0124",
    "BeginScan": "012501",
    "BeginScan-nopause": "012500",
    "EndScan": "0126",
    "Batch": (
        "012700000004000000030125010000002a0122ffff888000123400000004f80000258000"
        "00012c00000008ffff888000999900000000400000000000000012012100000001000000000000"
        "100000000002000000020126"
    ),
    "PagesReply": ("013100000003ffff88800000100000ffff88800000200001000000000000300002"),
    "ListReply": (
        "013200000002ffff888000123400ffff8880002000000300000003ffff88800000100000"
        "ffff88800000200001000000000000300002"
    ),
    "VmcoreinfoReply": (
        "01330000000200000018564d434f5245494e464f004f5352454c454153453d362e3100000000"
    ),
    "RegistersReply": (
        "01340000000200000000000080050033000000000123400000000000003506f000000000"
        "00000d010001000000000000000100000000000000020000000000000003000000000000"
        "0004"
    ),
    "Ack": "013501",
    "Ack-running": "013500",
    "BatchReply": (
        "013600000004000000030135010000001301320000000100000000000000080000000000"
        "00000021013100000003ffff88800000100000ffff888000002000010000000000003000"
        "0200000006013400000000"
    ),
    "BatchReply-failed": "01360000000100000009013f000b0000000178",
    "RequestFailed": "013f000a00000003626164",
    "Call": (
        "0141000000000000000101000000126563616c6c5f6f70656e5f73657373696f6e030100"
        "0000000000000502000000056279746573030000000474657874"
    ),
    "Call-ocall": "0141800000000000000002000000096f63616c6c5f6c6f6700",
    "Return": ("01420000000000000001030200000005000000000001ffffffffffffffff0300000000"),
    "CallFailed": "0143000000000000000100100000000c6e6f20737563682063616c6c",
}

# bit i set: flipping every bit of byte i (XOR 0xFF) was refused with a WireError then
REFUSED_FLIPS = {
    "Hello": 0x3FFF,
    "HelloReply": 0x400000003,
    "OpenSession": 0x3C00000000000000000001E0000FF,
    "SessionOpened": 0x3,
    "CloseSession": 0x3,
    "SessionClosed": 0x3,
    "Request": 0x3C000003,
    "Reply": 0x1E003C000003,
    "Reply-nopages": 0x3FC000003,
    "Error": 0x1FFFFFF,
    "Error-bare": 0x1FF,
    "ChallengeRequest": 0x7,
    "ChallengeRequest-monitor": 0x7,
    "Challenge": 0x3C00000003,
    "AttestSession": 0x3C00000000F0001FFF,
    "StatementIssued": 0x3F,
    "LinkHello": 0x7FF,
    "LinkChallenge": 0x3,
    "LinkOpen": 0x3C01E03C0003,
    "LinkOpened": 0x3,
    "HeartbeatChallenge": 0x3,
    "HeartbeatAnswer": 0x3,
    "SealedReport": 0x3C03,
    "ReportAck": 0x3,
    "Revoke-measurement": 0x7F,
    "Revoke-session": 0x7F,
    "Revoked": 0x3,
    "ReadPages": 0x1F01F03F,
    "FollowList": 0x1DC03DCDE03,
    "GetVmcoreinfo": 0x3,
    "GetRegisters": 0x3,
    "BeginScan": 0x7,
    "BeginScan-nopause": 0x7,
    "EndScan": 0x3,
    "Batch": 0x7EF81FFBB807B9BC07FFFF,
    "PagesReply": 0x1C0E0703F,
    "ListReply": 0x381C0E07C0003F,
    "VmcoreinfoReply": 0x3C000003FF,
    "RegistersReply": 0x3F,
    "Ack": 0x7,
    "Ack-running": 0x7,
    "BatchReply": 0x7FFC0E0703FFF807FFFFF,
    "BatchReply-failed": 0x7FFFF,
    "RequestFailed": 0x7FF,
    "Call": 0x3FE0F807FFFFFC03,
    "Call-ocall": 0x1FFFC03,
    "Return": 0x7C020FC03,
    "CallFailed": 0xFFFFC03,
}

INSTANCES = _instances()


def test_every_message_type_has_a_golden_encoding() -> None:
    assert [name for name, _ in INSTANCES] == list(GOLDEN)
    assert {m.TYPE for _, m in INSTANCES} == set(core._REGISTRY)


@pytest.mark.parametrize(("name", "msg"), INSTANCES, ids=[n for n, _ in INSTANCES])
def test_golden_encoding(name: str, msg: wire.Message) -> None:
    data = bytes.fromhex(GOLDEN[name])
    assert wire.encode(msg) == data
    assert wire.decode(data) == msg
    assert wire.framed(msg) == len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize(("name", "msg"), INSTANCES, ids=[n for n, _ in INSTANCES])
def test_malformed_variants_still_refused(name: str, msg: wire.Message) -> None:
    data = bytes.fromhex(GOLDEN[name])
    for cut in range(len(data)):
        with pytest.raises(wire.WireError):
            wire.decode(data[:cut])
    with pytest.raises(wire.WireError, match="trailing"):
        wire.decode(data + b"\0")
    mask = REFUSED_FLIPS[name]
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        if mask >> i & 1:
            with pytest.raises(wire.WireError):
                wire.decode(bytes(flipped))
        else:
            with contextlib.suppress(wire.WireError):  # stricter than before is allowed
                wire.decode(bytes(flipped))
