"""Typed views of guest kernel memory: IDS code that reads like kernel C.

``task.comm``, ``task.real_parent.pid``, ``task.tasks.next`` work as in drgn: an
:class:`Object` is a C type plus an address (a *reference*, read lazily, only the bytes
of the member asked for) or plus a value already read. Types come from BTF; derived
types (``struct task_struct **``, ``char [16]``) are made on demand from a small C
type-name parser. Every read goes through :class:`~sgmonitor.kernel.address_space.AddressSpace`,
so a fault is a :class:`~sgmonitor.errors.PageFault` and hostile sizes are bounded.

A ``Kernel`` built on top takes (address space, BTF, symbol lookup) and only has to add
``object(symbol)``: ``TypedMemory.object(type_name, lookup(symbol))``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from sgmonitor.errors import GuestDataError
from sgmonitor.kernel.address_space import AddressSpace
from sgmonitor.kernel.btf import Btf, BtfError, Kind

__all__ = ["CType", "DesignatorIndexError", "Object", "TypeKind", "TypedMemory"]

MAX_READ = 1 << 20  # largest single value read (bytes); a hostile BTF can claim huge arrays
MAX_STRING = 4096  # default bound for C strings read through a pointer
PAGE = 4096
MAX_DESIGNATOR = 256  # characters in a member designator ("pid_links[1].next")


class DesignatorIndexError(GuestDataError, IndexError):
    """A designator's subscript is outside the array's length as the guest's BTF declares
    it (``pid_links[7]`` of a ``struct hlist_node [4]``)."""


class TypeKind:
    """What an object can do; typedefs and qualifiers are already resolved away."""

    VOID = "void"
    INT = "int"
    BOOL = "bool"
    ENUM = "enum"
    FLOAT = "float"
    POINTER = "pointer"
    ARRAY = "array"
    STRUCT = "struct"
    UNION = "union"
    FUNCTION = "function"


_INTEGER = frozenset({TypeKind.INT, TypeKind.BOOL, TypeKind.ENUM, TypeKind.POINTER})
_PLAIN_INTEGER = frozenset({TypeKind.INT, TypeKind.ENUM, TypeKind.POINTER})
_COMPOUND = frozenset({TypeKind.STRUCT, TypeKind.UNION})

_INT_WORDS = frozenset({"char", "short", "int", "long", "signed", "unsigned", "_Bool"})
_TOKEN = re.compile(r"\s*(?:([A-Za-z_]\w*)|(\*)|\[\s*(\d*)\s*\]|(\S))")
_DESIGNATOR_PART = re.compile(r"(?:^|\.)([A-Za-z_]\w*)|\[(\d{1,10})\]")


def _designator(path: str) -> list[str | int]:
    """The parts of a C member designator: ``"pid_links[1].next"`` is
    ``["pid_links", 1, "next"]``; ValueError for anything else (bounded length)."""
    if len(path) > MAX_DESIGNATOR:
        raise ValueError(f"member designator longer than {MAX_DESIGNATOR} characters")
    parts: list[str | int] = []
    at = 0
    while at < len(path):
        m = _DESIGNATOR_PART.match(path, at)
        if m is None or (at == 0) != (m[1] is not None and not m[0].startswith(".")):
            raise ValueError(f"cannot parse member designator {path!r} at {at}")
        parts.append(m[1] if m[1] is not None else int(m[2]))
        at = m.end()
    if not parts:
        raise ValueError("empty member designator")
    return parts


def _check_index(ctype: CType, index: int) -> None:
    """A designator's subscript must lie in a fixed array (flexible arrays: any)."""
    if ctype.kind != TypeKind.ARRAY:
        raise TypeError(f"{ctype.name} is not an array")
    if ctype.length and index >= ctype.length:
        raise DesignatorIndexError(f"index {index} out of range for {ctype.name}")


class CType:
    """A C type as objects use it: BTF-backed (``btf_id``) or derived (pointer/array)."""

    __slots__ = (
        "_members",
        "_pointer",
        "_target",
        "_target_id",
        "_tm",
        "btf_id",
        "enumerators",
        "kind",
        "length",
        "name",
        "signed",
        "size",
    )

    def __init__(
        self,
        tm: TypedMemory,
        kind: str,
        name: str,
        size: int | None,
        *,
        btf_id: int = 0,
        signed: bool = False,
        target: CType | None = None,
        target_id: int | None = None,
        length: int | None = None,
        enumerators: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self._tm = tm
        self.kind = kind
        self.name = name
        self.size = size
        self.btf_id = btf_id
        self.signed = signed
        self._target = target
        self._target_id = target_id
        self.length = length
        self.enumerators = enumerators
        self._members: dict[str, tuple[int, CType, tuple[int, int] | None]] = {}
        self._pointer: CType | None = None

    def __repr__(self) -> str:
        return f"CType({self.name!r})"

    def __str__(self) -> str:
        return self.name

    @property
    def target(self) -> CType:
        """The pointed-to type (pointers) or element type (arrays); resolved lazily."""
        if self._target is None:
            if self._target_id is None:
                raise TypeError(f"{self.name} is neither a pointer nor an array")
            self._target = self._tm._from_btf(self._target_id)
        return self._target

    def pointer(self) -> CType:
        """``T *`` for this type ``T``."""
        if self._pointer is None:
            spelled = f"{self.name}*" if self.name.endswith("*") else f"{self.name} *"
            size = self._tm.btf.pointer_size
            self._pointer = CType(self._tm, TypeKind.POINTER, spelled, size, target=self)
        return self._pointer

    def member(self, name: str) -> tuple[int, CType, tuple[int, int] | None]:
        """(byte offset, type, bitfield (bit shift, width) or None); AttributeError if absent."""
        found = self._members.get(name)
        if found is not None:
            return found
        if self.kind not in _COMPOUND or not self.btf_id:
            raise AttributeError(f"{self.name} has no member {name!r}")
        m = self._tm.btf.members(self.btf_id).get(name)
        if m is None:
            raise AttributeError(f"{self.name} has no member {name!r}")
        bits = (m.bit_offset % 8, m.bitfield_size) if m.bitfield_size or m.bit_offset % 8 else None
        found = (m.bit_offset // 8, self._tm._from_btf(m.type), bits)
        self._members[name] = found
        return found

    def member_names(self) -> list[str]:
        """Members by name, anonymous struct/union members flattened."""
        return list(self._tm.btf.members(self.btf_id)) if self.kind in _COMPOUND else []

    @property
    def is_char(self) -> bool:
        return self.kind == TypeKind.INT and self.size == 1


class TypedMemory:
    """Types from one BTF over one address space: ``object``, ``cast``, ``container_of``.

    Types are cached per BTF id and per spelled name, so the per-access cost of
    ``task.pid`` is a dict lookup, a small object and one ``read`` of 4 bytes.
    """

    def __init__(
        self,
        btf: Btf,
        memory: AddressSpace,
        *,
        max_read: int = MAX_READ,
        max_string: int = MAX_STRING,
    ) -> None:
        self.btf = btf
        self.memory = memory
        self.max_read = max_read
        self.max_string = max_string
        self.byteorder: Any = btf.byteorder
        self._by_id: dict[int, CType] = {}
        self._by_name: dict[str, CType] = {}
        self._layouts: dict[tuple[str, tuple[str, ...]], Layout] = {}
        self.void = CType(self, TypeKind.VOID, "void", None)

    # -- types ----------------------------------------------------------------------

    def type(self, spec: str | int | CType) -> CType:
        """A type from a C spelling (``"struct task_struct *"``, ``"char [16]"``), a BTF id
        or a CType."""
        if isinstance(spec, CType):
            return spec
        if isinstance(spec, int):
            return self._from_btf(spec)
        found = self._by_name.get(spec)
        if found is None:
            found = self._parse(spec)
            self._by_name[spec] = found
        return found

    def sizeof(self, spec: str | int | CType) -> int:
        """``sizeof(spec)`` in bytes; TypeError for void, functions, incomplete types."""
        ctype = self.type(spec)
        if ctype.size is None:
            raise TypeError(f"sizeof({ctype.name}): incomplete type")
        return ctype.size

    def offsetof(self, spec: str | int | CType, member: str) -> int:
        """``offsetof(spec, member)``; ``member`` is a designator (``"se.run_node"``,
        ``"pid_links[1]"``)."""
        offset, _ = self._member_path(self.type(spec), member)
        return offset

    def array_of(self, element: CType, length: int) -> CType:
        """``T [length]``."""
        size = None if element.size is None else element.size * length
        name = _array_name(element.name, length)
        return CType(self, TypeKind.ARRAY, name, size, target=element, length=length)

    def _member_path(self, ctype: CType, path: str) -> tuple[int, CType]:
        offset = 0
        for part in _designator(path):
            if isinstance(part, int):
                _check_index(ctype, part)
                ctype = ctype.target
                offset += part * self.sizeof(ctype)
                continue
            step, ctype, bits = ctype.member(part)
            if bits is not None:
                raise TypeError(f"offsetof a bitfield ({path!r})")
            offset += step
        return offset, ctype

    def _from_btf(self, type_id: int) -> CType:
        found = self._by_id.get(type_id)
        if found is None:
            found = self._make(type_id)
            self._by_id[type_id] = found
        return found

    def _make(self, type_id: int) -> CType:
        btf = self.btf
        if type_id == 0:
            return self.void
        name = btf.type_name(type_id)
        t = btf.resolve(type_id)
        k = t.kind
        if k == Kind.INT:
            kind = TypeKind.BOOL if t.int_encoding & 4 else TypeKind.INT
            return CType(self, kind, name, t.size, btf_id=t.id, signed=t.is_signed)
        if k == Kind.PTR:
            size = btf.pointer_size
            return CType(self, TypeKind.POINTER, name, size, btf_id=t.id, target_id=t.type)
        if k == Kind.ARRAY:
            n = t.array_nelems
            size = btf.sizeof(t.id)
            tid = t.array_type
            return CType(self, TypeKind.ARRAY, name, size, btf_id=t.id, target_id=tid, length=n)
        if k in (Kind.STRUCT, Kind.UNION):
            kind = TypeKind.STRUCT if k == Kind.STRUCT else TypeKind.UNION
            return CType(self, kind, name, t.size, btf_id=t.id)
        if k == Kind.FWD:
            kind = TypeKind.UNION if t.kind_flag else TypeKind.STRUCT
            return CType(self, kind, name, None)
        if k in (Kind.ENUM, Kind.ENUM64):
            names = tuple((e.name, e.value) for e in t.enumerators)
            signed = t.is_signed
            return CType(
                self, TypeKind.ENUM, name, t.size, btf_id=t.id, signed=signed, enumerators=names
            )
        if k == Kind.FLOAT:
            return CType(self, TypeKind.FLOAT, name, t.size, btf_id=t.id)
        if k in (Kind.FUNC, Kind.FUNC_PROTO):
            return CType(self, TypeKind.FUNCTION, name, None, btf_id=t.id)
        if k == Kind.UNKN:
            return self.void
        raise BtfError(f"type {type_id} ({k.name}) is not an object type")

    def _parse(self, spec: str) -> CType:
        """Parse ``[qualifiers] base [qualifiers] {'*' [qualifiers]} {'[' N ']'}``."""
        tokens: list[tuple[str, str]] = []
        for m in _TOKEN.finditer(spec.strip()):
            word, star, dim, other = m.groups()
            if other is not None:
                raise ValueError(f"cannot parse C type {spec!r} at {other!r}")
            if word is not None and word not in ("const", "volatile", "restrict"):
                tokens.append(("word", word))
            elif star is not None:
                tokens.append(("*", star))
            elif dim is not None:
                tokens.append(("[]", dim))
        words = [t for kind, t in tokens if kind == "word"]
        rest = tokens[len(words) :]
        if not words or any(kind == "word" for kind, _ in rest):
            raise ValueError(f"cannot parse C type {spec!r}")
        ctype = self._base(words, spec)
        dims: list[int] = []
        for kind, text in rest:
            if kind == "*":
                if dims:
                    raise ValueError(f"cannot parse C type {spec!r}: '*' after '[]'")
                ctype = ctype.pointer()
            else:
                dims.append(int(text or 0))
        for length in reversed(dims):
            ctype = self.array_of(ctype, length)
        return ctype

    def _base(self, words: list[str], spec: str) -> CType:
        btf = self.btf
        if words[0] in ("struct", "union", "enum"):
            if len(words) != 2:
                raise ValueError(f"cannot parse C type {spec!r}")
            kinds = {
                "struct": (Kind.STRUCT,),
                "union": (Kind.UNION,),
                "enum": (Kind.ENUM, Kind.ENUM64),
            }[words[0]]
            ids = btf.find_all(words[1])
            for wanted in (*kinds, Kind.FWD):
                for type_id in ids:
                    if btf.type(type_id).kind == wanted:
                        return self._from_btf(type_id)
            raise LookupError(f"no type {words[0]} {words[1]} in BTF")
        if words == ["void"]:
            return self.void
        if all(w in _INT_WORDS for w in words):
            return self._builtin_int(words, spec)
        if len(words) == 1:
            for wanted in (Kind.TYPEDEF, Kind.INT, Kind.FLOAT):
                for type_id in btf.find_all(words[0]):
                    if btf.type(type_id).kind == wanted:
                        return self._from_btf(type_id)
            raise LookupError(f"no type named {words[0]!r} in BTF")
        raise ValueError(f"cannot parse C type {spec!r}")

    def _builtin_int(self, words: list[str], spec: str) -> CType:
        """C's integer spellings in GCC/BTF canonical form (``unsigned long`` is
        ``long unsigned int``); x86-64 sizes, plain char is signed."""
        longs = words.count("long")
        unsigned = "unsigned" in words
        others = [w for w in words if w != "long"]
        if longs > 2 or len(others) != len(set(others)) or {"signed", "unsigned"} <= set(words):
            raise ValueError(f"cannot parse C type {spec!r}")
        if words == ["_Bool"]:
            return CType(self, TypeKind.BOOL, "_Bool", 1)
        if "_Bool" in words:
            raise ValueError(f"cannot parse C type {spec!r}")
        if "char" in words:
            if longs or "short" in words or "int" in words:
                raise ValueError(f"cannot parse C type {spec!r}")
            name = "unsigned char" if unsigned else "signed char" if "signed" in words else "char"
            return CType(self, TypeKind.INT, name, 1, signed=not unsigned)
        if "short" in words and longs:
            raise ValueError(f"cannot parse C type {spec!r}")
        stem, size = (
            ("short", 2) if "short" in words else (("long " * longs).strip(), 8 if longs else 4)
        )
        name = " ".join(part for part in (stem, "unsigned" if unsigned else "", "int") if part)
        return CType(self, TypeKind.INT, name, size, signed=not unsigned)

    # -- objects --------------------------------------------------------------------

    def object(self, spec: str | int | CType, address: int) -> Object:
        """A reference object: ``*(spec *)address``, read lazily."""
        return Object(self, self.type(spec), address)

    def value(self, spec: str | int | CType, value: int) -> Object:
        """A value object of a scalar type (``value("unsigned long", 3)``)."""
        ctype = self.type(spec)
        if ctype.kind not in _INTEGER:
            raise TypeError(f"cannot make a {ctype.name} from an int")
        return Object(self, ctype, None, _to_width(value, ctype))

    def cast(self, spec: str | int | CType, obj: Object | int) -> Object:
        """C cast: ``(spec)obj``. Scalars convert; a reference to a struct or array is
        reinterpreted in place (``cast("char [16]", obj)``)."""
        ctype = self.type(spec)
        if isinstance(obj, int):
            return self.value(ctype, obj)
        if ctype.kind in _INTEGER and obj._type.kind in _INTEGER:
            return self.value(ctype, obj.value_())
        if obj._address is None:
            raise TypeError(f"cannot cast a {obj._type.name} value to {ctype.name}")
        return Object(self, ctype, obj._address)

    def container_of(self, ptr: Object | int, spec: str | int | CType, member: str) -> Object:
        """``container_of(ptr, type, member)``: a ``type *`` to the enclosing object."""
        ctype = self.type(spec)
        address = int(ptr) - self.offsetof(ctype, member)
        return Object(self, ctype.pointer(), None, address & 0xFFFFFFFFFFFFFFFF)

    def layout(self, spec: str | int | CType, members: Sequence[str]) -> Layout:
        """Some members of a struct, compiled (see :class:`Layout`); cached per type."""
        ctype = self.type(spec)
        key = (ctype.name, tuple(members))
        found = self._layouts.get(key)
        if found is None:
            found = self._layouts[key] = Layout(self, ctype, members)
        return found

    def read(self, address: int, size: int) -> bytes:
        """Raw bytes of guest memory (bounded by ``max_read``)."""
        if not 0 <= size <= self.max_read:
            raise BtfError(f"read of {size} bytes at {address:#x} exceeds {self.max_read}")
        return self.memory.read(address, size)


class Layout:
    """Some members of one struct type, compiled: offsets, sizes and kinds resolved once
    (the paper's LLView idea), so reading them from an object costs one guest read per
    cluster of nearby members and one ``struct`` unpack, not a typed object and a read
    per member.

    Members are designators (``"pid"``, ``"uid.val"``, ``"pid_links[1].next"``) of
    integer, enum, pointer (read as its address) or ``char [N]`` type (read as a C
    string); anything else, or a bitfield, is a TypeError when the layout is made.
    Members further apart than ``GAP`` bytes are read separately, so a layout of a
    large struct (``task_struct`` is ~9 KiB) does not copy, or cross pages for, the
    bytes between them.
    """

    GAP = 2048

    __slots__ = ("_clusters", "_count", "_strings", "_tm", "end", "start", "type")

    def __init__(self, tm: TypedMemory, ctype: CType, members: Sequence[str]) -> None:
        if not members:
            raise ValueError("a layout needs at least one member")
        order = "<" if tm.byteorder == "little" else ">"
        fields = []  # (offset, size, struct code, position in the output)
        strings = []
        for position, member in enumerate(members):
            offset, mtype = tm._member_path(ctype, member)
            size = mtype.size or 0
            if mtype.kind in _INTEGER or mtype.kind == TypeKind.POINTER:
                signed = mtype.kind != TypeKind.POINTER and mtype.signed
                code = _STRUCT_CODES.get((size, signed))
                if code is None:
                    raise TypeError(f"{ctype.name}.{member}: a {size}-byte integer")
            elif mtype.kind == TypeKind.ARRAY and mtype.target.is_char and size:
                size = min(size, tm.max_string)
                code = f"{size}s"
                strings.append(position)
            else:
                raise TypeError(f"{ctype.name}.{member} ({mtype.name}) has no plain value")
            fields.append((offset, size, code, position))
        fields.sort()
        clusters: list[list[tuple[int, int, str, int]]] = [[fields[0]]]
        for field in fields[1:]:
            last = clusters[-1][-1]
            # overlapping members (a union) and far-apart ones are read on their own
            if field[0] < last[0] + last[1] or field[0] - (last[0] + last[1]) > self.GAP:
                clusters.append([field])
            else:
                clusters[-1].append(field)
        self._clusters = []
        for cluster in clusters:
            start = cluster[0][0]
            parts, at = [order], start
            for offset, size, code, _ in cluster:
                parts.append(f"{offset - at}x{code}" if offset > at else code)
                at = offset + size
            self._clusters.append(
                (start, at - start, struct.Struct("".join(parts)), [f[3] for f in cluster])
            )
        self.type = ctype
        self.start = fields[0][0]
        self.end = max(offset + size for offset, size, _, _ in fields)
        if any(size > tm.max_read for _, size, _, _ in self._clusters):
            raise ValueError(f"{members}: a span of {ctype.name} beyond {tm.max_read} bytes")
        self._strings = tuple(strings)
        self._count = len(fields)
        self._tm = tm

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(offset, size) of each read a :meth:`read` makes, relative to the object."""
        return [(start, size) for start, size, _, _ in self._clusters]

    def read(self, address: int) -> tuple[Any, ...]:
        """The members of the object at ``address``, in the order given: ints, and strs
        for the ``char [N]`` members."""
        read = self._tm.memory.read
        out: list[Any] = [None] * self._count
        for start, size, unpack, positions in self._clusters:
            values = unpack.unpack(read(address + start, size))
            for position, value in zip(positions, values, strict=True):
                out[position] = value
        for i in self._strings:
            out[i] = out[i].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        return tuple(out)


_STRUCT_CODES = {
    (1, True): "b",
    (1, False): "B",
    (2, True): "h",
    (2, False): "H",
    (4, True): "i",
    (4, False): "I",
    (8, True): "q",
    (8, False): "Q",
}


def _array_name(element: str, length: int) -> str:
    """``int [3]`` of 2 is ``int [2][3]``, as C spells it."""
    head, bracket, dims = element.partition(" [")
    return f"{head} [{length}]" + (f"[{dims}" if bracket else "")


def _to_width(value: int, ctype: CType) -> int:
    """Wrap ``value`` to the type's width and signedness, as a C conversion does."""
    if ctype.kind == TypeKind.BOOL:
        return bool(value)
    bits = 8 * (ctype.size or 8)
    value &= (1 << bits) - 1
    if ctype.signed and value >> (bits - 1):
        value -= 1 << bits
    return value


class Object:
    """A typed piece of guest memory (``address`` set) or a value already read.

    Members are attributes (``task.pid``; on a pointer they dereference, like drgn);
    methods end in ``_`` so they never hide a member name.
    """

    __slots__ = ("_address", "_bits", "_tm", "_type", "_value")

    def __init__(
        self,
        tm: TypedMemory,
        ctype: CType,
        address: int | None,
        value: int | float | bytes | None = None,
        bits: tuple[int, int] | None = None,
    ) -> None:
        self._tm = tm
        self._type = ctype
        self._address = address
        self._value = value
        self._bits = bits

    # -- identity -------------------------------------------------------------------

    @property
    def type_(self) -> CType:
        return self._type

    @property
    def address_(self) -> int | None:
        """The guest-virtual address, or None for a value."""
        return self._address

    @property
    def memory_(self) -> TypedMemory:
        return self._tm

    def __repr__(self) -> str:
        where = f"address={self._address:#x}" if self._address is not None else "value"
        return f"Object({self._type.name!r}, {where})"

    def __dir__(self) -> list[str]:
        t = self._type
        if t.kind == TypeKind.POINTER:
            t = t.target
        return sorted(set(super().__dir__()) | set(t.member_names()))

    # -- members and elements -------------------------------------------------------

    def __getattr__(self, name: str) -> Object:
        found = self._type._members.get(name)  # fast path: a member already looked up
        if found is not None and self._address is not None:
            return Object(self._tm, found[1], self._address + found[0], None, found[2])
        if name[:2] == "__" and name[-2:] == "__":
            raise AttributeError(name)
        target = self._type._target
        if target is not None and self._type.kind == TypeKind.POINTER:
            found = target._members.get(name)  # fast path: ptr->member
            if found is not None and target.kind != TypeKind.VOID:
                return Object(self._tm, found[1], int(self) + found[0], None, found[2])
        return self.member_(name)

    def member_(self, name: str) -> Object:
        """``obj.name`` (or ``obj->name`` when this is a pointer); ``name`` may be a
        designator (``"pid_links[1].pprev"``), its subscripts checked against the
        array's length (:class:`DesignatorIndexError`)."""
        if not name.isidentifier():
            return self._designated(name)
        obj = self
        if self._type.kind == TypeKind.POINTER:
            obj = self.deref_()
        offset, mtype, bits = obj._type.member(name)
        if obj._address is not None:
            return Object(self._tm, mtype, obj._address + offset, None, bits)
        raw = obj._value
        assert isinstance(raw, bytes)
        size = mtype.size if bits is None else (bits[0] + bits[1] + 7) // 8
        return Object(self._tm, mtype, None, raw[offset : offset + (size or 0)], bits)

    def _designated(self, path: str) -> Object:
        obj = self
        for part in _designator(path):
            if isinstance(part, int):
                if obj._type.kind != TypeKind.POINTER:
                    _check_index(obj._type, part)
                obj = obj[part]
            else:
                obj = obj.member_(part)
        return obj

    def deref_(self) -> Object:
        """``*ptr`` as a reference object (nothing is read until used)."""
        t = self._type
        if t.kind != TypeKind.POINTER:
            raise TypeError(f"cannot dereference a {t.name}")
        target = t._target or t.target
        if target.kind == TypeKind.VOID:
            raise TypeError("cannot dereference a void *")
        return Object(self._tm, target, self.value_())

    def __getitem__(self, index: int) -> Object:
        t = self._type
        index = index.__index__()
        if t.kind == TypeKind.POINTER:
            target = t.target
            return Object(self._tm, target, self.value_() + index * self._tm.sizeof(target))
        if t.kind != TypeKind.ARRAY:
            raise TypeError(f"{t.name} is not subscriptable")
        if t.length and not 0 <= index < t.length:
            raise IndexError(f"index {index} out of range for {t.name}")
        elem = t.target
        step = self._tm.sizeof(elem)
        if self._address is not None:
            return Object(self._tm, elem, self._address + index * step)
        raw = self._value
        assert isinstance(raw, bytes)
        return Object(self._tm, elem, None, raw[index * step : (index + 1) * step])

    def __len__(self) -> int:
        if self._type.kind != TypeKind.ARRAY or self._type.length is None:
            raise TypeError(f"{self._type.name} has no len()")
        return self._type.length

    def __iter__(self) -> Iterator[Object]:
        for i in range(len(self)):
            yield self[i]

    def address_of_(self) -> Object:
        """``&obj``: a pointer value."""
        if self._address is None or self._bits is not None:
            raise ValueError("cannot take the address of a value or a bitfield")
        return Object(self._tm, self._type.pointer(), None, self._address)

    def cast_(self, spec: str | int | CType) -> Object:
        return self._tm.cast(spec, self)

    def read_(self) -> Object:
        """A value copy: one read of the whole object; later member access reads nothing.

        Worth it when many members of one struct are needed over a slow transport.
        """
        if self._address is None:
            return self
        return Object(self._tm, self._type, None, self._raw(), self._bits)

    # -- values ---------------------------------------------------------------------

    def _raw(self) -> bytes:
        value = self._value
        if isinstance(value, bytes):
            return value
        if self._address is None:
            raise TypeError(f"{self._type.name} value has no bytes")
        size = self._type.size
        if self._bits is not None:
            size = (self._bits[0] + self._bits[1] + 7) // 8
        if size is None:
            raise TypeError(f"cannot read an object of incomplete type {self._type.name}")
        return self._tm.read(self._address, size)

    def value_(self) -> Any:
        """The Python value: int (int, enum, pointer), bool, float, list (array), dict
        (struct/union, anonymous members flattened)."""
        value = self._value
        if value is not None and not isinstance(value, bytes):
            return value
        t = self._type
        kind = t.kind
        if kind in _INTEGER:
            raw = value if value is not None else self._raw()
            if self._bits is None:
                n = int.from_bytes(raw, self._tm.byteorder, signed=t.signed)
            else:
                n = self._bitfield(raw)
            return bool(n) if kind == TypeKind.BOOL else n
        if kind == TypeKind.FLOAT:
            fmt = {4: "f", 8: "d"}.get(t.size or 0)
            if fmt is None:
                raise TypeError(f"unsupported float size {t.size}")
            order = "<" if self._tm.byteorder == "little" else ">"
            return struct.unpack(order + fmt, self._raw())[0]
        if kind == TypeKind.ARRAY:
            copy = self.read_()
            return [copy[i].value_() for i in range(t.length or 0)]
        if kind in _COMPOUND:
            copy = self.read_()
            return {name: copy.member_(name).value_() for name in t.member_names()}
        raise TypeError(f"{t.name} has no value")

    def _bitfield(self, raw: bytes) -> int:
        assert self._bits is not None
        shift, width = self._bits
        n = int.from_bytes(raw, self._tm.byteorder) >> shift
        n &= (1 << width) - 1
        if self._type.signed and width and n >> (width - 1):
            n -= 1 << width
        return n

    def enumerator_(self) -> str | None:
        """The enumerator name of an enum value (None if no enumerator has it)."""
        if self._type.kind != TypeKind.ENUM:
            raise TypeError(f"{self._type.name} is not an enum")
        value = self.value_()
        return next((name for name, v in self._type.enumerators if v == value), None)

    def string_(self, limit: int | None = None) -> str:
        """A C string from ``char [N]`` or ``char *``: up to NUL, at most ``limit`` bytes."""
        t = self._type
        limit = self._tm.max_string if limit is None else limit
        if t.kind == TypeKind.ARRAY and t.target.is_char:
            size = min(t.length or 0, limit) if t.length else limit
            if self._address is not None:
                raw = self._tm.read(self._address, size)
            else:
                raw = self._raw()[:size]
            return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        if t.kind == TypeKind.POINTER and t.target.is_char:
            return _read_c_string(self._tm, self.value_(), limit)
        raise TypeError(f"{t.name} is not a C string")

    def __str__(self) -> str:
        t = self._type
        is_string = t.kind in (TypeKind.ARRAY, TypeKind.POINTER) and t.target.is_char
        return self.string_() if is_string else repr(self)

    def __int__(self) -> int:
        t = self._type
        if t.kind in _PLAIN_INTEGER and self._value is None and self._bits is None:
            # Fast path: one read of exactly this member's bytes.
            tm = self._tm
            raw = tm.memory.read(self._address, t.size)  # type: ignore[arg-type]
            return int.from_bytes(raw, tm.byteorder, signed=t.signed)
        if t.kind not in _INTEGER:
            raise TypeError(f"{self._type.name} is not an integer")
        return int(self.value_())

    __index__ = __int__

    def __float__(self) -> float:
        return float(self.value_())

    def __bool__(self) -> bool:
        """Non-zero / non-NULL; structs and arrays have no truth value."""
        return bool(self._scalar())

    def _scalar(self) -> int | float:
        if self._type.kind in _PLAIN_INTEGER:
            return self.__int__()
        if self._type.kind not in _INTEGER and self._type.kind != TypeKind.FLOAT:
            raise TypeError(f"{self._type.name} is not a scalar")
        return self.value_()  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Object):
            return self._scalar() == other._scalar()
        if isinstance(other, int | float):
            return self._scalar() == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # type: ignore[assignment]

    def __lt__(self, other: Object | int) -> bool:
        return self._scalar() < _plain(other)

    def __le__(self, other: Object | int) -> bool:
        return self._scalar() <= _plain(other)

    def __gt__(self, other: Object | int) -> bool:
        return self._scalar() > _plain(other)

    def __ge__(self, other: Object | int) -> bool:
        return self._scalar() >= _plain(other)

    def __add__(self, other: Object | int) -> Object | int | float:
        """Pointer + n moves by n elements (a pointer value); ints add as Python ints."""
        if self._type.kind == TypeKind.POINTER:
            step = self._tm.sizeof(self._type.target) if self._type.target.size else 1
            return self._tm.value(self._type, self.value_() + int(other) * step)
        return self._scalar() + _plain(other)

    def __sub__(self, other: Object | int) -> Object | int | float:
        """Pointer - n (a pointer), pointer - pointer (elements), or int subtraction."""
        if self._type.kind == TypeKind.POINTER:
            step = self._tm.sizeof(self._type.target) if self._type.target.size else 1
            if isinstance(other, Object) and other._type.kind == TypeKind.POINTER:
                return (int(self.value_()) - int(other.value_())) // step
            return self._tm.value(self._type, self.value_() - int(other) * step)
        difference: int | float = self._scalar() - _plain(other)
        return difference

    def __and__(self, other: Object | int) -> int:
        return int(self) & int(other)

    def __or__(self, other: Object | int) -> int:
        return int(self) | int(other)

    def __rshift__(self, other: int) -> int:
        return int(self) >> other

    def __lshift__(self, other: int) -> int:
        return int(self) << other


def _plain(value: Object | int | float) -> int | float:
    return value._scalar() if isinstance(value, Object) else value


def _read_c_string(tm: TypedMemory, address: int, limit: int) -> str:
    """Read up to NUL in page-sized pieces, so a short string never touches the next page."""
    out = bytearray()
    while len(out) < limit:
        chunk = min(PAGE - (address + len(out)) % PAGE, limit - len(out))
        piece = tm.read(address + len(out), chunk)
        end = piece.find(b"\0")
        if end >= 0:
            out += piece[:end]
            break
        out += piece
    return bytes(out).decode("utf-8", errors="replace")
