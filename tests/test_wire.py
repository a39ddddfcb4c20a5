"""The wire module: mirror-image codecs, strict limits, bounded socket reads."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgmonitor.channel import Suite
from sgmonitor.errors import SGMonitorError
from sgmonitor.wire import admin, attestation, calls, core, hypervisor, monitor, sealed
from sgmonitor.wire.calls import Call, CallDirection
from sgmonitor.wire.core import (
    MAX_FRAME,
    ConnectionClosed,
    ErrorCode,
    WireError,
    WireTimeout,
    decode,
    encode,
)
from sgmonitor.wire.sealed import (
    PAGE_SIZE,
    FollowList,
    ListEnd,
    PageEntry,
    PageRange,
    PageStatus,
    ReadPages,
)

FAMILIES = (core, sealed, calls, hypervisor, attestation, monitor, admin)
# every family's names, as the one wire module offered them before the split
wire = SimpleNamespace(**{n: getattr(m, n) for m in FAMILIES for n in m.__all__})

SID = bytes(range(16))

# --- strategies ----------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
vm = st.text(min_size=1, max_size=16).filter(lambda s: 0 < len(s.encode()) <= 64)
sid = st.binary(min_size=16, max_size=16)
page_addr = st.integers(0, 2**52 - 1).map(lambda p: p * PAGE_SIZE)
range_addr = st.integers(0, 2**52 - 8).map(lambda p: p * PAGE_SIZE)  # + 8 pages never wraps
small_blob = st.binary(max_size=64)
page_entry = st.builds(PageEntry, page_addr, st.sampled_from(PageStatus))
page_entries = st.lists(page_entry, max_size=8, unique_by=lambda p: p.address).map(
    wire.PageIndex.of
)
vcpu = st.builds(wire.VcpuRegisters, st.integers(0, 65535), u64, u64, u64, u64)
value = st.one_of(u64, small_blob, st.text(max_size=16))


@st.composite
def follow_list(draw: st.DrawFn) -> FollowList:
    size = draw(st.integers(16, wire.MAX_ENTRY_SIZE))
    walk = wire.ListWalk(
        head=draw(st.integers(0, 2**61 - 1)) * 8,
        next_offset=draw(st.integers(0, 8)),
        member_offset=draw(st.integers(0, size - 16)),
        span_size=size,
        limit=draw(st.integers(1, wire.MAX_LIST_NODES)),
        after=draw(u64),
    )
    return FollowList(walk)


key32 = st.binary(min_size=32, max_size=32)

messages = st.one_of(
    st.builds(wire.Hello, vm),
    st.builds(
        wire.HelloReply,
        key32,
        st.lists(st.sampled_from(Suite), max_size=8).map(tuple),
        key32,
    ),
    st.builds(wire.OpenSession, vm, sid, st.sampled_from(Suite), small_blob, small_blob),
    st.builds(wire.ChallengeRequest, st.sampled_from([1, 2]), key32),
    st.builds(wire.LinkHello, vm),
    st.builds(wire.LinkChallenge, key32, key32),
    st.builds(wire.LinkOpen, sid, small_blob, small_blob, small_blob),
    st.builds(wire.LinkOpened, sid),
    st.builds(wire.HeartbeatChallenge, u64, key32),
    st.builds(wire.HeartbeatAnswer, u64, u64, u64, key32),
    st.builds(wire.SealedReport, u64, small_blob),
    st.builds(wire.ReportAck, u64),
    st.builds(wire.Challenge, key32, small_blob),
    st.builds(
        wire.AttestSession,
        st.sampled_from(["sim", "gramine-sgx"]),
        small_blob,
        small_blob,
        key32,
        small_blob,
    ),
    st.builds(wire.StatementIssued, small_blob),
    st.builds(wire.Revoke, st.just(wire.RevokeKind.MEASUREMENT), key32),
    st.builds(wire.Revoke, st.just(wire.RevokeKind.SESSION), sid),
    st.builds(wire.Revoked, st.integers(0, 2**32 - 1)),
    st.builds(wire.SessionOpened, sid),
    st.builds(wire.CloseSession, sid),
    st.builds(wire.SessionClosed, sid),
    st.builds(wire.Request, sid, u64, small_blob),
    st.builds(wire.Reply, sid, u64, small_blob, small_blob),
    st.builds(
        wire.Error,
        st.sampled_from(ErrorCode),
        st.text(max_size=20),
        st.sampled_from([b"", SID]),
        u64,
    ),
    st.builds(
        ReadPages,
        st.lists(st.builds(PageRange, range_addr, st.integers(1, 8)), min_size=1, max_size=8).map(
            tuple
        ),
    ),
    follow_list(),
    st.builds(wire.GetVmcoreinfo),
    st.builds(wire.GetRegisters),
    st.builds(wire.PagesReply, page_entries),
    st.builds(
        wire.ListReply, st.lists(u64, max_size=8).map(tuple), st.sampled_from(ListEnd), page_entries
    ),
    st.builds(wire.VmcoreinfoReply, st.lists(small_blob, max_size=4).map(tuple)),
    st.builds(
        wire.RegistersReply,
        st.lists(
            st.builds(wire.VcpuRegisters, st.integers(0, 65535), u64, u64, u64, u64), max_size=4
        ).map(tuple),
    ),
    st.builds(wire.RequestFailed, st.sampled_from(ErrorCode), st.text(max_size=20)),
    st.builds(
        Call,
        u64,
        st.sampled_from(CallDirection),
        st.text(min_size=1, max_size=10),
        st.lists(value, max_size=4).map(tuple),
    ),
    st.builds(wire.Return, u64, st.lists(value, max_size=4).map(tuple)),
    st.builds(wire.CallFailed, u64, st.sampled_from(ErrorCode), st.text(max_size=20)),
    st.builds(
        wire.Batch,
        st.tuples(
            st.builds(wire.BeginScan, st.booleans()),
            follow_list(),
            st.builds(
                ReadPages,
                st.lists(
                    st.builds(PageRange, range_addr, st.integers(1, 8)), min_size=1, max_size=4
                ).map(tuple),
            ),
        ),
    ),
    st.builds(
        wire.BatchReply,
        st.tuples(
            st.builds(wire.Ack, st.booleans()),
            st.builds(
                wire.ListReply,
                st.lists(u64, max_size=8).map(tuple),
                st.sampled_from(ListEnd),
                page_entries,
            ),
            st.builds(wire.PagesReply, page_entries),
        ),
    ),
)


# --- properties ----------------------------------------------------------------------


@given(messages)
def test_decode_encode_round_trip(msg: wire.Message) -> None:
    data = encode(msg)
    assert data[0] == wire.WIRE_VERSION and data[1] == msg.TYPE
    assert decode(data) == msg
    assert encode(decode(data)) == data


@given(st.binary(max_size=512))
@settings(max_examples=2000)
def test_random_bytes_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(data)


@given(st.binary(max_size=256))
@settings(max_examples=2000)
def test_random_bodies_only_wire_error(body: bytes) -> None:
    """Valid version and a known type, random body: the deeper parsers see garbage."""
    for t in (0x03, 0x08, 0x0F, 0x21, 0x22, 0x31, 0x32, 0x34, 0x41, 0x42):
        with contextlib.suppress(WireError):
            decode(bytes([1, t]) + body)


@given(messages, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_truncation_and_mutation_only_wire_error(msg: wire.Message, data: st.DataObject) -> None:
    enc = encode(msg)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(WireError):
        decode(enc[:cut])
    i = data.draw(st.integers(0, len(enc) - 1))
    mutated = bytearray(enc)
    mutated[i] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(WireError):
        decode(bytes(mutated))
    with pytest.raises(WireError):
        decode(enc + b"\0")


# --- limits and clear errors --------------------------------------------------------


def test_wire_error_family() -> None:
    assert issubclass(WireError, SGMonitorError)
    assert issubclass(WireTimeout, WireError)
    assert issubclass(ConnectionClosed, WireError)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "too short"),
        (b"\x02\x01", "version 2"),
        (b"\x01\xee", "unknown message type 0xee"),
        (b"\x01\x01\x00\x00\x00\x05ab", "truncated in vm"),
        (b"\x01\x01\x00\x00\x00\x01a!", "trailing"),
        (b"\x01\x01\x00\x00\x00\x02\xff\xfe", "not UTF-8"),
        (b"\x01\x04" + bytes(15), "truncated in session_id"),
    ],
)
def test_clear_messages(data: bytes, words: str) -> None:
    with pytest.raises(WireError, match=words):
        decode(data)


def test_expect_restricts_types() -> None:
    data = encode(wire.Hello("g"))
    assert decode(data, expect=(wire.Hello,)) == wire.Hello("g")
    with pytest.raises(WireError, match="unexpected Hello"):
        decode(data, expect=(ReadPages, FollowList))


def test_huge_counts_rejected_before_allocation() -> None:
    body = SID + struct.pack(">Q", 1) + struct.pack(">I", 0) + struct.pack(">I", 2**32 - 1)
    with pytest.raises(WireError, match="limit"):
        decode(b"\x01\x08" + body)
    body = struct.pack(">I", wire.MAX_RANGES)  # plausible count, no data
    with pytest.raises(WireError, match="do not fit"):
        decode(b"\x01\x21" + body)
    with pytest.raises(WireError, match="limit"):
        decode(b"\x01\x07" + SID + bytes(8) + struct.pack(">I", 2**31))


def test_request_limits() -> None:
    with pytest.raises(WireError, match="no ranges"):
        ReadPages(())
    with pytest.raises(WireError, match="limit"):
        ReadPages((PageRange(0, wire.MAX_PAGES_PER_REQUEST + 1),))
    with pytest.raises(WireError, match="aligned"):
        PageRange(0x1001, 1)
    with pytest.raises(WireError, match="wraps"):
        PageRange(2**64 - PAGE_SIZE, 2)
    assert decode(encode(ReadPages((PageRange(2**64 - PAGE_SIZE, 1),)))).pages() == [
        2**64 - PAGE_SIZE
    ]
    with pytest.raises(WireError, match="inside the span"):
        wire.ListWalk(0x1000, 0, 100, 100, 10)
    with pytest.raises(WireError, match="limit"):
        FollowList(wire.ListWalk(0x1000, 0, 0, 100, wire.MAX_LIST_NODES + 1))
    with pytest.raises(WireError, match="max_pages"):
        wire.ListWalk(0x1000, 0, 0, 100, 10, max_pages=wire.MAX_REPLY_PAGES + 1)
    with pytest.raises(WireError, match="twice"):
        wire.PagesReply(
            wire.PageIndex.of(
                (PageEntry(0, PageStatus.PRESENT), PageEntry(0, PageStatus.NOT_PRESENT))
            )
        )
    with pytest.raises(WireError, match="unsigned"):
        wire.Request(SID, -1, b"")
    with pytest.raises(WireError, match="unsigned"):
        Call(True, CallDirection.ECALL, "x")  # type: ignore[arg-type]
    with pytest.raises(WireError, match="session_id"):
        wire.SessionOpened(b"short")


def test_read_pages_of_scattered_pages_up_to_the_page_limit() -> None:
    """A scan's predicted misses are scattered: every page may need its own range."""
    scattered = tuple(PageRange(0x10_0000 + i * 2 * PAGE_SIZE, 1) for i in range(1024))
    assert len(scattered) == wire.MAX_PAGES_PER_REQUEST
    assert decode(encode(ReadPages(scattered))).pages() == [r.address for r in scattered]
    with pytest.raises(WireError, match="limit"):
        ReadPages((*scattered, PageRange(0, 1)))


def test_read_pages_helpers() -> None:
    req = ReadPages((PageRange(0x1000, 2), PageRange(0x8000, 1)))
    assert req.pages() == [0x1000, 0x2000, 0x8000]
    reply = wire.PagesReply(
        wire.PageIndex.of(
            (PageEntry(0x1000, PageStatus.PRESENT), PageEntry(0x2000, PageStatus.NOT_PRESENT))
        )
    )
    assert reply.present() == [0x1000]


def test_largest_reply_fits_a_frame_and_an_ocall() -> None:
    reply = wire.Reply(SID, 1, bytes(wire.MAX_SEALED_REPLY), bytes(wire.MAX_SEALED_PAGES))
    data = encode(reply)
    assert len(data) <= wire.MAX_CALL_VALUE
    call = wire.Return(1, (data,))
    assert decode(encode(call)) == call


def test_known_encoding() -> None:
    """A known answer for the layout in docs/protocol.md, written out by hand."""
    msg = wire.Request(SID, 7, b"\xaa\xbb")
    assert encode(msg) == (
        b"\x01\x07" + SID + b"\x00\x00\x00\x00\x00\x00\x00\x07" + b"\x00\x00\x00\x02\xaa\xbb"
    )
    assert encode(ReadPages((PageRange(0xFFFF888000001000, 3),))).hex() == (
        "0121" + "00000001" + "ffff888000001000" + "00000003"
    )


# --- sockets --------------------------------------------------------------------------


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_send_recv_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msgs = [wire.Hello("g"), wire.Request(SID, 1, b"x" * 60_000), wire.SessionOpened(SID)]
    t = threading.Thread(target=lambda: [wire.send_frame(a, m) for m in msgs])
    t.start()
    assert [wire.recv_frame(b, timeout=5) for _ in msgs] == msgs
    t.join()


def test_recv_times_out_on_silence(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    start = time.monotonic()
    with pytest.raises(WireTimeout):
        wire.recv_frame(b, timeout=0.2)
    assert time.monotonic() - start < 1.0


def test_recv_deadline_is_total_not_per_chunk(pair: tuple[socket.socket, socket.socket]) -> None:
    """A relay dripping one byte at a time can't keep the receiver waiting forever."""
    a, b = pair
    frame = struct.pack(">I", 100) + bytes(100)
    stop = threading.Event()

    def drip() -> None:
        for byte in frame:
            if stop.is_set():
                return
            a.send(bytes([byte]))
            time.sleep(0.05)

    t = threading.Thread(target=drip)
    t.start()
    start = time.monotonic()
    with pytest.raises(WireTimeout):
        wire.recv_frame(b, timeout=0.5)
    assert time.monotonic() - start < 1.5
    stop.set()
    t.join()


def test_oversized_length_rejected_without_reading(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(WireError, match="frame length"):
        wire.recv_frame(b, timeout=1)
    a.sendall(struct.pack(">I", 1) + b"\x01")
    with pytest.raises(WireError, match="frame length"):
        wire.recv_frame(b, timeout=1)


def test_closed_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b"\x01\x01")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed, match="mid-frame"):
        wire.recv_frame(b, timeout=1)
    with pytest.raises(ConnectionClosed, match="closed the connection"):
        wire.recv_frame(b, timeout=1)


def test_garbage_frame_is_wire_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 4) + b"\x01\x21\xff\xff")
    with pytest.raises(WireError, match="ReadPages"):
        wire.recv_frame(b, timeout=1)


def test_send_encoded_relays_opaque_bytes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = encode(wire.CloseSession(SID))
    wire.send_encoded(a, data, timeout=1)
    assert wire.recv_encoded(b, timeout=1) == data
    with pytest.raises(WireError):
        wire.send_encoded(a, b"\x01", timeout=1)


def test_batch_limits() -> None:
    walk = FollowList(wire.ListWalk(8, 0, 0, 16, 1))
    pages = ReadPages((PageRange(0, wire.MAX_PAGES_PER_REQUEST),))
    batch = wire.Batch((wire.BeginScan(True), walk, pages))
    assert decode(encode(batch)) == batch
    assert batch.list_page_budget() == wire.MAX_REPLY_PAGES - wire.MAX_PAGES_PER_REQUEST
    for bad in [
        (),
        (walk, walk),  # one FollowList per batch
        (pages, ReadPages((PageRange(0, 1),))),  # more pages than one ReadPages
        (wire.GetVmcoreinfo(),),  # not batchable
        (wire.BeginScan(),) * (wire.MAX_BATCH + 1),
    ]:
        with pytest.raises(WireError):
            wire.Batch(bad)  # type: ignore[arg-type]
    with pytest.raises(WireError, match="unexpected Batch"):  # no batch in a batch
        body = encode(wire.Batch((wire.EndScan(),)))
        decode(encode(wire.Batch((wire.EndScan(),)))[:2] + struct.pack(">II", 1, len(body)) + body)
    many = wire.PageIndex.of(PageEntry(i * PAGE_SIZE, PageStatus.PRESENT) for i in range(1025))
    with pytest.raises(WireError, match="page entries"):  # 2,050 entries in all
        wire.BatchReply((wire.PagesReply(many), wire.PagesReply(many)))
    with pytest.raises(WireError, match="holds a VmcoreinfoReply"):
        wire.BatchReply((wire.VmcoreinfoReply(()),))  # type: ignore[arg-type]


def test_bulk_parsed_pages_fail_as_before() -> None:
    """Page indexes are parsed in bulk, and a reply's sealed pages are one blob; each bad
    one is still named."""
    sid = bytes(16)
    good = wire.encode(wire.Reply(sid, 1, b"i", b"a" * 30))
    for cut in range(len(good) - 30, len(good)):
        with pytest.raises(wire.WireError, match="truncated in sealed_pages"):
            wire.decode(good[:cut])
    limit = wire.MAX_SEALED_PAGES
    big = wire.encode(wire.Reply(sid, 1, b"i", b"a"))[:-5] + struct.pack(">I", limit + 1) + b"a"
    with pytest.raises(wire.WireError, match=f"sealed_pages is {limit + 1} bytes"):
        wire.decode(big)
    entry = wire.PageEntry(0x1000, wire.PageStatus.PRESENT)
    index = wire.encode(wire.PagesReply(wire.PageIndex.of((entry,))))
    with pytest.raises(wire.WireError, match="unknown page status 9"):
        wire.decode(index[:-1] + b"\x09")
    with pytest.raises(wire.WireError, match="truncated in pages"):
        wire.decode(index[:-1])
    listed = wire.ListReply((8, 16), wire.ListEnd.LIMIT)
    assert wire.decode(wire.encode(listed)) == listed
    with pytest.raises(wire.WireError, match="not page-aligned"):
        wire.decode(index[:-9] + struct.pack(">QB", 0x1008, 1))
    with pytest.raises(wire.WireError, match="twice"):
        wire.decode(index[:-13] + struct.pack(">IQBQB", 2, 0x1000, 1, 0x1000, 2))


def test_pop_frame_takes_whole_frames_only_and_refuses_bad_lengths() -> None:
    one, two = wire.framed(wire.Hello("a")), wire.framed(wire.ReportAck(7))
    buffer = bytearray(one + two[:5])
    assert wire.pop_frame(buffer) == one[4:]
    assert wire.pop_frame(buffer) is None  # the second has not all arrived
    buffer += two[5:]
    assert wire.decode(wire.pop_frame(buffer) or b"") == wire.ReportAck(7)
    assert buffer == bytearray()
    for length in (0, 1, wire.MAX_FRAME + 1):
        with pytest.raises(wire.WireError, match="out of bounds"):
            wire.pop_frame(bytearray(length.to_bytes(4, "big") + b"xx"))


def test_the_enclave_families_load_and_decode_alone() -> None:
    """Importing the enclave's families (core, sealed, calls) loads no other; their
    decode does not know the others' types."""
    code = """if True:
        import sys
        from sgmonitor.wire import calls, core, sealed
        loaded = sorted(m[15:] for m in sys.modules if m.startswith("sgmonitor.wire."))
        assert loaded == ["calls", "core", "sealed"], loaded
        try:
            core.decode(bytes.fromhex("0101000000016167"))  # a Hello
        except core.WireError as exc:
            assert "unknown message type 0x01" in str(exc), exc
        else:
            raise AssertionError("Hello decoded without its family")
        assert core.decode(core.encode(sealed.EndScan())) == sealed.EndScan()
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_family_registers_distinct_types() -> None:
    declared = [
        obj
        for family in FAMILIES
        for obj in vars(family).values()
        if isinstance(obj, type) and issubclass(obj, core.Message) and obj is not core.Message
    ]
    assert {m.TYPE: m for m in declared} == core._REGISTRY
    for m in declared:  # each message named once, by the family that declares it
        owners = [f for f in FAMILIES if m.__name__ in f.__all__]
        assert owners == [sys.modules[m.__module__]], m


def test_a_replys_sealed_pages_are_a_view_of_an_immutable_frame_only() -> None:
    """Decoded, the sealed pages are a view of the frame (no copy of the megabytes); of
    a private copy when the frame is a mutable buffer, so later writes change nothing."""
    frame = wire.encode(wire.Reply(bytes(16), 1, b"i", b"sealed pages"))
    viewed = wire.decode(frame)
    assert isinstance(viewed.sealed_pages, memoryview) and viewed.sealed_pages.obj is frame
    assert viewed == wire.Reply(bytes(16), 1, b"i", b"sealed pages")
    buffer = bytearray(frame)
    copied = wire.decode(buffer)
    buffer[-1] ^= 0xFF
    assert copied.sealed_pages == b"sealed pages" and copied.sealed_pages.obj is not buffer
    with pytest.raises(wire.WireError, match="truncated in sealed_pages"):
        wire.decode(frame[:-1])


def test_a_page_index_is_checked_when_a_reply_holds_it() -> None:
    """PageIndex is built unchecked (the hypervisor's hot path); the reply checks it."""
    bad = [
        (wire.PageIndex((0x1000,), b""), "1 addresses and 0 statuses"),
        (wire.PageIndex((0x1000,), b"\x07"), "unknown page status 7"),
        (wire.PageIndex((0x1001,), b"\x00"), "not page-aligned"),
        (wire.PageIndex((-4096,), b"\x00"), "outside the u64 range"),
        (wire.PageIndex((1 << 64,), b"\x00"), "outside the u64 range"),
        (wire.PageIndex((True,), b"\x00"), "not an int"),  # type: ignore[arg-type]
        (wire.PageIndex([0x1000], b"\x00"), "tuple of addresses"),  # type: ignore[arg-type]
        (wire.PageIndex((0x1000, 0x1000), b"\x00\x00"), "twice"),
    ]
    for index, why in bad:
        with pytest.raises(WireError, match=why):
            wire.PagesReply(index)
    good = wire.PageIndex((0x2000, 0x1000, 0x3000), b"\x00\x01\x00")
    assert list(good) == [
        PageEntry(0x2000, PageStatus.PRESENT),
        PageEntry(0x1000, PageStatus.NOT_PRESENT),
        PageEntry(0x3000, PageStatus.PRESENT),
    ]
    assert good[1:] == wire.PageIndex((0x1000, 0x3000), b"\x01\x00")
    assert wire.PagesReply(good).present() == [0x2000, 0x3000]
    assert wire.PageIndex.of(good) == good
