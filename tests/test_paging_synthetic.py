"""The page walker on hand-built page tables: every page size and every fault level.

These complement the real-guest tests (test_guest_memory.py) with the cases a booted
Linux rarely shows: 1 GiB pages, a missing entry at each level, tables outside RAM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import CR0_PG, CR4_PAE, PRESENT_RW, RAM_SIZE, Tables

from sgmonitor.errors import PageFault
from sgmonitor.guest.memory import RawImage, Registers, Segment
from sgmonitor.guest.paging import PageWalker, VirtualMemory


def walker_for(tables: Tables, tmp_path: Path) -> tuple[PageWalker, RawImage]:
    image = tables.image(tmp_path)
    return PageWalker.for_kernel(image, image.registers()), image


@pytest.mark.parametrize("la57", [False, True], ids=["4level", "5level"])
@pytest.mark.parametrize("size", [0x1000, 0x200000, 0x40000000], ids=["4k", "2m", "1g"])
def test_translates_each_page_size(tmp_path: Path, la57: bool, size: int) -> None:
    tables = Tables(la57)
    va = 0xFFFF_FFFF_C000_0000 if size == 0x40000000 else 0xFFFF_FFFF_8120_0000
    if la57:
        va |= 0xFF00_0000_0000_0000
    pa = 0x4000_0000 if size == 0x40000000 else 0x40_0000
    tables.map(va, pa, size)
    walker, _ = walker_for(tables, tmp_path)
    probe = va + size - 8
    t = walker.translate(probe)
    assert t.page_size == size
    assert t.physical(probe) == pa + size - 8
    assert t.virtual_base == va


def test_reads_span_pages_mapped_apart(tmp_path: Path) -> None:
    tables = Tables(la57=False)
    va = 0xFFFF_8880_0000_0000
    tables.map(va, 0x30_0000, 0x1000)
    tables.map(va + 0x1000, 0x20_0000, 0x1000)
    tables.ram[0x30_0FFC:0x30_1000] = b"ABCD"
    tables.ram[0x20_0000:0x20_0004] = b"EFGH"
    walker, _ = walker_for(tables, tmp_path)
    assert VirtualMemory(walker).read(va + 0xFFC, 8) == b"ABCDEFGH"


@pytest.mark.parametrize("la57", [False, True], ids=["4level", "5level"])
def test_not_present_at_every_level(tmp_path: Path, la57: bool) -> None:
    va = 0xFFFF_8880_1234_5000 | (0xFF00_0000_0000_0000 if la57 else 0)
    levels = 5 if la57 else 4
    for level in range(levels):
        tables = Tables(la57)
        path = tables.map(va, 0x50_0000, 0x1000)
        table, index = path[level]
        tables.set_entry(table, index, 0)  # clear the present bit at this level
        walker, _ = walker_for(tables, tmp_path)
        with pytest.raises(PageFault) as fault:
            walker.translate(va)
        assert fault.value.level == level
        assert fault.value.address == va
        assert "not present" in str(fault.value)


@pytest.mark.parametrize(
    ("la57", "address"),
    [(False, 0x0000_8000_0000_0000), (False, 0xFF00_0000_0000_0000), (True, 0x0100_0000_0000_0000)],
)
def test_non_canonical_addresses_fault(tmp_path: Path, la57: bool, address: int) -> None:
    walker, _ = walker_for(Tables(la57), tmp_path)
    with pytest.raises(PageFault, match="non-canonical"):
        walker.translate(address)


def test_table_outside_ram_is_a_fault_not_zeros(tmp_path: Path) -> None:
    tables = Tables(la57=False)
    va = 0xFFFF_8880_0000_0000
    path = tables.map(va, 0x50_0000, 0x1000)
    table, index = path[1]
    tables.set_entry(table, index, (RAM_SIZE + 0x10_0000) | PRESENT_RW)
    walker, _ = walker_for(tables, tmp_path)
    with pytest.raises(PageFault, match="not RAM"):
        walker.translate(va)


def test_page_outside_ram_is_a_fault(tmp_path: Path) -> None:
    tables = Tables(la57=False)
    va = 0xFFFF_8880_0000_0000
    tables.map(va, RAM_SIZE + 0x10_0000, 0x1000)
    walker, _ = walker_for(tables, tmp_path)
    with pytest.raises(PageFault):
        VirtualMemory(walker).read(va, 8)


def test_translation_cache_holds_until_invalidated(tmp_path: Path) -> None:
    tables = Tables(la57=False)
    va = 0xFFFF_8880_0000_0000
    path = tables.map(va, 0x50_0000, 0x1000)
    image_path = tmp_path / "ram.img"
    walker, _ = walker_for(tables, tmp_path)
    assert walker.translate(va).physical_base == 0x50_0000
    leaf_table, index = path[-1]
    with image_path.open("r+b") as f:  # the guest remaps the page behind our back
        f.seek(leaf_table + index * 8)
        f.write((0x60_0000 | PRESENT_RW).to_bytes(8, "little"))
    assert walker.translate(va).physical_base == 0x50_0000
    walker.invalidate()
    assert walker.translate(va).physical_base == 0x60_0000


def test_pti_user_pgd_walks_through_the_kernel_twin(tmp_path: Path) -> None:
    tables = Tables(la57=False)  # the kernel PGD at 0x2000, its (empty) user twin at 0x3000
    va = 0xFFFF_FFFF_8100_0000
    tables.map(va, 0x20_0000, 0x200000)
    image = tables.image(tmp_path)
    user_cr3 = Registers(cr0=CR0_PG, cr3=tables.root | 0x1000, cr4=CR4_PAE)
    with pytest.raises(PageFault):
        PageWalker(image, user_cr3.cr3, la57=False).translate(va)
    assert PageWalker.for_kernel(image, user_cr3).translate(va).physical_base == 0x20_0000


def test_raw_image_layout_follows_qemu_above_the_pci_hole(tmp_path: Path) -> None:
    size = 3 << 30  # q35 with >= 2.75 GiB keeps 2 GiB low, the rest from 4 GiB
    path = tmp_path / "big.img"
    with path.open("wb") as f:
        f.truncate(size)
        f.seek((2 << 30) + 16)
        f.write(b"above-the-hole")
    image = RawImage(str(path), Registers(CR0_PG, 0, CR4_PAE))
    assert image.ram_ranges() == [range(0, 2 << 30), range(4 << 30, 5 << 30)]
    assert image.read_physical((4 << 30) + 16, 14) == b"above-the-hole"
    with pytest.raises(Exception, match="not guest RAM"):
        image.read_physical(3 << 30, 8)
    assert image.segments[1] == Segment(4 << 30, 1 << 30, 2 << 30)


@pytest.mark.parametrize("size", [0x200000, 0x40000000], ids=["2m", "1g"])
def test_a_large_page_is_walked_once_per_2mib_frame_until_invalidated(
    tmp_path: Path, size: int
) -> None:
    """Every 4 KiB page of a 2 MiB frame of a large page takes the one walk's
    translation (the direct map: one walk per 2 MiB read, not one per page); the guest
    remapping it is seen once the cache is invalidated, as for a 4 KiB page."""
    tables = Tables(la57=False)
    va = 0xFFFF_FFFF_C000_0000 if size == 0x40000000 else 0xFFFF_FFFF_8120_0000
    path = tables.map(va, 0x4000_0000 if size == 0x40000000 else 0x40_0000, size)
    walker, _ = walker_for(tables, tmp_path)
    first = walker.translate(va + 0x1000)
    table, index = path[-1]  # the large page's own entry: remapped behind our back
    with (tmp_path / "ram.img").open("r+b") as f:
        f.seek(table + index * 8)
        f.write((0 | PRESENT_RW | 1 << 7).to_bytes(8, "little"))
    assert all(walker.translate(va + i * 0x1000) is first for i in range(512))
    walker.invalidate()
    assert walker.translate(va + 0x1000).physical_base == 0
