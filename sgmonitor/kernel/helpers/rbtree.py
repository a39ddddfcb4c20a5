"""Red-black trees, as in include/linux/rbtree.h and lib/rbtree.c, and the latched trees
of include/linux/rbtree_latch.h, walked with validation by default, in constant memory.

A node's parent is ``__rb_parent_color`` with the two colour bits masked off
(``rb_parent()``). Every step of a walk checks the links it follows both ways:

- going down to a child: ``rb_parent(child) == node``, and a node's two children differ,
- going up: the node is its parent's left or right child,
- the root's parent is NULL, and the walk is back at depth 0 exactly when a parent is NULL,
- at most ``limit`` nodes (default :data:`~sgmonitor.kernel.helpers.list.DEFAULT_LIMIT`)
  and no deeper than a red-black tree of ``limit`` nodes can be (its root-to-leaf paths
  have at most ``2 * log2(n + 1)`` nodes), so a long chain fails as soon as it is that deep,
- every node must be readable (a :class:`~sgmonitor.errors.PageFault` is a wild pointer).

With these checks a static tree is walked once with no visited set: a node reached twice
would need two parents. A guest changing the tree under the walk still cannot make it run
for ever: the node count and the depth bound every walk. Any failure raises
:class:`~sgmonitor.errors.ValidationError`; nodes yielded before it were read, but the walk
as a whole is unverified: report "could not check", not "clean".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from sgmonitor.errors import PageFault, ValidationError
from sgmonitor.kernel.helpers.list import DEFAULT_LIMIT, _address
from sgmonitor.kernel.objects import CType, Object, TypedMemory, TypeKind

__all__ = [
    "latch_tree_for_each",
    "latch_tree_for_each_entry",
    "rb_first",
    "rb_next",
    "rb_parent",
    "rbtree_inorder_for_each",
    "rbtree_inorder_for_each_entry",
]


def _max_depth(limit: int) -> int:
    """How many links below the root a red-black tree of at most ``limit`` nodes can
    reach: its paths have at most ``2 * log2(limit + 1) <= 2 * limit.bit_length()`` nodes."""
    return 2 * limit.bit_length() - 1


# Bound of a lone rb_first()/rb_next() call, which has no node count to derive one from.
MAX_DEPTH = _max_depth(DEFAULT_LIMIT)


@dataclass(frozen=True)
class _Node:
    """One ``struct rb_node`` as read: its parent (colour masked) and children."""

    address: int
    parent: int
    left: int
    right: int


class _Reader:
    """Reads whole ``struct rb_node`` s (layout from BTF) and checks their links."""

    def __init__(self, tm: TypedMemory, what: str) -> None:
        self.tm = tm
        self.what = what
        self.size = tm.sizeof("struct rb_node")
        self.offsets = [
            tm.offsetof("struct rb_node", m) for m in ("__rb_parent_color", "rb_left", "rb_right")
        ]
        self.node_type: CType = tm.type("struct rb_node *")

    def read(self, address: int) -> _Node:
        try:
            raw = self.tm.read(address, self.size)
        except PageFault as fault:
            self.fail(f"node {address:#x} is unreadable ({fault})", fault)
        width = self.tm.btf.pointer_size
        order = self.tm.byteorder
        pc, left, right = (int.from_bytes(raw[o : o + width], order) for o in self.offsets)
        if left and left == right:
            self.fail(f"node {address:#x} has {left:#x} as both children")
        return _Node(address, pc & ~3, left, right)

    def child(self, node: _Node, address: int) -> _Node:
        """Go down from ``node`` to its child at ``address``: ``rb_parent(child) == node``."""
        child = self.read(address)
        if child.parent != node.address:
            self.fail(
                f"node {address:#x} has parent {child.parent:#x}, expected {node.address:#x}"
                " (broken link)"
            )
        return child

    def parent(self, node: _Node) -> _Node:
        """Go up from ``node``: it must be its parent's left or right child."""
        parent = self.read(node.parent)
        if node.address not in (parent.left, parent.right):
            self.fail(
                f"node {node.address:#x} names {parent.address:#x} as parent, which does not"
                " name it as a child (broken link)"
            )
        return parent

    def object(self, node: _Node) -> Object:
        return self.tm.value(self.node_type, node.address)

    def fail(self, why: str, cause: Exception | None = None) -> NoReturn:
        raise ValidationError(f"{self.what}: {why}") from cause


def _root_node(reader: _Reader, root_addr: int) -> _Node | None:
    """``root->rb_node``, checked to have no parent."""
    offset = reader.tm.offsetof("struct rb_root", "rb_node")
    try:
        top = int(reader.tm.object("struct rb_node *", root_addr + offset))
    except PageFault as fault:
        reader.fail("the root is unreadable", fault)
    if not top:
        return None
    node = reader.read(top)
    if node.parent:
        reader.fail(f"root node {top:#x} has parent {node.parent:#x}, expected NULL")
    return node


def _leftmost(reader: _Reader, node: _Node, depth: int, max_depth: int) -> tuple[_Node, int]:
    """Follow ``rb_left`` down from ``node`` (``depth`` links below the root) to the
    leftmost node; ``node`` itself must not be deeper than ``max_depth`` either."""
    while True:
        if depth > max_depth:
            reader.fail(f"deeper than {max_depth} at node {node.address:#x}")
        if not node.left:
            return node, depth
        node = reader.child(node, node.left)
        depth += 1


def rb_parent(node: Object) -> Object:
    """``rb_parent(node)``: ``__rb_parent_color`` with the colour bits masked off.

    :param node: ``struct rb_node *``
    :return: ``struct rb_node *`` (NULL for the root)
    """
    tm = node.memory_
    return tm.value("struct rb_node *", int(node.__rb_parent_color) & ~3)


def rb_first(root: Object) -> Object | None:
    """The first (leftmost) node of a tree, or None if it is empty (``rb_first()``).

    :param root: ``struct rb_root *`` (or the ``struct rb_root`` object itself)
    :return: ``struct rb_node *`` or None
    :raises ValidationError: a broken parent link, a too deep tree, a wild pointer
    """
    root_addr = _address(root, "rb_root")
    reader = _Reader(root.memory_, f"rbtree at {root_addr:#x}")
    top = _root_node(reader, root_addr)
    if top is None:
        return None
    return reader.object(_leftmost(reader, top, 0, MAX_DEPTH)[0])


def rb_next(node: Object) -> Object | None:
    """The next node in sort order, or None after the last one (``rb_next()``).

    :param node: ``struct rb_node *``
    :return: ``struct rb_node *`` or None (also for an empty node, ``RB_EMPTY_NODE``)
    :raises ValidationError: a broken link, a too deep tree, a wild pointer
    """
    address = int(node)
    reader = _Reader(node.memory_, f"rbtree node {address:#x}")
    current = reader.read(address)
    if current.parent == address:  # RB_EMPTY_NODE: the colour bits are 0
        return None
    if current.right:
        child = reader.child(current, current.right)
        return reader.object(_leftmost(reader, child, 1, MAX_DEPTH)[0])
    for _ in range(MAX_DEPTH):
        if not current.parent:
            return None
        parent = reader.parent(current)
        if parent.left == current.address:
            return reader.object(parent)
        current = parent
    reader.fail(f"no root within {MAX_DEPTH} parents")


def rbtree_inorder_for_each(root: Object, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Iterate over the nodes of a tree in sort order, validating every link.

    :param root: ``struct rb_root *`` (or the ``struct rb_root`` object itself)
    :param limit: most nodes to accept before raising
    :return: iterator of ``struct rb_node *``
    :raises ValidationError: a broken link, a tree deeper than a red-black tree of
        ``limit`` nodes can be, more than ``limit`` nodes, a wild pointer
    """
    root_addr = _address(root, "rb_root")
    reader = _Reader(root.memory_, f"rbtree at {root_addr:#x}")
    max_depth = _max_depth(limit)
    top = _root_node(reader, root_addr)
    if top is None:
        return
    node, depth = _leftmost(reader, top, 0, max_depth)
    for _ in range(limit):
        yield reader.object(node)
        if node.right:
            node, depth = _leftmost(reader, reader.child(node, node.right), depth + 1, max_depth)
            continue
        while True:  # up while node is a right child; at most depth steps
            if depth == 0:
                if node.parent:
                    reader.fail(f"node {node.address:#x} at the top has a parent")
                return
            if not node.parent:
                reader.fail(f"node {node.address:#x} at depth {depth} has no parent")
            parent = reader.parent(node)
            depth -= 1
            if parent.left == node.address:
                node = parent
                break
            node = parent
    reader.fail(f"more than {limit} nodes")


def rbtree_inorder_for_each_entry(
    type: str | CType, root: Object, member: str, limit: int = DEFAULT_LIMIT
) -> Iterator[Object]:
    """Iterate over the entries of a tree in sort order, validating every link.

    :param type: entry type, e.g. ``"struct sched_entity"``
    :param root: ``struct rb_root *`` (or the ``struct rb_root`` object itself)
    :param member: name of the ``struct rb_node`` member in ``type`` (e.g. ``"run_node"``)
    :return: iterator of ``type *``
    :raises ValidationError: as :func:`rbtree_inorder_for_each`
    """
    tm = root.memory_
    for node in rbtree_inorder_for_each(root, limit):
        yield tm.container_of(node, type, member)


def _latch_index(root: Object, index: int | None) -> int:
    """The copy a reader would use, ``raw_read_seqcount_latch(&root->seq) & 1``, or the
    one asked for (0 or 1)."""
    if index is None:
        return int(root.seq.seqcount.sequence) & 1
    if index not in (0, 1):
        raise ValueError(f"a latched tree has copies 0 and 1, not {index}")
    return index


def latch_tree_for_each(
    root: Object, index: int | None = None, limit: int = DEFAULT_LIMIT
) -> Iterator[Object]:
    """Iterate over the nodes of one copy of a latched tree in sort order, validating.

    A ``struct latch_tree_root`` holds two rbtrees, ``tree[2]``; each ``struct
    latch_tree_node`` sits in both, through ``node[0]`` and ``node[1]``. Writers update
    one copy while readers use the other (include/linux/rbtree_latch.h).

    :param root: ``struct latch_tree_root *`` (or the object itself)
    :param index: the copy (0 or 1); None for the one ``latch_tree_find()`` would read,
        ``seq & 1``
    :return: iterator of ``struct latch_tree_node *``
    :raises ValidationError: as :func:`rbtree_inorder_for_each`
    """
    tm = root.memory_
    if root.type_.kind == TypeKind.POINTER:
        root = root.deref_()
    copy = _latch_index(root, index)
    offset = tm.offsetof("struct latch_tree_node", "node") + copy * tm.sizeof("struct rb_node")
    node_type = tm.type("struct latch_tree_node *")
    for node in rbtree_inorder_for_each(root.tree[copy], limit):
        yield tm.value(node_type, int(node) - offset)


def latch_tree_for_each_entry(
    type: str | CType,
    root: Object,
    member: str,
    index: int | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Iterator[Object]:
    """Iterate over the entries of one copy of a latched tree, validating every link.

    :param type: entry type, e.g. ``"struct mod_tree_node"``
    :param root: ``struct latch_tree_root *`` (or the object itself)
    :param member: name of the ``struct latch_tree_node`` member in ``type``
    :return: iterator of ``type *``
    :raises ValidationError: as :func:`rbtree_inorder_for_each`
    """
    tm = root.memory_
    for node in latch_tree_for_each(root, index, limit):
        yield tm.container_of(node, type, member)
