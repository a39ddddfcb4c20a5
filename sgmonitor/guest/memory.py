"""Guest-physical memory sources: one interface for a live QEMU guest, a raw RAM image
and (in :mod:`sgmonitor.guest.elfcore`) QEMU's ELF core dumps.

Only the hypervisor service and the traditional baseline open guest RAM; the enclave
never imports this module.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

from sgmonitor.errors import PhysicalAccessError

GIB = 1 << 30
FOUR_GIB = 4 * GIB


@dataclass(frozen=True)
class Registers:
    """The vCPU state page walking needs. ``efer`` is None where the source lacks it."""

    cr0: int
    cr3: int
    cr4: int
    efer: int | None = None

    @property
    def la57(self) -> bool:
        """CR4.LA57: 5-level paging."""
        return bool(self.cr4 & (1 << 12))

    @property
    def paging(self) -> bool:
        """CR0.PG and CR4.PAE: the guest runs with 4- or 5-level long-mode paging."""
        return bool(self.cr0 & (1 << 31)) and bool(self.cr4 & (1 << 5))


@dataclass(frozen=True)
class Segment:
    """A run of guest-physical RAM stored contiguously in a file."""

    address: int
    size: int
    file_offset: int

    @property
    def end(self) -> int:
        return self.address + self.size


class PhysicalMemory(ABC):
    """Read guest-physical bytes, know which ranges are RAM, give the vCPU registers."""

    @abstractmethod
    def read_physical(self, address: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``address``; PhysicalAccessError if any is not RAM."""

    @abstractmethod
    def ram_ranges(self) -> list[range]:
        """Guest-physical RAM, sorted."""

    def read_strided(self, address: int, stride: int, count: int) -> bytes:
        """The byte at ``address + i * stride`` for each ``i < count`` (one byte of
        every page, for a scan that checks page starts without copying all of RAM)."""
        return b"".join(self.read_physical(address + i * stride, 1) for i in range(count))

    @abstractmethod
    def registers(self) -> Registers:
        """The first vCPU's control registers."""

    def resets(self) -> int:
        """How many times the machine has reset since this source opened (a dump: 0)."""
        return 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the guest still for a consistent read (a no-op for dumps)."""
        yield

    @abstractmethod
    def close(self) -> None:
        """Release the mapping (and any monitor connection)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappedFile(PhysicalMemory, ABC):
    """Guest RAM laid out in a file as a list of segments, mapped read-only."""

    def __init__(self, path: str, segments: list[Segment]) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            length = os.fstat(fd).st_size
            if length == 0:
                raise PhysicalAccessError(0, 0, f"{path} is empty")
            self._map = mmap.mmap(fd, length, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        segments = sorted(segments, key=lambda s: s.address)
        for seg in segments:
            if seg.size <= 0 or seg.file_offset < 0 or seg.file_offset + seg.size > length:
                raise PhysicalAccessError(seg.address, seg.size, f"beyond the end of {path}")
        for before, after in itertools.pairwise(segments):
            if before.end > after.address:
                raise PhysicalAccessError(after.address, after.size, "overlapping RAM segments")
        self._segments = segments
        self._starts = [s.address for s in segments]

    def read_physical(self, address: int, size: int) -> bytes:
        if size < 0 or address < 0:
            raise PhysicalAccessError(address, size, "negative address or size")
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            seg = self._segments[i]
            if address + size <= seg.end:
                start = seg.file_offset + address - seg.address
                return self._view[start : start + size].tobytes()
        return self._read_across(address, size)

    def read_strided(self, address: int, stride: int, count: int) -> bytes:
        if stride <= 0 or address < 0:
            raise PhysicalAccessError(address, 1, "negative address or stride")
        parts = []
        i = 0
        while i < count:  # a strided slice of each segment the positions fall in
            at = address + i * stride
            k = bisect.bisect_right(self._starts, at) - 1
            seg = self._segments[k] if k >= 0 else None
            if seg is None or at >= seg.end:
                raise PhysicalAccessError(at, 1)
            n = min(count - i, (seg.end - 1 - at) // stride + 1)
            start = seg.file_offset + at - seg.address
            parts.append(self._view[start : start + (n - 1) * stride + 1 : stride].tobytes())
            i += n
        return b"".join(parts)

    def _read_across(self, address: int, size: int) -> bytes:
        """A read spanning adjacent segments (rare: only at a boundary)."""
        parts = []
        end = address + size
        while address < end:
            i = bisect.bisect_right(self._starts, address) - 1
            seg = self._segments[i] if i >= 0 else None
            if seg is None or address >= seg.end:
                raise PhysicalAccessError(address, end - address)
            take = min(end, seg.end) - address
            start = seg.file_offset + address - seg.address
            parts.append(self._view[start : start + take].tobytes())
            address += take
        return b"".join(parts)

    def ram_ranges(self) -> list[range]:
        return [range(s.address, s.end) for s in self._segments]

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def close(self) -> None:
        self._view.release()
        self._map.close()


def qemu_ram_layout(ram_size: int, machine: str = "q35") -> list[Segment]:
    """Where QEMU puts RAM of ``ram_size`` bytes: low RAM from 0, the rest from 4 GiB.

    Mirrors hw/i386/pc_q35.c and pc_piix.c: q35 keeps up to 2.75 GiB low (2 GiB once
    RAM reaches 2.75 GiB); i440fx ("pc") keeps up to 3.5 GiB low.
    """
    if machine == "q35":
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
    elif machine == "pc":
        lowmem = 0xE0000000
    else:
        raise ValueError(f"unknown machine type {machine!r} (q35 or pc)")
    below = min(ram_size, lowmem)
    segments = [Segment(0, below, 0)]
    if ram_size > below:
        segments.append(Segment(FOUR_GIB, ram_size - below, below))
    return segments


class RawImage(MappedFile):
    """A raw guest RAM image (e.g. a copy of the RAM file) with registers given."""

    def __init__(
        self, path: str, registers: Registers, segments: list[Segment] | None = None
    ) -> None:
        if segments is None:
            segments = qemu_ram_layout(os.path.getsize(path))
        super().__init__(path, segments)
        self._registers = registers

    def registers(self) -> Registers:
        return self._registers
