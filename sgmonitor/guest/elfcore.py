"""QEMU ``dump-guest-memory`` ELF cores as a physical memory source.

The core's PT_LOAD segments give guest-physical RAM (``p_paddr``); its notes give the
registers (the ``QEMU`` note holds CR0/CR3/CR4) and the guest's VMCOREINFO. A core is
untrusted input: every offset and length is checked against the file before use.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct

from sgmonitor.errors import SGMonitorError
from sgmonitor.guest.memory import MappedFile, Registers, Segment
from sgmonitor.kernel.elf import EM_X86_64, ET_CORE, PT_LOAD, ByteImage, ElfError, ElfFile, Note

# QEMUCPUState (target/i386/arch_dump.c): version, size, 18 GPRs/rip/rflags, then
# 10 segment descriptors of 24 bytes, then cr[0..4].
_QEMU_CPU_STATE_CR_OFFSET = 8 + 18 * 8 + 10 * 24
_QEMU_CPU_STATE_MIN = _QEMU_CPU_STATE_CR_OFFSET + 5 * 8


class CoreFileError(SGMonitorError):
    """The file is not a usable QEMU ELF core (truncated, corrupt or not x86-64)."""


class ElfCore(MappedFile):
    """Guest-physical memory and vCPU state from a QEMU ELF core (paging=false)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CoreFileError(f"{path}: empty file, not an ELF core")
            with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as data:
                segments, self.notes, self._registers = read_core(data, path)
        super().__init__(path, segments)

    def registers(self) -> Registers:
        return self._registers

    def vmcoreinfo(self) -> bytes | None:
        """The guest's VMCOREINFO text, if QEMU's vmcoreinfo device put it in the core."""
        return next((n.desc for n in self.notes if n.name == "VMCOREINFO"), None)


def read_core(data: ByteImage, path: str) -> tuple[list[Segment], list[Note], Registers]:
    """The RAM segments, notes and first vCPU's registers of a core held in memory
    (``path`` labels errors); :class:`CoreFileError` when it is not a usable one."""
    try:
        elf = ElfFile(data, name=path)
        e_type, machine = elf.header.type, elf.header.machine
        if e_type != ET_CORE or machine != EM_X86_64:
            raise CoreFileError(
                f"{path}: not an x86-64 core file (type {e_type}, machine {machine})"
            )
        segments: list[Segment] = []
        for ph in elf.program_headers:
            if ph.type == PT_LOAD and ph.filesz:
                if ph.memsz != ph.filesz:
                    raise CoreFileError(
                        f"{path}: segment {ph.index} is partial ({ph.filesz} of {ph.memsz})"
                    )
                segments.append(Segment(ph.paddr, ph.filesz, ph.offset))
        notes = list(elf.notes())
    except ElfError as exc:
        raise CoreFileError(str(exc)) from exc
    if not segments:
        raise CoreFileError(f"{path}: no PT_LOAD segments (no guest RAM)")
    ordered = sorted(segments, key=lambda segment: segment.address)
    for before, after in itertools.pairwise(ordered):
        if before.end > after.address:
            raise CoreFileError(
                f"{path}: RAM segments at {before.address:#x}+{before.size:#x} and "
                f"{after.address:#x}+{after.size:#x} overlap"
            )
    return segments, notes, _registers_from_notes(path, notes)


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
