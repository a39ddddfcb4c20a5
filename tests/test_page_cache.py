"""The enclave's page cache and RemoteMemory over a real PageServer on synthetic RAM.

Crossings are counted twice: by RemoteMemory's own counters and by the transport that
records each call, and the two must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import Region, Ring, Tables
from synthetic_memory import vendor_btf
from transports import CountingTransport, NoPrefetch, StreamingTransport

from sgmonitor.enclave.memory import (
    FIRST_WINDOW,
    LAST_WINDOW,
    PageCache,
    RemoteMemory,
    TransportError,
)
from sgmonitor.errors import PageFault, ValidationError
from sgmonitor.guest.paging import PageWalker, VirtualMemory
from sgmonitor.hypervisor.pages import PageServer
from sgmonitor.kernel.address_space import AddressSpace
from sgmonitor.kernel.helpers.list import list_for_each_entry
from sgmonitor.kernel.objects import TypedMemory

PAGE = 4096
MIB = 1 << 20
FAULT = PageFault(0, 0, None, "test")


# -- PageCache -------------------------------------------------------------------------


def test_lru_order_and_evictions() -> None:
    cache = PageCache(3 * PAGE)
    for page in (0x1000, 0x2000, 0x3000):
        cache.put(page, bytes(PAGE))
    assert cache.get(0x1000) is not None  # now the most recently used
    cache.put(0x4000, bytes(PAGE))
    assert 0x2000 not in cache and {0x1000, 0x3000, 0x4000} <= set(cache._entries)
    assert list(cache._entries) == [0x3000, 0x1000, 0x4000]
    assert (cache.evictions, cache.hits, cache.misses) == (1, 1, 0)
    assert cache.get(0x2000) is None and cache.misses == 1


def test_budget_is_in_bytes_and_faults_are_cheap() -> None:
    cache = PageCache(2 * PAGE + 3 * 64)
    cache.put(0x1000, bytes(PAGE))
    cache.put(0x2000, bytes(PAGE))
    for page in (0x3000, 0x4000, 0x5000):
        cache.put(page, FAULT)
    assert len(cache) == 5 and cache.used == 2 * PAGE + 3 * 64 and cache.evictions == 0
    cache.put(0x6000, FAULT)  # the oldest entry, a whole page, makes room
    assert 0x1000 not in cache and cache.used == PAGE + 4 * 64 and cache.evictions == 1
    cache.put(0x2000, bytes(PAGE))  # replacing an entry does not count it twice
    assert cache.used == PAGE + 4 * 64


def test_one_mib_budget_holds_256_pages() -> None:
    cache = PageCache(MIB)
    for i in range(300):
        cache.put(i * PAGE, bytes(PAGE))
    assert len(cache) == 256 and cache.used == MIB and cache.evictions == 44
    assert 43 * PAGE not in cache and 44 * PAGE in cache


def test_a_budget_below_one_page_is_an_error() -> None:
    with pytest.raises(ValueError, match="holds no page"):
        PageCache(PAGE - 1)
    PageCache(PAGE)


# -- RemoteMemory over a PageServer --------------------------------------------------


def remote(
    region: Region, tmp_path: Path, budget: int = 32 * MIB
) -> tuple[RemoteMemory, CountingTransport]:
    transport = CountingTransport(PageServer(region.tables.image(tmp_path)))
    return RemoteMemory(transport, budget), transport


def patterned(pages: int, **kwargs: int) -> Region:
    region = Region(Tables(la57=False), pages=pages, **kwargs)
    for i in range(min(pages, region.alias)):
        region.write(region.va + i * PAGE, i.to_bytes(2, "little") * (PAGE // 2))
    return region


def test_a_multi_page_read_is_one_crossing(tmp_path: Path) -> None:
    region = patterned(16)
    memory, transport = remote(region, tmp_path)
    address = region.va + 3 * PAGE + 100
    assert memory.read(address, 4 * PAGE) == region.read(address, 4 * PAGE)
    assert transport.calls == [("read_pages", tuple(region.va + i * PAGE for i in range(3, 8)))]
    assert memory.read(address, 4 * PAGE) == region.read(address, 4 * PAGE)  # all cached
    assert len(transport.calls) == 1
    memory.read(region.va + 6 * PAGE, 4 * PAGE)  # two cached, two missing: one crossing
    assert transport.calls[-1] == ("read_pages", (region.va + 8 * PAGE, region.va + 9 * PAGE))
    stats = memory.stats()
    assert (stats.crossings, stats.pages_fetched, stats.bytes_fetched) == (2, 7, 7 * PAGE)
    assert (stats.misses, stats.hits) == (7, 7)


def test_reads_beyond_a_request_and_beyond_the_budget(tmp_path: Path) -> None:
    region = patterned(1100, alias=32)  # 1,100 virtual pages over 32 physical ones
    memory, transport = remote(region, tmp_path, budget=MIB)
    assert memory.read(region.va, 1100 * PAGE) == region.read(region.va, 1100 * PAGE)
    assert [len(pages) for _, pages in transport.calls] == [1024, 76]
    assert memory.stats().crossings == 2 and len(memory.cache) == 256


def test_begin_scan_drops_stale_pages(tmp_path: Path) -> None:
    region = patterned(4)
    memory, transport = remote(region, tmp_path)
    assert memory.read(region.va + PAGE, 2) == b"\x01\x00"
    with (tmp_path / "ram.img").open("r+b") as f:  # the guest writes between scans
        f.seek(region.physical(region.va + PAGE))
        f.write(b"\x99\x99")
    assert memory.read(region.va + PAGE, 2) == b"\x01\x00"  # same scan: cached
    memory.begin_scan()
    assert transport.scans == 1 and len(memory.cache) == 0
    assert memory.read(region.va + PAGE, 2) == b"\x99\x99"


def test_faults_are_cached_for_the_scan(tmp_path: Path) -> None:
    region = patterned(4)
    region.unmap(region.va + 2 * PAGE)
    memory, transport = remote(region, tmp_path)
    for _ in range(10):
        with pytest.raises(PageFault) as fault:
            memory.read(region.va + 2 * PAGE + 8, 8)
        assert fault.value.address == region.va + 2 * PAGE + 8  # the byte read, as in-process
    assert len(transport.calls) == 1 and memory.stats().faults_fetched == 1
    memory.begin_scan()
    with pytest.raises(PageFault):
        memory.read(region.va + 2 * PAGE, 8)
    assert len(transport.calls) == 2


def test_a_fault_inside_a_multi_page_read(tmp_path: Path) -> None:
    region = patterned(4)
    region.unmap(region.va + 2 * PAGE)
    memory, transport = remote(region, tmp_path)
    with pytest.raises(PageFault) as fault:
        memory.read(region.va + PAGE + 10, PAGE)
    assert fault.value.address == region.va + 2 * PAGE
    assert memory.read(region.va + PAGE, 4) == b"\x01\x00\x01\x00"  # kept from that reply
    assert len(transport.calls) == 1


def test_reads_outside_the_address_space_never_cross(tmp_path: Path) -> None:
    memory, transport = remote(patterned(1), tmp_path)
    with pytest.raises(PageFault, match="64-bit"):
        memory.read((1 << 64) - 4, 8)
    with pytest.raises(PageFault):
        memory.read(-8, 8)
    with pytest.raises(ValueError):
        memory.read(0, -1)
    assert transport.calls == []


def test_cached_pages_do_not_widen_the_address_space(tmp_path: Path) -> None:
    """The one-page fast path serves only reads inside one page of the 64-bit space: with
    the first and last pages cached, a read that wraps, starts below 0 or above 2**64,
    or has a negative size still fails as it would with nothing cached."""
    memory, transport = remote(patterned(1), tmp_path)
    top = (1 << 64) - PAGE
    memory.cache.put(top, bytes(range(256)) * 16)
    memory.cache.put(0, bytes(PAGE))
    assert memory.read(top + PAGE - 8, 8) == bytes(range(248, 256))
    for address, size in [(top + PAGE - 4, 8), (-8, 8), (1 << 64, 8), ((1 << 64) + 16, 4)]:
        with pytest.raises(PageFault, match="64-bit"):
            memory.read(address, size)
    with pytest.raises(ValueError):
        memory.read(16, -1)
    assert transport.calls == []


def test_stats_since_gives_per_scan_counters(tmp_path: Path) -> None:
    region = patterned(8)
    memory, _ = remote(region, tmp_path)
    memory.read(region.va, PAGE)
    before = memory.stats()
    memory.begin_scan()
    memory.read(region.va, 3 * PAGE)
    scan = memory.stats().since(before)
    assert (scan.crossings, scan.pages_fetched, scan.misses, scan.hits) == (1, 3, 3, 0)
    assert scan.entries == 3 and scan.as_dict()["budget"] == 32 * MIB


class ShortTransport(CountingTransport):
    """A transport that loses the last page of every reply."""

    def read_pages(self, addresses):  # type: ignore[no-untyped-def]
        return super().read_pages(addresses)[:-1]


def test_a_reply_of_the_wrong_shape_is_an_error(tmp_path: Path) -> None:
    region = patterned(4)
    memory = RemoteMemory(ShortTransport(PageServer(region.tables.image(tmp_path))))
    with pytest.raises(TransportError, match="asked for 2 pages, got 1"):
        memory.read(region.va, 2 * PAGE)


# -- prefetch ------------------------------------------------------------------------


def prefetch_all(memory: RemoteMemory, ring: Ring, limit: int = 1000) -> int:
    """Prefetch window after window, as list_for_each_entry does; the calls made."""
    calls, after = 0, None
    while True:
        calls += 1
        after = memory.prefetch_list(ring.walk(limit, after or 0))
        if after is None:
            return calls


def test_prefetch_caches_every_entry_page(tmp_path: Path) -> None:
    ring = Ring(12)
    memory, transport = remote(ring.region, tmp_path)
    assert prefetch_all(memory, ring) == 1
    for node in ring.nodes:
        start = node - ring.member
        assert memory.read(start, ring.entry) == ring.region.read(start, ring.entry)
    assert len(transport.calls) == 1 and memory.stats().prefetches == 1


def test_a_streamed_walk_asks_each_next_window_ahead(tmp_path: Path) -> None:
    """With a transport that can take a walk ahead, each window's arrival sends the
    next, whose answer is taken when the walk gets there; windows start at
    FIRST_WINDOW nodes and double, up to a quarter of the budget each, and each
    announces the length of the one after it (``then``), which the trusted side walks
    ahead."""
    ring = Ring(300, pages=1000)  # entries of 3 or 4 pages
    transport = StreamingTransport(ring.server(tmp_path))
    memory = RemoteMemory(transport, 16 * MIB)  # a quarter: 1024 pages, 256 entries
    memory.begin_scan()
    calls, after = 0, None
    while True:
        calls += 1
        after = memory.prefetch_list(ring.walk(1000, after or 0))
        if after is None:
            break
    limits = [args[4] for _, args in transport.calls]
    assert [name for name, _ in transport.calls] == ["follow_list_later"] * 4
    assert limits == [FIRST_WINDOW, 2 * FIRST_WINDOW, 4 * FIRST_WINDOW, 8 * FIRST_WINDOW]
    assert [args[-1] for _, args in transport.calls] == [*limits[1:], 16 * FIRST_WINDOW]
    assert len(transport.taken) == 4 and calls == 4
    for node in ring.nodes:
        start = node - ring.member
        assert memory.read(start, ring.entry) == ring.region.read(start, ring.entry)
    assert memory.stats().evictions == 0 and memory.cache.reserved == 0
    memory.begin_scan()  # a window sent ahead and never asked for is dropped
    assert memory.prefetch_list(ring.walk(1000)) == ring.nodes[FIRST_WINDOW - 1]
    memory.begin_scan()
    assert memory.prefetch_list(ring.walk(1000)) == ring.nodes[FIRST_WINDOW - 1]
    assert len(transport.taken) == 4 + 2 and memory.cache.reserved > 0  # two first windows


def test_streamed_windows_stop_doubling_at_the_last_window(tmp_path: Path) -> None:
    """Past ``LAST_WINDOW`` nodes windows keep that length (and announce it), however
    much of the budget is left: the trusted side then walks each next window in about
    the time the enclave takes for this one, instead of twice as long."""
    doublings = (LAST_WINDOW // FIRST_WINDOW).bit_length()  # windows up to the last
    reached = FIRST_WINDOW * (2**doublings - 1)  # the nodes in them
    count = reached + LAST_WINDOW + 100  # one-page entries: two more windows, not one
    ring = Ring(count, pages=count + 16, member=0x40, entry=0x100)
    transport = StreamingTransport(ring.server(tmp_path))
    memory = RemoteMemory(transport, 64 * MIB)  # a quarter: 4096 one-page entries
    memory.begin_scan()
    after = memory.prefetch_list(ring.walk(2 * count))
    while after is not None:
        after = memory.prefetch_list(ring.walk(2 * count, after))
    limits = [args[4] for _, args in transport.calls]
    grown = [FIRST_WINDOW << i for i in range(doublings)]
    assert grown[-1] == LAST_WINDOW and sum(grown) == reached
    assert limits == [*grown, LAST_WINDOW, LAST_WINDOW]
    assert [args[-1] for _, args in transport.calls] == [*limits[1:], LAST_WINDOW]
    for node in ring.nodes:
        start = node - ring.member
        assert memory.read(start, ring.entry) == ring.region.read(start, ring.entry)
    assert memory.stats().evictions == 0


def test_a_window_that_takes_the_walks_whole_limit_announces_none(tmp_path: Path) -> None:
    """``then`` is the next window's length, bounded by the walk's ``limit`` like the
    window itself, and 0 once a window takes the whole limit (none follows it)."""
    ring = Ring(60, pages=200)
    transport = StreamingTransport(ring.server(tmp_path))
    memory = RemoteMemory(transport, 16 * MIB)
    memory.begin_scan()
    last = memory.prefetch_list(ring.walk(40))
    assert last == ring.nodes[FIRST_WINDOW - 1]
    assert memory.prefetch_list(ring.walk(40, last)) is None
    assert [(args[4], args[-1]) for _, args in transport.calls] == [(FIRST_WINDOW, 40), (40, 0)]


def test_streamed_windows_fit_a_quarter_of_the_budget(tmp_path: Path) -> None:
    """A streamed window asks for a quarter of the budget in pages and holds the entries
    that fit: 21 of these 3-page entries in 64 pages, where windows sized for the worst
    case (4 pages an entry) held 16 and took a fourth crossing."""
    ring = Ring(60, pages=200)  # 60 entries of 3 pages (4 at worst); 1 MiB holds 256 pages
    assert {len(ring.span(node)) for node in ring.nodes} == {3}
    transport = StreamingTransport(ring.server(tmp_path))
    memory = RemoteMemory(transport, MIB)
    assert prefetch_all(memory, ring) == 3
    assert [call[1][6] for call in transport.calls] == [64, 64, 64]  # max_pages
    assert [call[1][5] for call in transport.calls[1:]] == [ring.nodes[20], ring.nodes[41]]
    assert len(transport.taken) == 3
    assert memory.stats().evictions == 0 and memory.cache.reserved == 0
    for node in ring.nodes:
        start = node - ring.member
        assert memory.read(start, ring.entry) == ring.region.read(start, ring.entry)


def test_prefetch_windows_fit_half_the_budget(tmp_path: Path) -> None:
    ring = Ring(60, pages=200)  # 60 entries of 3 pages; 1 MiB holds 256 pages
    memory, transport = remote(ring.region, tmp_path, budget=MIB)
    assert prefetch_all(memory, ring) == 2  # windows of 128 pages: 42 entries, then 18
    assert [call[1][-1] for call in transport.calls] == [128, 128]
    assert memory.stats().evictions == 0  # 60 entries of 3 pages all fit
    # every entry's 3 pages, the head's, and again the page of the node window 2 went on from
    assert memory.stats().pages_fetched == 180 + 1 + 1


def test_prefetch_past_a_wild_pointer_stops_quietly(tmp_path: Path) -> None:
    ring = Ring(5)
    ring.link(ring.nodes[1], 0xDEAD_0000_0000_0000, ring.nodes[0])
    memory, _ = remote(ring.region, tmp_path)
    assert prefetch_all(memory, ring) == 1
    assert memory.stats().faults_fetched == 1


# -- list_for_each_entry with the prefetch hint ---------------------------------------


def walk(memory: AddressSpace, head: int, limit: int = 1000) -> tuple[list[int], str | None]:
    """The entries a validating walk yields, and the error that ended it, if any."""
    tm = TypedMemory(vendor_btf(), memory)
    seen: list[int] = []
    try:
        for task in list_for_each_entry(
            "struct task_struct", tm.value("struct list_head *", head), "tasks", limit
        ):
            seen.append(int(task))
    except ValidationError as exc:
        return seen, str(exc)
    return seen, None


def task_ring(count: int, pages: int = 200) -> Ring:
    tm = TypedMemory(vendor_btf(), None)  # type: ignore[arg-type]  # layouts only, no reads
    member = tm.offsetof("struct task_struct", "tasks")
    return Ring(count, pages, member=member, entry=tm.sizeof("struct task_struct"))


CORRUPTIONS = {
    "good": lambda r: None,
    "cycle": lambda r: r.link(r.nodes[-1], r.nodes[3], r.nodes[-2]),
    "broken prev": lambda r: r.link(r.nodes[4], r.nodes[5], r.nodes[1]),
    "wild": lambda r: r.link(r.nodes[6], 0xFFFF_8880_DEAD_0000, r.nodes[5]),
    "noncanonical": lambda r: r.link(r.nodes[6], 0x4141_4141_4141_4141, r.nodes[5]),
    "hole in an entry": lambda r: r.region.unmap(max(r.span(r.nodes[2]))),
    "unreadable head": lambda r: r.region.unmap(r.head & ~0xFFF),
}


@pytest.mark.parametrize("budget", [32 * MIB, MIB], ids=["32MiB", "1MiB"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_prefetch_never_changes_what_the_walk_finds(
    tmp_path: Path, corruption: str, budget: int
) -> None:
    ring = task_ring(40)
    CORRUPTIONS[corruption](ring)
    image = ring.tables.image(tmp_path)
    expected = walk(VirtualMemory(PageWalker.for_kernel(image, image.registers())), ring.head)
    memory = RemoteMemory(CountingTransport(PageServer(image)), budget)
    assert walk(memory, ring.head) == expected
    assert memory.stats().prefetches >= 1
    without = RemoteMemory(CountingTransport(PageServer(image)), budget)
    assert walk(NoPrefetch(without), ring.head) == expected
    for limit in (10, 40):  # too short, and just long enough
        plain = VirtualMemory(PageWalker.for_kernel(image, image.registers()))
        memory.begin_scan()
        assert walk(memory, ring.head, limit) == walk(plain, ring.head, limit)


@pytest.mark.parametrize(("budget", "crossings"), [(32 * MIB, 1), (MIB, 1), (MIB // 2, 2)])
def test_a_good_list_walk_costs_one_crossing_per_window(
    tmp_path: Path, budget: int, crossings: int
) -> None:
    ring = task_ring(40)
    memory, transport = remote(ring.region, tmp_path, budget)
    entries, error = walk(memory, ring.head)
    assert error is None and len(entries) == 40
    assert len(transport.calls) == memory.stats().crossings == crossings


# -- what a scan needs, learned from the scan before ----------------------------------


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_learned_prediction_never_changes_what_the_walk_finds(
    tmp_path: Path, corruption: str
) -> None:
    """A scan learned on a good list, then the guest corrupts it: the next scan fetches
    the predicted pages afresh and the walk finds exactly what an in-process walk finds."""
    ring = task_ring(40)
    image_path = tmp_path / "good"
    image_path.mkdir()
    memory = RemoteMemory(CountingTransport(PageServer(ring.tables.image(image_path))))
    for view in (memory, NoPrefetch(memory)):  # learn: with and without the list hint
        memory.begin_scan()
        assert walk(view, ring.head)[1] is None
    CORRUPTIONS[corruption](ring)
    bad_path = tmp_path / "bad"
    bad_path.mkdir()
    image = ring.tables.image(bad_path)
    memory.transport = transport = CountingTransport(PageServer(image))
    plain = VirtualMemory(PageWalker.for_kernel(image, image.registers()))
    memory.begin_scan()
    assert walk(NoPrefetch(memory), ring.head) == walk(plain, ring.head)
    assert memory.stats().predicted > 0
    assert transport.calls and all(len(c[1]) > 1 for c in transport.calls[:1])


def test_prediction_rides_in_the_first_crossing_and_reads_afresh(tmp_path: Path) -> None:
    region = patterned(16)
    memory, transport = remote(region, tmp_path)
    memory.begin_scan()
    for page in (2, 5, 9):  # three misses, three crossings
        memory.read(region.va + page * PAGE, 2)
    assert len(transport.calls) == 3
    with (tmp_path / "ram.img").open("r+b") as f:  # the guest writes between scans
        f.seek(region.physical(region.va + 5 * PAGE))
        f.write(b"\x77\x77")
    memory.begin_scan()
    assert len(memory.cache) == 0
    assert memory.read(region.va + 9 * PAGE, 2) == b"\x09\x00"
    asked = transport.calls[-1][1]
    assert sorted(asked) == [region.va + p * PAGE for p in (2, 5, 9)]  # one crossing
    assert memory.read(region.va + 5 * PAGE, 2) == b"\x77\x77"  # this scan's bytes
    assert memory.read(region.va + 2 * PAGE, 2) == b"\x02\x00"
    assert len(transport.calls) == 4
    stats = memory.stats()
    assert (stats.predicted, stats.predicted_used) == (2, 2)
    memory.begin_scan()  # pages a scan did not read are not predicted again
    memory.read(region.va + 9 * PAGE, 2)
    assert sorted(transport.calls[-1][1]) == [region.va + p * PAGE for p in (2, 5, 9)]
    memory.begin_scan()
    memory.read(region.va + 9 * PAGE, 2)
    assert transport.calls[-1][1] == (region.va + 9 * PAGE,)


def test_predicted_pages_stay_within_the_budget(tmp_path: Path) -> None:
    """More pages predicted than a quarter of the budget holds: each crossing brings the
    next quarter's worth, in the order the last scan needed them, so the scan takes a
    handful of crossings instead of one per page beyond the first quarter."""
    region = patterned(600, alias=32)
    memory, transport = remote(region, tmp_path, budget=MIB)  # 256 pages
    memory.begin_scan()
    for page in range(0, 600, 2):
        memory.read(region.va + page * PAGE, 8)
    memory.begin_scan()
    before = memory.stats()
    memory.read(region.va + PAGE, 8)
    assert len(transport.calls[-1][1]) <= 1 + MIB // 4 // PAGE
    assert memory.cache.used + memory.cache.reserved <= MIB
    for page in range(0, 600, 2):
        assert memory.read(region.va + page * PAGE, 2) == region.read(region.va + page * PAGE, 2)
        assert memory.cache.used + memory.cache.reserved <= MIB
    scan = memory.stats().since(before)
    assert scan.crossings <= 300 // (MIB // 4 // PAGE) + 2
    assert scan.predicted_used >= 300 - scan.crossings  # each later crossing: one miss


# -- only the part of each entry the last scan read -----------------------------------


def walk_fields(
    memory: AddressSpace, head: int, limit: int = 1000, fields: tuple[str, ...] = ("pid",)
) -> tuple[list[tuple[int, ...]], str | None]:
    """As :func:`walk`, also reading ``fields`` of each task (as pslist reads pid, comm)."""
    tm = TypedMemory(vendor_btf(), memory)
    offsets = [tm.offsetof("struct task_struct", f) for f in fields]
    seen: list[tuple[int, ...]] = []
    try:
        for task in list_for_each_entry(
            "struct task_struct", tm.value("struct list_head *", head), "tasks", limit
        ):
            values = [int.from_bytes(memory.read(int(task) + o, 8), "little") for o in offsets]
            seen.append((int(task), *values))
    except (ValidationError, PageFault) as exc:
        return seen, f"{type(exc).__name__}: {exc}"
    return seen, None


def numbered_ring(count: int) -> Ring:
    ring = task_ring(count)
    tm = TypedMemory(vendor_btf(), None)  # type: ignore[arg-type]
    for field in ("pid", "thread"):
        offset = tm.offsetof("struct task_struct", field)
        for i, node in enumerate(ring.nodes):
            ring.region.write(node - ring.member + offset, (1000 + i).to_bytes(8, "little"))
    return ring


def list_calls(transport: CountingTransport) -> list[tuple[int, ...]]:
    return [args for name, args in transport.calls if name == "follow_list"]


def test_later_scans_ask_only_for_the_part_of_each_entry_read(tmp_path: Path) -> None:
    ring = numbered_ring(40)
    memory, transport = remote(ring.region, tmp_path)
    (tmp_path / "plain").mkdir()
    image = ring.tables.image(tmp_path / "plain")
    plain = VirtualMemory(PageWalker.for_kernel(image, image.registers()))
    expected = walk_fields(plain, ring.head)
    assert expected[1] is None and len(expected[0]) == 40
    memory.begin_scan()
    assert walk_fields(memory, ring.head) == expected
    first = memory.stats()
    assert list_calls(transport)[-1][2:4] == (ring.member, ring.entry)  # whole entries
    memory.begin_scan()
    assert walk_fields(memory, ring.head) == expected
    second = memory.stats().since(first)
    _, _, member, size, *_ = list_calls(transport)[-1]
    tm = TypedMemory(vendor_btf(), None)  # type: ignore[arg-type]
    pid = tm.offsetof("struct task_struct", "pid")
    start = ring.member - member  # the span's start in the entry
    assert size < ring.entry and start <= min(pid, ring.member)
    assert start + size >= max(pid + 8, ring.member + 16)
    assert second.crossings == 1 and second.misses == 0
    assert second.pages_fetched < first.pages_fetched


def test_a_read_outside_the_learned_span_is_fetched_and_learned(tmp_path: Path) -> None:
    ring = numbered_ring(12)
    memory, transport = remote(ring.region, tmp_path)
    memory.begin_scan()
    walk_fields(memory, ring.head, fields=("pid",))
    memory.begin_scan()
    walk_fields(memory, ring.head, fields=("pid",))
    narrow = list_calls(transport)[-1][3]
    memory.begin_scan()  # this scan reads more of each entry than the last one did
    found, error = walk_fields(memory, ring.head, fields=("pid", "thread"))
    assert error is None and [f[1:] for f in found] == [(1000 + i,) * 2 for i in range(12)]
    assert memory.stats().misses > 0 and transport.calls[-1][0] == "read_pages"
    memory.begin_scan()  # ... and the next one asks for that too
    calls = len(transport.calls)
    assert walk_fields(memory, ring.head, fields=("pid", "thread")) == (found, None)
    assert list_calls(transport)[-1][3] > narrow and len(transport.calls) == calls + 1
    memory.begin_scan()  # a span only grows: a scan reading less keeps it
    assert walk_fields(memory, ring.head, fields=("pid",))[1] is None
    assert list_calls(transport)[-1][3] == list_calls(transport)[-2][3]
    (tmp_path / "again").mkdir()
    fresh, fresh_transport = remote(ring.region, tmp_path / "again")
    for _ in range(2):  # in a session whose scans read only the links
        fresh.begin_scan()
        assert walk_fields(fresh, ring.head, fields=())[1] is None
    assert [c[3] for c in list_calls(fresh_transport)] == [ring.entry, 16]


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_learned_span_never_changes_what_the_walk_finds(tmp_path: Path, corruption: str) -> None:
    """Spans learned on a good list, then the guest changes (a pid) and corrupts the
    list: the next scan reads everything afresh and finds what an in-process walk finds."""
    ring = numbered_ring(40)
    good = tmp_path / "good"
    good.mkdir()
    memory = RemoteMemory(CountingTransport(PageServer(ring.tables.image(good))))
    for _ in range(2):
        memory.begin_scan()
        assert walk_fields(memory, ring.head, fields=("pid", "thread"))[1] is None
    assert memory.entry_spans
    tm = TypedMemory(vendor_btf(), None)  # type: ignore[arg-type]
    pid = tm.offsetof("struct task_struct", "pid")
    ring.region.write(ring.nodes[1] - ring.member + pid, (4242).to_bytes(8, "little"))
    CORRUPTIONS[corruption](ring)
    bad = tmp_path / "bad"
    bad.mkdir()
    image = ring.tables.image(bad)
    memory.transport = CountingTransport(PageServer(image))
    for limit in (1000, 10):
        plain = VirtualMemory(PageWalker.for_kernel(image, image.registers()))
        expected = walk_fields(plain, ring.head, limit, ("pid", "thread"))
        memory.begin_scan()
        assert walk_fields(memory, ring.head, limit, ("pid", "thread")) == expected
        if len(expected[0]) > 1:
            assert expected[0][1][1] == 4242
