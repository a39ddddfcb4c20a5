"""x86-64 page-table walking: guest-virtual to guest-physical with the vCPU's CR3.

Table-driven like Volatility's Intel layers: each paging mode is a list of levels
(name, index shift, whether a large page may end the walk there) and one loop walks
them. Faults carry the address, the level and the entry that stopped the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

from sgmonitor.errors import PageFault, PhysicalAccessError
from sgmonitor.guest.memory import PhysicalMemory, Registers

PAGE_SIZE = 4096
PAGE_SHIFT = 12
_PRESENT = 1
_LARGE = 1 << 7
_LARGE_SHIFT = 21  # 2 MiB: the smallest large page
_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51 of an entry
_CR3_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
# Linux's PTI keeps the kernel PGD and the user PGD in one 8 KiB block and switches
# between them with this CR3 bit (arch/x86/entry/calling.h, PTI_USER_PGTABLE_BIT).
_PTI_USER_PGD_BIT = 1 << PAGE_SHIFT


@dataclass(frozen=True)
class Level:
    name: str
    shift: int
    large_ok: bool


FOUR_LEVEL = (
    Level("PML4", 39, False),
    Level("PDPT", 30, True),
    Level("PD", 21, True),
    Level("PT", 12, False),
)
FIVE_LEVEL = (Level("PML5", 48, False), *FOUR_LEVEL)


@dataclass(frozen=True)
class Translation:
    """Where a virtual page lives: its physical base and size (4 KiB, 2 MiB or 1 GiB)."""

    virtual_base: int
    physical_base: int
    page_size: int

    def physical(self, address: int) -> int:
        return self.physical_base + (address - self.virtual_base)


class PageWalker:
    """Translate guest-virtual addresses through one page-table root.

    Successful translations are cached until :meth:`invalidate`: a 4 KiB page's by its
    page, a large page's (2 MiB or 1 GiB) by each 2 MiB frame it is walked for, so the
    direct map costs one walk per 2 MiB read, not one per 4 KiB page.
    """

    def __init__(self, memory: PhysicalMemory, root: int, la57: bool) -> None:
        self.memory = memory
        self.root = root & _CR3_ADDRESS_MASK
        self.levels = FIVE_LEVEL if la57 else FOUR_LEVEL
        self._va_bits = 57 if la57 else 48
        self._cache: dict[int, Translation] = {}  # by 4 KiB page
        self._large: dict[int, Translation] = {}  # by 2 MiB frame

    @classmethod
    def for_kernel(cls, memory: PhysicalMemory, registers: Registers) -> PageWalker:
        """A walker for kernel addresses: under PTI, CR3 may hold the user PGD of a
        process paused in user mode, whose kernel half is nearly empty, so walk
        through its kernel twin instead."""
        if not registers.paging:
            raise PageFault(0, 0, None, "the vCPU does not have long-mode paging enabled")
        return cls(memory, registers.cr3 & ~_PTI_USER_PGD_BIT, registers.la57)

    def is_canonical(self, address: int) -> bool:
        top = address >> (self._va_bits - 1)
        return top == 0 or top == (1 << (65 - self._va_bits)) - 1

    def translate(self, address: int) -> Translation:
        """The translation of the page holding ``address``, or a PageFault."""
        page = address >> PAGE_SHIFT
        hit = self._cache.get(page)
        if hit is not None:
            return hit
        frame = address >> _LARGE_SHIFT
        hit = self._large.get(frame)
        if hit is not None:
            return hit
        found = self._walk(address)
        if found.page_size > PAGE_SIZE:
            self._large[frame] = found
        else:
            self._cache[page] = found
        return found

    def invalidate(self) -> None:
        """Forget cached translations (the guest may have changed its page tables)."""
        self._cache.clear()
        self._large.clear()

    def _walk(self, address: int) -> Translation:
        if not 0 <= address < 1 << 64 or not self.is_canonical(address):
            raise PageFault(address, 0, None, "non-canonical address")
        table = self.root
        for depth, level in enumerate(self.levels):
            index = (address >> level.shift) & 0x1FF
            try:
                raw = self.memory.read_physical(table + index * 8, 8)
            except PhysicalAccessError as exc:
                raise PageFault(address, depth, None, f"{level.name} table is not RAM") from exc
            entry = int.from_bytes(raw, "little")
            if not entry & _PRESENT:
                raise PageFault(address, depth, entry, f"{level.name} entry not present")
            if (level.large_ok and entry & _LARGE) or level.shift == PAGE_SHIFT:
                size = 1 << level.shift
                base = entry & _ADDRESS_MASK & ~(size - 1)
                return Translation(address & ~(size - 1) & ((1 << 64) - 1), base, size)
            table = entry & _ADDRESS_MASK
        raise AssertionError("unreachable: the last level always ends the walk")


class VirtualMemory:
    """Guest-virtual kernel memory read in-process: the traditional (dom0) path.

    Implements :class:`sgmonitor.kernel.address_space.AddressSpace`.
    """

    def __init__(self, walker: PageWalker) -> None:
        self.walker = walker
        self.physical = walker.memory

    def read(self, address: int, size: int) -> bytes:
        if size < 0:
            raise ValueError("negative size")
        t = self.walker.translate(address)
        offset = address - t.virtual_base
        if offset + size <= t.page_size:
            return self._read(address, t.physical_base + offset, size)
        parts = []
        end = address + size
        while address < end:
            t = self.walker.translate(address)
            take = min(end, t.virtual_base + t.page_size) - address
            parts.append(self._read(address, t.physical(address), take))
            address += take
        return b"".join(parts)

    def _read(self, virtual: int, physical: int, size: int) -> bytes:
        try:
            return self.physical.read_physical(physical, size)
        except PhysicalAccessError as exc:
            raise PageFault(virtual, len(self.walker.levels), None, str(exc)) from exc

    def translate(self, address: int) -> int:
        """The guest-physical address of ``address``."""
        return self.walker.translate(address).physical(address)
