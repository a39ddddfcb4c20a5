"""The one reader of ELF64 little-endian files: vendor vmlinux images and QEMU's cores.

:class:`ElfFile` reads the file header, the section headers (with their names) and the
program headers of an image held in memory (``bytes``, a ``memoryview`` or an
``mmap``), and the notes of a note segment or section. Every file it reads is untrusted
(a vmlinux an operator named, a core a host wrote): each count, offset and size is
checked against the file and against fixed limits before it is used, so a malformed
file raises :class:`ElfError` after work bounded by those limits, never an
``IndexError``, a ``struct.error`` or a huge allocation. Data is copied only in the
pieces a caller asks for.

Extended numbering (``e_phnum == PN_XNUM``, ``e_shnum == 0``, ``e_shstrndx ==
SHN_XINDEX``, with the real values in section header 0) is understood: QEMU writes it
for cores with many RAM blocks.

Lives in ``kernel`` (which the enclave runs) so that ``btf`` and ``kallsyms`` can use
it; ``guest.elfcore`` may import it too. It imports only the standard library's
``struct`` and the shared error family.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from sgmonitor.errors import SGMonitorError

ET_EXEC, ET_DYN, ET_CORE = 2, 3, 4
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
SHT_NULL, SHT_NOTE, SHT_NOBITS = 0, 7, 8
SHF_ALLOC = 0x2
PN_XNUM = 0xFFFF
SHN_XINDEX = 0xFFFF

# Limits a hostile file cannot raise (a vmlinux has ~40 sections, a QEMU core one
# program header per RAM block).
MAX_SECTIONS = 1 << 16
MAX_PROGRAM_HEADERS = 1 << 16
MAX_SECTION_NAME = 4096
MAX_NOTES_BYTES = 16 << 20
MAX_NOTES = 1 << 16

_FILE_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_NOTE_HEADER = struct.Struct("<III")
_U64_END = 1 << 64


class ElfError(SGMonitorError):
    """The file is not a well-formed ELF64 little-endian file, or lacks what was asked."""


class ByteImage(Protocol):
    """What the reader needs of the file's bytes: ``bytes``, ``memoryview``, ``mmap``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes | memoryview: ...


@dataclass(frozen=True)
class ElfHeader:
    """The file header, with extended numbering already resolved."""

    type: int
    machine: int
    entry: int
    phoff: int
    shoff: int
    flags: int
    phentsize: int
    phnum: int
    shentsize: int
    shnum: int
    shstrndx: int


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    address: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entsize: int

    @property
    def in_file(self) -> bool:
        """Whether the section's bytes are in the file (not NOBITS, not the NULL entry)."""
        return self.type not in (SHT_NULL, SHT_NOBITS)


@dataclass(frozen=True)
class ProgramHeader:
    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


class ElfFile:
    """An ELF64 little-endian file, validated on construction.

    ``name`` only labels error messages. The image must stay valid (an ``mmap`` open)
    for as long as data is read through this object.
    """

    def __init__(self, data: ByteImage, *, name: str = "ELF file") -> None:
        self._data = data
        self.name = name
        self.size = len(data)
        self.header = self._file_header()
        self.sections: tuple[Section, ...] = self._section_headers()
        self.program_headers: tuple[ProgramHeader, ...] = self._program_headers()

    # -- reading -----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the file at ``offset``; :class:`ElfError` past its end."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ElfError(f"{self.name}: bytes {offset:#x}+{size:#x} lie outside the file")
        return bytes(self._data[offset : offset + size])

    def section(self, name: str) -> Section:
        """The first section called ``name``; :class:`ElfError` when there is none."""
        for section in self.sections:
            if section.name == name:
                return section
        raise ElfError(f"{self.name}: no {name} section")

    def section_data(self, section: Section) -> bytes:
        if not section.in_file:
            raise ElfError(f"{self.name}: section {section.index} has no bytes in the file")
        return self.read(section.offset, section.size)

    def segment_data(self, header: ProgramHeader) -> bytes:
        return self.read(header.offset, header.filesz)

    def notes(self) -> Iterator[Note]:
        """The notes of every PT_NOTE segment, in file order."""
        for header in self.program_headers:
            if header.type == PT_NOTE:
                if header.filesz > MAX_NOTES_BYTES:
                    raise ElfError(
                        f"{self.name}: note segment {header.index} is implausibly large "
                        f"({header.filesz:#x} bytes)"
                    )
                yield from parse_notes(self.segment_data(header), name=self.name)

    # -- parsing -----------------------------------------------------------------------

    def _file_header(self) -> ElfHeader:
        if self.size < _FILE_HEADER.size:
            raise ElfError(f"{self.name}: {self.size} bytes, too short for an ELF header")
        (
            ident,
            e_type,
            machine,
            version,
            entry,
            phoff,
            shoff,
            flags,
            _ehsize,
            phentsize,
            phnum,
            shentsize,
            shnum,
            shstrndx,
        ) = _FILE_HEADER.unpack(self.read(0, _FILE_HEADER.size))
        if ident[:4] != b"\x7fELF":
            raise ElfError(f"{self.name}: not an ELF file")
        if ident[4] != 2 or ident[5] != 1:
            raise ElfError(f"{self.name}: not a 64-bit little-endian ELF file")
        if ident[6] != 1 or version != 1:
            raise ElfError(f"{self.name}: unknown ELF version {ident[6]}/{version}")
        # e_ehsize is not checked: QEMU's dump-guest-memory writes 8 there.
        # Extended numbering: the real counts live in section header 0.
        if phnum == PN_XNUM or (shnum == 0 and shoff) or shstrndx == SHN_XINDEX:
            zero = self._section_zero(shoff, shentsize)
            if phnum == PN_XNUM:
                phnum = zero[7]  # sh_info
            if shnum == 0 and shoff:
                shnum = zero[5]  # sh_size
            if shstrndx == SHN_XINDEX:
                shstrndx = zero[6]  # sh_link
        header = ElfHeader(
            type=e_type,
            machine=machine,
            entry=entry,
            phoff=phoff,
            shoff=shoff,
            flags=flags,
            phentsize=phentsize,
            phnum=phnum,
            shentsize=shentsize,
            shnum=shnum,
            shstrndx=shstrndx,
        )
        self._check_table("section header", shoff, shnum, shentsize, _SECTION_HEADER, MAX_SECTIONS)
        self._check_table(
            "program header", phoff, phnum, phentsize, _PROGRAM_HEADER, MAX_PROGRAM_HEADERS
        )
        if shnum and shstrndx >= shnum:
            raise ElfError(f"{self.name}: section name table index {shstrndx} of {shnum}")
        return header

    def _section_zero(self, shoff: int, shentsize: int) -> tuple[int, ...]:
        if shoff == 0 or shentsize < _SECTION_HEADER.size:
            raise ElfError(f"{self.name}: extended numbering without a section header 0")
        return _SECTION_HEADER.unpack(self.read(shoff, _SECTION_HEADER.size))

    def _check_table(
        self, what: str, offset: int, count: int, entsize: int, entry: struct.Struct, limit: int
    ) -> None:
        if count == 0:
            return
        if count > limit:
            raise ElfError(f"{self.name}: {count} {what}s, over the limit of {limit}")
        if entsize < entry.size:
            raise ElfError(f"{self.name}: {what} entries of {entsize} bytes (< {entry.size})")
        if offset + count * entsize > self.size:
            raise ElfError(f"{self.name}: the {what} table runs past the end of the file")

    def _section_headers(self) -> tuple[Section, ...]:
        h = self.header
        if h.shnum == 0:
            return ()
        size = _SECTION_HEADER.size
        raw = [
            _SECTION_HEADER.unpack(self.read(h.shoff + i * h.shentsize, size))
            for i in range(h.shnum)
        ]
        for index, (_, kind, _, address, offset, size, *_rest) in enumerate(raw):
            if kind not in (SHT_NULL, SHT_NOBITS) and offset + size > self.size:
                raise ElfError(f"{self.name}: section {index} runs past the end of the file")
            if address + size > _U64_END:
                raise ElfError(f"{self.name}: section {index} wraps around the address space")
        names = self._name_table(raw)
        return tuple(
            Section(index, names(name_off), *fields)
            for index, (name_off, *fields) in enumerate(raw)
        )

    def _name_table(self, raw: list[tuple[int, ...]]) -> _Names:
        index = self.header.shstrndx
        if index == 0:  # SHN_UNDEF: no section names
            return lambda offset: ""
        _, kind, _, _, offset, size, *_rest = raw[index]
        if kind in (SHT_NULL, SHT_NOBITS):
            raise ElfError(f"{self.name}: section name table {index} has no bytes in the file")

        def name(at: int) -> str:
            if at >= size:
                raise ElfError(f"{self.name}: section name offset {at:#x} is outside its table")
            chunk = self.read(offset + at, min(size - at, MAX_SECTION_NAME + 1))
            end = chunk.find(b"\0")
            if end < 0:
                raise ElfError(f"{self.name}: section name at {at:#x} is unterminated or too long")
            return chunk[:end].decode("utf-8", "replace")

        return name

    def _program_headers(self) -> tuple[ProgramHeader, ...]:
        h = self.header
        if h.phnum == 0:
            return ()
        headers = []
        for index in range(h.phnum):
            entry = self.read(h.phoff + index * h.phentsize, _PROGRAM_HEADER.size)
            fields = _PROGRAM_HEADER.unpack(entry)
            header = ProgramHeader(index, *fields)
            if header.offset + header.filesz > self.size:
                raise ElfError(f"{self.name}: segment {index} runs past the end of the file")
            if max(header.vaddr, header.paddr) + header.memsz > _U64_END:
                raise ElfError(f"{self.name}: segment {index} wraps around the address space")
            headers.append(header)
        return tuple(headers)


class _Names(Protocol):
    def __call__(self, offset: int, /) -> str: ...


def parse_notes(blob: bytes, *, name: str = "ELF file") -> list[Note]:
    """The notes in a note segment or section (4-byte aligned, as Linux and QEMU write
    them); a note that runs past ``blob`` raises :class:`ElfError`. Fewer than 12 bytes
    left at the end (padding) are ignored."""
    notes: list[Note] = []
    pos = 0
    while pos + _NOTE_HEADER.size <= len(blob):
        if len(notes) >= MAX_NOTES:
            raise ElfError(f"{name}: more than {MAX_NOTES} notes")
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(blob, pos)
        name_at = pos + _NOTE_HEADER.size
        desc_at = name_at + _align4(namesz)
        if desc_at + descsz > len(blob):
            raise ElfError(f"{name}: note at {pos:#x} runs past its segment")
        note_name = blob[name_at : name_at + namesz].rstrip(b"\0").decode("ascii", "replace")
        notes.append(Note(note_name, note_type, blob[desc_at : desc_at + descsz]))
        pos = desc_at + _align4(descsz)
    return notes


def _align4(n: int) -> int:
    return (n + 3) & ~3


__all__ = [
    "EM_X86_64",
    "ET_CORE",
    "PT_LOAD",
    "PT_NOTE",
    "SHF_ALLOC",
    "SHT_NOBITS",
    "SHT_NULL",
    "ByteImage",
    "ElfError",
    "ElfFile",
    "ElfHeader",
    "Note",
    "ProgramHeader",
    "Section",
    "parse_notes",
]
