"""The hypervisor service's page logic: translate, read and walk lists for the enclave.

Transport-independent: the service wraps these results in sealed replies
(:class:`sgmonitor.wire.sealed.PagesReply`, :class:`sgmonitor.wire.sealed.ListReply`);
tests and the in-process modes call a :class:`PageServer` directly (it is itself a
``sgmonitor.enclave.memory.PageTransport``).

Guest data is hostile here too: every pointer goes through the page walker, request
sizes are bounded by the wire limits, and a list walk stops at its limit, at a page
budget, on a cycle or at the first fault, so a guest with wild or looping pointers
costs bounded work and never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sgmonitor.errors import PageFault, PhysicalAccessError
from sgmonitor.guest.memory import PhysicalMemory, Registers
from sgmonitor.guest.paging import PAGE_SHIFT, PAGE_SIZE, PageWalker
from sgmonitor.wire.sealed import (
    MAX_ENTRY_SIZE,
    MAX_LIST_NODES,
    MAX_PAGES_PER_REQUEST,
    MAX_REPLY_PAGES,
)
from sgmonitor.wire.sealed import ListEnd as ListEnd
from sgmonitor.wire.sealed import ListWalk as ListWalk

__all__ = ["ListEnd", "ListWalk", "PageNotRam", "PageServer", "WalkedList"]

_U64 = 1 << 64
_PAGE_MASK = ~(PAGE_SIZE - 1)  # clears the offset in a page
_POINTER = 8  # x86-64: list pointers are 8 little-endian bytes


class PageNotRam(PageFault):
    """The page translates, but outside guest RAM (the wire's ``NOT_RAM``)."""


@dataclass(frozen=True)
class WalkedList:
    """What :meth:`PageServer.follow_list` found.

    ``nodes`` are the node addresses (for a ``list_head`` list, the ``list_head``
    addresses) whose spans were read completely, in list order; ``pages`` maps every
    page the walk read, including the head's and the one that faulted, to its bytes or
    its fault; ``fault`` is what stopped a walk that ended with ``ListEnd.FAULT``.
    """

    nodes: tuple[int, ...]
    end: ListEnd
    pages: dict[int, bytes | PageFault] = field(repr=False)
    fault: PageFault | None = None


class PageServer:
    """Guest-virtual kernel pages of one guest, read with the vCPU's page tables.

    Call :meth:`refresh` at the start of each scan (with the guest paused): it drops
    every cached translation, so no scan sees the page tables of an earlier one, and
    re-reads the control registers when the top-level table they name may be stale.
    """

    def __init__(self, memory: PhysicalMemory, *, max_list_pages: int = MAX_REPLY_PAGES) -> None:
        # the head's pointer, then one widest entry and its pointer, must always fit
        if max_list_pages < _span_pages(MAX_ENTRY_SIZE) + 2 * _span_pages(_POINTER):
            raise ValueError("max_list_pages must hold at least one full entry")
        self.memory = memory  # the VMCOREINFO scan (GetVmcoreinfo) reads physical RAM here
        self.max_list_pages = max_list_pages
        self._walker: PageWalker | None = None
        self._registers: Registers | None = None
        self._kernel_half: bytes | None = None  # the walker's top-level kernel entries
        self._resets = 0  # the machine's resets when the registers were read

    def refresh(self) -> None:
        """Start from fresh translations; re-read the vCPU registers (a QMP round trip,
        ~1 ms) only if the machine has reset or the top-level table the last ones named
        has changed its kernel half.

        Every process's top-level table holds the same kernel half (``pgd_alloc`` copies
        ``swapper_pg_dir``'s, and x86-64 never changes those entries after boot), and
        only that half translates the kernel addresses read here. So while the kernel
        runs and the page at the cached CR3 still holds the entries it held when the
        registers were read, walking from it translates exactly as the kernel's own
        tables do, even if the process it belonged to has exited and the page now
        serves another; a reused page changes those 2 KiB. A reset is told by QEMU's
        RESET event, not by the page: RAM survives a reboot, so the old kernel's tables
        (and data) may still be there untouched. The lower levels are read afresh by
        every walk in any case.
        """
        resets = self.memory.resets()
        if self._walker is not None and self._still_current(resets):
            self._walker.invalidate()
            return
        registers = self.memory.registers()
        self._walker = PageWalker.for_kernel(self.memory, registers)
        self._registers = registers
        self._kernel_half = self._read_kernel_half()
        self._resets = resets

    def _still_current(self, resets: int) -> bool:
        """No reset since the registers were read, and the same kernel half at CR3."""
        known = self._kernel_half
        return resets == self._resets and known is not None and self._read_kernel_half() == known

    def _read_kernel_half(self) -> bytes | None:
        """Entries 256-511 of the walker's top-level table (None if not RAM)."""
        assert self._walker is not None
        try:
            return self.memory.read_physical(self._walker.root + PAGE_SIZE // 2, PAGE_SIZE // 2)
        except PhysicalAccessError:
            return None

    begin_scan = refresh  # the PageTransport hook: a new scan starts from fresh tables

    @property
    def registers(self) -> Registers:
        """The control registers the current walker was built from."""
        if self._registers is None:
            self.refresh()
        assert self._registers is not None
        return self._registers

    def _kernel_walker(self) -> PageWalker:
        if self._walker is None:
            self.refresh()
        assert self._walker is not None
        return self._walker

    def read_page(self, page: int) -> bytes | PageFault:
        """The 4 KiB at page-aligned ``page``, or why it could not be read."""
        walker = self._kernel_walker()
        try:
            t = walker.translate(page)
        except PageFault as fault:
            return fault
        try:
            return self.memory.read_physical(t.physical(page), PAGE_SIZE)
        except PhysicalAccessError as exc:
            return PageNotRam(page, len(walker.levels), None, str(exc))

    def read_pages(self, addresses: Sequence[int]) -> list[bytes | PageFault]:
        """Each page-aligned guest-virtual address -> its 4 KiB, or its fault, in order.

        :raises ValueError: more than ``MAX_PAGES_PER_REQUEST`` addresses, or one that is
            not a page-aligned 64-bit address (a caller bug, not guest data)
        """
        if len(addresses) > MAX_PAGES_PER_REQUEST:
            raise ValueError(f"{len(addresses)} pages asked, limit {MAX_PAGES_PER_REQUEST}")
        for a in addresses:
            if not 0 <= a < _U64 or a % PAGE_SIZE:
                raise ValueError(f"not a page-aligned guest-virtual address: {a:#x}")
        return [self.read_page(a) for a in addresses]

    def follow_list(
        self,
        walk: ListWalk,
        *,
        max_pages: int | None = None,
        pages: Sequence[int] = (),
    ) -> WalkedList:
        """Follow a kernel linked list (see :class:`sgmonitor.wire.sealed.ListWalk`, which
        validated the request) and return the pages its nodes' spans cover.

        Ends on reaching ``head`` (``HEAD_REACHED``), after ``min(limit,
        MAX_LIST_NODES)`` nodes (``LIMIT``), on a node seen before (``LOOP``), on a
        pointer or entry that does not read (``FAULT``), or when the next entry would
        exceed ``max_pages`` or the walk's own ``max_pages`` (default and at most
        ``max_list_pages``: ``REPLY_FULL``).
        Nothing here is validated beyond that: the enclave re-checks every link it reads.

        ``pages`` (the in-process form of a ``Batch``'s ReadPages) are read too, first,
        and returned with the walk's own; they count against ``max_pages``.

        :raises ValueError: ``pages`` beyond ``read_pages``'s limits
        """
        if not isinstance(walk, ListWalk):
            raise ValueError("follow_list takes a ListWalk")
        budget = self.max_list_pages if max_pages is None else min(max_pages, self.max_list_pages)
        if walk.max_pages:
            budget = min(budget, walk.max_pages)
        extra = {p: v for p, v in zip(pages, self.read_pages(pages), strict=True)}
        walker = _ListWalker(self, walk)
        try:
            return self._follow(walker, walk, budget - len(extra))
        finally:
            for p, v in extra.items():
                walker.pages.setdefault(p, v)

    def _follow(self, walker: _ListWalker, walk: ListWalk, budget: int) -> WalkedList:
        head, limit = walk.head, min(walk.limit, MAX_LIST_NODES)
        first = walker.pointer(walk.after or head)
        if first is None:
            return walker.result(ListEnd.FAULT)
        # The usual node, inlined (one list entry a few microseconds matters here: the
        # hypervisor sets the pace of a streamed walk): its span in one page, its next
        # pointer inside the span; anything else takes the _ListWalker's general way.
        member, size, next_offset = walker.member_offset, walker.size, walker.next_offset
        pages, nodes, read_page = walker.pages, walker.nodes, self.read_page
        node, seen = first, set[int]()
        while True:
            if node == head:
                return walker.result(ListEnd.HEAD_REACHED)
            if node in seen:
                return walker.result(ListEnd.LOOP)
            if len(nodes) >= limit:
                return walker.result(ListEnd.LIMIT)
            start, ptr = node - member, node + next_offset
            page = start & _PAGE_MASK
            if (
                start >= 0
                and start + size <= page + PAGE_SIZE <= _U64
                and start <= ptr <= start + size - _POINTER
            ):
                value = pages.get(page)
                if value is None:
                    if len(pages) + 1 > budget:
                        return walker.result(ListEnd.REPLY_FULL)
                    value = pages[page] = read_page(page)
                if isinstance(value, PageFault):
                    walker.fault = walker.fault or value
                    return walker.result(ListEnd.FAULT)
                nodes.append(node)
                seen.add(node)
                at = ptr - page
                node = int.from_bytes(value[at : at + _POINTER], "little")
                continue
            needed = walker.needed(node)
            if needed is not None and len(pages) + len(needed) > budget:
                return walker.result(ListEnd.REPLY_FULL)
            if not walker.take(node, needed):
                return walker.result(ListEnd.FAULT)
            seen.add(node)
            nxt = walker.pointer(node)
            if nxt is None:  # defensive: the validated links lie inside the span read
                return walker.result(ListEnd.FAULT)
            node = nxt


class _ListWalker:
    """The state of one follow_list: pages read so far, nodes taken, the first fault."""

    def __init__(self, server: PageServer, walk: ListWalk):
        self.server = server
        self.next_offset = walk.next_offset
        self.member_offset = walk.member_offset
        self.size = walk.span_size
        self.pages: dict[int, bytes | PageFault] = {}
        self.nodes: list[int] = []
        self.fault: PageFault | None = None

    def result(self, end: ListEnd) -> WalkedList:
        return WalkedList(tuple(self.nodes), end, self.pages, self.fault)

    def needed(self, node: int) -> list[int] | None:
        """Pages of the node's span and next pointer not read yet; None if they leave the
        64-bit address space (a wild pointer)."""
        start, ptr = node - self.member_offset, node + self.next_offset
        end = start + self.size
        if start < 0 or end > _U64 or ptr + _POINTER > _U64:
            return None
        have = self.pages
        wanted = [p for p in range(start & _PAGE_MASK, end, PAGE_SIZE) if p not in have]
        if start <= ptr and ptr + _POINTER <= end:  # the usual case: the links in the span
            return wanted
        return [p for p in dict.fromkeys([*wanted, *_pages(ptr, _POINTER)]) if p not in have]

    def _load(self, pages: Sequence[int]) -> list[bytes] | None:
        """The bytes of each page, reading those not read yet; None at the first fault."""
        out = []
        for page in pages:
            got = self.pages.get(page)
            if got is None:
                got = self.pages[page] = self.server.read_page(page)
            if isinstance(got, PageFault):
                self.fault = self.fault or got
                return None
            out.append(got)
        return out

    def take(self, node: int, needed: list[int] | None) -> bool:
        """Read the node's ``needed`` pages; False, fault recorded, if one faults. Pages
        read before are known good: the first fault ends the walk."""
        if needed is None:
            self.fault = PageFault(node, 0, None, "list node outside the address space")
            return False
        if self._load(needed) is None:
            return False
        self.nodes.append(node)
        return True

    def pointer(self, node: int) -> int | None:
        """``*(node + next_offset)``, reading its pages if needed; None on a fault."""
        address = node + self.next_offset
        if address + _POINTER > _U64:
            self.fault = PageFault(address, 0, None, "next pointer outside the address space")
            return None
        offset = address & (PAGE_SIZE - 1)
        if offset <= PAGE_SIZE - _POINTER:  # within one page (always, when aligned)
            got = self.pages.get(address - offset)
            if isinstance(got, bytes):
                return int.from_bytes(got[offset : offset + _POINTER], "little")
        pages = _pages(address, _POINTER)
        chunks = self._load(pages)
        if chunks is None:
            return None
        offset = address - pages[0]
        return int.from_bytes(b"".join(chunks)[offset : offset + _POINTER], "little")


def _pages(address: int, size: int) -> range:
    """The page addresses covering ``[address, address + size)``."""
    first = address >> PAGE_SHIFT
    last = (address + max(size, 1) - 1) >> PAGE_SHIFT
    return range(first << PAGE_SHIFT, (last + 1) << PAGE_SHIFT, PAGE_SIZE)


def _span_pages(size: int) -> int:
    """The most pages ``size`` bytes can cover (when they start just before a page end)."""
    return len(_pages(PAGE_SIZE - 1, size))
