"""XArrays and IDRs, as in include/linux/xarray.h, lib/xarray.c and lib/idr.c, walked
with validation by default.

An XArray's ``xa_head`` is NULL, one entry (at index 0), or an internal entry pointing
to a ``struct xa_node``: ``XA_CHUNK_SIZE`` slots, each covering ``1 << shift`` indices,
holding entries, nodes one level down (``shift - XA_CHUNK_SHIFT``), or internal entries
(siblings of a multi-index entry, retry and zero entries). An IDR is an XArray
(``idr_rt``; ``struct radix_tree_root`` is ``struct xarray`` since v4.20) whose ids
start at ``idr_base``.

Every node read is checked before it is trusted: its shift is a multiple of
``XA_CHUNK_SHIFT`` below 64 and exactly one step below its parent's, its ``parent``,
``offset`` and ``array`` point back where the walk came from. So the walk only descends
(a cycle is impossible, the depth is at most 64 / ``XA_CHUNK_SHIFT`` nodes) and every
node has one place; a :class:`~.list.WalkGuard` bounds the nodes of a whole walk.
Anything else raises :class:`~sgmonitor.errors.ValidationError`. ``XA_CHUNK_SHIFT`` is
the guest's own (4 or 6, ``CONFIG_BASE_SMALL``): the length of ``xa_node.slots`` in BTF.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sgmonitor.errors import PageFault, ValidationError
from sgmonitor.kernel.helpers.list import DEFAULT_LIMIT, WalkGuard, _address
from sgmonitor.kernel.objects import Object, TypedMemory

__all__ = [
    "idr_find",
    "idr_for_each",
    "xa_for_each",
    "xa_is_internal",
    "xa_is_node",
    "xa_is_retry",
    "xa_is_value",
    "xa_is_zero",
    "xa_load",
    "xa_to_value",
]

BITS_PER_LONG = 64
_MASK = (1 << BITS_PER_LONG) - 1
INT_MAX = (1 << 31) - 1  # idr_for_each() stops at ids above it (lib/idr.c)


def _xa_mk_internal(v: int) -> int:
    return ((v << 2) | 2) & _MASK


XA_RETRY_ENTRY = _xa_mk_internal(256)
XA_ZERO_ENTRY = _xa_mk_internal(257)


def xa_is_internal(entry: int) -> bool:
    """Whether an entry (``void *`` as an int) is internal to the XArray."""
    return entry & 3 == 2


def xa_is_node(entry: int) -> bool:
    """Whether an entry points to a ``struct xa_node`` (internal, above 4096)."""
    return xa_is_internal(entry) and entry > 4096


def xa_is_value(entry: int) -> bool:
    """Whether an entry is a value entry (an integer stored with ``xa_mk_value``)."""
    return bool(entry & 1)


def xa_to_value(entry: int) -> int:
    """The integer a value entry holds."""
    return entry >> 1


def xa_is_zero(entry: int) -> bool:
    """Whether an entry is ``XA_ZERO_ENTRY`` (reserved: reads as NULL)."""
    return entry == XA_ZERO_ENTRY


def xa_is_retry(entry: int) -> bool:
    """Whether an entry is ``XA_RETRY_ENTRY`` (the array was being changed)."""
    return entry == XA_RETRY_ENTRY


@dataclass(frozen=True)
class _Layout:
    """``struct xa_node`` as this guest's BTF lays it out."""

    size: int
    shift: int
    offset: int
    parent: int
    array: int
    slots: int
    chunk_shift: int

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_shift


@dataclass(frozen=True)
class _Node:
    address: int
    shift: int
    slots: tuple[int, ...]


def _layout(tm: TypedMemory) -> _Layout:
    spec = "struct xa_node"
    slots = tm.type(spec).member("slots")[1]
    chunk = slots.length or 0
    if chunk not in (16, 64):  # XA_CHUNK_SIZE: 1 << (CONFIG_BASE_SMALL ? 4 : 6)
        raise ValidationError(f"xa_node.slots has {chunk} slots, not 16 or 64")
    return _Layout(
        tm.sizeof(spec),
        tm.offsetof(spec, "shift"),
        tm.offsetof(spec, "offset"),
        tm.offsetof(spec, "parent"),
        tm.offsetof(spec, "array"),
        tm.offsetof(spec, "slots"),
        chunk.bit_length() - 1,
    )


class _Walk:
    """One walk of one XArray: reads and checks nodes, counts them with a guard."""

    def __init__(self, xa: Object, limit: int) -> None:
        self.tm = xa.memory_
        self.xa = _address(xa, "xarray")
        self.layout = _layout(self.tm)
        self.guard = WalkGuard(f"xarray at {self.xa:#x}", limit)

    def head(self) -> int:
        try:
            return int(self.tm.object("struct xarray", self.xa).xa_head)
        except PageFault as fault:
            raise self.error(f"is unreadable ({fault})") from fault

    def error(self, why: str) -> ValidationError:
        return ValidationError(f"{self.guard.what}: {why}")

    def node(self, entry: int, parent: _Node | None, offset: int) -> _Node:
        """Read and check the node ``entry`` points to (``parent`` None: the root)."""
        address = entry - 2  # xa_to_node()
        self.guard.step(address)
        lay, tm = self.layout, self.tm
        try:
            raw = tm.read(address, lay.size)
        except PageFault as fault:
            raise self.error(f"node {address:#x} is unreadable ({fault})") from fault
        order, width = tm.byteorder, tm.btf.pointer_size

        def word(at: int) -> int:
            return int.from_bytes(raw[at : at + width], order)

        shift = raw[lay.shift]
        where = f"node {address:#x}"
        if shift % lay.chunk_shift or shift >= BITS_PER_LONG:
            raise self.error(f"{where} has shift {shift}: not k * {lay.chunk_shift} below 64")
        if parent is not None and shift != parent.shift - lay.chunk_shift:
            raise self.error(f"{where} has shift {shift} under a node of shift {parent.shift}")
        back = parent.address if parent is not None else 0
        if word(lay.parent) != back:
            raise self.error(f"{where} has parent {word(lay.parent):#x}, expected {back:#x}")
        if parent is not None and raw[lay.offset] != offset:
            raise self.error(f"{where} has offset {raw[lay.offset]}, is in slot {offset}")
        if word(lay.array) != self.xa:
            raise self.error(f"{where} belongs to the xarray at {word(lay.array):#x}")
        slots = tuple(word(lay.slots + i * width) for i in range(lay.chunk_size))
        return _Node(address, shift, slots)

    def slot(self, node: _Node, offset: int) -> int:
        """The entry in ``offset``, a sibling followed to its canonical slot
        (``xas_descend()``); a sibling must point to a lower slot."""
        entry = node.slots[offset]
        if self.is_sibling(entry):
            target = entry >> 2  # xa_to_sibling()
            if target >= offset:
                raise self.error(f"node {node.address:#x} slot {offset}: sibling of {target}")
            entry = node.slots[target]
            if self.is_sibling(entry) or (node.shift and xa_is_node(entry)):
                raise self.error(f"node {node.address:#x} slot {target}: bad sibling target")
        return entry

    def is_sibling(self, entry: int) -> bool:
        return xa_is_internal(entry) and entry < _xa_mk_internal(self.layout.chunk_size - 1)

    def leaf(self, entry: int, where: str) -> int | None:
        """An entry that is not a node, as ``xa_load()`` returns it (None: skip it)."""
        if not entry or xa_is_zero(entry):
            return None
        if xa_is_retry(entry):
            raise self.error(f"{where}: retry entry (the array was being changed)")
        if xa_is_internal(entry):
            raise self.error(f"{where}: unexpected internal entry {entry:#x}")
        return entry


def xa_load(xa: Object, index: int) -> Object:
    """The entry at ``index`` (``xa_load()``), NULL if none; a zero entry reads as NULL.

    :param xa: ``struct xarray *`` (or the ``struct xarray`` itself)
    :return: ``void *``
    :raises ValidationError: a wild or inconsistent node, a retry entry
    """
    if not 0 <= index <= _MASK:
        raise ValueError(f"index {index} is not an unsigned long")
    walk = _Walk(xa, DEFAULT_LIMIT)
    void = walk.tm.type("void *")
    entry = walk.head()
    if not xa_is_node(entry):
        found = walk.leaf(entry, "head") if index == 0 else None
        return walk.tm.value(void, found or 0)
    node = walk.node(entry, None, 0)
    if index >> node.shift > walk.layout.chunk_size - 1:
        return walk.tm.value(void, 0)
    while True:
        offset = (index >> node.shift) & (walk.layout.chunk_size - 1)
        entry = walk.slot(node, offset)
        if node.shift and xa_is_node(entry):
            node = walk.node(entry, node, offset)
            continue
        found = walk.leaf(entry, f"node {node.address:#x} slot {offset}")
        return walk.tm.value(void, found or 0)


def xa_for_each(xa: Object, limit: int = DEFAULT_LIMIT) -> Iterator[tuple[int, Object]]:
    """Every present entry in index order, as ``xa_for_each()``: NULL and zero entries
    skipped, a multi-index entry once (at its first index).

    :param xa: ``struct xarray *`` (or the ``struct xarray`` itself)
    :param limit: most nodes to read before raising
    :return: iterator of (index, ``void *``)
    :raises ValidationError: a wild or inconsistent node, too many nodes, a retry entry
    """
    walk = _Walk(xa, limit)
    void = walk.tm.type("void *")
    entry = walk.head()
    if not xa_is_node(entry):
        found = walk.leaf(entry, "head")
        if found is not None:
            yield 0, walk.tm.value(void, found)
        return
    for index, found in _walk_node(walk, walk.node(entry, None, 0), 0):
        yield index, walk.tm.value(void, found)


def _walk_node(walk: _Walk, node: _Node, base: int) -> Iterator[tuple[int, int]]:
    """Entries under ``node``, whose first index is ``base``. Recursion depth is bounded:
    each level's shift is checked to be one step below its parent's."""
    for offset, entry in enumerate(node.slots):
        if walk.is_sibling(entry):
            walk.slot(node, offset)  # checked, reported at its canonical slot
            continue
        index = base + (offset << node.shift)
        if node.shift and xa_is_node(entry):
            yield from _walk_node(walk, walk.node(entry, node, offset), index)
            continue
        found = walk.leaf(entry, f"node {node.address:#x} slot {offset}")
        if found is not None:
            yield index, found


def idr_find(idr: Object, id: int) -> Object:
    """The pointer stored under ``id`` (``idr_find()``), NULL if none.

    :param idr: ``struct idr *`` (or the ``struct idr`` itself)
    :return: ``void *``
    :raises ValidationError: as :func:`xa_load`
    """
    obj = _idr(idr)
    base = int(obj.idr_base)
    if id < base:  # the kernel's unsigned id - base wraps to an index beyond any entry
        return idr.memory_.value("void *", 0)
    return xa_load(obj.idr_rt, id - base)


def idr_for_each(idr: Object, limit: int = DEFAULT_LIMIT) -> Iterator[tuple[int, Object]]:
    """Every (id, pointer) of an IDR in id order, as ``idr_for_each()`` visits them.

    :param idr: ``struct idr *`` (or the ``struct idr`` itself)
    :return: iterator of (id, ``void *``)
    :raises ValidationError: as :func:`xa_for_each`, or an id above ``INT_MAX``
    """
    obj = _idr(idr)
    base = int(obj.idr_base)
    for index, entry in xa_for_each(obj.idr_rt, limit):
        if index + base > INT_MAX:
            raise ValidationError(f"idr at {obj.address_:#x}: id {index + base} > INT_MAX")
        yield index + base, entry


def _idr(idr: Object) -> Object:
    """The ``struct idr`` a ``struct idr *`` or reference object designates."""
    return idr.memory_.object("struct idr", _address(idr, "idr"))
