"""The kernel's VMCOREINFO note: parse it strictly, find it in guest-physical RAM.

VMCOREINFO is the text the kernel writes for crash tools (kernel/crash_core.c,
``crash_save_vmcoreinfo_init``): ``KEY=VALUE`` lines naming the release, the page size,
the KASLR slide (``KERNELOFFSET``), some symbol addresses and structure offsets. It is
the first thing a monitor without debug files reads, and it comes from a guest that may
be hostile, so the parser is strict and bounded: at most :data:`VMCOREINFO_BYTES` of
printable ASCII, one ``KEY=VALUE`` per line, values in the format the kernel prints them
(``SYMBOL``/``KERNELOFFSET`` hex, ``NUMBER`` signed decimal, ``OFFSET``/``SIZE``/
``LENGTH`` unsigned decimal). Keys it does not know are kept verbatim in
:attr:`Vmcoreinfo.other`. Anything else raises :class:`VmcoreinfoError`.

The note lives in a page the kernel allocated (``vmcoreinfo_note``), so it is found by
scanning guest-physical RAM for its ELF note header. User space can plant look-alike
notes in its own pages, so :func:`find_vmcoreinfo` returns *every* candidate;
:func:`sgmonitor.kernel.kallsyms.genuine_vmcoreinfo` picks the one the kernel itself
points at (see there for the rule).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sgmonitor.errors import GuestDataError, PhysicalAccessError

# The kernel allocates one page for the text (VMCOREINFO_BYTES == PAGE_SIZE); the
# parser never accepts more than this, whatever the guest's note header claims.
VMCOREINFO_BYTES = 4096
# ELF note name and type the kernel uses (include/linux/crash_core.h).
VMCOREINFO_NOTE_NAME = b"VMCOREINFO"
VMCOREINFO_NOTE_TYPE = 0
_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type
_NAME_FIELD = VMCOREINFO_NOTE_NAME + b"\0\0"  # "VMCOREINFO\0" padded to 4 bytes
# What a note's name field and the start of its text look like in RAM: the bytes that
# :func:`find_vmcoreinfo` looks for with ``bytes.find``.
_SIGNATURE = _NAME_FIELD + b"OSRELEASE="
_HEADER_BEFORE_SIGNATURE = _NOTE_HEADER.size
# Physical RAM is scanned in chunks this big: large enough that per-read overhead
# vanishes, small enough that each copy stays in cache (measured: 256 KiB is best).
SCAN_CHUNK = 256 << 10
# The RAM one strided read covers in the page-start scan: the scan stops early when its
# caller does, and no more of RAM is touched than that.
STRIDED_SPAN = 16 << 20
# Below this alignment one bytes.find beats checking each aligned spot.
_STRIDE_MIN = 256
# Where the kernel's note starts (a page: see find_vmcoreinfo).
NOTE_ALIGNMENT = 4096
_MAX_LINE = 512
_MAX_LINES = 1024

_NAME = r"[A-Za-z0-9_.$]{1,128}"
_LINE = re.compile(rb"[\x20-\x7e]{1,%d}" % _MAX_LINE)
_KEYED = re.compile(r"(SYMBOL|OFFSET|SIZE|LENGTH|NUMBER)\((" + _NAME + r")\)")
_PLAIN_KEY = re.compile(r"[A-Z][A-Z0-9_-]{0,63}")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_UDEC = re.compile(r"[0-9]{1,20}")
_SDEC = re.compile(r"-?[0-9]{1,20}")
_U64 = (1 << 64) - 1


class VmcoreinfoError(GuestDataError):
    """The VMCOREINFO text is malformed, oversized, ambiguous or missing."""


class PhysicalSource(Protocol):
    """What the physical scan needs: :class:`sgmonitor.guest.memory.PhysicalMemory` fits."""

    def read_physical(self, address: int, size: int) -> bytes: ...

    def ram_ranges(self) -> list[range]: ...

    def read_strided(self, address: int, stride: int, count: int) -> bytes: ...


@dataclass(frozen=True)
class Vmcoreinfo:
    """One parsed VMCOREINFO text.

    ``symbols`` are the kernel's run-time addresses (``&sym``, KASLR slide included);
    ``kernel_offset`` is the text slide (x86 ``KERNELOFFSET``), ``None`` when the
    kernel does not print it.
    """

    osrelease: str
    page_size: int
    build_id: str | None
    kernel_offset: int | None
    crash_time: int | None
    symbols: Mapping[str, int]
    offsets: Mapping[str, int]
    sizes: Mapping[str, int]
    lengths: Mapping[str, int]
    numbers: Mapping[str, int]
    other: Mapping[str, str]
    raw: bytes = field(repr=False)

    def symbol(self, name: str) -> int:
        """``SYMBOL(name)``, or :class:`VmcoreinfoError` if the kernel did not export it."""
        try:
            return self.symbols[name]
        except KeyError:
            raise VmcoreinfoError(f"VMCOREINFO has no SYMBOL({name})") from None

    def number(self, name: str) -> int:
        """``NUMBER(name)``, or :class:`VmcoreinfoError` if absent."""
        try:
            return self.numbers[name]
        except KeyError:
            raise VmcoreinfoError(f"VMCOREINFO has no NUMBER({name})") from None


@dataclass(frozen=True)
class VmcoreinfoNote:
    """A VMCOREINFO note found in guest-physical RAM, not yet known to be genuine.

    ``address`` is the guest-physical address of the note header; ``note`` is the
    whole note (header, padded name, text) as it sits in RAM.
    """

    address: int
    note: bytes = field(repr=False)
    info: Vmcoreinfo


def parse_vmcoreinfo(data: bytes) -> Vmcoreinfo:
    """Parse a VMCOREINFO text (an ELF note's desc bytes, or the raw page).

    Trailing NUL padding is allowed (ELF note descs are padded to 4 bytes and a raw
    page is NUL-filled); a NUL anywhere else, a non-printable byte, an over-long line,
    a value in the wrong format or a key given twice with different values raises
    :class:`VmcoreinfoError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("VMCOREINFO must be bytes")
    data = bytes(data)
    if len(data) > VMCOREINFO_BYTES:
        raise VmcoreinfoError(f"VMCOREINFO is {len(data)} bytes, over {VMCOREINFO_BYTES}")
    text = data.rstrip(b"\0")
    if not text:
        raise VmcoreinfoError("VMCOREINFO is empty")
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if len(lines) > _MAX_LINES:
        raise VmcoreinfoError("VMCOREINFO has too many lines")
    fields: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not _LINE.fullmatch(line):
            raise VmcoreinfoError(f"VMCOREINFO line {number} is empty, too long or not ASCII")
        key, sep, value = line.decode("ascii").partition("=")
        if not sep or not value:
            raise VmcoreinfoError(f"VMCOREINFO line {number} is not KEY=VALUE")
        if key in fields and fields[key] != value:
            raise VmcoreinfoError(f"VMCOREINFO gives {key} twice with different values")
        fields[key] = value
    return _build(fields, text)


def _build(fields: dict[str, str], raw: bytes) -> Vmcoreinfo:
    keyed: dict[str, dict[str, int]] = {
        k: {} for k in ("SYMBOL", "OFFSET", "SIZE", "LENGTH", "NUMBER")
    }
    other: dict[str, str] = {}
    for key, value in fields.items():
        if m := _KEYED.fullmatch(key):
            kind, name = m[1], m[2]
            if kind == "SYMBOL":
                keyed[kind][name] = _hex(key, value)
            elif kind == "NUMBER":
                keyed[kind][name] = _int(key, value, _SDEC)
            else:
                keyed[kind][name] = _int(key, value, _UDEC)
        elif _PLAIN_KEY.fullmatch(key):
            other[key] = value
        else:
            raise VmcoreinfoError(f"VMCOREINFO key {key!r} is malformed")
    osrelease = other.pop("OSRELEASE", None)
    if osrelease is None or not re.fullmatch(r"[\x21-\x7e]{1,64}", osrelease):
        raise VmcoreinfoError("VMCOREINFO has no valid OSRELEASE")
    if "PAGESIZE" not in other:
        raise VmcoreinfoError("VMCOREINFO has no PAGESIZE")
    page_size = _int("PAGESIZE", other.pop("PAGESIZE"), _UDEC)
    if page_size < 4096 or page_size & (page_size - 1):
        raise VmcoreinfoError(f"VMCOREINFO PAGESIZE {page_size} is not a power of two ≥ 4096")
    build_id = other.pop("BUILD-ID", None)
    if build_id is not None and not re.fullmatch(r"(?:[0-9a-f]{2}){1,64}", build_id):
        raise VmcoreinfoError("VMCOREINFO BUILD-ID is not hex")
    offset = other.pop("KERNELOFFSET", None)
    crash = other.pop("CRASHTIME", None)
    return Vmcoreinfo(
        osrelease=osrelease,
        page_size=page_size,
        build_id=build_id,
        kernel_offset=None if offset is None else _hex("KERNELOFFSET", offset),
        crash_time=None if crash is None else _int("CRASHTIME", crash, _SDEC),
        symbols=keyed["SYMBOL"],
        offsets=keyed["OFFSET"],
        sizes=keyed["SIZE"],
        lengths=keyed["LENGTH"],
        numbers=keyed["NUMBER"],
        other=other,
        raw=raw,
    )


def _hex(key: str, value: str) -> int:
    if not _HEX.fullmatch(value):
        raise VmcoreinfoError(f"VMCOREINFO {key}={value!r} is not a 64-bit hex number")
    return int(value, 16)


def _int(key: str, value: str, pattern: re.Pattern[str]) -> int:
    if not pattern.fullmatch(value):
        raise VmcoreinfoError(f"VMCOREINFO {key}={value!r} is not a decimal number")
    number = int(value)
    if not -(1 << 63) <= number <= _U64:
        raise VmcoreinfoError(f"VMCOREINFO {key} is out of 64-bit range")
    return number


def parse_vmcoreinfo_note(note: bytes) -> Vmcoreinfo:
    """Parse a whole ELF note (header, name, desc), checking it is a VMCOREINFO note."""
    desc = _note_desc(note)
    return parse_vmcoreinfo(desc)


def _note_desc(note: bytes) -> bytes:
    if len(note) < _NOTE_HEADER.size + len(_NAME_FIELD):
        raise VmcoreinfoError("VMCOREINFO note is truncated")
    namesz, descsz, kind = _NOTE_HEADER.unpack_from(note)
    start = _NOTE_HEADER.size + len(_NAME_FIELD)
    if namesz != len(VMCOREINFO_NOTE_NAME) + 1 or kind != VMCOREINFO_NOTE_TYPE:
        raise VmcoreinfoError("not a VMCOREINFO note (name size or type)")
    if note[_NOTE_HEADER.size : start] != _NAME_FIELD:
        raise VmcoreinfoError("not a VMCOREINFO note (name)")
    if descsz > VMCOREINFO_BYTES:
        raise VmcoreinfoError(f"VMCOREINFO note claims {descsz} bytes, over {VMCOREINFO_BYTES}")
    if len(note) < start + descsz:
        raise VmcoreinfoError("VMCOREINFO note is truncated")
    return note[start : start + descsz]


def find_vmcoreinfo(
    memory: PhysicalSource, alignment: int = NOTE_ALIGNMENT, chunk: int = SCAN_CHUNK
) -> list[VmcoreinfoNote]:
    """Every well-formed VMCOREINFO note in guest-physical RAM, in address order (all of
    :func:`iter_vmcoreinfo`)."""
    return list(iter_vmcoreinfo(memory, alignment, chunk))


def iter_vmcoreinfo(
    memory: PhysicalSource, alignment: int = NOTE_ALIGNMENT, chunk: int = SCAN_CHUNK
) -> Iterator[VmcoreinfoNote]:
    """The well-formed VMCOREINFO notes in guest-physical RAM, in address order, found
    as the caller asks for them: a caller that stops at the kernel's own note reads RAM
    only up to it (the kernel allocates it early, some 20 MiB into RAM on the lab
    guests), not all of it.

    With the default ``alignment`` (4096) only notes that start a page are looked
    for: since Linux 4.15 (commit 203e9e41219b, "kexec: move vmcoreinfo out of the
    kernel's .bss section") the kernel allocates the note with ``alloc_pages_exact``,
    so one byte of each page is read (``read_strided``), ``STRIDED_SPAN`` of RAM at a
    time, instead of copying all of it (what that costs is mostly the first touch of
    each page of the mapping: ~100 ms a GiB). ``alignment=1`` searches every byte with
    ``bytes.find``, reading RAM in ``chunk``-sized pieces (older kernels keep the note
    in .bss, 4-byte aligned).

    Candidates that do not parse are skipped (a guest can write garbage anywhere).
    More than one candidate is normal when user space is hostile, so the caller must
    choose with :func:`sgmonitor.kernel.kallsyms.genuine_vmcoreinfo`.
    """
    if alignment < 1 or alignment & (alignment - 1) or alignment > chunk:
        raise ValueError("alignment must be a power of two no larger than chunk")
    if chunk < 2 * VMCOREINFO_BYTES:
        raise ValueError("chunk is too small")
    for ram in memory.ram_ranges():
        if alignment < _STRIDE_MIN:
            hits = _dense_hits(memory, ram, alignment, chunk)
        else:
            hits = _aligned_hits(memory, ram, alignment)
        for address in hits:
            note = _candidate(memory, ram, address)
            if note is not None:
                yield note


def _dense_hits(memory: PhysicalSource, ram: range, alignment: int, chunk: int) -> Iterator[int]:
    """Addresses in ``ram`` where a note header may start, found by ``bytes.find`` over
    all of it, ``chunk`` bytes at a time."""
    overlap = _HEADER_BEFORE_SIGNATURE + len(_SIGNATURE)
    for start in range(ram.start, ram.stop, chunk):
        data = memory.read_physical(start, min(chunk + overlap, ram.stop - start))
        limit = min(chunk, len(data))
        hit = data.find(_SIGNATURE, _HEADER_BEFORE_SIGNATURE)
        while hit != -1 and hit - _HEADER_BEFORE_SIGNATURE < limit:
            if (start + hit - _HEADER_BEFORE_SIGNATURE) % alignment == 0:
                yield start + hit - _HEADER_BEFORE_SIGNATURE
            hit = data.find(_SIGNATURE, hit + 1)


def _aligned_hits(memory: PhysicalSource, ram: range, alignment: int) -> Iterator[int]:
    """Aligned addresses in ``ram`` where a note header may start. Only the signature's
    first byte of each aligned spot is read at first (one strided read per
    ``STRIDED_SPAN``); the spots where it matches are then compared whole. A guest that
    plants that byte everywhere costs one short read per page, no more."""
    skip, sig = _HEADER_BEFORE_SIGNATURE, _SIGNATURE
    first = ram.start + (-ram.start % alignment)
    if first + skip + len(sig) > ram.stop:
        return
    count = (ram.stop - skip - len(sig) - first) // alignment + 1
    per_read = max(1, STRIDED_SPAN // alignment)
    for done in range(0, count, per_read):
        base = first + done * alignment
        column = memory.read_strided(base + skip, alignment, min(per_read, count - done))
        i = column.find(sig[0])
        while i != -1:
            address = base + i * alignment
            if memory.read_physical(address + skip, len(sig)) == sig:
                yield address
            i = column.find(sig[0], i + 1)


def _candidate(memory: PhysicalSource, ram: range, address: int) -> VmcoreinfoNote | None:
    if address < ram.start:
        return None
    size = min(_NOTE_HEADER.size + len(_NAME_FIELD) + VMCOREINFO_BYTES, ram.stop - address)
    try:
        head = memory.read_physical(address, size)
        desc = _note_desc(head)
        info = parse_vmcoreinfo(desc)
    except (VmcoreinfoError, PhysicalAccessError):
        return None
    note = head[: _NOTE_HEADER.size + len(_NAME_FIELD) + len(desc)]
    return VmcoreinfoNote(address=address, note=note, info=info)


__all__ = [
    "VMCOREINFO_BYTES",
    "PhysicalSource",
    "Vmcoreinfo",
    "VmcoreinfoError",
    "VmcoreinfoNote",
    "find_vmcoreinfo",
    "iter_vmcoreinfo",
    "parse_vmcoreinfo",
    "parse_vmcoreinfo_note",
]
