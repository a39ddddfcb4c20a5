"""VMCOREINFO: known-answer and must-fail vectors, and the physical RAM scan.

The known-answer text follows the format of kernel/crash_core.c and
arch/x86/kernel/crash_core_64.c (Linux 6.1) as printed by a lab guest.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sgmonitor.errors import GuestDataError
from sgmonitor.guest.memory import RawImage, Registers, Segment
from sgmonitor.kernel.vmcoreinfo import (
    STRIDED_SPAN,
    VMCOREINFO_BYTES,
    VmcoreinfoError,
    find_vmcoreinfo,
    iter_vmcoreinfo,
    parse_vmcoreinfo,
    parse_vmcoreinfo_note,
)

TEXT = (
    b"OSRELEASE=6.1.0-56-cloud-amd64\n"
    b"BUILD-ID=3b43fad5034874490492495d552c0af6a5fab235\n"
    b"PAGESIZE=4096\n"
    b"SYMBOL(init_uts_ns)=ffffffff82bf9b60\n"
    b"OFFSET(uts_namespace.name)=0\n"
    b"SYMBOL(_stext)=ffffffff81000000\n"
    b"LENGTH(mem_section)=2048\n"
    b"SIZE(mem_section)=16\n"
    b"NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129\n"
    b"NUMBER(phys_base)=0\n"
    b"KERNELOFFSET=1c000000\n"
    b"CRASHTIME=1700000000\n"
    b"PHYS_OFFSET=0x80000000\n"
)


def note(text: bytes, namesz: int = 11, kind: int = 0) -> bytes:
    pad = b"\0" * (-len(text) % 4)
    return struct.pack("<III", namesz, len(text), kind) + b"VMCOREINFO\0\0" + text + pad


def test_known_answer() -> None:
    info = parse_vmcoreinfo(TEXT)
    assert info.osrelease == "6.1.0-56-cloud-amd64"
    assert info.build_id == "3b43fad5034874490492495d552c0af6a5fab235"
    assert info.page_size == 4096
    assert info.symbol("_stext") == 0xFFFFFFFF81000000
    assert info.symbols["init_uts_ns"] == 0xFFFFFFFF82BF9B60
    assert info.offsets == {"uts_namespace.name": 0}
    assert info.lengths == {"mem_section": 2048}
    assert info.sizes == {"mem_section": 16}
    assert info.number("PAGE_BUDDY_MAPCOUNT_VALUE") == -129
    assert info.kernel_offset == 0x1C000000
    assert info.crash_time == 1700000000
    assert info.other == {"PHYS_OFFSET": "0x80000000"}  # unknown keys kept verbatim
    assert info.raw == TEXT
    with pytest.raises(VmcoreinfoError):
        info.symbol("nope")


def test_note_and_padding() -> None:
    assert parse_vmcoreinfo_note(note(TEXT)).osrelease == "6.1.0-56-cloud-amd64"
    assert parse_vmcoreinfo(TEXT + b"\0" * 100).raw == TEXT
    assert parse_vmcoreinfo(TEXT.rstrip(b"\n")).page_size == 4096
    assert parse_vmcoreinfo(TEXT + b"SYMBOL(_stext)=ffffffff81000000\n").symbols["_stext"]


MUST_FAIL = {
    "empty": b"",
    "only NULs": b"\0" * 16,
    "too big": TEXT + b"X=" + b"a" * 300 + b"\n" + b"Y=1\n" * ((VMCOREINFO_BYTES // 4) + 1),
    "NUL inside": TEXT.replace(b"PAGESIZE", b"PAGE\0IZE"),
    "non-ASCII": TEXT + b"FOO=\xff\n",
    "control char": TEXT + b"FOO=a\tb\n",
    "empty line": TEXT.replace(b"PAGESIZE=4096\n", b"PAGESIZE=4096\n\n"),
    "no equals": TEXT + b"JUSTTEXT\n",
    "empty value": TEXT + b"FOO=\n",
    "long line": TEXT + b"FOO=" + b"a" * 600 + b"\n",
    "bad hex": TEXT + b"SYMBOL(x)=0xffff\n",
    "hex too long": TEXT + b"SYMBOL(x)=1ffffffffffffffff\n",
    "negative size": TEXT + b"SIZE(x)=-1\n",
    "bad number": TEXT + b"NUMBER(x)=12a\n",
    "bad key": TEXT + b"SYMBOL(a b)=1\n",
    "lowercase key": TEXT + b"foo=1\n",
    "conflicting duplicate": TEXT + b"SYMBOL(_stext)=ffffffff82000000\n",
    "no OSRELEASE": TEXT.replace(b"OSRELEASE=", b"RELEASE="),
    "no PAGESIZE": TEXT.replace(b"PAGESIZE=4096\n", b""),
    "odd PAGESIZE": TEXT.replace(b"PAGESIZE=4096", b"PAGESIZE=4095"),
    "bad BUILD-ID": TEXT.replace(b"BUILD-ID=3b", b"BUILD-ID=zz"),
    "bad KERNELOFFSET": TEXT.replace(b"KERNELOFFSET=1c000000", b"KERNELOFFSET=-1"),
    "number out of range": TEXT + b"NUMBER(x)=99999999999999999999\n",
}


@pytest.mark.parametrize("name", sorted(MUST_FAIL))
def test_must_fail(name: str) -> None:
    with pytest.raises(VmcoreinfoError) as err:
        parse_vmcoreinfo(MUST_FAIL[name])
    assert isinstance(err.value, GuestDataError)


@pytest.mark.parametrize(
    "bad",
    [
        note(TEXT, namesz=10),
        note(TEXT, kind=1),
        note(TEXT)[:30],
        note(TEXT).replace(b"VMCOREINFO", b"VMCOREINFX"),
        struct.pack("<III", 11, VMCOREINFO_BYTES + 1, 0) + b"VMCOREINFO\0\0" + TEXT,
    ],
)
def test_note_must_fail(bad: bytes) -> None:
    with pytest.raises(VmcoreinfoError):
        parse_vmcoreinfo_note(bad)


class BytesRam:
    """Guest-physical RAM held in a bytes object, in two ranges with a hole between."""

    def __init__(self, low: bytes, high_base: int, high: bytes) -> None:
        self._parts = [(0, low), (high_base, high)]

    def ram_ranges(self) -> list[range]:
        return [range(b, b + len(d)) for b, d in self._parts]

    def read_physical(self, address: int, size: int) -> bytes:
        for base, data in self._parts:
            if base <= address and address + size <= base + len(data):
                return data[address - base : address - base + size]
        raise GuestDataError(f"{address:#x} is not RAM")

    def read_strided(self, address: int, stride: int, count: int) -> bytes:
        return b"".join(self.read_physical(address + i * stride, 1) for i in range(count))


def test_find_in_ram() -> None:
    low = bytearray(3 << 20)
    high = bytearray(1 << 20)
    real = note(TEXT)
    fake = note(TEXT.replace(b"KERNELOFFSET=1c000000", b"KERNELOFFSET=0"))
    broken = note(TEXT + b"FOO=\xff\n")
    low[0x123000 : 0x123000 + len(real)] = real
    low[(1 << 20) - 8 : (1 << 20) - 8 + len(fake)] = fake  # across a scan chunk, unaligned
    low[0x200000 : 0x200000 + len(broken)] = broken  # does not parse: skipped
    high[0x3000 : 0x3000 + len(fake)] = fake
    ram = BytesRam(bytes(low), 1 << 32, bytes(high))
    paged = find_vmcoreinfo(ram)
    assert [c.address for c in paged] == [0x123000, (1 << 32) + 0x3000]
    every = find_vmcoreinfo(ram, alignment=1, chunk=1 << 20)
    assert [c.address for c in every] == [(1 << 20) - 8, 0x123000, (1 << 32) + 0x3000]
    assert every[1].note == real and every[1].info.kernel_offset == 0x1C000000
    assert every[0].info.kernel_offset == 0
    assert find_vmcoreinfo(BytesRam(bytes(4096), 1 << 32, bytes(4096))) == []


def test_page_scan_of_a_mapped_file(tmp_path: Path) -> None:
    """The page-start scan over a real mapping (RawImage's strided read), RAM in two
    segments with the 32-bit hole between: the notes at page starts are found in both,
    a guest that plants the signature's first byte on every page costs a short read
    each and hides nothing, and the strided read equals byte-by-byte reads."""
    low = bytearray(2 << 20)
    high = bytearray(1 << 20)
    for page in range(0, len(low), 4096):  # every page's byte 12 is the signature's first
        low[page + 12] = ord("V")
    real = note(TEXT)
    low[0x41000 : 0x41000 + len(real)] = real
    high[len(high) - 4096 : len(high) - 4096 + len(real)] = real  # the last page of RAM
    path = tmp_path / "ram"
    path.write_bytes(bytes(low) + bytes(high))
    segments = [Segment(0, len(low), 0), Segment(1 << 32, len(high), len(low))]
    with RawImage(str(path), Registers(cr0=0, cr3=0, cr4=0), segments) as ram:
        found = find_vmcoreinfo(ram)
        assert [c.address for c in found] == [0x41000, (1 << 32) + len(high) - 4096]
        assert all(c.note == real for c in found)
        column = ram.read_strided(12, 4096, 512)
        assert column == b"".join(ram.read_physical(12 + i * 4096, 1) for i in range(512))
        assert column.count(b"V") == 512
        # across the hole: the slow path, same answer as reading each byte
        across = ram.read_strided(len(low) - 4096 + 12, (1 << 32) - len(low) + 4096, 2)
        assert across == bytes([low[len(low) - 4096 + 12], high[12]])


class CountingImage(RawImage):
    """A RAM image that counts the bytes its strided reads cover."""

    def __init__(self, path: str, segments: list[Segment]) -> None:
        super().__init__(path, Registers(cr0=0, cr3=0, cr4=0), segments)
        self.covered = 0

    def read_strided(self, address: int, stride: int, count: int) -> bytes:
        self.covered += stride * count
        return super().read_strided(address, stride, count)


def test_the_scan_reads_ram_only_as_far_as_it_is_asked(tmp_path: Path) -> None:
    """iter_vmcoreinfo finds notes as it is asked for them: a caller that stops at the
    first (the kernel view stops at the kernel's own) leaves the rest of RAM unread."""
    size = 8 * STRIDED_SPAN
    real = note(TEXT)
    path = tmp_path / "ram"
    with path.open("wb") as f:  # sparse: a note near the start, another near the end
        f.truncate(size)
        f.seek(0x5000)
        f.write(real)
        f.seek(size - 0x3000)
        f.write(real)
    with CountingImage(str(path), [Segment(0, size, 0)]) as ram:
        first = next(iter_vmcoreinfo(ram))
        assert first.address == 0x5000 and ram.covered <= STRIDED_SPAN
        assert [c.address for c in find_vmcoreinfo(ram)] == [0x5000, size - 0x3000]
        assert ram.covered > size
