"""QEMU ``dump-guest-memory`` ELF cores as a physical memory source.

The core's PT_LOAD segments give guest-physical RAM (``p_paddr``); its notes give the
registers (the ``QEMU`` note holds CR0/CR3/CR4) and the guest's VMCOREINFO. A core is
untrusted input: every offset and length is checked against the file before use.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from sgmonitor.errors import SGMonitorError
from sgmonitor.guest.memory import MappedFile, Registers, Segment

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_PT_LOAD, _PT_NOTE = 1, 4
_MAX_PROGRAM_HEADERS = 4096
_MAX_NOTES_BYTES = 16 << 20
# QEMUCPUState (target/i386/arch_dump.c): version, size, 18 GPRs/rip/rflags, then
# 10 segment descriptors of 24 bytes, then cr[0..4].
_QEMU_CPU_STATE_CR_OFFSET = 8 + 18 * 8 + 10 * 24
_QEMU_CPU_STATE_MIN = _QEMU_CPU_STATE_CR_OFFSET + 5 * 8


class CoreFileError(SGMonitorError):
    """The file is not a usable QEMU ELF core (truncated, corrupt or not x86-64)."""


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


class ElfCore(MappedFile):
    """Guest-physical memory and vCPU state from a QEMU ELF core (paging=false)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _ELF_HEADER.size:
                raise CoreFileError(f"{path}: too short for an ELF header")
            with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as data:
                segments, self.notes = _parse(path, data, size)
        if not segments:
            raise CoreFileError(f"{path}: no PT_LOAD segments (no guest RAM)")
        super().__init__(path, segments)
        self._registers = _registers_from_notes(path, self.notes)

    def registers(self) -> Registers:
        return self._registers

    def vmcoreinfo(self) -> bytes | None:
        """The guest's VMCOREINFO text, if QEMU's vmcoreinfo device put it in the core."""
        return next((n.desc for n in self.notes if n.name == "VMCOREINFO"), None)


def _parse(path: str, data: mmap.mmap, size: int) -> tuple[list[Segment], list[Note]]:
    ident, e_type, machine, _, _, phoff, _, _, _, phentsize, phnum, *_ = _ELF_HEADER.unpack_from(
        data, 0
    )
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise CoreFileError(f"{path}: not a 64-bit little-endian ELF file")
    if e_type != 4 or machine != 62:
        raise CoreFileError(f"{path}: not an x86-64 core file (type {e_type}, machine {machine})")
    if phentsize != _PROGRAM_HEADER.size or not 0 < phnum <= _MAX_PROGRAM_HEADERS:
        raise CoreFileError(f"{path}: bad program header table ({phnum} x {phentsize})")
    if phoff + phnum * phentsize > size:
        raise CoreFileError(f"{path}: program headers run past the end of the file")
    segments: list[Segment] = []
    notes: list[Note] = []
    for i in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz, _ = _PROGRAM_HEADER.unpack_from(
            data, phoff + i * phentsize
        )
        if offset + filesz > size:
            raise CoreFileError(f"{path}: segment {i} runs past the end (truncated core?)")
        if p_type == _PT_LOAD and filesz:
            if memsz != filesz:
                raise CoreFileError(f"{path}: segment {i} is partial ({filesz} of {memsz})")
            segments.append(Segment(paddr, filesz, offset))
        elif p_type == _PT_NOTE:
            if filesz > _MAX_NOTES_BYTES:
                raise CoreFileError(f"{path}: note segment {i} is implausibly large")
            notes.extend(_parse_notes(path, bytes(data[offset : offset + filesz])))
    return segments, notes


def _parse_notes(path: str, blob: bytes) -> list[Note]:
    notes = []
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, note_type = struct.unpack_from("<III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if desc_at + descsz > len(blob):
            raise CoreFileError(f"{path}: note at {pos:#x} runs past its segment")
        name = blob[name_at : name_at + namesz].rstrip(b"\0").decode("ascii", "replace")
        notes.append(Note(name, note_type, blob[desc_at : desc_at + descsz]))
        pos = end
    return notes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _registers_from_notes(path: str, notes: list[Note]) -> Registers:
    """CR0/CR3/CR4 of the first vCPU, from its QEMU note (EFER is not in the core)."""
    state = next((n.desc for n in notes if n.name == "QEMU"), None)
    if state is None:
        raise CoreFileError(f"{path}: no QEMU CPU-state note (not written by QEMU?)")
    version, declared = struct.unpack_from("<II", state, 0) if len(state) >= 8 else (0, 0)
    if version != 1 or declared < _QEMU_CPU_STATE_MIN or len(state) < _QEMU_CPU_STATE_MIN:
        raise CoreFileError(f"{path}: QEMU CPU-state note has version {version}, size {declared}")
    cr0, _, _, cr3, cr4 = struct.unpack_from("<5Q", state, _QEMU_CPU_STATE_CR_OFFSET)
    return Registers(cr0=cr0, cr3=cr3, cr4=cr4)
