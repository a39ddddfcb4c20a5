"""Loaded kernel modules, as in include/linux/module.h and kernel/module/, validating.

Two views of the same modules: the ``modules`` list (``struct module`` linked through
``list``) and ``mod_tree``, the latched rbtree of address ranges that
``__module_address()`` searches. A rootkit that unlinks itself from one and not the other
shows up as a difference between :func:`for_each_module` and
:func:`for_each_mod_tree_module`. All walks validate (see :mod:`.list`, :mod:`.rbtree`).
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.kernel.helpers.list import DEFAULT_LIMIT, list_for_each_entry
from sgmonitor.kernel.helpers.rbtree import latch_tree_for_each_entry
from sgmonitor.kernel.kernel import Kernel
from sgmonitor.kernel.objects import Object

__all__ = [
    "address_to_module",
    "find_module",
    "for_each_mod_tree_module",
    "for_each_module",
    "module_address_regions",
    "module_name",
]


def for_each_module(kernel: Kernel, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Every module on the ``modules`` list (kernel/module/main.c), loading ones too.

    :return: iterator of ``struct module *``
    :raises ValidationError: the list is corrupt (cycle, broken link, wild pointer)
    """
    return list_for_each_entry("struct module", kernel.object("modules"), "list", limit)


def module_name(mod: Object) -> str:
    """The module's name, ``mod->name`` (``char [MODULE_NAME_LEN]``).

    :param mod: ``struct module *``
    """
    return mod.name.string_()


def find_module(kernel: Kernel, name: str) -> Object | None:
    """The module called ``name`` on the ``modules`` list, or None (``find_module()``).

    :return: ``struct module *`` or None
    :raises ValidationError: as :func:`for_each_module`
    """
    return next((mod for mod in for_each_module(kernel) if module_name(mod) == name), None)


def _module_memories(mod: Object) -> list[Object]:
    """The module's memory regions: ``struct module_memory mem[MOD_MEM_NUM_TYPES]`` since
    v6.4 (commit ac3b43283923, "module: replace module_layout with module_memory"),
    ``struct module_layout core_layout, init_layout`` before. Both have ``base``,
    ``size`` and ``mtn``."""
    try:
        return list(mod.mem)
    except AttributeError:
        return [mod.core_layout, mod.init_layout]


def module_address_regions(mod: Object) -> list[tuple[int, int]]:
    """The (start, size) of each non-empty memory region of a module (core and init).

    :param mod: ``struct module *``
    """
    regions = [(int(m.base), int(m.size)) for m in _module_memories(mod)]
    return [(start, size) for start, size in regions if size]


def address_to_module(kernel: Kernel, address: int) -> Object | None:
    """The module whose memory holds ``address``, or None (``__module_address()``, but
    from the ``modules`` list, not ``mod_tree``).

    :return: ``struct module *`` or None
    :raises ValidationError: as :func:`for_each_module`
    """
    for mod in for_each_module(kernel):
        if any(start <= address < start + size for start, size in module_address_regions(mod)):
            return mod
    return None


def for_each_mod_tree_module(kernel: Kernel, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Every module in ``mod_tree`` (the copy ``latch_tree_find()`` reads), once each,
    in the order of its lowest region.

    Each node is the ``struct mod_tree_node`` of one region, whose ``mod`` names its
    module; that module's region must hold this very node, or the tree lies.
    (``mod_tree`` exists with CONFIG_MODULES_TREE_LOOKUP: LookupError without it.)

    :return: iterator of ``struct module *``
    :raises ValidationError: a corrupt tree, or a node its module does not own
    """
    mod_tree = kernel.object("mod_tree", "struct mod_tree_root")
    seen: set[int] = set()
    nodes = latch_tree_for_each_entry("struct mod_tree_node", mod_tree.root, "node", None, limit)
    for mtn in nodes:
        mod = mtn.mod.read_()  # a value: read once
        owned = {m.mtn.address_ for m in _module_memories(mod)}
        if int(mtn) not in owned:
            raise ValidationError(
                f"mod_tree: node {int(mtn):#x} names module {int(mod):#x}, which does not hold it"
            )
        if int(mod) not in seen:
            seen.add(int(mod))
            yield mod
