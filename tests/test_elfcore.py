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
