"""Doubly linked lists, as in include/linux/list.h, walked with validation by default.

drgn trusts guest data unless asked (``validate_list_for_each``); a monitor facing a
hostile guest can't, so every walk here checks each link as it goes:

- ``next->prev == pos`` (``hlist``: ``node->pprev == &prev->next``),
- no node is visited twice (a cycle that skips the head would otherwise never end):
  Brent's cycle detection, in constant memory, see :class:`WalkGuard`,
- at most ``limit`` nodes (default :data:`DEFAULT_LIMIT`, 2**20: far above any real
  kernel list, small enough to bound the work),
- every node must be readable (a :class:`~sgmonitor.errors.PageFault` is a wild pointer).

Any failure raises :class:`~sgmonitor.errors.ValidationError` naming the list and the
node address. Iterators raise when they reach the bad link, so nodes yielded before it
were read but the walk as a whole is unverified: report "could not check", not "clean".
Layouts come from BTF (``struct list_head``, ``struct hlist_node``), never hard-coded.

An address space that offers ``prefetch_list`` (the enclave's ``RemoteMemory``) is asked
to fetch the entries of a ``list_for_each_entry`` walk in bulk first: one crossing for a
window of entries instead of one per entry. That is only a hint: the walk still reads
and validates every link itself, and a failed prefetch changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from sgmonitor.errors import GuestDataError, PageFault, ValidationError
from sgmonitor.kernel.objects import CType, Object, TypedMemory, TypeKind

__all__ = [
    "DEFAULT_LIMIT",
    "WalkGuard",
    "hlist_empty",
    "hlist_for_each",
    "hlist_for_each_entry",
    "list_empty",
    "list_first_entry",
    "list_first_entry_or_null",
    "list_for_each",
    "list_for_each_entry",
]

DEFAULT_LIMIT = 1 << 20
_U64_MASK = (1 << 64) - 1


class WalkGuard:
    """The guard of one walk over guest data: a hard bound and a cycle check.

    Call :meth:`step` with each node's address before using it. Cycles are found with
    Brent's algorithm (a saved node, replaced at power-of-two distances): constant
    memory, and a cycle of length L entered after M nodes is seen within about
    M + 2L steps. Either failure raises :class:`~sgmonitor.errors.ValidationError`
    naming the walk (``what``) and the node.
    """

    __slots__ = ("_power", "_saved", "_since", "count", "limit", "what")

    def __init__(self, what: str, limit: int = DEFAULT_LIMIT) -> None:
        self.what = what
        self.limit = limit
        self.count = 0
        self._saved: int | None = None
        self._power = 1
        self._since = 0

    def step(self, pos: int) -> None:
        """Account for visiting ``pos``: a cycle or node ``limit + 1`` raises."""
        if pos == self._saved:
            raise ValidationError(f"{self.what}: node {pos:#x} seen twice (cycle)")
        if self.count >= self.limit:
            raise ValidationError(f"{self.what}: more than {self.limit} nodes")
        self.count += 1
        self._since += 1
        if self._since == self._power:  # Brent: move the saved node, double the distance
            self._saved, self._power, self._since = pos, self._power * 2, 0


def _address(obj: Object, struct_name: str) -> int:
    """The address of a ``struct X`` given as ``struct X *`` or as a reference object."""
    t = obj.type_
    if t.kind == TypeKind.POINTER:
        return int(obj)
    if obj.address_ is None or t.kind != TypeKind.STRUCT:
        raise TypeError(f"expected struct {struct_name} * or a struct {struct_name}, got {t}")
    return obj.address_


def _links(tm: TypedMemory, struct_name: str, a: str, b: str) -> tuple[int, int, int]:
    """(size, offset of ``a``, offset of ``b``) of ``struct struct_name``, from BTF."""
    spec = f"struct {struct_name}"
    return tm.sizeof(spec), tm.offsetof(spec, a), tm.offsetof(spec, b)


def _read_pair(
    tm: TypedMemory, what: str, address: int, layout: tuple[int, int, int]
) -> tuple[int, int]:
    """Both link pointers of one node in one read; a fault is a wild pointer."""
    size, first, second = layout
    try:
        raw = tm.read(address, size)
    except PageFault as fault:
        raise ValidationError(f"{what}: node {address:#x} is unreadable ({fault})") from fault
    order = tm.byteorder
    width = tm.btf.pointer_size
    return (
        int.from_bytes(raw[first : first + width], order),
        int.from_bytes(raw[second : second + width], order),
    )


def list_for_each(head: Object, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Iterate over the nodes of a list, validating every link.

    :param head: ``struct list_head *`` (or the ``struct list_head`` object itself)
    :param limit: most nodes to accept before raising
    :return: iterator of ``struct list_head *``
    :raises ValidationError: a broken ``prev`` link, a cycle, too many nodes, a wild pointer
    """
    tm = head.memory_
    node_type: CType = tm.type("struct list_head *")
    for pos in _list_nodes(head, limit):
        yield tm.value(node_type, pos)


def _list_nodes(head: Object, limit: int) -> Iterator[int]:
    """:func:`list_for_each`'s walk, yielding each node's address (no object a node)."""
    tm = head.memory_
    layout = _links(tm, "list_head", "next", "prev")
    head_addr = _address(head, "list_head")
    guard = WalkGuard(f"list at {head_addr:#x}", limit)
    what = guard.what
    prev = head_addr
    pos, _ = _read_pair(tm, what, head_addr, layout)
    while True:
        nxt, back = _read_pair(tm, what, pos, layout)
        if back != prev:
            raise ValidationError(
                f"{what}: node {pos:#x} has prev {back:#x}, expected {prev:#x} (broken link)"
            )
        if pos == head_addr:
            return
        guard.step(pos)
        yield pos
        prev, pos = pos, nxt


def _prefetcher(
    tm: TypedMemory, type: str | CType, head: Object, member: str, limit: int
) -> Callable[[int | None], int | None] | None:
    """The memory's ``prefetch_list`` bound to this list's layout, or None without one.

    It returns the last node it fetched when more may follow (ask again ``after`` it).
    A guest-data error while prefetching is dropped: the walk will meet it and report it.
    """
    prefetch = getattr(tm.memory, "prefetch_list", None)
    if prefetch is None:
        return None
    # Only memory that prefetches (the enclave's) takes the wire's list walk: the
    # traditional path never imports the wire (~16 ms of a cold start).
    from sgmonitor.wire.core import WireError
    from sgmonitor.wire.sealed import ListWalk

    try:  # a head the trusted side can't walk (unaligned, say): the walk reads it
        walk = ListWalk(
            _address(head, "list_head"),
            tm.offsetof("struct list_head", "next"),
            tm.offsetof(type, member),
            tm.sizeof(type),
            limit,
        )
    except WireError:
        return None

    def fetch(after: int | None) -> int | None:
        try:
            found = prefetch(replace(walk, after=after or 0))
        except (GuestDataError, WireError):
            return None
        return found if isinstance(found, int) else None

    return fetch


def list_for_each_entry(
    type: str | CType, head: Object, member: str, limit: int = DEFAULT_LIMIT
) -> Iterator[Object]:
    """Iterate over the entries of a list, validating every link.

    :param type: entry type, e.g. ``"struct task_struct"``
    :param head: ``struct list_head *`` (or the ``struct list_head`` object itself)
    :param member: name of the ``struct list_head`` member in ``type`` (e.g. ``"tasks"``)
    :return: iterator of ``type *``
    :raises ValidationError: as :func:`list_for_each`
    """
    tm = head.memory_
    entry_type = tm.type(type)
    offset = tm.offsetof(entry_type, member)  # container_of's, resolved once a walk
    pointer = entry_type.pointer()
    prefetch = _prefetcher(tm, entry_type, head, member, limit)
    resume = prefetch(None) if prefetch is not None else None
    for node in _list_nodes(head, limit):
        if prefetch is not None and resume is not None and node == resume:
            resume = prefetch(resume)  # reached the end of the window: fetch the next
        yield Object(tm, pointer, None, (node - offset) & _U64_MASK)


def _checked_first(head: Object) -> tuple[int, int]:
    """(address of head, ``head->next``) after checking ``head->next->prev == head``."""
    tm = head.memory_
    layout = _links(tm, "list_head", "next", "prev")
    head_addr = _address(head, "list_head")
    what = f"list at {head_addr:#x}"
    first, _ = _read_pair(tm, what, head_addr, layout)
    _, back = _read_pair(tm, what, first, layout)
    if back != head_addr:
        raise ValidationError(
            f"{what}: node {first:#x} has prev {back:#x}, expected {head_addr:#x} (broken link)"
        )
    return head_addr, first


def list_empty(head: Object) -> bool:
    """Whether a list is empty, after checking its first link both ways.

    :param head: ``struct list_head *`` (or the ``struct list_head`` object itself)
    :raises ValidationError: ``head->next->prev != head`` or an unreadable node
    """
    head_addr, first = _checked_first(head)
    return first == head_addr


def list_first_entry_or_null(head: Object, type: str | CType, member: str) -> Object | None:
    """The first entry of a list, or None if it is empty (first link validated).

    :param head: ``struct list_head *`` (or the ``struct list_head`` object itself)
    :return: ``type *`` or None
    :raises ValidationError: as :func:`list_empty`
    """
    head_addr, first = _checked_first(head)
    if first == head_addr:
        return None
    return head.memory_.container_of(first, type, member)


def list_first_entry(head: Object, type: str | CType, member: str) -> Object:
    """The first entry of a non-empty list (first link validated).

    :param head: ``struct list_head *`` (or the ``struct list_head`` object itself)
    :return: ``type *``
    :raises ValueError: the list is empty (C would return garbage)
    """
    entry = list_first_entry_or_null(head, type, member)
    if entry is None:
        raise ValueError("list_first_entry() of an empty list")
    return entry


def hlist_empty(head: Object) -> bool:
    """Whether a hash list is empty.

    :param head: ``struct hlist_head *`` (or the ``struct hlist_head`` object itself)
    """
    return not _hlist_first(head.memory_, _address(head, "hlist_head"))


def _hlist_first(tm: TypedMemory, head_addr: int) -> int:
    """``head->first`` of the ``struct hlist_head`` at ``head_addr``; a fault is a wild
    pointer."""
    try:
        return int(tm.object("struct hlist_head", head_addr).first)
    except PageFault as fault:
        raise ValidationError(f"hlist at {head_addr:#x} is unreadable ({fault})") from fault


def hlist_for_each(head: Object, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Iterate over the nodes of a hash list, validating every ``pprev`` link.

    :param head: ``struct hlist_head *`` (or the ``struct hlist_head`` object itself)
    :return: iterator of ``struct hlist_node *``
    :raises ValidationError: ``node->pprev != &prev->next``, a cycle, too many nodes, a
        wild pointer
    """
    tm = head.memory_
    layout = _links(tm, "hlist_node", "next", "pprev")
    next_off = layout[1]
    node_type = tm.type("struct hlist_node *")
    head_addr = _address(head, "hlist_head")
    guard = WalkGuard(f"hlist at {head_addr:#x}", limit)
    what = guard.what
    first_off = tm.offsetof("struct hlist_head", "first")
    pos = _hlist_first(tm, head_addr)
    link = head_addr + first_off  # the address that must hold pos: &head->first
    while pos:
        guard.step(pos)
        nxt, pprev = _read_pair(tm, what, pos, layout)
        if pprev != link:
            raise ValidationError(
                f"{what}: node {pos:#x} has pprev {pprev:#x}, expected {link:#x} (broken link)"
            )
        yield tm.value(node_type, pos)
        link, pos = pos + next_off, nxt


def hlist_for_each_entry(
    type: str | CType, head: Object, member: str, limit: int = DEFAULT_LIMIT
) -> Iterator[Object]:
    """Iterate over the entries of a hash list, validating every link.

    :param type: entry type, e.g. ``"struct pid"``
    :param head: ``struct hlist_head *`` (or the ``struct hlist_head`` object itself)
    :param member: name of the ``struct hlist_node`` member in ``type``
    :return: iterator of ``type *``
    :raises ValidationError: as :func:`hlist_for_each`
    """
    tm = head.memory_
    for node in hlist_for_each(head, limit):
        yield tm.container_of(node, type, member)
