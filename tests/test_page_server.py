"""The hypervisor side's page logic on hand-built page tables and lists.

``read_pages`` and ``follow_list`` must turn every hostile shape a guest can give them
(wild, non-canonical and NULL pointers, cycles, endless lists, pages outside RAM) into
a bounded answer that says how it ended, never an exception or a hang.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from synthetic import CR0_PG, CR4_PAE, ENTRY, MEMBER, RAM_SIZE, Region, Ring, Tables

from sgmonitor.errors import PageFault
from sgmonitor.guest.memory import RawImage, Registers
from sgmonitor.hypervisor.pages import ListEnd, PageNotRam, PageServer
from sgmonitor.hypervisor.service import HypervisorService, _WalkedList
from sgmonitor.wire.core import WireError
from sgmonitor.wire.sealed import MAX_LIST_NODES, FollowList, ListWalk

PAGE = 0x1000
NONCANONICAL = 0x4141_4141_4141_4141


@pytest.fixture(params=[ENTRY, 0xA00], ids=["multi-page-entries", "one-page-entries"])
def entry(request: pytest.FixtureRequest) -> int:
    """List entries spanning 3 or 4 pages (the walk's general way), or inside one page
    with their links (its inlined usual case): every list test runs with both."""
    return int(request.param)


def test_read_pages_returns_page_bytes_and_faults(tmp_path: Path) -> None:
    tables = Tables(la57=False)
    region = Region(tables, pages=4)
    region.write(region.va + PAGE, bytes(range(256)) * 16)
    region.unmap(region.va + 2 * PAGE)
    outside = region.end + 0x100000
    tables.map(outside, RAM_SIZE + 0x100000, PAGE)  # translates, but not to RAM
    server = PageServer(tables.image(tmp_path))
    got = server.read_pages([region.va + PAGE, region.va + 2 * PAGE, outside, 1 << 63, 0])
    assert got[0] == bytes(range(256)) * 16
    assert isinstance(got[1], PageFault) and "not present" in str(got[1])
    assert isinstance(got[2], PageNotRam)
    assert isinstance(got[3], PageFault) and "non-canonical" in str(got[3])
    assert isinstance(got[4], PageFault) and got[4].address == 0
    assert server.read_pages([]) == []


def test_read_pages_bounds_its_requests(tmp_path: Path) -> None:
    server = Ring(1).server(tmp_path)
    with pytest.raises(ValueError, match="limit"):
        server.read_pages([0] * 1025)
    with pytest.raises(ValueError, match="page-aligned"):
        server.read_pages([0x1008])
    with pytest.raises(ValueError, match="page-aligned"):
        server.read_pages([1 << 64])


def test_follow_list_returns_every_entry_page(tmp_path: Path, entry: int) -> None:
    ring = Ring(8, entry=entry)
    walk = ring.follow(ring.server(tmp_path))
    assert walk.end is ListEnd.HEAD_REACHED and walk.fault is None
    assert walk.nodes == tuple(ring.nodes)
    wanted = set().union(*(ring.span(n) for n in ring.nodes)) | {ring.head & ~0xFFF}
    assert set(walk.pages) == wanted
    for page, data in walk.pages.items():
        assert data == ring.region.read(page, PAGE)


def test_follow_list_of_an_empty_list(tmp_path: Path, entry: int) -> None:
    ring = Ring(0, entry=entry)
    walk = ring.follow(ring.server(tmp_path))
    assert walk.end is ListEnd.HEAD_REACHED
    assert walk.nodes == () and set(walk.pages) == {ring.head & ~0xFFF}


def test_cycle_that_skips_the_head(tmp_path: Path, entry: int) -> None:
    ring = Ring(6, entry=entry)
    ring.link(ring.nodes[5], ring.nodes[2], ring.nodes[4])
    walk = ring.follow(ring.server(tmp_path))
    assert walk.end is ListEnd.LOOP
    assert walk.nodes == tuple(ring.nodes)


def test_self_loop_ends_at_once(tmp_path: Path, entry: int) -> None:
    ring = Ring(3, entry=entry)
    ring.link(ring.nodes[0], ring.nodes[0], ring.nodes[0])
    walk = ring.follow(ring.server(tmp_path), limit=4096)
    assert walk.end is ListEnd.LOOP and walk.nodes == (ring.nodes[0],)


@pytest.mark.parametrize("wild", ["unmapped", "noncanonical", "null", "top"])
def test_wild_pointer_ends_in_a_fault(tmp_path: Path, wild: str, entry: int) -> None:
    ring = Ring(5, entry=entry)
    target = {
        "unmapped": ring.region.end + 0x20_0000,
        "noncanonical": NONCANONICAL,
        "null": 0,  # its entry would start below address 0
        "top": (1 << 64) - 8,  # its entry would end beyond the address space
    }[wild]
    ring.link(ring.nodes[2], target, ring.nodes[1])
    walk = ring.follow(ring.server(tmp_path))
    assert walk.end is ListEnd.FAULT
    assert walk.nodes == tuple(ring.nodes[:3])
    assert walk.fault is not None
    if wild in ("unmapped", "noncanonical"):  # the faulting page is reported too
        assert isinstance(walk.pages[(target - MEMBER) & ~0xFFF], PageFault)


def test_an_unmapped_page_inside_an_entry(tmp_path: Path, entry: int) -> None:
    ring = Ring(5, entry=entry)
    hole = max(ring.span(ring.nodes[3]))  # the entry's last page; its list_head is earlier
    ring.region.unmap(hole)
    walk = ring.follow(ring.server(tmp_path))
    assert walk.end is ListEnd.FAULT and walk.nodes == tuple(ring.nodes[:3])
    assert walk.fault is not None and walk.fault.address == hole
    assert isinstance(walk.pages[hole], PageFault)


def test_unreadable_head(tmp_path: Path, entry: int) -> None:
    ring = Ring(2, entry=entry)
    ring.region.unmap(ring.head & ~0xFFF)
    walk = ring.follow(ring.server(tmp_path))
    assert walk.end is ListEnd.FAULT and walk.nodes == ()


def test_limit_then_continue_after_the_last_node(tmp_path: Path, entry: int) -> None:
    ring = Ring(8, entry=entry)
    server = ring.server(tmp_path)
    first = ring.follow(server, limit=3)
    assert first.end is ListEnd.LIMIT and first.nodes == tuple(ring.nodes[:3])
    rest = ring.follow(server, limit=100, after=first.nodes[-1])
    assert rest.end is ListEnd.HEAD_REACHED and rest.nodes == tuple(ring.nodes[3:])


@pytest.mark.parametrize("bound", ["server", "walk"])
def test_reply_full_bounds_the_pages_of_one_reply(tmp_path: Path, entry: int, bound: str) -> None:
    """21 pages a reply, as the server's most (``max_list_pages``) or as the walk asks
    (``ListWalk.max_pages``, under a server that would allow 2,048)."""
    ring = Ring(12 if entry == ENTRY else 50, entry=entry)  # 40+ pages either way
    server = ring.server(tmp_path, **({"max_list_pages": 21} if bound == "server" else {}))
    nodes: list[int] = []
    pages: set[int] = set()
    after, replies = 0, 0
    for _ in range(12):
        replies += 1
        asked = ring.walk(100, after)
        walk = server.follow_list(asked if bound == "server" else replace(asked, max_pages=21))
        assert len(walk.pages) <= 21 and walk.nodes
        nodes += walk.nodes
        pages |= set(walk.pages)
        if walk.end is not ListEnd.REPLY_FULL:
            break
        after = walk.nodes[-1]
    assert walk.end is ListEnd.HEAD_REACHED and replies >= 2
    assert nodes == ring.nodes
    assert pages >= set().union(*(ring.span(n) for n in ring.nodes))
    with pytest.raises(ValueError, match="one full entry"):
        ring.server(tmp_path, max_list_pages=20)


def test_endless_list_stops_at_the_node_cap(tmp_path: Path) -> None:
    """12,288 nodes, each pointing 16 bytes further, never back to the head: the walk
    stops at the server's node cap whatever limit is asked."""
    tables = Tables(la57=False)
    region = Region(tables, pages=48)
    nodes = range(region.va, region.end, 16)
    region.write(region.va, b"".join((n + 16).to_bytes(8, "little") + bytes(8) for n in nodes))
    server = PageServer(tables.image(tmp_path))
    walk = server.follow_list(ListWalk(region.va, 0, 0, 16, 1 << 30))
    assert walk.end is ListEnd.LIMIT and len(walk.nodes) == MAX_LIST_NODES


def test_refresh_drops_translations(tmp_path: Path) -> None:
    tables = Tables(la57=False)
    region = Region(tables, pages=2)
    region.write(region.va, b"old page")
    tables.ram[0x30_0000:0x30_0008] = b"new page"
    server = PageServer(tables.image(tmp_path))
    assert server.read_pages([region.va])[0][:8] == b"old page"  # type: ignore[index]
    table, index = region._leaf[region.va]
    with (tmp_path / "ram.img").open("r+b") as f:  # the guest remaps the page
        f.seek(table + index * 8)
        f.write((0x30_0000 | 0x3).to_bytes(8, "little"))
    assert server.read_pages([region.va])[0][:8] == b"old page"  # type: ignore[index]
    server.refresh()
    assert server.read_pages([region.va])[0][:8] == b"new page"  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0x1000, 0, 0, 0, 1), "span_size"),
        ((0x1000, 0, 0, 0x10001, 1), "span_size"),
        ((0x1000, 0, 0x20000, 16, 1), "inside the span"),
        ((0x1000, 0, 8, 16, 1), "inside the span"),
        ((0x1000, 0, -8, 16, 1), "member_offset"),  # the one sign: never negative
        ((0x1000, -8, 0, 16, 1), "next_offset"),
        ((0x1000, 9, 0, 32, 1), "next_offset"),
        ((0x1000, 0, 0, 16, 0), "limit"),
        ((1 << 64, 0, 0, 16, 1), "head"),
        ((0x1004, 0, 0, 16, 1), "aligned"),
    ],
)
def test_a_bad_list_walk_is_refused_where_it_is_made(
    tmp_path: Path, args: tuple[int, int, int, int, int], match: str
) -> None:
    with pytest.raises(WireError, match=match):
        ListWalk(*args)
    with pytest.raises(ValueError, match="ListWalk"):
        Ring(1).server(tmp_path).follow_list(args)  # type: ignore[arg-type]


class CountingImage(RawImage):
    """A RAM image whose vCPU registers are ``now`` (a live guest's move between
    reads), counting how often they are read (QMP's ``info registers`` on a live guest),
    with a count of machine resets to set (QEMU's RESET events)."""

    def __init__(self, path: str, now: Registers) -> None:
        super().__init__(path, now)
        self.now, self.reads, self.reset_count = now, 0, 0

    def registers(self) -> Registers:
        self.reads += 1
        return self.now

    def resets(self) -> int:
        return self.reset_count


def two_boots(tmp_path: Path) -> tuple[CountingImage, Region, int, int]:
    """A page mapped at the same address by two top-level tables, onto b"old boot" and
    b"new boot": the kernel before and after a reset. The vCPU runs on the first."""
    tables = Tables(la57=False)
    region = Region(tables, pages=2)
    region.write(region.va, b"old boot")
    tables.ram[0x30_0000:0x30_0008] = b"new boot"
    first = tables.root
    if tables.next_table % 0x2000:  # top-level tables are 8 KiB aligned (PTI pairs)
        tables._new_table()
    tables.root = tables._new_table()
    tables.map(region.va, 0x30_0000, 0x1000)
    second, tables.root = tables.root, first
    tables.image(tmp_path).close()
    image = CountingImage(str(tmp_path / "ram.img"), Registers(CR0_PG, first, CR4_PAE))
    return image, region, first, second


def test_refresh_rereads_registers_only_when_the_kernel_half_changes(tmp_path: Path) -> None:
    """The registers are read again only when the top-level table at the cached CR3 no
    longer holds the kernel half it held: a change in its user half (another process's
    table in the same page) keeps them; a new kernel half (the page reused for
    something else) makes the next scan read them, and walk from the new CR3."""
    image, region, first, second = two_boots(tmp_path)
    server = PageServer(image)
    server.refresh()
    server.refresh()
    assert image.reads == 1
    assert server.read_pages([region.va])[0][:8] == b"old boot"  # type: ignore[index]
    with (tmp_path / "ram.img").open("r+b") as f:  # a user-half entry: not the kernel's
        f.seek(first + 8)
        f.write((0x7000 | 0x3).to_bytes(8, "little"))
    server.refresh()
    assert image.reads == 1
    image.now = Registers(CR0_PG, second, CR4_PAE)  # the vCPU moves to another table ...
    server.refresh()
    assert image.reads == 1  # ... which a scan need not see while the old one is intact
    with (tmp_path / "ram.img").open("r+b") as f:  # the old table's page is reused
        f.seek(first + 2048)
        f.write(bytes(2048))
    server.refresh()
    assert image.reads == 2
    assert server.read_pages([region.va])[0][:8] == b"new boot"  # type: ignore[index]


def test_a_reset_rereads_registers_though_the_old_tables_survive(tmp_path: Path) -> None:
    """RAM survives a reboot: the old kernel's top-level table may still be intact, and
    walking it would read the old kernel's data. The reset itself (QEMU's RESET event)
    makes the next scan read the registers and walk the new kernel's tables."""
    image, region, _, second = two_boots(tmp_path)
    server = PageServer(image)
    server.refresh()
    assert server.read_pages([region.va])[0][:8] == b"old boot"  # type: ignore[index]
    image.now, image.reset_count = Registers(CR0_PG, second, CR4_PAE), 1  # a reboot
    server.refresh()
    assert image.reads == 2
    assert server.read_pages([region.va])[0][:8] == b"new boot"  # type: ignore[index]


def test_a_window_walked_ahead_answers_only_its_own_walk_within_its_budget(
    tmp_path: Path,
) -> None:
    """The hypervisor answers a FollowList from the window it walked ahead only if the
    request asks for exactly that walk, of the same page server, and the reply's page
    budget holds what it read; otherwise it walks afresh (a smaller budget stops the
    walk sooner). Either way the window the request announces is noted."""
    ring = Ring(40, pages=200)
    server = ring.server(tmp_path)
    (tmp_path / "other").mkdir()
    other_server = ring.server(tmp_path / "other")
    walk = ring.walk(8, after=ring.nodes[7])
    ahead = _WalkedList.of(server, walk, None)
    assert list(ahead.index.entries) == ring.nodes[8:16] and ahead.read() > 8
    session = SimpleNamespace(ahead=ahead, announced=None)
    assert HypervisorService._follow(session, server, FollowList(walk, then=16), None) is ahead
    assert session.ahead is None
    assert session.announced == replace(walk, after=ring.nodes[15], limit=16)
    budget = ahead.read() - 1
    for asked, by, pages in (
        (replace(walk, limit=7), server, None),
        (walk, other_server, None),
        (walk, server, budget),
    ):
        session.ahead = ahead
        got = HypervisorService._follow(session, by, FollowList(asked), pages)
        assert got is not ahead and session.ahead is None and session.announced is None
        assert got.index == _WalkedList.of(by, asked, pages).index
    assert got.index.end is ListEnd.REPLY_FULL and got.read() <= budget
