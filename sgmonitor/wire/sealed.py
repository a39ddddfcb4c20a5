"""The enclave <-> hypervisor exchange: what the enclave itself encodes and decodes.

The clear envelope, framed by the enclave and relayed by the library as opaque OCALL
frames: ``Request`` (a sealed request body) and ``Reply`` (a sealed index, then the
sealed pages). Inside the channel, the sealed bodies: the requests ReadPages,
FollowList, GetVmcoreinfo, GetRegisters, BeginScan, EndScan, Batch, and their replies
PagesReply, ListReply, VmcoreinfoReply, RegistersReply, Ack, BatchReply, RequestFailed.
The hypervisor service serves them; opening and closing its sessions is
:mod:`sgmonitor.wire.hypervisor`, which the enclave does not contain.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import replace
from enum import IntEnum
from typing import Any, overload

from sgmonitor.wire.core import (
    MAX_ERROR_TEXT,
    SESSION_ID_LEN,
    TAG_LEN,
    U64_END,
    Blob,
    BlobView,
    Codec,
    ErrorCode,
    Message,
    Messages,
    Nested,
    Reader,
    Record,
    Seq,
    U64s,
    WireError,
    Writer,
    blob,
    enum,
    fixed,
    flag,
    message,
    record,
    spec,
    text,
    u16,
    u32,
    u64,
)

__all__ = [
    "MAX_BATCH",
    "MAX_ENTRY_SIZE",
    "MAX_LIST_NODES",
    "MAX_PAGES_PER_REQUEST",
    "MAX_RANGES",
    "MAX_REPLY_PAGES",
    "MAX_SEALED_PAGES",
    "MAX_SEALED_REPLY",
    "MAX_SEALED_REQUEST",
    "MAX_VCPUS",
    "MAX_VMCOREINFO_NOTE",
    "MAX_VMCOREINFO_NOTES",
    "PAGE_SIZE",
    "Ack",
    "Batch",
    "BatchReply",
    "BeginScan",
    "EndScan",
    "FollowList",
    "GetRegisters",
    "GetVmcoreinfo",
    "ListEnd",
    "ListReply",
    "ListWalk",
    "PageEntry",
    "PageIndex",
    "PageRange",
    "PageStatus",
    "PagesReply",
    "ReadPages",
    "RegistersReply",
    "Reply",
    "Request",
    "RequestFailed",
    "VcpuRegisters",
    "VmcoreinfoReply",
]

PAGE_SIZE = 4096
MAX_PAGES_PER_REQUEST = 1024  # pages one ReadPages may ask for
MAX_RANGES = MAX_PAGES_PER_REQUEST  # ranges in one ReadPages: scattered pages, one each
MAX_REPLY_PAGES = 2048  # page entries (and pages in the sealed block) of one reply: 8 MiB
MAX_LIST_NODES = 4096  # entries one FollowList may visit
MAX_ENTRY_SIZE = 64 * 1024  # bytes of one list entry (struct task_struct is ~10 KiB)
MAX_VCPUS = 1024
MAX_SEALED_REQUEST = 64 * 1024
MAX_SEALED_REPLY = 1024 * 1024
# A reply's sealed pages: at most MAX_REPLY_PAGES, plus the tag (16) or, unsealed, the AD
MAX_SEALED_PAGES = MAX_REPLY_PAGES * PAGE_SIZE + 256
MAX_BATCH = 4  # requests in one Batch (BeginScan, FollowList, ReadPages, EndScan)
MAX_VMCOREINFO_NOTES = 16  # candidates (genuine and planted) in one reply
MAX_VMCOREINFO_NOTE = 8192  # header, name and a one-page text
_PAGE_MASK = PAGE_SIZE - 1

assert TAG_LEN <= MAX_SEALED_PAGES - MAX_REPLY_PAGES * PAGE_SIZE


class PageStatus(IntEnum):
    """What the hypervisor found at one guest-virtual page (authenticated in the index)."""

    PRESENT = 0  # a sealed page follows in the reply
    NOT_PRESENT = 1  # the page walk faulted
    NOT_RAM = 2  # translated outside guest RAM


class ListEnd(IntEnum):
    """Why a FollowList walk stopped."""

    HEAD_REACHED = 0  # came back to the list head: the whole list
    LIMIT = 1  # the request's limit; continue from the last entry
    FAULT = 2  # a next pointer or entry did not translate
    LOOP = 3  # an entry was seen twice without reaching the head
    REPLY_FULL = 4  # MAX_REPLY_PAGES reached; continue from the last entry


# --- the clear envelope (relayed by the library) -----------------------------------


@message(0x07)
class Request(Message):
    """Library -> hypervisor: one sealed request body (kind REQUEST) from the enclave.

    ``request_id`` travels in the clear so the hypervisor can rebuild the associated
    data and the library can match replies; changing it breaks the seal.
    """

    session_id: bytes = fixed(SESSION_ID_LEN)
    request_id: int = u64()
    sealed: bytes = blob(MAX_SEALED_REQUEST)


@message(0x08)
class Reply(Message):
    """Hypervisor -> library: a sealed reply index (kind REPLY), then the bytes of the
    index's PRESENT pages, in index order, sealed as one message (kind PAGE; empty when
    no page is present). One seal for all of them: the index names each page's address,
    and nothing inside the block can be moved, dropped or reordered without breaking
    its tag."""

    session_id: bytes = fixed(SESSION_ID_LEN)
    request_id: int = u64()
    sealed_reply: bytes = blob(MAX_SEALED_REPLY)
    # decoded as a view of the frame: opened where it is, not copied out first
    sealed_pages: bytes | memoryview = spec(BlobView(MAX_SEALED_PAGES), default=b"")


# --- sealed request bodies ----------------------------------------------------------


@record()
class PageRange(Record):
    """``count`` consecutive 4 KiB guest-virtual pages starting at ``address``."""

    address: int = u64(align=PAGE_SIZE)
    count: int = u32()

    def _check(self) -> None:
        if self.count < 1:
            self._fail("count must be at least 1")
        if self.address + self.count * PAGE_SIZE > U64_END:
            self._fail(f"{self.address:#x} + {self.count} pages wraps")


_PAGE_RANGE = struct.Struct(">QI")


class PageRanges(Seq):
    """ReadPages' ranges: ``u32 count | (u64 address, u32 count) * count``, the bytes a
    Seq of nested PageRange records writes, packed and unpacked in one ``struct`` call
    each (the generic way took ~180 µs to decode the 32 ranges of a scan's first
    request; each range is still checked as it is made)."""

    def __init__(self) -> None:
        super().__init__(Nested(PageRange), MAX_RANGES, item_name="ranges")

    def put(self, w: Writer, v: tuple[PageRange, ...]) -> None:
        w.u32(len(v))
        fields = [x for rng in v for x in (rng.address, rng.count)]
        w.parts.append(struct.pack(">" + "QI" * len(v), *fields))

    def get(self, r: Reader, name: str) -> tuple[PageRange, ...]:
        n = self.get_count(r, name)
        values = struct.unpack(">" + "QI" * n, r.take(_PAGE_RANGE.size * n, name))
        return tuple(map(PageRange, values[0::2], values[1::2]))


@message(0x21)
class ReadPages(Message):
    """Enclave -> hypervisor (sealed): read these guest-virtual pages with the vCPU's CR3."""

    ranges: tuple[PageRange, ...] = spec(PageRanges())

    def _check(self) -> None:
        if not self.ranges:
            self._fail("no ranges")
        total = sum(r.count for r in self.ranges)
        if total > MAX_PAGES_PER_REQUEST:
            self._fail(f"{total} pages, limit {MAX_PAGES_PER_REQUEST}")

    def pages(self) -> list[int]:
        """Every page address asked for, in order."""
        return [rng.address + i * PAGE_SIZE for rng in self.ranges for i in range(rng.count)]


# on the wire: head, member_offset, span_size, limit, next_offset, after
@record(
    wire_order=("head", "member_offset", "span_size", "limit", "next_offset", "after", "max_pages")
)
class ListWalk(Record):
    """A kernel list for the trusted side to walk: the one shape of that request, from
    ``list_for_each_entry`` through ``RemoteMemory.prefetch_list``, the transport and
    the wire (:class:`FollowList`) to ``PageServer.follow_list``.

    Like ``list_for_each_entry(pos, head, member)``: start at ``*(head + next_offset)``
    (``next_offset`` is ``offsetof(struct list_head, next)``, 0 on every kernel so far),
    or at ``*(after + next_offset)`` to continue a walk that stopped at node ``after``
    (0: from the head); each node's successor is ``*(node + next_offset)``; each node's
    span is ``[node - member_offset, node - member_offset + span_size)`` (for a whole
    entry: ``member_offset = offsetof(type, member)``, ``span_size = sizeof(type)``; a
    narrower span keeps the node's ``list_head`` inside it). Stop on returning to
    ``head``, after ``limit`` nodes, or on a fault or loop.

    One sign convention: ``member_offset`` is where the node lies in its span, never
    negative (the kernel's ``container_of``). Validated here and only here.

    ``max_pages`` bounds the pages of one reply (0: as many as the trusted side
    allows): the walk stops before the entry that would exceed it, so a window asked
    for in pages holds as many entries as fit, not as many as would if each spanned
    the most pages it can.
    """

    head: int = u64(align=8)
    next_offset: int = u32()
    member_offset: int = u32()
    span_size: int = u32()
    limit: int = u32()
    after: int = u64(default=0)
    max_pages: int = u32(default=0)

    def _check(self) -> None:
        if not 0 < self.span_size <= MAX_ENTRY_SIZE:
            self._fail(f"span_size must be 1..{MAX_ENTRY_SIZE}")
        if self.member_offset + 16 > self.span_size:
            self._fail("the list_head must lie inside the span")
        if self.next_offset + 8 > 16:
            self._fail("next_offset must lie inside the list_head")
        if self.limit < 1:
            self._fail("limit must be at least 1")
        if self.max_pages > MAX_REPLY_PAGES:
            self._fail(f"max_pages must be 0..{MAX_REPLY_PAGES}")

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(head, next_offset, member_offset, span_size): the list and its span."""
        return self.head, self.next_offset, self.member_offset, self.span_size

    def span_start(self, node: int) -> int:
        """Where the node's span begins: ``node - member_offset``."""
        return node - self.member_offset


@message(0x22)
class FollowList(Message):
    """Enclave -> hypervisor (sealed): walk a kernel ``list_head`` list (a
    :class:`ListWalk` of at most ``MAX_LIST_NODES`` nodes), return its entries. The
    reply lists node addresses and the pages covering each node's span.

    ``then`` (0: none) announces the window of a streamed walk the enclave will ask for
    next if this one stops at its ``limit`` or page bound: the same walk continued after
    this reply's last node, ``then`` nodes long. The hypervisor may walk it while the
    enclave works on this reply, and answers the next FollowList from that walk only if
    it asks for exactly it, in the same scan, within its page budget."""

    walk: ListWalk = spec(Nested(ListWalk))
    then: int = u32(default=0)

    def _check(self) -> None:
        if self.walk.limit > MAX_LIST_NODES:
            self._fail(f"limit must be 1..{MAX_LIST_NODES}")
        if self.then > MAX_LIST_NODES:
            self._fail(f"then must be 0..{MAX_LIST_NODES}")

    def following(self, last: int) -> ListWalk | None:
        """The walk announced by ``then`` once this one stopped at node ``last``."""
        if not self.then:
            return None
        return replace(self.walk, after=last, limit=self.then)


@message(0x23)
class GetVmcoreinfo(Message):
    """Enclave -> hypervisor (sealed): the guest's VMCOREINFO note text."""


@message(0x24)
class GetRegisters(Message):
    """Enclave -> hypervisor (sealed): control registers of each vCPU (CR0/CR3/CR4/EFER)."""


@message(0x25)
class BeginScan(Message):
    """Enclave -> hypervisor (sealed): a scan starts. The hypervisor re-reads the vCPU
    registers and drops cached translations; with ``pause`` it also stops the guest's
    vCPUs until :class:`EndScan` (or a bounded maximum pause) so the scan sees one
    consistent state. Answered by :class:`Ack`."""

    pause: bool = flag(default=False)


@message(0x26)
class EndScan(Message):
    """Enclave -> hypervisor (sealed): the scan is over; resume the guest if it paused it.
    Answered by :class:`Ack`."""


_BATCHABLE: tuple[type[Message], ...] = (ReadPages, FollowList, BeginScan, EndScan, GetRegisters)


@message(0x27)
class Batch(Message):
    """Enclave -> hypervisor (sealed): several requests served in order, in one crossing
    and under one guest lock, answered by one :class:`BatchReply` (e.g. BeginScan with a
    scan's first FollowList and the pages it is expected to need).

    At most ``MAX_BATCH`` requests among ReadPages, FollowList (at most one), BeginScan,
    EndScan and GetRegisters; together the ReadPages ask for at most
    ``MAX_PAGES_PER_REQUEST`` pages, and a FollowList in a batch gets what is left of
    ``MAX_REPLY_PAGES``. Each request travels as a nested ``version | type | body``.
    """

    requests: tuple[Message, ...] = spec(
        Messages(_BATCHABLE, MAX_BATCH, MAX_SEALED_REQUEST, "request")
    )

    def _check(self) -> None:
        if not self.requests:
            self._fail("no requests")
        if sum(isinstance(m, FollowList) for m in self.requests) > 1:
            self._fail("more than one FollowList")
        pages = sum(len(m.pages()) for m in self.requests if isinstance(m, ReadPages))
        if pages > MAX_PAGES_PER_REQUEST:
            self._fail(f"{pages} pages, limit {MAX_PAGES_PER_REQUEST}")

    def list_page_budget(self) -> int:
        """The reply pages a FollowList of this batch may fill."""
        asked = sum(len(m.pages()) for m in self.requests if isinstance(m, ReadPages))
        return MAX_REPLY_PAGES - asked


# --- sealed reply bodies ------------------------------------------------------------


@record()
class PageEntry(Record):
    """One page of a reply: its guest-virtual address and what the hypervisor found."""

    address: int = u64(align=PAGE_SIZE)
    status: PageStatus = enum(PageStatus)


_PAGE_ENTRY = struct.Struct(">QB")
_STATUS_BYTES = bytes(sorted(int(s) for s in PageStatus))
_PRESENT = int(PageStatus.PRESENT)


class PageIndex(Sequence[PageEntry]):
    """A reply index's pages, packed: their addresses and their statuses (one byte
    each), so that a 1,000-page reply is parsed, checked and answered without making a
    thousand objects. Indexing or iterating gives :class:`PageEntry` values.

    Built unchecked; the wire checks it (:class:`PageEntries`) when a message holding
    it is made or decoded: aligned u64 addresses, no address twice, known statuses.
    """

    __slots__ = ("addresses", "statuses")

    def __init__(self, addresses: tuple[int, ...] = (), statuses: bytes = b"") -> None:
        self.addresses = addresses
        self.statuses = statuses

    @classmethod
    def of(cls, entries: Iterable[PageEntry]) -> PageIndex:
        """The index of these entries, in order."""
        items = tuple(entries)
        return cls(tuple(e.address for e in items), bytes(e.status for e in items))

    def present(self) -> list[int]:
        """The addresses whose pages the reply carries (status PRESENT), in order."""
        if self.statuses.count(_PRESENT) == len(self.statuses):
            return list(self.addresses)
        return [a for a, s in zip(self.addresses, self.statuses, strict=True) if s == _PRESENT]

    def __len__(self) -> int:
        return len(self.addresses)

    @overload
    def __getitem__(self, i: int) -> PageEntry: ...
    @overload
    def __getitem__(self, i: slice) -> PageIndex: ...
    def __getitem__(self, i: int | slice) -> PageEntry | PageIndex:
        if isinstance(i, slice):
            return PageIndex(self.addresses[i], self.statuses[i])
        return PageEntry(self.addresses[i], PageStatus(self.statuses[i]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageIndex):
            return NotImplemented
        return (self.addresses, self.statuses) == (other.addresses, other.statuses)

    def __hash__(self) -> int:
        return hash((self.addresses, self.statuses))

    def __repr__(self) -> str:
        return f"PageIndex.of({list(self)!r})"


class PageEntries(Codec):
    """A :class:`PageIndex` on the wire: ``u32 count | (u64 address, u8 status) * count``,
    packed, parsed and checked in bulk; no address twice."""

    size, types = 4, PageIndex

    def check(self, msg: str, name: str, v: Any) -> None:
        if not isinstance(v, PageIndex):
            raise WireError(f"{msg}: {name} must be a PageIndex")
        addresses, statuses = v.addresses, v.statuses
        if not isinstance(addresses, tuple) or not isinstance(statuses, bytes):
            raise WireError(f"{msg}: {name} must hold a tuple of addresses and status bytes")
        n = len(addresses)
        if n > MAX_REPLY_PAGES:
            raise WireError(f"{msg}: {n} {name}, limit {MAX_REPLY_PAGES}")
        if len(statuses) != n:
            raise WireError(f"{msg}: {name} has {n} addresses and {len(statuses)} statuses")
        unknown = statuses.translate(None, _STATUS_BYTES)
        if unknown:
            raise WireError(f"{msg}: unknown page status {unknown[0]}")
        if not all(type(a) is int for a in addresses):
            raise WireError(f"{msg}: {name} holds an address that is not an int")
        if n and (min(addresses) < 0 or max(addresses) >= U64_END):
            raise WireError(f"{msg}: {name} holds an address outside the u64 range")
        misaligned = next((a for a in addresses if a & _PAGE_MASK), None)
        if misaligned is not None:
            raise WireError(f"{msg}: {name} address {misaligned:#x} is not page-aligned")
        if len(set(addresses)) != n:
            raise WireError(f"{msg}: a page address appears twice")

    def put(self, w: Writer, v: PageIndex) -> None:
        n = len(v.addresses)
        w.u32(n)
        interleaved = [x for pair in zip(v.addresses, v.statuses, strict=True) for x in pair]
        w.parts.append(struct.pack(">" + "QB" * n, *interleaved))

    def get(self, r: Reader, name: str) -> PageIndex:
        n = r.count(name, MAX_REPLY_PAGES, _PAGE_ENTRY.size)
        raw = r.take(n * _PAGE_ENTRY.size, name)
        return PageIndex(struct.unpack(">" + "Qx" * n, raw), raw[8 :: _PAGE_ENTRY.size])


@message(0x31)
class PagesReply(Message):
    """Hypervisor -> enclave (sealed index) for ReadPages."""

    pages: PageIndex = spec(PageEntries())

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return self.pages.present()


@message(0x32)
class ListReply(Message):
    """Hypervisor -> enclave (sealed index) for FollowList: entries in list order."""

    entries: tuple[int, ...] = spec(U64s(MAX_LIST_NODES, "entry"))
    end: ListEnd = enum(ListEnd, label="list end")
    pages: PageIndex = spec(PageEntries(), default=PageIndex())

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return self.pages.present()


@message(0x33)
class VmcoreinfoReply(Message):
    """Hypervisor -> enclave (sealed): every VMCOREINFO ELF note found in guest RAM.

    A hostile guest can plant copies, so the hypervisor does not choose: the enclave
    keeps the note the kernel's own ``vmcoreinfo_note`` pointer names
    (``sgmonitor.kernel.kallsyms.genuine_vmcoreinfo``).
    """

    notes: tuple[bytes, ...] = spec(
        Seq(Blob(MAX_VMCOREINFO_NOTE), MAX_VMCOREINFO_NOTES, item_name="note")
    )


@record()
class VcpuRegisters(Record):
    """Control registers of one vCPU."""

    index: int = u16()
    cr0: int = u64()
    cr3: int = u64()
    cr4: int = u64()
    efer: int = u64()


@message(0x34)
class RegistersReply(Message):
    """Hypervisor -> enclave (sealed): each vCPU's control registers."""

    vcpus: tuple[VcpuRegisters, ...] = spec(Seq(Nested(VcpuRegisters), MAX_VCPUS))


@message(0x35)
class Ack(Message):
    """Hypervisor -> enclave (sealed): BeginScan or EndScan done; ``paused`` says whether
    the guest's vCPUs are stopped now."""

    paused: bool = flag(default=False)


@message(0x3F)
class RequestFailed(Message):
    """Hypervisor -> enclave (sealed): the request was refused; authenticated, unlike Error."""

    code: ErrorCode = enum(ErrorCode, 16, "error code")
    message: str = text(MAX_ERROR_TEXT, default="")


_BATCH_REPLIES: tuple[type[Message], ...] = (
    PagesReply,
    ListReply,
    Ack,
    RegistersReply,
    RequestFailed,
)


@message(0x36)
class BatchReply(Message):
    """Hypervisor -> enclave (sealed index) for Batch: one reply per request, in order
    (each a PagesReply, ListReply, Ack, RegistersReply or RequestFailed). The sealed
    pages of all of them follow, in reply order."""

    replies: tuple[Message, ...] = spec(
        Messages(_BATCH_REPLIES, MAX_BATCH, MAX_SEALED_REPLY, "reply")
    )

    def _check(self) -> None:
        if not self.replies:
            self._fail("no replies")
        entries = sum(len(m.pages) for m in self.replies if isinstance(m, PagesReply | ListReply))
        if entries > MAX_REPLY_PAGES:
            self._fail(f"{entries} page entries, limit {MAX_REPLY_PAGES}")

    def present(self) -> list[int]:
        """Addresses of the sealed pages that follow, in their order."""
        return [
            a for m in self.replies if isinstance(m, PagesReply | ListReply) for a in m.present()
        ]
