"""Hand-built x86-64 page tables in a raw RAM image, shared by the synthetic tests."""

from __future__ import annotations

from pathlib import Path

from sgmonitor.guest.memory import RawImage, Registers

PRESENT_RW = 0x3
LARGE = 0x80
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
RAM_SIZE = 8 << 20  # 8 MiB of synthetic RAM


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
