"""Hand-built x86-64 page tables in a raw RAM image, shared by the synthetic tests."""

from __future__ import annotations

from pathlib import Path

from sgmonitor.guest.memory import RawImage, Registers
from sgmonitor.hypervisor.pages import ListWalk, PageServer, WalkedList

PRESENT_RW = 0x3
LARGE = 0x80
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
RAM_SIZE = 8 << 20  # 8 MiB of synthetic RAM
ENTRY = 0x2600  # a list entry the size of a small task_struct: 3 or 4 pages
MEMBER = 0x908  # where its list_head sits


class Tables:
    """Builds x86-64 page tables inside a bytearray of guest RAM."""

    def __init__(self, la57: bool) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.la57 = la57
        self.next_table = 0x2000  # Linux allocates its PGDs 8 KiB aligned (PTI pairs)
        self.root = self._new_table()
        self.next_table = 0x4000

    def _new_table(self) -> int:
        table = self.next_table
        self.next_table += 0x1000
        return table

    def _entry(self, table: int, index: int) -> int:
        return int.from_bytes(self.ram[table + index * 8 : table + index * 8 + 8], "little")

    def set_entry(self, table: int, index: int, value: int) -> None:
        self.ram[table + index * 8 : table + index * 8 + 8] = value.to_bytes(8, "little")

    def map(self, va: int, pa: int, size: int) -> list[tuple[int, int]]:
        """Map one page; return the (table, index) of each level's entry used."""
        shifts = [48, 39, 30, 21, 12] if self.la57 else [39, 30, 21, 12]
        leaf_shift = size.bit_length() - 1
        path = []
        table = self.root
        for shift in shifts:
            index = (va >> shift) & 0x1FF
            path.append((table, index))
            if shift == leaf_shift:
                self.set_entry(table, index, pa | PRESENT_RW | (LARGE if shift > 12 else 0))
                return path
            entry = self._entry(table, index)
            if not entry & 1:
                entry = self._new_table() | PRESENT_RW
                self.set_entry(table, index, entry)
            table = entry & ~0xFFF
        raise AssertionError(f"bad page size {size}")

    def image(self, tmp_path: Path) -> RawImage:
        path = tmp_path / "ram.img"
        path.write_bytes(self.ram)
        cr4 = CR4_PAE | (CR4_LA57 if self.la57 else 0)
        return RawImage(str(path), Registers(cr0=CR0_PG, cr3=self.root, cr4=cr4))


class Region:
    """``pages`` 4 KiB pages mapped at ``va`` onto RAM from ``pa`` (or onto ``alias``
    physical pages, reused in turn, to map more virtual pages than the RAM holds), plus
    helpers to lay out kernel-like data in them."""

    def __init__(
        self,
        tables: Tables,
        va: int = 0xFFFF_8880_0100_0000,
        pa: int = 0x10_0000,
        pages: int = 64,
        alias: int | None = None,
    ) -> None:
        self.tables, self.va, self.pa, self.pages = tables, va, pa, pages
        self.alias = alias or pages
        self._leaf: dict[int, tuple[int, int]] = {}
        for i in range(pages):
            page = va + i * 0x1000
            self._leaf[page] = tables.map(page, pa + (i % self.alias) * 0x1000, 0x1000)[-1]

    @property
    def end(self) -> int:
        return self.va + self.pages * 0x1000

    def physical(self, address: int) -> int:
        offset = address - self.va
        assert 0 <= offset < self.pages * 0x1000, f"{address:#x} is outside the region"
        return self.pa + (offset // 0x1000 % self.alias) * 0x1000 + offset % 0x1000

    def _chunks(self, address: int, size: int) -> list[tuple[int, int, int]]:
        """(physical, offset in the data, length) pieces, one per page touched."""
        out, done = [], 0
        while done < size:
            take = min(size - done, 0x1000 - (address + done) % 0x1000)
            out.append((self.physical(address + done), done, take))
            done += take
        return out

    def write(self, address: int, data: bytes) -> None:
        for phys, at, take in self._chunks(address, len(data)):
            self.tables.ram[phys : phys + take] = data[at : at + take]

    def read(self, address: int, size: int) -> bytes:
        ram = self.tables.ram
        return b"".join(ram[p : p + take] for p, _, take in self._chunks(address, size))

    def pointer(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(8, "little"))

    def unmap(self, page: int) -> None:
        """Clear the present bit of ``page``'s leaf entry."""
        table, index = self._leaf[page]
        self.tables.set_entry(table, index, 0)


class Ring:
    """``count`` entries of ``entry`` bytes linked through a list_head at ``member``
    (next at +0, prev at +8), headed by a standalone list_head in the region's first
    page; entries start at odd offsets so their spans cross page boundaries."""

    def __init__(
        self,
        count: int,
        pages: int = 64,
        member: int = MEMBER,
        entry: int = ENTRY,
    ) -> None:
        self.tables = Tables(la57=False)
        self.region = Region(self.tables, pages=pages)
        self.member, self.entry = member, entry
        stride = (entry + 0x234 + 0xFFF) & ~0xFFF
        self.head = self.region.va + 0x100
        first = self.region.va + 0x1000 + 0x234 + member
        self.nodes = [first + i * stride for i in range(count)]
        chain = [self.head, *self.nodes]
        for i, node in enumerate(chain):
            self.link(node, chain[(i + 1) % len(chain)], chain[i - 1])

    def link(self, node: int, nxt: int, prev: int) -> None:
        self.region.pointer(node, nxt)
        self.region.pointer(node + 8, prev)

    def server(self, tmp_path: Path, **kwargs: int) -> PageServer:
        return PageServer(self.tables.image(tmp_path), **kwargs)

    def span(self, node: int) -> set[int]:
        """The pages an entry's span covers."""
        start = node - self.member
        return set(range(start & ~0xFFF, start + self.entry, 0x1000))

    def walk(self, limit: int = 100, after: int = 0) -> ListWalk:
        """The walk ``list_for_each_entry`` over this ring asks for."""
        return ListWalk(self.head, 0, self.member, self.entry, limit, after)

    def follow(self, server: PageServer, limit: int = 100, after: int = 0) -> WalkedList:
        """``follow_list`` as ``list_for_each_entry`` over this ring would ask it."""
        return server.follow_list(self.walk(limit, after))
