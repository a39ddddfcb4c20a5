"""VMCOREINFO: known-answer and must-fail vectors, and the physical RAM scan.

The known-answer text follows the format of kernel/crash_core.c and
arch/x86/kernel/crash_core_64.c (Linux 6.1) as printed by a lab guest.
"""

from __future__ import annotations

import struct

import pytest

from sgmonitor.errors import GuestDataError
from sgmonitor.kernel.vmcoreinfo import (
    VMCOREINFO_BYTES,
    VmcoreinfoError,
    find_vmcoreinfo,
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
