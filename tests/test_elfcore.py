"""Corrupt and truncated ELF cores give a clear CoreFileError, never garbage or a crash.

The cores are cut and bent from a real one written by QEMU's dump-guest-memory.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from guests import MAIN, GuestUnderTest, only

from sgmonitor.guest.elfcore import CoreFileError, ElfCore
from sgmonitor.guest.qemu import QemuGuest


@pytest.fixture(scope="module")
def real_core(guest: GuestUnderTest, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("core") / "real.core"
    with QemuGuest(guest.info.qmp) as live, live.paused():
        live.qmp.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
    return path.read_bytes()


def _phdrs(core: bytes) -> list[tuple[int, tuple[int, ...]]]:
    phoff, phnum = struct.unpack_from("<Q", core, 0x20)[0], struct.unpack_from("<H", core, 0x38)[0]
    return [
        (phoff + i * 56, struct.unpack_from("<IIQQQQQQ", core, phoff + i * 56))
        for i in range(phnum)
    ]


def _truncate(core: bytes) -> bytes:
    return core[: len(core) // 2]


def _bad_magic(core: bytes) -> bytes:
    return b"\x7fELG" + core[4:]


def _not_a_core(core: bytes) -> bytes:
    return core[:16] + struct.pack("<H", 2) + core[18:]  # ET_EXEC


def _phdrs_past_end(core: bytes) -> bytes:
    return core[:0x20] + struct.pack("<Q", len(core) + 8) + core[0x28:]


def _huge_phnum(core: bytes) -> bytes:
    return core[:0x38] + struct.pack("<H", 0xFFFF) + core[0x3A:]


def _note_lies_about_size(core: bytes) -> bytes:
    out = bytearray(core)
    for _, (p_type, _, offset, *_rest) in _phdrs(core):
        if p_type == 4:
            out[offset + 4 : offset + 8] = struct.pack("<I", 0x7FFFFFFF)  # first note's descsz
    return bytes(out)


def _no_qemu_note(core: bytes) -> bytes:
    return core.replace(b"QEMU\0", b"QEMX\0")


def _load_past_end(core: bytes) -> bytes:
    out = bytearray(core)
    for at, (p_type, *_rest) in _phdrs(core):
        if p_type == 1:
            out[at + 32 : at + 40] = struct.pack("<Q", len(core) * 2)  # p_filesz
            break
    return bytes(out)


def _overlapping_ram(core: bytes) -> bytes:
    """Found by test_properties: the second PT_LOAD's p_paddr set to 0 (the first's), so
    two RAM segments claim the same guest-physical range."""
    out = bytearray(core)
    loads = [(at, fields) for at, fields in _phdrs(core) if fields[0] == 1]
    out[loads[1][0] + 24 : loads[1][0] + 32] = struct.pack("<Q", loads[0][1][4])  # p_paddr
    return bytes(out)


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": _truncate,
    "bad-magic": _bad_magic,
    "not-a-core": _not_a_core,
    "phdrs-past-end": _phdrs_past_end,
    "huge-phnum": _huge_phnum,
    "note-lies-about-size": _note_lies_about_size,
    "no-qemu-note": _no_qemu_note,
    "load-past-end": _load_past_end,
    "overlapping-ram": _overlapping_ram,
}


@pytest.mark.guest
@only(MAIN)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_core_is_rejected(real_core: bytes, tmp_path: Path, corruption: str) -> None:
    path = tmp_path / "bad.core"
    path.write_bytes(CORRUPTIONS[corruption](real_core))
    with pytest.raises(CoreFileError):
        ElfCore(str(path))


def test_empty_and_tiny_files_are_rejected(tmp_path: Path) -> None:
    for content in (b"", b"\x7fELF"):
        path = tmp_path / "tiny.core"
        path.write_bytes(content)
        with pytest.raises(CoreFileError):
            ElfCore(str(path))


def _tiny_core(*, extended: bool) -> bytes:
    """A minimal x86-64 core as QEMU lays one out: header, section header 0, program
    headers (a note segment with a QEMU CPU-state note, one page of RAM), the note, RAM.
    ``extended`` writes the program header count as QEMU does past 65534 segments:
    ``e_phnum = PN_XNUM`` and the real count in section header 0's ``sh_info``."""
    phoff, phnum = 64 + 64, 2
    state = struct.pack("<II", 1, 0x1B8) + bytes(8 + 18 * 8 + 10 * 24 - 8)
    state += struct.pack("<5Q", 0x80050033, 0, 0, 0x1234000, 0x3606E0) + bytes(0x1B8 - 432)
    note = struct.pack("<III", 5, len(state), 0) + b"QEMU\0\0\0\0" + state
    note_at = phoff + phnum * 56
    ram_at = note_at + len(note)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 64, 0, 64, 56,
                          0xFFFF if extended else phnum, 64, 1, 0)  # fmt: skip
    section0 = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum if extended else 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, note_at, 0, 0, len(note), len(note), 0)
    phdrs += struct.pack("<IIQQQQQQ", 1, 0, ram_at, 0, 0x1000, 4096, 4096, 0)
    return header + section0 + phdrs + note + b"\xaa" * 4096


@pytest.mark.parametrize("extended", [False, True])
def test_tiny_core_and_extended_numbering(tmp_path: Path, extended: bool) -> None:
    path = tmp_path / "tiny.core"
    path.write_bytes(_tiny_core(extended=extended))
    with ElfCore(str(path)) as core:
        assert core.registers().cr3 == 0x1234000 and core.registers().cr4 == 0x3606E0
        assert core.ram_ranges() == [range(0x1000, 0x2000)]
        assert core.read_physical(0x1800, 4) == b"\xaa" * 4


def test_extended_numbering_without_section_zero_is_rejected(tmp_path: Path) -> None:
    core = bytearray(_tiny_core(extended=True))
    core[0x28:0x30] = bytes(8)  # e_shoff = 0: nowhere to find the real count
    path = tmp_path / "bad.core"
    path.write_bytes(bytes(core))
    with pytest.raises(CoreFileError, match="extended numbering"):
        ElfCore(str(path))
