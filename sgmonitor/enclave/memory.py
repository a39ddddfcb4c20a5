"""The enclave's view of guest kernel memory: pages from the trusted side, cached.

:class:`RemoteMemory` is the ``AddressSpace`` the IDS reads through in the secure
modes. Every page comes from a :class:`PageTransport` (the sealed channel to the
hypervisor service, or a ``PageServer`` in-process) and is kept in a :class:`PageCache`
bounded like the EPC. Crossings, not cryptography, are the cost (DESIGN.md, "Data path
and its budget"), so a read fetches all its missing pages in one call, a list walk can
ask the trusted side to follow the list and return every entry's pages in one reply,
and the counters say how many crossings a scan took. Over the sealed channel a list is
streamed: while the IDS works through one window of it, the next is already asked for.

The cache lives for one scan: :meth:`RemoteMemory.begin_scan` empties it, so a periodic
IDS never judges the guest by pages read during an earlier scan. Faults are cached too
(negative entries), so a wild pointer read in a loop costs one crossing per scan.

What a scan will read is learned from the one before: the pages the previous scan of
the session had to fetch one miss at a time (second-level pointers such as a task's
``cred``) are asked for again, fresh, in the new scan's crossings, in the order that
scan needed them: as many as a quarter of the budget holds in the first, more in each
later one as the scan reads those. Like the list prefetch this is only a hint about
*which* pages to fetch: every page is read during the current scan, and the walk
validates whatever it reads.

So is the part of each list entry a walk reads: a list prefetch asks for whole entries
the first time, and from then on only for the hull of the offsets the previous scan
read inside that list's entries (``task_struct`` is ~10 KiB, a ``pslist`` reads ~3 KiB
of it). A read outside that hull is a plain miss, fetched and added to the hull for the
next scan (so a hull only grows, until a scan reads nothing inside the list's entries).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

from sgmonitor.errors import PageFault, SGMonitorError
from sgmonitor.wire.sealed import (
    MAX_LIST_NODES,
    MAX_PAGES_PER_REQUEST,
    MAX_REPLY_PAGES,
    ListEnd,
    ListWalk,
)

__all__ = [
    "DEFAULT_BUDGET",
    "FIRST_WINDOW",
    "LAST_WINDOW",
    "CacheStats",
    "ListPages",
    "PageCache",
    "PageTransport",
    "RemoteMemory",
    "TransportError",
]

PAGE_SIZE = 4096
_PAGE_MASK = PAGE_SIZE - 1
_U64 = 1 << 64
_PAGE_BASE = _U64 - PAGE_SIZE  # address & _PAGE_BASE: its page, for 0 <= address < 2**64
DEFAULT_BUDGET = 32 << 20  # the EPC of the paper's machine
NEGATIVE_ENTRY_COST = 64  # budget bytes charged for a cached fault
FIRST_WINDOW = 32  # list nodes in a streamed walk's first window (see prefetch_list)
LAST_WINDOW = 512  # ... and in its largest: windows double from the first up to this


class TransportError(SGMonitorError):
    """The transport answered with a reply of the wrong shape (a bug, never guest data)."""


class ListPages(Protocol):
    """The trusted side's answer to ``follow_list``: nodes in list order, why the walk
    ended (:class:`sgmonitor.wire.sealed.ListEnd`), and every page it read."""

    @property
    def nodes(self) -> Sequence[int]: ...

    @property
    def end(self) -> ListEnd: ...

    @property
    def pages(self) -> Mapping[int, bytes | PageFault]: ...


class PageTransport(Protocol):
    """What the enclave needs from the trusted side (one call = one crossing).

    A transport may also offer ``begin_scan()``, called when a scan starts, to refresh
    its registers and translations, and ``follow_list_later(walk, pages=..., then=...)``,
    which sends a ``follow_list`` at once (announcing the next window's length) and
    returns the call that takes its answer (streamed list walks, see
    :meth:`RemoteMemory.prefetch_list`).
    """

    def read_pages(self, addresses: Sequence[int]) -> Sequence[bytes | PageFault]:
        """Page-aligned guest-virtual addresses (at most ``MAX_PAGES_PER_REQUEST``) ->
        4096 bytes each, or the authenticated fault, in order."""
        ...

    def follow_list(self, walk: ListWalk, *, pages: Sequence[int] = ()) -> ListPages:
        """Follow a kernel list on the trusted side (see ``PageServer.follow_list``);
        also read ``pages`` (at most ``MAX_PAGES_PER_REQUEST``) in the same crossing."""
        ...


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache and its counters; ``later.since(earlier)`` gives the
    counters of what happened in between (a scan)."""

    budget: int
    used: int
    entries: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    crossings: int = 0
    pages_fetched: int = 0
    faults_fetched: int = 0
    bytes_fetched: int = 0  # page bytes received (and, over the sealed channel, decrypted)
    prefetches: int = 0
    predicted: int = 0  # pages fetched because the previous scan needed them
    predicted_used: int = 0  # ... and read by this scan

    def since(self, earlier: CacheStats) -> CacheStats:
        """Counters as differences, sizes as now."""
        counters = {name: getattr(self, name) - getattr(earlier, name) for name in _COUNTERS}
        return CacheStats(self.budget, self.used, self.entries, **counters)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# CacheStats' counters (its other fields are sizes); PageCache has an attribute of each.
_COUNTERS = tuple(f.name for f in fields(CacheStats) if f.name not in ("budget", "used", "entries"))


class PageCache:
    """Pages by guest-virtual address, least recently used evicted first, within a byte
    budget (each page costs 4096, each cached fault ``NEGATIVE_ENTRY_COST``)."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        if budget < PAGE_SIZE:
            raise ValueError(f"a cache budget of {budget} bytes holds no page")
        self.budget = budget
        self.used = 0
        self.reserved = 0  # budget bytes held outside the cache (RemoteMemory's staged pages)
        self._entries: OrderedDict[int, bytes | PageFault] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self.crossings = self.pages_fetched = self.faults_fetched = 0
        self.bytes_fetched = self.prefetches = 0
        self.predicted = self.predicted_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, page: object) -> bool:
        return page in self._entries

    def get(self, page: int) -> bytes | PageFault | None:
        """The cached page (or fault), now the most recently used; None on a miss."""
        found = self._entries.get(page)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(page)
        return found

    def hit(self, page: int) -> bytes | None:
        """The cached bytes of ``page``, now the most recently used; None if it is not
        cached or is a cached fault (:meth:`get` then tells which, and counts it).
        The one-page read's fast path: a hit and nothing else."""
        found = self._entries.get(page)
        if found.__class__ is not bytes:
            return None
        self.hits += 1
        self._entries.move_to_end(page)
        return found

    def put(self, page: int, value: bytes | PageFault) -> None:
        """Cache a page or a fault as the most recently used, evicting to fit."""
        self.put_all(((page, value),))

    def put_all(self, items: Iterable[tuple[int, bytes | PageFault]]) -> None:
        """:meth:`put` each in turn, evicting once after the last (the same entries
        stay: the least recently used go first either way)."""
        entries = self._entries
        for page, value in items:
            old = entries.pop(page, None)
            if old is not None:
                self.used -= _cost(old)
            entries[page] = value
            self.used += _cost(value)
        self.reserve(0)

    def reserve(self, size: int) -> None:
        """Hold ``size`` more budget bytes outside the cache (less, if negative),
        evicting to fit."""
        self.reserved += size
        while self.used + self.reserved > self.budget and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.used -= _cost(evicted)
            self.evictions += 1

    def clear(self) -> None:
        """Forget every page (a new scan); counters keep counting."""
        self._entries.clear()
        self.used = 0

    def stats(self) -> CacheStats:
        counters = {name: getattr(self, name) for name in _COUNTERS}
        return CacheStats(self.budget, self.used, len(self._entries), **counters)


def _fault_at(fault: PageFault, address: int) -> PageFault:
    """A page's cached fault as a fresh error naming the byte actually read, as the
    in-process walker does (the cached one names the page and must not collect
    tracebacks)."""
    why = str(fault).removeprefix(f"guest-virtual {fault.address:#x}: ")
    if fault.entry is not None:
        why = why.removesuffix(f" at level {fault.level} (entry {fault.entry:#x})")
    return PageFault(address, fault.level, fault.entry, why)


class _EntrySpan:
    """What scans read inside the entries of one prefetched list: ``[lo, hi)`` relative
    to the entry's start (empty while ``lo >= hi``), the entry being ``size`` bytes."""

    __slots__ = ("hi", "lo", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.lo = size
        self.hi = 0


def _cost(value: bytes | PageFault) -> int:
    return len(value) if isinstance(value, bytes) else NEGATIVE_ENTRY_COST


class RemoteMemory:
    """Guest-virtual kernel memory fetched from the trusted side, page by page, cached.

    Implements :class:`sgmonitor.kernel.address_space.AddressSpace`, plus
    :meth:`prefetch_list`, which ``list_for_each_entry`` uses when present.
    """

    def __init__(self, transport: PageTransport, cache_budget: int = DEFAULT_BUDGET) -> None:
        self.transport = transport
        # The sealed channel's split exchange, which streams list walks; None in-process.
        self._follow_list_later = getattr(transport, "follow_list_later", None)
        self.cache = PageCache(cache_budget)
        # Pages fetched because the previous scan needed them, not read yet (their bytes
        # are charged to the cache budget as ``reserved``), and what to ask for.
        self._staged: dict[int, bytes | PageFault] = {}
        self._staged_bytes = 0  # their cost, at most a quarter of the budget
        self._predict: list[int] = []
        self._needed: list[int] = []  # this scan's misses and staged pages it read
        # At most this many pages a scan (32 MiB: the creds of some 100,000 processes);
        # they are fetched a staging quarter at a time.
        self.max_predicted = 8 * MAX_PAGES_PER_REQUEST
        # The part of each prefetched list's entries the last scan read, by list layout
        # (ListWalk.layout) -> (lo, hi) relative to the entry;
        # this scan's, and the entries prefetched in this scan (sorted starts, and the
        # span each start belongs to) that reads are attributed to.
        self.entry_spans: dict[tuple[int, int, int, int], tuple[int, int]] = {}
        self._reading: dict[tuple[int, int, int, int], _EntrySpan] = {}
        self._starts: list[int] = []
        self._owners: list[_EntrySpan] = []
        self._unsorted: list[tuple[int, _EntrySpan]] = []
        self._learning = False  # some list's entries came whole this scan: note every read
        self._windows: dict[tuple[int, int, int, int], int] = {}  # list windows this scan
        self._ahead: _Ahead | None = None  # the next window, asked for already

    def begin_scan(self) -> None:
        """Start a scan: drop every cached page and fault, let the transport refresh."""
        for key, span in self._reading.items():
            if span.lo < span.hi:
                self.entry_spans[key] = (span.lo, span.hi)
            else:  # nothing read inside this list's entries: ask for them whole again
                self.entry_spans.pop(key, None)
        self._reading.clear()
        self._starts, self._owners, self._unsorted = [], [], []
        self._learning = False
        self.cache.clear()
        self._staged.clear()
        self._staged_bytes = 0
        self._windows.clear()
        self._ahead = None  # (the transport takes in an answer still out itself)
        self.cache.reserved = 0
        self._predict = list(dict.fromkeys(self._needed))[: self.max_predicted]
        self._needed = []
        refresh = getattr(self.transport, "begin_scan", None)
        if refresh is not None:
            refresh()

    def learn_from_here(self) -> None:
        """Forget the misses of this scan so far (e.g. reading symbols and types, which a
        session does once): the next scan is predicted from what follows."""
        self._needed = []

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def read(self, address: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``address``; all missing pages in one crossing.

        :raises PageFault: a page of the range is not present (authenticated by the
            trusted side) or the range leaves the 64-bit address space
        """
        first = address & _PAGE_BASE
        offset = address - first  # outside 0..PAGE_SIZE - size for a bad address or size
        if 0 <= offset <= PAGE_SIZE - size and size >= 0 and not self._learning:
            data = self.cache.hit(first)  # the common case: one cached page
            if data is not None:
                return data[offset : offset + size]
        return self._read(address, size)

    def _read(self, address: int, size: int) -> bytes:
        """:meth:`read`, every case."""
        if size < 0:
            raise ValueError("negative size")
        if not 0 <= address <= _U64 - max(size, 1):
            raise PageFault(address, 0, None, "outside the 64-bit address space")
        if self._learning:  # a list was fetched whole: see what its entries are read for
            self._note_entry_read(address, size)
        first = address & ~_PAGE_MASK
        offset = address - first
        if offset + size <= PAGE_SIZE:  # the common case: one page
            data = self.cache.get(first)
            if data is None:
                data = self._staged.pop(first, None)
                if data is None:
                    if self._starts or self._unsorted:  # outside a learned span?
                        self._note_entry_read(address, size)
                    data = self._fetch([first])[first]
                else:
                    self._unstage(first, data)
            if isinstance(data, PageFault):
                raise _fault_at(data, address)
            return data[offset : offset + size]
        pages = range(first, address + size, PAGE_SIZE)
        found: dict[int, bytes | PageFault] = {}
        missing = []
        for page in pages:
            cached = self.cache.get(page)
            if cached is None:
                cached = self._staged.pop(page, None)
                if cached is not None:
                    self._unstage(page, cached)
            if cached is None:
                missing.append(page)
            else:
                found[page] = cached
        if missing:
            if self._starts or self._unsorted:
                self._note_entry_read(address, size)
            found.update(self._fetch(missing))
        parts = []
        for page in pages:
            data = found[page]
            if isinstance(data, PageFault):
                raise _fault_at(data, max(address, page))
            parts.append(data)
        return b"".join(parts)[offset : offset + size]

    def _note_entry_read(self, address: int, size: int) -> None:
        """Widen the span of the prefetched entry ``address`` lies in (if any). Called
        for every read while some list's entries came whole, else only for misses (a
        read inside a learned span hits, so only a miss can widen it)."""
        if self._unsorted:
            merged = sorted(
                [*zip(self._starts, self._owners, strict=True), *self._unsorted],
                key=_first,
            )
            self._starts = [start for start, _ in merged]
            self._owners = [owner for _, owner in merged]
            self._unsorted = []
        i = bisect_right(self._starts, address) - 1
        if i < 0:
            return
        span = self._owners[i]
        offset = address - self._starts[i]
        if offset >= span.size:
            return
        if offset < span.lo:
            span.lo = offset
        end = min(offset + max(size, 1), span.size)
        if end > span.hi:
            span.hi = end

    def _fetch(self, pages: list[int]) -> dict[int, bytes | PageFault]:
        """Fetch ``pages`` in as few crossings as the request limit allows; cache them.
        The first crossing also brings the next predicted pages."""
        self._needed += pages
        out: dict[int, bytes | PageFault] = {}
        first, asked = pages[:MAX_PAGES_PER_REQUEST], set(pages)
        extra = self._take_prediction(asked, MAX_PAGES_PER_REQUEST - len(first))
        batches = [first + extra]
        batches += [
            pages[i : i + MAX_PAGES_PER_REQUEST]
            for i in range(MAX_PAGES_PER_REQUEST, len(pages), MAX_PAGES_PER_REQUEST)
        ]
        for batch in batches:
            reply = self.transport.read_pages(batch)
            self.cache.crossings += 1
            if len(reply) != len(batch):
                raise TransportError(f"asked for {len(batch)} pages, got {len(reply)}")
            stored = []
            for page, value in zip(batch, reply, strict=True):
                if page not in asked:
                    self._stage(page, value)
                else:
                    stored.append((page, value))
                    out[page] = value
            self._store(stored)
        return out

    def _take_prediction(self, exclude: set[int], room: int) -> list[int]:
        """The next predicted pages to fetch, in the order the last scan needed them: at
        most ``room``, and no more than the staging quarter of the budget has room for
        now (the rest ride along with later crossings, as staged pages are read)."""
        if not self._predict or room <= 0:
            return []
        space = (self.cache.budget // 4 - self._staged_bytes) // PAGE_SIZE
        wanted = [p for p in self._predict if p not in exclude and p not in self.cache]
        wanted = [p for p in wanted if p not in self._staged]
        taken = wanted[: max(0, min(room, space))]
        self._predict = wanted[len(taken) :]
        return taken

    def _asked(self, walk: ListWalk) -> ListWalk:
        """The walk to ask for: over whole entries, or over the learned hull of what the
        last scan read in them, always with the node's links (its ``list_head``)."""
        learned = self.entry_spans.get(walk.layout)
        if learned is None:
            return walk
        node = walk.member_offset  # the node's offset in its entry
        lo = max(0, min(learned[0], node))
        hi = min(walk.span_size, max(learned[1], node + 16))
        return replace(walk, member_offset=node - lo, span_size=hi - lo)

    def _stage(self, page: int, value: bytes | PageFault) -> None:
        """Keep a predicted page until the scan reads it, within the budget's quarter."""
        self._check([(page, value)])
        self.cache.predicted += 1
        cost = _cost(value)
        if page in self._staged or self._staged_bytes + cost > self.cache.budget // 4:
            return
        self._staged[page] = value
        self._staged_bytes += cost
        self.cache.reserve(cost)

    def _unstage(self, page: int, value: bytes | PageFault) -> None:
        """A staged page is read: it moves to the cache (and is predicted next time)."""
        self._staged_bytes -= _cost(value)
        self.cache.reserve(-_cost(value))
        self.cache.predicted_used += 1
        self._needed.append(page)
        self.cache.put(page, value)

    def _store(self, items: list[tuple[int, bytes | PageFault]]) -> None:
        self._check(items)
        self.cache.put_all(items)

    def _check(self, items: list[tuple[int, bytes | PageFault]]) -> None:
        """Count fetched pages and faults; anything else is the transport's bug."""
        faults = 0
        for page, value in items:
            if value.__class__ is bytes and len(value) == PAGE_SIZE:
                continue
            if not isinstance(value, PageFault):
                raise TransportError(f"page {page:#x}: neither {PAGE_SIZE} bytes nor a fault")
            faults += 1
        self.cache.pages_fetched += len(items) - faults
        self.cache.bytes_fetched += (len(items) - faults) * PAGE_SIZE
        self.cache.faults_fetched += faults

    def prefetch_list(self, walk: ListWalk) -> int | None:
        """Have the trusted side follow a list and cache every page its entries span.

        An optimization only: nothing is validated here (the walk that follows checks
        every link it reads from the cache). ``walk`` spans whole entries and its
        ``limit`` bounds the whole walk; each call asks for one window of it. Once a
        scan of this session has read inside this list's entries, only the hull of what
        it read (and the node's links) is asked for; reads outside it miss, are
        fetched, and widen it.

        A transport with ``follow_list_later`` (the sealed channel) streams the walk:
        as each window arrives the next is asked for at once, so the trusted side walks
        and the relay carries it while the IDS works through this one. Windows start at
        ``FIRST_WINDOW`` nodes (the IDS starts soon) and double up to ``LAST_WINDOW``
        nodes and a quarter of the cache budget each (this window cached, the next held
        outside the cache and reserved in its budget). The trusted side walks the next
        window while the enclave works through this one, taking about as long a node:
        a window twice as long as the last takes it about as long as the enclave's work
        on the last two, so windows that kept doubling had the enclave wait for each,
        longer the longer they grew (docs/benchmarks.md, "Windows that stop growing").
        Each request also announces the window after it (``then``), which the trusted
        side walks ahead of being asked. Without streaming one window holds half the
        budget. Either way prefetched pages are not evicted before the walk reaches them.

        :return: the last node prefetched when more may follow (call again with
            ``after=`` that node when the walk gets there), else None
        """
        key = walk.layout
        windows = self._windows.get(key, 0)
        asked = self._window(walk, windows)
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self.cache.reserve(-ahead.reserved)
        later = self._follow_list_later
        if ahead is not None and ahead.walk == asked:
            found, extra = ahead.answer(), ahead.pages
        else:  # nothing sent ahead for this window (a stale one is just dropped)
            extra = self._take_prediction(set(), self._predicted_with(asked))
            if later is None:
                found = self.transport.follow_list(asked, pages=extra)
            else:
                found = later(asked, pages=extra, then=self._then(walk, windows))()
        self._windows[key] = windows + 1
        span = self._reading.get(key)
        if span is None:
            span = self._reading[key] = _EntrySpan(walk.span_size)
            learned = self.entry_spans.get(key)
            if learned is None:
                self._learning = True
            else:  # reads inside the span hit; only misses can widen it
                span.lo, span.hi = learned
        self._unsorted += [(walk.span_start(node), span) for node in found.nodes]
        self.cache.crossings += 1
        self.cache.prefetches += 1
        pages = found.pages
        for page in extra:  # staged before the next request, whose prediction counts them
            value = pages.get(page)
            if value is None:
                raise TransportError(f"follow_list did not return predicted page {page:#x}")
            self._stage(page, value)
        more = found.end in (ListEnd.LIMIT, ListEnd.REPLY_FULL) and len(found.nodes) < walk.limit
        last = found.nodes[-1] if more and found.nodes else None
        if last is not None and later is not None:  # ask for the next window first...
            following = self._window(replace(walk, after=last), windows + 1)
            most = following.limit * self._pages_per_entry(following)
            reserved = min(most, following.max_pages) * PAGE_SIZE
            self.cache.reserve(reserved)
            predicted = self._take_prediction(set(), self._predicted_with(following))
            answer = later(following, pages=predicted, then=self._then(walk, windows + 1))
            self._ahead = _Ahead(following, answer, reserved, predicted)
        staged = set(extra)
        for page in pages:  # ... then cache this one's pages
            if page & _PAGE_MASK or not 0 <= page < _U64:
                raise TransportError(f"follow_list returned unaligned page {page:#x}")
        self._store([(page, value) for page, value in pages.items() if page not in staged])
        return last

    def _window(self, walk: ListWalk, number: int) -> ListWalk:
        """What to ask for as window ``number`` (from 0) of ``walk`` in this scan: its
        nodes (streamed: ``FIRST_WINDOW`` doubling) and its share of the budget in pages
        (``max_pages``: the reply ends at the entry that would exceed it, so a window
        holds the entries that fit, not the worst case of two pages each)."""
        asked = self._asked(walk)
        share = self.cache.budget // (2 if self._follow_list_later is None else 4)
        pages = min(max(share // PAGE_SIZE, self._pages_per_entry(asked)), MAX_REPLY_PAGES)
        return replace(asked, limit=self._window_limit(walk, number), max_pages=pages)

    def _window_limit(self, walk: ListWalk, number: int) -> int:
        """The nodes of window ``number``: the whole walk's ``limit`` unstreamed, else
        ``FIRST_WINDOW`` doubling up to ``LAST_WINDOW`` (within that limit and
        ``MAX_LIST_NODES``)."""
        if self._follow_list_later is None:
            nodes = walk.limit
        else:
            nodes = min(FIRST_WINDOW << min(number, 16), LAST_WINDOW)
        return max(1, min(walk.limit, nodes, MAX_LIST_NODES))

    def _then(self, walk: ListWalk, number: int) -> int:
        """What window ``number`` announces of the next (``FollowList.then``): its
        length, or 0 when this one takes the walk's whole ``limit`` (none follows)."""
        if self._window_limit(walk, number) >= walk.limit:
            return 0
        return self._window_limit(walk, number + 1)

    def _predicted_with(self, window: ListWalk) -> int:
        """How many predicted pages to ask for with ``window``: a streamed window takes
        one a node (the pages the last scan needed come in the order it needed them,
        so each window brings about its own, and the first crossing stays short)."""
        if self._follow_list_later is None:
            return MAX_PAGES_PER_REQUEST
        return min(window.limit, window.max_pages)

    @staticmethod
    def _pages_per_entry(walk: ListWalk) -> int:
        """The most pages one entry's span can cover."""
        return (walk.span_size + 2 * PAGE_SIZE - 1) // PAGE_SIZE


@dataclass(frozen=True)
class _Ahead:
    """A list window asked for before the walk reached it: the request, the call that
    takes its answer, the budget bytes reserved for that answer meanwhile, and the
    predicted pages that ride along."""

    walk: ListWalk
    answer: Callable[[], ListPages]
    reserved: int
    pages: list[int]  # predicted pages asked for with it


def _first(item: tuple[int, _EntrySpan]) -> int:
    return item[0]
