"""A synthetic AddressSpace made of explicitly mapped pages, and the vendor kernel's BTF,
shared by the typed-object and list-helper tests."""

from __future__ import annotations

from functools import cache

from sgmonitor.errors import PageFault
from sgmonitor.kernel.btf import Btf
from sgmonitor.lab.kernel import fetch_kernel

PAGE = 4096


class PageMemory:
    """An AddressSpace made of explicitly mapped pages (anything else faults); it counts
    reads for cost checks."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.reads: list[tuple[int, int]] = []

    def map(self, address: int, size: int) -> None:
        for page in range(address & ~(PAGE - 1), address + size, PAGE):
            self.pages.setdefault(page, bytearray(PAGE))

    def write(self, address: int, data: bytes) -> None:
        self.map(address, len(data))
        for i, byte in enumerate(data):
            self.pages[(address + i) & ~(PAGE - 1)][(address + i) % PAGE] = byte

    def read(self, address: int, size: int) -> bytes:
        self.reads.append((address, size))
        out = bytearray()
        while len(out) < size:
            at = address + len(out)
            page = self.pages.get(at & ~(PAGE - 1))
            if page is None:
                raise PageFault(at, 1, None, "not mapped in the test")
            take = min(size - len(out), PAGE - at % PAGE)
            out += page[at % PAGE : at % PAGE + take]
        return bytes(out)


@cache
def vendor_btf() -> Btf:
    """The Debian cloud kernel's BTF (downloaded once into the lab cache)."""
    return Btf.from_vmlinux(fetch_kernel("cloud").vmlinux)
