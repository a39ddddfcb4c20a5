"""Property tests (Hypothesis) of the parsers of untrusted input, over mutated REAL inputs.

The inputs are real: the lab's cloud vmlinux (its ELF headers, its ``.BTF`` section and
its kallsyms tables, as ``test_btf`` and ``test_kallsyms`` use them), and a QEMU
``dump-guest-memory`` core of the main lab guest (as ``test_elfcore`` makes one) with
the guest's VMCOREINFO note, found in its RAM. Each example bends one of them with a few
edits (bit flips, random bytes, fields overwritten with extreme values, bytes copied
from elsewhere in the input, splices, truncations), aimed half of the time at the
headers and tables the parser reads first. The property: the parser returns, or raises
the project's own error for that input (``ElfError``, ``BtfError``, ``KallsymsError``,
``CoreFileError``, ``VmcoreinfoError`` or another ``GuestDataError``), never anything
else, within a deadline per example.

Runs are deterministic (``derandomize=True``, no example database) with a fixed number
of examples, sized so that the whole file takes well under a minute
(``SGMONITOR_PROPERTY_SCALE=N`` runs N times as many, randomly: a bug hunt).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path

import pytest
from guests import MAIN, GuestUnderTest, only
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sgmonitor.errors import GuestDataError
from sgmonitor.guest.elfcore import CoreFileError, ElfCore, read_core
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.kernel.btf import Btf, BtfError, Kind
from sgmonitor.kernel.elf import (
    MAX_NOTES_BYTES,
    SHT_NOTE,
    ByteImage,
    ElfError,
    ElfFile,
    parse_notes,
)
from sgmonitor.kernel.kallsyms import (
    MAX_IMAGE_SIZE,
    KallsymsError,
    KallsymsTables,
    VmlinuxFile,
    decode_kallsyms,
    find_kallsyms_tables,
    image_range,
    kallsyms_tables_from_vmcoreinfo,
)
from sgmonitor.kernel.vmcoreinfo import (
    VmcoreinfoError,
    find_vmcoreinfo,
    parse_vmcoreinfo,
    parse_vmcoreinfo_note,
)
from sgmonitor.lab.kernel import fetch_kernel

# A longer, random hunt for bugs (not for CI): SGMONITOR_PROPERTY_SCALE=20 runs twenty
# times the examples, from a random seed (``--hypothesis-seed`` picks one).
SCALE = int(os.environ.get("SGMONITOR_PROPERTY_SCALE", "1"))


def _settings(examples: int, deadline_s: float) -> settings:
    return settings(
        max_examples=examples * SCALE,
        derandomize=SCALE == 1,
        database=None,
        deadline=timedelta(seconds=deadline_s),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.large_base_example,
        ],
    )


# -- mutations -------------------------------------------------------------------------

EXTREMES = (
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
)


@dataclass(frozen=True)
class Mutation:
    """Edits of a base input: overwrites, then splices (concrete inputs only), then a cut."""

    patches: tuple[tuple[int, bytes], ...]
    splices: tuple[tuple[int, int, bytes], ...]  # (at, bytes deleted, bytes inserted)
    length: int

    def apply(self, base: bytes) -> bytes:
        """The mutated input as bytes (for inputs small enough to copy per example)."""
        out = bytearray(base)
        for at, data in self.patches:
            out[at : at + len(data)] = data[: max(0, len(out) - at)]
        for at, delete, insert in self.splices:
            out[at : at + delete] = insert
        return bytes(out[: self.length + len(out) - len(base)])


class MutatedImage:
    """A lazily mutated view of a big real input (an ``ElfFile`` image): the base stays
    shared, each read overlays the patches; splices are not supported."""

    def __init__(self, base: ByteImage, mutation: Mutation) -> None:
        assert not mutation.splices
        self._base = base
        self._patches = mutation.patches
        self._length = mutation.length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: slice, /) -> bytes:
        start, stop, step = index.indices(self._length)
        assert step == 1
        data = bytearray(self._base[start:stop])
        for at, new in self._patches:
            lo, hi = max(at, start), min(at + len(new), stop)
            if lo < hi:
                data[lo - start : hi - start] = new[lo - at : hi - at]
        return bytes(data)


class Target:
    """A real input to mutate, the ranges to aim at and its known (offset, width) fields;
    its repr stays short (Hypothesis prints the arguments of a failing strategy)."""

    def __init__(
        self,
        label: str,
        data: ByteImage,
        hot: tuple[range, ...] = (),
        fields: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.label, self.data, self.size = label, data, len(data)
        clipped = (range(max(0, r.start), min(r.stop, self.size)) for r in hot)
        self.hot = tuple(r for r in clipped if len(r)) or (range(self.size),)
        self.fields = tuple((at, w) for at, w in fields if at >= 0 and at + w <= self.size)

    def __repr__(self) -> str:
        return f"<{self.label}: {self.size} bytes>"


@st.composite
def mutations(
    draw: st.DrawFn, target: Target, *, splices: bool = False, truncate: bool = True
) -> Mutation:
    """One to four edits of the target; offsets fall in one of its hot ranges half of the
    time, field overwrites hit one of its known fields half of the time (with an extreme
    value, any value, or the value of another field of the same width)."""
    base, size, regions, fields = target.data, target.size, target.hot, target.fields

    def offset() -> int:
        region = draw(st.sampled_from(regions)) if draw(st.booleans()) else range(size)
        return draw(st.integers(region.start, region.stop - 1))

    patches: list[tuple[int, bytes]] = []
    cuts: list[tuple[int, int, bytes]] = []
    length = size
    kinds = ["flip", "bytes", "field", "field", "copy"]
    kinds += ["field from field"] if fields else []
    kinds += ["splice"] if splices else []
    kinds += ["truncate"] if truncate else []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind == "flip":
            at = offset()
            patches.append((at, bytes([base[at : at + 1][0] ^ (1 << draw(st.integers(0, 7)))])))
        elif kind == "bytes":
            patches.append((offset(), draw(st.binary(min_size=1, max_size=16))))
        elif kind == "field":
            if fields and draw(st.booleans()):
                at, width = draw(st.sampled_from(fields))
            else:
                width = draw(st.sampled_from((1, 2, 4, 8)))
                at = offset() // width * width
            value = draw(
                st.sampled_from((*EXTREMES, size - 1, size, size + 1)) | st.integers(0, 1 << 64)
            )
            patches.append((at, (value % (1 << (8 * width))).to_bytes(width, "little")))
        elif kind == "field from field":  # a plausible lie: another field's real value
            at, width = draw(st.sampled_from(fields))
            src, _ = draw(st.sampled_from([f for f in fields if f[1] == width]))
            patches.append((at, bytes(base[src : src + width])))
        elif kind == "copy":
            src, n = offset(), draw(st.integers(1, 4096))
            patches.append((offset(), bytes(base[src : src + n])))
        elif kind == "splice":
            src, n = offset(), draw(st.integers(0, 4096))
            cuts.append((offset(), draw(st.integers(0, 4096)), bytes(base[src : src + n])))
        else:
            length = min(length, offset())
    # Splices shift what follows them; apply them back to front so offsets stay meaningful.
    cuts.sort(key=lambda cut: -cut[0])
    return Mutation(tuple(patches), tuple(cuts), length)


# -- the real inputs -------------------------------------------------------------------


@cache
def vmlinux_image() -> bytes:
    """The lab's cloud vmlinux (downloaded once, as the lab does to boot it)."""
    return Path(fetch_kernel("cloud").vmlinux).read_bytes()


@cache
def vmlinux_elf() -> ElfFile:
    return ElfFile(vmlinux_image(), name="vmlinux")


def _elf_hot_spots(elf: ElfFile) -> tuple[tuple[range, ...], tuple[tuple[int, int], ...]]:
    """The header, both header tables and the name table, and every header field."""
    h = elf.header
    hot = [
        range(0, 64),
        range(h.phoff, h.phoff + h.phnum * h.phentsize),
        range(h.shoff, h.shoff + h.shnum * h.shentsize),
    ]
    if h.shstrndx:
        names = elf.sections[h.shstrndx]
        hot.append(range(names.offset, names.offset + names.size))
    fields = [(0x10, 2), (0x12, 2), (0x18, 8), (0x20, 8), (0x28, 8), (0x34, 2), (0x36, 2)]
    fields += [(0x38, 2), (0x3A, 2), (0x3C, 2), (0x3E, 2)]
    for i in range(h.shnum):  # name, type, flags, addr, offset, size, link, info
        at = h.shoff + i * h.shentsize
        fields += [(at, 4), (at + 4, 4), (at + 8, 8), (at + 16, 8), (at + 24, 8), (at + 32, 8)]
        fields += [(at + 40, 4), (at + 44, 4)]
    for i in range(h.phnum):  # type, offset, vaddr, paddr, filesz, memsz
        at = h.phoff + i * h.phentsize
        fields += [(at, 4), (at + 8, 8), (at + 16, 8), (at + 24, 8), (at + 32, 8), (at + 40, 8)]
    return tuple(hot), tuple(fields)


def _exercise_elf(image: ByteImage) -> ElfFile | None:
    """Everything the reader offers: only ElfError may come out."""
    try:
        elf = ElfFile(image, name="mutated")
    except ElfError:
        event("ElfFile: ElfError")
        return None
    event("ElfFile: parsed")
    for section in elf.sections:
        if section.in_file:
            head = elf.read(section.offset, min(section.size, 64))
            assert len(head) == min(section.size, 64)
            if section.type == SHT_NOTE and section.size <= MAX_NOTES_BYTES:
                with contextlib.suppress(ElfError):
                    parse_notes(elf.section_data(section))
        else:
            with pytest.raises(ElfError):
                elf.section_data(section)
    for header in elf.program_headers:
        assert header.offset + header.filesz <= len(image)
    with contextlib.suppress(ElfError):
        list(elf.notes())
    return elf


# -- ELF: the vendor vmlinux -----------------------------------------------------------


@cache
def vmlinux_target() -> Target:
    return Target("vmlinux", vmlinux_image(), *_elf_hot_spots(vmlinux_elf()))


@st.composite
def vmlinux_mutations(draw: st.DrawFn) -> Mutation:
    return draw(mutations(vmlinux_target()))


@given(vmlinux_mutations())
@_settings(examples=120, deadline_s=3)
def test_vmlinux_elf_users_raise_only_their_errors(mutation: Mutation) -> None:
    """The reader, Btf.from_elf and VmlinuxFile over a bent vmlinux."""
    image = MutatedImage(vmlinux_image(), mutation)
    _exercise_elf(image)
    try:
        btf = Btf.from_elf(image)
    except BtfError:
        event("Btf.from_elf: BtfError")
    else:
        event("Btf.from_elf: loaded")
        with contextlib.suppress(BtfError):
            btf.members(btf.find("task_struct", Kind.STRUCT).id)
    try:
        vm = VmlinuxFile.from_image(image, "mutated")
    except ElfError:
        event("VmlinuxFile: ElfError")
        return
    event("VmlinuxFile: loaded")
    for r in vm.ranges:
        for at, size in ((r.start, min(len(r), 64)), (r.stop - 8, 16)):
            with contextlib.suppress(GuestDataError):  # PageFault: not in the next section
                assert len(vm.read(at, size)) == size


# -- ELF: a QEMU core of the main lab guest --------------------------------------------


@pytest.fixture(scope="module")
def core_file(guest: GuestUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A dump-guest-memory core of the running guest (RAM, notes, VMCOREINFO)."""
    path = tmp_path_factory.mktemp("core") / "real.core"
    with QemuGuest(guest.info.qmp) as live, live.paused():
        live.qmp.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def real_core(core_file: Path) -> Iterator[mmap.mmap]:
    with core_file.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
        yield data


@pytest.fixture(scope="module")
def core_target(real_core: mmap.mmap) -> Target:
    return Target("core", real_core, *_core_hot_spots(real_core))


def _core_hot_spots(core: ByteImage) -> tuple[tuple[range, ...], tuple[tuple[int, int], ...]]:
    """The ELF hot spots, plus the notes segment and each note's header fields."""
    elf = ElfFile(core, name="core")
    hot, fields = _elf_hot_spots(elf)
    more_hot, more_fields = list(hot), list(fields)
    for header in elf.program_headers:
        if header.type == 4:  # PT_NOTE
            more_hot.append(range(header.offset, header.offset + header.filesz))
            pos = 0
            blob = elf.segment_data(header)
            while pos + 12 <= len(blob):
                namesz, descsz, _ = struct.unpack_from("<III", blob, pos)
                at = header.offset + pos
                more_fields += [(at, 4), (at + 4, 4), (at + 8, 4)]
                desc_at = at + 12 + (namesz + 3) // 4 * 4
                more_fields += [(desc_at, 4), (desc_at + 4, 4)]  # QEMU note: version, size
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return tuple(more_hot), tuple(more_fields)


@pytest.mark.guest
@only(MAIN)
@given(data=st.data())
@_settings(examples=400, deadline_s=2)
def test_core_reader_raises_only_core_file_error(core_target: Target, data: st.DataObject) -> None:
    """The reader and read_core over a bent core: only ElfError / CoreFileError."""
    image = MutatedImage(core_target.data, data.draw(mutations(core_target)))
    _exercise_elf(image)
    try:
        segments, _notes, _registers = read_core(image, "mutated core")
    except CoreFileError:
        event("read_core: CoreFileError")
        return
    event("read_core: read")
    # What ElfCore then maps: RAM segments inside the file, none overlapping another.
    assert segments
    for segment in segments:
        assert segment.size > 0 and segment.file_offset + segment.size <= len(image)
    ordered = sorted(segments, key=lambda segment: segment.address)
    for before, after in itertools.pairwise(ordered):
        assert before.end <= after.address, f"RAM segments overlap: {before}, {after}"


# -- VMCOREINFO: the guest's own note --------------------------------------------------


@pytest.fixture(scope="module")
def real_vmcoreinfo_note(core_file: Path) -> bytes:
    """The kernel's VMCOREINFO note as it sits in the guest's RAM (found in the core)."""
    with ElfCore(str(core_file)) as core:
        found = find_vmcoreinfo(core)
        qemu_copy = core.vmcoreinfo()
    assert found, "no VMCOREINFO note in the guest's RAM"
    if qemu_copy is not None:  # QEMU's vmcoreinfo device put the same text in the core
        assert found[0].info == parse_vmcoreinfo(qemu_copy)
    return found[0].note


@pytest.mark.guest
@only(MAIN)
@given(data=st.data())
@_settings(examples=400, deadline_s=1)
def test_vmcoreinfo_parser_raises_only_vmcoreinfo_error(
    real_vmcoreinfo_note: bytes, data: st.DataObject
) -> None:
    note = real_vmcoreinfo_note
    fields = ((0, 4), (4, 4), (8, 4))
    target = Target("VMCOREINFO note", note, (range(0, 24),), fields)
    mutated = data.draw(mutations(target, splices=True)).apply(note)
    for parse in (parse_vmcoreinfo_note, lambda blob: parse_vmcoreinfo(blob[24:])):
        try:
            info = parse(mutated)
        except VmcoreinfoError:
            event("VMCOREINFO: VmcoreinfoError")
            continue
        event("VMCOREINFO: parsed")
        try:  # what the bootstrap does next with it
            kallsyms_tables_from_vmcoreinfo(info)
            image_range(info)
        except (VmcoreinfoError, KallsymsError):
            pass


# -- BTF: the vendor kernel's .BTF section ---------------------------------------------


@cache
def real_btf() -> bytes:
    return Btf.from_vmlinux(fetch_kernel("cloud").vmlinux).raw


def _btf_spots(blob: bytes) -> tuple[tuple[range, ...], tuple[tuple[int, int], ...]]:
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<IIIII", blob, 4)
    types, strings = hdr_len + type_off, hdr_len + str_off
    hot = (
        range(0, hdr_len),
        range(types, types + 8192),
        range(types + type_len - 4096, types + type_len),
        range(strings, strings + 4096),
        range(strings + str_len - 4096, strings + str_len),
    )
    fields = tuple((at, 4) for at in range(4, 24, 4))
    fields += tuple((at, 4) for at in range(types, types + 4096, 4))  # the first types' words
    return hot, fields


@cache
def btf_target() -> Target:
    return Target("BTF", real_btf(), *_btf_spots(real_btf()))


NAMES = ("task_struct", "list_head", "cred", "module", "mm_struct", "pid", "file")


@given(data=st.data())
@_settings(examples=60, deadline_s=3)
def test_btf_parser_raises_only_btf_error(data: st.DataObject) -> None:
    blob = real_btf()
    mutated = data.draw(mutations(btf_target(), splices=True)).apply(blob)
    try:
        btf = Btf(mutated)
    except BtfError:
        event("Btf: BtfError at load")
        return
    event("Btf: loaded")
    ids = data.draw(st.lists(st.integers(0, len(btf) - 1), min_size=20, max_size=20))
    ids += list(range(1, min(len(btf), 200)))  # the first types, where the edits aim
    for name in NAMES:
        with contextlib.suppress(BtfError):
            ids.append(btf.find(name, Kind.STRUCT).id)
    for type_id in ids:
        with contextlib.suppress(BtfError):
            btf.type(type_id)
            btf.type_name(type_id)
        with contextlib.suppress(BtfError):
            btf.sizeof(type_id)
        with contextlib.suppress(BtfError):
            btf.members(type_id)
    with contextlib.suppress(BtfError, KeyError):  # KeyError: no such enumerator (its API)
        btf.enumerator_value("TASK_COMM_LEN")


# -- kallsyms: the vendor kernel's tables ----------------------------------------------


@cache
def vendor_tables() -> tuple[VmlinuxFile, range, KallsymsTables]:
    vm = VmlinuxFile.from_image(vmlinux_image())
    image = range(vm.ranges[0].start, vm.ranges[0].start + MAX_IMAGE_SIZE)
    return vm, image, find_kallsyms_tables(vm, image)


class PatchedSpace:
    """The vendor vmlinux's address space with its kallsyms tables replaced by ``tables``
    (a mutated copy of the span from ``start``)."""

    def __init__(self, base: VmlinuxFile, start: int, tables: bytes) -> None:
        self.base, self.start, self.tables = base, start, tables

    def read(self, address: int, size: int) -> bytes:
        data = bytearray(self.base.read(address, size))
        lo, hi = max(address, self.start), min(address + size, self.start + len(self.tables))
        if lo < hi:
            data[lo - address : hi - address] = self.tables[lo - self.start : hi - self.start]
        return bytes(data)


def _kallsyms_span(tables: KallsymsTables) -> range:
    addresses = [tables.num_syms, tables.names, tables.token_table, tables.offsets]
    addresses += [tables.relative_base] + ([tables.markers] if tables.markers else [])
    return range(min(addresses), tables.token_index + 2 * 256)


@given(data=st.data())
@_settings(examples=16, deadline_s=15)
def test_kallsyms_decoder_raises_only_guest_data_errors(data: st.DataObject) -> None:
    """Find and decode bent tables (the guest's copy is what a hostile guest controls):
    only KallsymsError, or another GuestDataError (a read outside the image)."""
    vm, image, tables = vendor_tables()
    span = _kallsyms_span(tables)
    original = vm.read(span.start, len(span))
    rel: Callable[[int], int] = lambda address: address - span.start  # noqa: E731
    hot = tuple(range(rel(a), rel(a) + 4096) for a in (tables.num_syms, tables.token_index))
    hot += tuple(range(rel(a), min(rel(a) + 4096, len(span))) for a in _table_starts(tables))
    fields = ((rel(tables.num_syms), 4), (rel(tables.relative_base), 8))
    fields += tuple((rel(tables.token_index) + 2 * i, 2) for i in range(0, 256, 7))
    fields += tuple((rel(tables.offsets) + 4 * i, 4) for i in range(0, 4096, 97))
    if tables.markers:
        fields += tuple((rel(tables.markers) + 4 * i, 4) for i in range(0, 64, 3))
    target = Target("kallsyms tables", original, hot, fields)
    mutation = data.draw(mutations(target, truncate=False))
    space = PatchedSpace(vm, span.start, mutation.apply(original))
    try:
        find_kallsyms_tables(space, image)
        event("find_kallsyms_tables: found")
    except GuestDataError as exc:
        event(f"find_kallsyms_tables: {type(exc).__name__}")
    try:
        syms = decode_kallsyms(space, tables, image)
    except GuestDataError as exc:
        event(f"decode_kallsyms: {type(exc).__name__}")
        return
    event("decode_kallsyms: decoded")
    for name in ("init_task", "_stext", "sys_call_table"):
        address = syms.get(name)
        if address is not None:
            syms.lookup(address)
            syms.lookup_size_offset(address)


def _table_starts(tables: KallsymsTables) -> list[int]:
    starts = [tables.names, tables.token_table, tables.offsets]
    return starts + ([tables.markers] if tables.markers else [])
