"""kallsyms from guest memory: the vendor vmlinux, live lab guests, corrupted tables.

Ground truth is the guest's own /proc/kallsyms (printed by the lab's /init).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from collections.abc import Iterator
from functools import cache

import pytest
from guests import MAIN, GuestUnderTest, only

from sgmonitor.guest.paging import PageWalker, VirtualMemory
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.kernel.kallsyms import (
    MAX_IMAGE_SIZE,
    MAX_VMCOREINFO_CANDIDATES,
    Kallsyms,
    KallsymsError,
    KallsymsTables,
    VmlinuxFile,
    decode_kallsyms,
    find_kallsyms_tables,
    genuine_vmcoreinfo,
    image_range,
    kallsyms_tables_from_vmcoreinfo,
)
from sgmonitor.kernel.vmcoreinfo import VmcoreinfoError, VmcoreinfoNote, find_vmcoreinfo
from sgmonitor.lab.kernel import fetch_kernel

TRUTH = ("init_task", "linux_banner", "sys_call_table", "__start_BTF", "__stop_BTF")


class Patched:
    """An address space with some bytes overwritten: a guest that corrupted its tables."""

    def __init__(self, base: VmlinuxFile, patches: dict[int, bytes]) -> None:
        self.base = base
        self.patches = patches

    def read(self, address: int, size: int) -> bytes:
        data = bytearray(self.base.read(address, size))
        for at, new in self.patches.items():
            lo, hi = max(at, address), min(at + len(new), address + size)
            if lo < hi:
                data[lo - address : hi - address] = new[lo - at : hi - at]
        return bytes(data)


@pytest.fixture(scope="module")
def vmlinux() -> VmlinuxFile:
    return VmlinuxFile(str(fetch_kernel("cloud").vmlinux))


@pytest.fixture(scope="module")
def vendor(vmlinux: VmlinuxFile) -> tuple[range, KallsymsTables, Kallsyms]:
    image = range(vmlinux.ranges[0].start, vmlinux.ranges[0].start + MAX_IMAGE_SIZE)
    tables = find_kallsyms_tables(vmlinux, image)
    return image, tables, decode_kallsyms(vmlinux, tables, image)


def test_vendor_vmlinux(vendor: tuple[range, KallsymsTables, Kallsyms]) -> None:
    image, tables, syms = vendor
    assert len(syms) > 50_000
    assert syms.symbol("init_task").type == "D"
    assert syms.symbol("_stext").type == "T"
    assert syms["_stext"] == image.start
    assert syms.symbol("__per_cpu_start").address == 0  # absolute per-cpu symbol
    assert syms.addresses == sorted(syms.addresses)
    sym, off = syms.lookup(syms["init_task"] + 8) or (None, 0)
    assert sym is not None and sym.name == "init_task" and off == 8
    assert syms.lookup(-1) is None
    assert tables.markers is not None and tables.offsets < tables.names < tables.token_table


def _corruptions(tables: KallsymsTables, vm: VmlinuxFile) -> dict[str, dict[int, bytes]]:
    (count,) = struct.unpack("<I", vm.read(tables.num_syms, 4))
    first_offset = vm.read(tables.offsets + 4 * (count // 2), 4)
    return {
        "huge count": {tables.num_syms: struct.pack("<I", 0xFFFFFFF)},
        "zero count": {tables.num_syms: struct.pack("<I", 0)},
        "count one more": {tables.num_syms: struct.pack("<I", count + 300)},
        "token index": {tables.token_index + 2 * 66: b"\x00\x01"},
        "token not printable": {tables.token_table + 1: b"\x07"},
        "name length": {tables.names: b"\x00"},
        "name runs away": {tables.names: b"\xff\xff"},
        "marker": {tables.markers + 4: b"\x01\x00\x00\x00"} if tables.markers else {},
        "unsorted": {tables.offsets + 4 * (count // 2 + 7): first_offset[:3] + b"\x80"},
    }


@pytest.mark.parametrize(
    "case",
    [
        "huge count",
        "zero count",
        "count one more",
        "token index",
        "token not printable",
        "name length",
        "name runs away",
        "marker",
        "unsorted",
    ],
)
def test_corrupted_tables(
    case: str, vmlinux: VmlinuxFile, vendor: tuple[range, KallsymsTables, Kallsyms]
) -> None:
    image, tables, _ = vendor
    space = Patched(vmlinux, _corruptions(tables, vmlinux)[case])
    with pytest.raises(KallsymsError):
        decode_kallsyms(space, tables, image)


def test_tables_outside_image(
    vmlinux: VmlinuxFile, vendor: tuple[range, KallsymsTables, Kallsyms]
) -> None:
    image, tables, _ = vendor
    small = range(image.start, tables.names)
    with pytest.raises(KallsymsError):
        decode_kallsyms(vmlinux, tables, small)


def test_no_tables_found(vmlinux: VmlinuxFile) -> None:
    text = vmlinux.ranges[0]
    with pytest.raises(KallsymsError):
        find_kallsyms_tables(vmlinux, range(text.start, text.start + (4 << 20)))


# --- live guests -----------------------------------------------------------------------


@contextlib.contextmanager
def kernel_memory(guest: GuestUnderTest) -> Iterator[tuple[QemuGuest, VirtualMemory]]:
    memory = QemuGuest(guest.info.qmp, guest.info.ram)
    try:
        with memory.paused():
            walker = PageWalker.for_kernel(memory, memory.registers())
            yield memory, VirtualMemory(walker)
    finally:
        memory.close()


@cache
def vendor_kallsyms(path: str) -> tuple[KallsymsTables, Kallsyms]:
    """The tables and symbols of a vendor vmlinux, at link-time addresses."""
    vm = VmlinuxFile(path)
    image = range(vm.ranges[0].start, vm.ranges[0].start + MAX_IMAGE_SIZE)
    tables = find_kallsyms_tables(vm, image)
    return tables, decode_kallsyms(vm, tables, image)


def kernel_offset(note: VmcoreinfoNote) -> int:
    """KERNELOFFSET, which x86-64 always prints (0 without KASLR): never defaulted."""
    assert note.info.kernel_offset is not None, "VMCOREINFO has no KERNELOFFSET"
    return note.info.kernel_offset


@pytest.mark.guest
def test_guest_symbols(guest: GuestUnderTest) -> None:
    """From guest RAM alone: VMCOREINFO → kallsyms → the guest's own addresses."""
    truth = guest.truth.symbols
    with kernel_memory(guest) as (memory, aspace):
        candidates = find_vmcoreinfo(memory)
        note, syms = genuine_vmcoreinfo(candidates, aspace)
        assert {name: syms[name] for name in TRUTH} == {name: truth[name] for name in TRUTH}
        assert note.info.osrelease == guest.info.release
        found = find_kallsyms_tables(aspace, image_range(note.info))
    # The content scan finds in guest RAM the tables of the vendor vmlinux, slid by KASLR.
    slide = kernel_offset(note)
    tables, _ = vendor_kallsyms(guest.info.vmlinux)
    slid = {k: v + slide for k, v in dataclasses.asdict(tables).items() if v is not None}
    assert found == dataclasses.replace(tables, **slid)
    # Kernels with "vmcoreinfo: include kallsyms symbols" (2024; not the lab's Debian 12
    # 6.1 kernels) export the table addresses: parsed exactly when present, and the same.
    exported = kallsyms_tables_from_vmcoreinfo(note.info)
    assert (exported is None) == (b"SYMBOL(kallsyms_names)=" not in note.info.raw)
    assert exported is None or (exported.names, exported.offsets, exported.token_table) == (
        found.names,
        found.offsets,
        found.token_table,
    )


@pytest.mark.guest
def test_vendor_vmlinux_matches_guest(guest: GuestUnderTest) -> None:
    """The vendor vmlinux's symbols plus KERNELOFFSET are the guest's own addresses."""
    with kernel_memory(guest) as (memory, aspace):
        note, _ = genuine_vmcoreinfo(find_vmcoreinfo(memory), aspace)
    slide = kernel_offset(note)
    if not guest.config.kaslr:
        assert slide == 0
    _, syms = vendor_kallsyms(guest.info.vmlinux)  # link-time addresses
    truth = guest.truth.symbols
    assert {n: syms[n] + slide for n in TRUTH} == {n: truth[n] for n in TRUTH}


@pytest.mark.guest
@only(MAIN)
def test_planted_fake_is_not_chosen(guest: GuestUnderTest) -> None:
    """User space can write a note anywhere in RAM; the kernel does not point at it."""
    with kernel_memory(guest) as (memory, aspace):
        (real,) = find_vmcoreinfo(memory)
        text = real.info.raw
        # another 2 MiB-aligned slide than the real one (KASLR may have chosen 0 itself)
        lie = real.info.kernel_offset + 0x1000000
        forged = text.replace(
            f"KERNELOFFSET={real.info.kernel_offset:x}".encode(), f"KERNELOFFSET={lie:x}".encode()
        )
        assert forged != text
        fake = real.note[:4] + struct.pack("<I", len(forged)) + real.note[8:24] + forged
        spot = _zero_page(memory)
        saved = memory.read_physical(spot, len(fake))
        fd = os.open(guest.info.ram, os.O_RDWR)
        try:
            os.pwrite(fd, fake, spot)  # RAM file offset == guest-physical below 2 GiB
            candidates = find_vmcoreinfo(memory)
            assert sorted(c.address for c in candidates) == sorted([real.address, spot])
            note, syms = genuine_vmcoreinfo(candidates, aspace)
            assert note.address == real.address
            assert syms["init_task"] == guest.truth.symbols["init_task"]
            planted = next(c for c in candidates if c.address == spot)
            with pytest.raises(VmcoreinfoError):
                genuine_vmcoreinfo([planted], aspace)
            # an exact copy is harmless: it is chosen only together with the real one
            copy = VmcoreinfoNote(spot, real.note, real.info)
            assert genuine_vmcoreinfo([copy, real], aspace)[0].note == real.note

            def then_nothing() -> Iterator[VmcoreinfoNote]:
                yield planted
                yield real
                raise AssertionError("candidates read past the kernel's own note")

            # the first that passes is the one: nothing after it is looked at
            assert genuine_vmcoreinfo(then_nothing(), aspace)[0].address == real.address
            # a guest that plants many notes buys bounded work: after so many failures
            # the rest (the kernel's own among them) is not tried
            many = [planted] * MAX_VMCOREINFO_CANDIDATES + [real]
            with pytest.raises(VmcoreinfoError, match="more follow"):
                genuine_vmcoreinfo(iter(many), aspace)
            assert genuine_vmcoreinfo(many[1:], aspace)[0].address == real.address
        finally:
            os.pwrite(fd, saved, spot)
            os.close(fd)


def _zero_page(memory: QemuGuest) -> int:
    """A page-aligned all-zero page high in low RAM (restored after the test)."""
    low = max((r for r in memory.ram_ranges() if r.stop <= 1 << 31), key=len)
    for page in range(low.stop - (1 << 20), low.start + len(low) // 2, -(1 << 20)):
        if memory.read_physical(page, 4096) == bytes(4096):
            return page
    pytest.fail("no all-zero page in low RAM to plant a note in")
