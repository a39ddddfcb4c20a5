"""BTF, the kernel's compact type format: the enclave's only source of struct layouts.

Why BTF: the vendor vmlinux is stripped, yet its ``.BTF`` section (also present in guest
memory between ``__start_BTF`` and ``__stop_BTF``) describes every kernel type in ~4 MB.
The blob may come from a hostile guest, so every length, offset and type id is checked
where it is used and every walk is bounded; anything wrong raises :class:`BtfError`.

Loading is lazy: construction makes one pass over the type section to record where each
type starts; types are decoded on first use and names are indexed on first lookup.
See the kernel's Documentation/bpf/btf.rst for the format.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from sgmonitor.errors import GuestDataError
from sgmonitor.kernel.elf import ByteImage, ElfError, ElfFile

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
HEADER_SIZE = 24
MAX_TYPES = 1 << 20  # the kernel's BTF_MAX_TYPE is 0xfffff
MAX_CHAIN = 64  # typedef/const/volatile hops, array nesting, anonymous-member nesting
MAX_FLAT_MEMBERS = 1 << 16  # members reachable from one struct through anonymous members


class BtfError(GuestDataError):
    """The BTF blob is malformed or inconsistent (it may come from a hostile guest)."""


class Kind(IntEnum):
    """BTF_KIND_* numbers."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Words (u32) after the 3-word btf_type header: fixed part, then per vlen entry.
_FIXED = {Kind.INT: 1, Kind.ARRAY: 3, Kind.VAR: 1, Kind.DECL_TAG: 1}
_PER_VLEN = {
    Kind.STRUCT: 3,
    Kind.UNION: 3,
    Kind.ENUM: 2,
    Kind.FUNC_PROTO: 2,
    Kind.DATASEC: 3,
    Kind.ENUM64: 3,
}
# Step tables indexed by the 5-bit kind field; -1 marks an invalid kind.
_STEP = tuple(3 + _FIXED.get(Kind(k), 0) if 0 < k <= 19 else -1 for k in range(32))
_PER = tuple(_PER_VLEN.get(Kind(k), 0) if 0 < k <= 19 else 0 for k in range(32))

_SIZED = frozenset({Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT})
_SIZED |= {Kind.DATASEC}
_MODIFIERS = frozenset({Kind.TYPEDEF, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG})
_QUALIFIERS = _MODIFIERS - {Kind.TYPEDEF}

INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4


@dataclass(frozen=True, slots=True)
class Member:
    """A struct/union member; ``bit_offset`` is from the start of the outermost struct."""

    name: str
    type: int
    bit_offset: int
    bitfield_size: int = 0  # 0: not a bitfield

    @property
    def offset(self) -> int:
        """Byte offset (of the storage unit holding the first bit, for bitfields)."""
        return self.bit_offset // 8


@dataclass(frozen=True, slots=True)
class Enumerator:
    name: str
    value: int


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: int


@dataclass(frozen=True, slots=True)
class VarSecInfo:
    type: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Type:
    """One decoded BTF type. Fields that do not apply to ``kind`` are None/empty.

    ``size`` is set for INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC; ``type`` (the
    referenced id) for PTR, TYPEDEF, the qualifiers, FUNC, VAR, DECL_TAG and the return
    type of FUNC_PROTO. Type id 0 is ``void`` (kind UNKN).
    """

    id: int
    kind: Kind
    name: str
    kind_flag: bool
    vlen: int
    size: int | None = None
    type: int | None = None
    int_encoding: int = 0
    int_offset: int = 0
    int_bits: int = 0
    array_type: int = 0
    array_index_type: int = 0
    array_nelems: int = 0
    members: tuple[Member, ...] = ()
    enumerators: tuple[Enumerator, ...] = ()
    params: tuple[Param, ...] = ()
    var_linkage: int = 0
    datasec: tuple[VarSecInfo, ...] = ()
    component_idx: int = -1

    @property
    def is_signed(self) -> bool:
        """INT: the SIGNED encoding bit; ENUM/ENUM64: kind_flag (libbpf's convention)."""
        if self.kind == Kind.INT:
            return bool(self.int_encoding & INT_SIGNED)
        return self.kind_flag and self.kind in (Kind.ENUM, Kind.ENUM64)


VOID = Type(id=0, kind=Kind.UNKN, name="void", kind_flag=False, vlen=0)


class Btf:
    """A parsed BTF blob: ``type(id)``, ``find(name, kind)``, ``sizeof``, ``members``.

    Construction validates the header and records every type's start (one pass);
    everything else is decoded, checked and cached on demand.
    """

    def __init__(self, blob: bytes, *, pointer_size: int = 8) -> None:
        self._blob = bytes(blob)
        self.pointer_size = pointer_size
        self.byteorder, types, strings = _split_sections(self._blob)
        self._words = array("I")
        self._words.frombytes(types)
        if self.byteorder != sys.byteorder:
            self._words.byteswap()
        self._strings = strings
        self._offsets = _index_types(self._words)
        self._cache: dict[int, Type] = {0: VOID}
        self._members: dict[int, dict[str, Member]] = {}
        self._by_name_off: dict[int, list[int]] | None = None
        self._found: dict[str, list[int]] = {}
        self._enum_by_name_off: dict[int, list[int]] | None = None

    @classmethod
    def from_vmlinux(cls, path: str | Path) -> Btf:
        """Read the ``.BTF`` section of an ELF vmlinux (stripped is fine)."""
        import mmap  # only outside the enclave: it takes BTF from guest memory

        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise BtfError(f"{path}: empty file, not an ELF vmlinux")
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
                return cls.from_elf(data, name=str(path))

    @classmethod
    def from_elf(cls, data: ByteImage, *, name: str = "vmlinux") -> Btf:
        """The ``.BTF`` section of an ELF image in memory; ELF errors become BtfError."""
        try:
            elf = ElfFile(data, name=name)
            blob = elf.section_data(elf.section(".BTF"))
        except ElfError as exc:
            raise BtfError(str(exc)) from exc
        return cls(blob)

    @property
    def raw(self) -> bytes:
        return self._blob

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the whole blob: lets an operator pin the vendor kernel's types."""
        return hashlib.sha256(self._blob).hexdigest()

    def __len__(self) -> int:
        """Number of type ids, ``void`` (id 0) included."""
        return len(self._offsets) + 1

    # -- decoding -------------------------------------------------------------------

    def type(self, type_id: int) -> Type:
        """Decode type ``type_id`` (0 is void); BtfError when out of range."""
        cached = self._cache.get(type_id)
        if cached is not None:
            return cached
        if not isinstance(type_id, int) or not 0 < type_id <= len(self._offsets):
            raise BtfError(f"type id {type_id!r} out of range (1..{len(self._offsets)})")
        decoded = self._decode(type_id)
        self._cache[type_id] = decoded
        return decoded

    def _decode(self, type_id: int) -> Type:
        w = self._words
        at = self._offsets[type_id - 1]
        name_off, info, size_or_type = w[at], w[at + 1], w[at + 2]
        kind = Kind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        flag = bool(info >> 31)
        base: dict[str, Any] = {"id": type_id, "kind": kind, "name": self.string(name_off)}
        base |= {"kind_flag": flag, "vlen": vlen}
        if kind in _SIZED:
            base["size"] = size_or_type
        elif kind not in (Kind.FWD, Kind.FUNC_PROTO):
            base["type"] = self._check_id(size_or_type, type_id)
        if kind == Kind.FUNC_PROTO:
            base["type"] = self._check_id(size_or_type, type_id)
        at += 3
        if kind == Kind.INT:
            enc = w[at]
            base |= {"int_encoding": (enc >> 24) & 0xF, "int_offset": (enc >> 16) & 0xFF}
            base["int_bits"] = enc & 0xFF
        elif kind == Kind.ARRAY:
            base["array_type"] = self._check_id(w[at], type_id)
            base["array_index_type"] = self._check_id(w[at + 1], type_id)
            base["array_nelems"] = w[at + 2]
        elif kind in (Kind.STRUCT, Kind.UNION):
            base["members"] = tuple(self._member(w, at + 3 * i, flag, type_id) for i in range(vlen))
        elif kind == Kind.ENUM:
            signed = flag
            base["enumerators"] = tuple(
                Enumerator(
                    self.string(w[at + 2 * i]),
                    _s32(w[at + 2 * i + 1]) if signed else w[at + 2 * i + 1],
                )
                for i in range(vlen)
            )
        elif kind == Kind.ENUM64:
            base["enumerators"] = tuple(
                Enumerator(
                    self.string(w[at + 3 * i]), _enum64(w[at + 3 * i + 1], w[at + 3 * i + 2], flag)
                )
                for i in range(vlen)
            )
        elif kind == Kind.FUNC_PROTO:
            base["params"] = tuple(
                Param(self.string(w[at + 2 * i]), self._check_id(w[at + 2 * i + 1], type_id))
                for i in range(vlen)
            )
        elif kind == Kind.VAR:
            base["var_linkage"] = w[at]
        elif kind == Kind.DATASEC:
            base["datasec"] = tuple(
                VarSecInfo(
                    self._check_id(w[at + 3 * i], type_id), w[at + 3 * i + 1], w[at + 3 * i + 2]
                )
                for i in range(vlen)
            )
        elif kind == Kind.DECL_TAG:
            base["component_idx"] = _s32(w[at])
        return Type(**base)

    def _member(self, w: array[int], at: int, kind_flag: bool, owner: int) -> Member:
        offset = w[at + 2]
        if kind_flag:
            return Member(
                self.string(w[at]),
                self._check_id(w[at + 1], owner),
                offset & 0xFFFFFF,
                offset >> 24,
            )
        return Member(self.string(w[at]), self._check_id(w[at + 1], owner), offset)

    def _check_id(self, type_id: int, referrer: int) -> int:
        if type_id > len(self._offsets):
            raise BtfError(f"type {referrer} refers to type id {type_id}, out of range")
        return type_id

    def string(self, offset: int) -> str:
        """The NUL-terminated string at ``offset`` in the string section."""
        if offset >= len(self._strings):
            raise BtfError(
                f"string offset {offset:#x} outside the {len(self._strings):#x}-byte string section"
            )
        end = self._strings.index(b"\0", offset)  # the section ends in NUL (checked)
        return self._strings[offset:end].decode("utf-8", errors="replace")

    # -- lookup ---------------------------------------------------------------------

    def find(self, name: str, kind: Kind | None = None) -> Type:
        """The first type called ``name`` (of ``kind`` if given); BtfError if none.

        ``find("task_struct", Kind.STRUCT)``; a name of several kinds (a struct and a
        typedef of the same name) needs ``kind``.
        """
        for type_id in self.find_all(name):
            found = self.type(type_id)
            if kind is None or found.kind == kind:
                return found
        what = f"{kind.name} " if kind is not None else ""
        raise BtfError(f"no {what}type named {name!r} in BTF")

    def find_all(self, name: str) -> list[int]:
        """Every type id called ``name``, ascending (the index is built on the first call).

        Why by string offset: decoding 95k names costs ~100 ms, while mapping name
        offsets to ids and searching the string section for ``name`` costs a fraction.
        """
        cached = self._found.get(name)
        if cached is not None:
            return list(cached)
        if self._by_name_off is None:
            self._by_name_off = self._index_name_offsets()
        key = name.encode() + b"\0"
        ids: list[int] = []
        pos = self._strings.find(key, 1)
        while pos >= 0:  # every offset whose string equals name (suffixes included)
            ids.extend(self._by_name_off.get(pos, ()))
            pos = self._strings.find(key, pos + 1)
        ids.sort()
        self._found[name] = ids
        return list(ids)

    def enumerator_value(self, name: str) -> int:
        """The value of enumerator ``name`` (``PIDTYPE_TGID``) in the first ENUM or ENUM64
        type declaring it; KeyError when no enum has it.

        Found as :meth:`find_all` finds types: by the string's offsets, through an index of
        every enumerator's name offset built on the first call (no enum decoded to build it).
        """
        if self._enum_by_name_off is None:
            self._enum_by_name_off = self._index_enumerators()
        key = name.encode() + b"\0"
        ids: set[int] = set()
        pos = self._strings.find(key, 1)
        while pos >= 0:
            ids.update(self._enum_by_name_off.get(pos, ()))
            pos = self._strings.find(key, pos + 1)
        for type_id in sorted(ids):
            for enumerator in self.type(type_id).enumerators:
                if enumerator.name == name:
                    return enumerator.value
        raise KeyError(f"no enumerator named {name!r} in BTF")

    def _index_enumerators(self) -> dict[int, list[int]]:
        words = self._words
        by_offset: dict[int, list[int]] = {}
        for type_id, at in enumerate(self._offsets, 1):
            info = words[at + 1]
            kind = (info >> 24) & 0x1F
            if kind not in (Kind.ENUM, Kind.ENUM64):
                continue
            per = _PER[kind]
            for i in range(info & 0xFFFF):
                by_offset.setdefault(words[at + 3 + per * i], []).append(type_id)
        return by_offset

    def _index_name_offsets(self) -> dict[int, list[int]]:
        words = self._words
        by_offset: dict[int, list[int]] = {}
        for type_id, name_off in enumerate([words[at] for at in self._offsets], 1):
            if name_off:
                by_offset.setdefault(name_off, []).append(type_id)
        return by_offset

    # -- type algebra ---------------------------------------------------------------

    def resolve(self, type_id: int) -> Type:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        return self._skip(type_id, _MODIFIERS, "typedef/qualifier")

    def strip_qualifiers(self, type_id: int) -> Type:
        """Follow const/volatile/restrict/type_tag but keep typedefs (for display)."""
        return self._skip(type_id, _QUALIFIERS, "qualifier")

    def _skip(self, type_id: int, kinds: frozenset[Kind], what: str) -> Type:
        """The first type down the chain from ``type_id`` whose kind is not in ``kinds``."""
        current = self.type(type_id)
        for _ in range(MAX_CHAIN):
            if current.kind not in kinds:
                return current
            assert current.type is not None
            current = self.type(current.type)
        raise BtfError(f"{what} chain from type {type_id} is cyclic or too long")

    def sizeof(self, type_id: int) -> int:
        """``sizeof`` in bytes; BtfError for void, functions and forward declarations."""
        current = self.resolve(type_id)
        factor = 1
        for _ in range(MAX_CHAIN):
            if current.kind == Kind.ARRAY:
                factor *= current.array_nelems
                current = self.resolve(current.array_type)
            elif current.kind == Kind.PTR:
                return factor * self.pointer_size
            elif current.kind == Kind.VAR:
                assert current.type is not None
                current = self.resolve(current.type)
            elif current.size is not None:
                return factor * current.size
            else:
                raise BtfError(f"type {type_id} ({current.kind.name}) has no size")
        raise BtfError(f"array nesting under type {type_id} is cyclic or too deep")

    def members(self, type_id: int) -> dict[str, Member]:
        """Members of a struct/union by name, anonymous struct/union members flattened.

        Offsets are from the start of ``type_id``; ``task_struct``'s members declared
        inside anonymous unions appear as if direct. Cached per type.
        """
        resolved = self.resolve(type_id)
        cached = self._members.get(resolved.id)
        if cached is not None:
            return cached
        if resolved.kind not in (Kind.STRUCT, Kind.UNION):
            raise BtfError(f"type {type_id} is {resolved.kind.name}, not a struct or union")
        flat: dict[str, Member] = {}
        self._flatten(resolved, 0, flat, 0, [0])
        self._members[resolved.id] = flat
        return flat

    def member(self, type_id: int, name: str) -> Member:
        """One member by name (anonymous members searched); BtfError when absent."""
        found = self.members(type_id).get(name)
        if found is None:
            raise BtfError(f"{self.type_name(type_id)} has no member {name!r}")
        return found

    def _flatten(
        self, st: Type, base: int, out: dict[str, Member], depth: int, work: list[int]
    ) -> None:
        if depth >= MAX_CHAIN:
            raise BtfError(f"anonymous members of type {st.id} nest too deep (cycle?)")
        for m in st.members:
            work[0] += 1
            if work[0] > MAX_FLAT_MEMBERS:
                raise BtfError(f"type {st.id} flattens to more than {MAX_FLAT_MEMBERS} members")
            target = self.resolve(m.type)
            if not m.name and target.kind in (Kind.STRUCT, Kind.UNION):
                self._flatten(target, base + m.bit_offset, out, depth + 1, work)
                continue
            bits = m.bitfield_size
            bit_offset = base + m.bit_offset
            # Legacy bitfields (no kind_flag): the width and offset live in the INT.
            if (
                not st.kind_flag
                and target.kind == Kind.INT
                and (target.int_offset or target.int_bits != _nonnull(target.size) * 8)
            ):
                bits, bit_offset = target.int_bits, bit_offset + target.int_offset
            if m.name and m.name not in out:
                out[m.name] = Member(m.name, m.type, bit_offset, bits)

    def type_name(self, type_id: int) -> str:
        """A C spelling of the type for messages (``struct task_struct *``, ``char [16]``)."""
        return _c_name(self, type_id, 0)

    def variable_type(self, name: str) -> int:
        """The type id of a global variable BTF describes (in vmlinux: per-cpu ones only)."""
        return _nonnull(self.find(name, Kind.VAR).type)


def _nonnull(value: int | None) -> int:
    assert value is not None
    return value


def _c_name(btf: Btf, type_id: int, depth: int) -> str:
    if depth > MAX_CHAIN:
        raise BtfError(f"type {type_id} nests too deep to name")
    t = btf.type(type_id)
    if t.kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FWD):
        tag = {
            Kind.STRUCT: "struct",
            Kind.UNION: "union",
            Kind.FWD: "union" if t.kind_flag else "struct",
        }
        return f"{tag.get(t.kind, 'enum')} {t.name or '<anonymous>'}"
    if t.kind == Kind.PTR:
        inner = _c_name(btf, _nonnull(t.type), depth + 1)
        return f"{inner}*" if inner.endswith("*") else f"{inner} *"
    if t.kind == Kind.ARRAY:
        head, bracket, dims = _c_name(btf, t.array_type, depth + 1).partition(" [")
        return f"{head} [{t.array_nelems}]" + (f"[{dims}" if bracket else "")
    if t.kind in _QUALIFIERS and t.kind != Kind.TYPE_TAG:
        return f"{t.kind.name.lower()} {_c_name(btf, _nonnull(t.type), depth + 1)}"
    if t.kind == Kind.TYPE_TAG:
        return _c_name(btf, _nonnull(t.type), depth + 1)
    if t.kind == Kind.FUNC_PROTO:
        return f"{_c_name(btf, _nonnull(t.type), depth + 1)} (...)"
    return t.name or t.kind.name.lower()


def _s32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def _enum64(lo: int, hi: int, signed: bool) -> int:
    value = (hi << 32) | lo
    return value - (1 << 64) if signed and value >> 63 else value


def _split_sections(blob: bytes) -> tuple[str, bytes, bytes]:
    """Check the header and return (byteorder, type section, string section)."""
    if len(blob) < HEADER_SIZE:
        raise BtfError(f"BTF blob of {len(blob)} bytes is shorter than its header")
    magic_le = int.from_bytes(blob[:2], "little")
    if magic_le == BTF_MAGIC:
        order = "little"
    elif int.from_bytes(blob[:2], "big") == BTF_MAGIC:
        order = "big"
    else:
        raise BtfError(f"bad BTF magic {blob[:2].hex()}")
    fmt = "<" if order == "little" else ">"
    _, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        fmt + "HBBIIIII", blob
    )
    if version != BTF_VERSION:
        raise BtfError(f"unsupported BTF version {version}")
    if hdr_len < HEADER_SIZE or hdr_len > len(blob):
        raise BtfError(f"BTF header length {hdr_len} does not fit a {len(blob)}-byte blob")
    data = len(blob) - hdr_len
    if type_off + type_len > data or str_off + str_len > data:
        raise BtfError(
            f"BTF sections (types {type_off}+{type_len}, strings {str_off}+{str_len}) "
            f"overrun the {data} data bytes"
        )
    if type_off % 4 or type_len % 4:
        raise BtfError("BTF type section is not 4-byte aligned")
    if type_off + type_len > str_off and str_off + str_len > type_off and type_len and str_len:
        raise BtfError("BTF type and string sections overlap")
    strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
    if not strings or strings[0] != 0 or strings[-1] != 0:
        raise BtfError("BTF string section must start and end with NUL")
    types = blob[hdr_len + type_off : hdr_len + type_off + type_len]
    return order, types, strings


def _index_types(words: array[int]) -> array[int]:
    """One pass: the word index where each type (id 1, 2, ...) starts."""
    offsets = array("I")
    append = offsets.append
    step, per = _STEP, _PER
    n = len(words)
    at = 0
    try:
        while at < n:
            append(at)
            info = words[at + 1]
            kind = (info >> 24) & 0x1F
            size = step[kind]
            if size < 0:
                raise BtfError(f"type {len(offsets)}: invalid kind {kind}")
            at += size + per[kind] * (info & 0xFFFF)
    except IndexError:
        raise BtfError(f"type {len(offsets)} is truncated by the end of the type section") from None
    if at != n:
        raise BtfError(f"type {len(offsets)} runs past the end of the type section")
    if len(offsets) >= MAX_TYPES:
        raise BtfError(f"{len(offsets)} types exceed the limit of {MAX_TYPES - 1}")
    return offsets
