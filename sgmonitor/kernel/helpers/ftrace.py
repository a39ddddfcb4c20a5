"""Registered ftrace callbacks and kprobes, as in kernel/trace/ftrace.c and
kernel/kprobes.c, validating.

Both are ways to run a function of one's choice at the entry of any kernel function
without touching the kernel's text by hand, which makes them a rootkit's favourite
hooks: ``ftrace_ops_list`` holds every registered ``struct ftrace_ops`` (its ``func``
is the callback, its filter hash the functions it is attached to) and ``kprobe_table``
every ``struct kprobe`` (``pre_handler``/``post_handler``). All walks validate (see
:mod:`.list`): a loop or a wild pointer raises :class:`ValidationError`.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.kernel.helpers.list import (
    DEFAULT_LIMIT,
    WalkGuard,
    hlist_for_each_entry,
    list_for_each_entry,
)
from sgmonitor.kernel.kernel import Kernel
from sgmonitor.kernel.objects import Object

__all__ = ["for_each_ftrace_op", "for_each_kprobe", "ftrace_hash_ips", "kprobe_handlers"]

# FTRACE_HASH_MAX_BITS (kernel/trace/ftrace.c): no filter hash has more buckets.
_FTRACE_HASH_MAX_BITS = 12
# kprobe_table is KPROBE_TABLE_SIZE (1 << KPROBE_HASH_BITS, 64 so far) hlist heads.
_MAX_KPROBE_TABLE = 1 << 12


def for_each_ftrace_op(kernel: Kernel, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Every ``struct ftrace_ops`` on ``ftrace_ops_list``, up to ``&ftrace_list_end``
    (``do_for_each_ftrace_op()``).

    :return: iterator of ``struct ftrace_ops *``
    :raises ValidationError: a NULL link (the list always ends at ``ftrace_list_end``),
        a cycle, too many ops, a wild pointer
    """
    end = kernel.symbols["ftrace_list_end"]
    op = kernel.object("ftrace_ops_list", "struct ftrace_ops *").read_()
    guard = WalkGuard("ftrace_ops_list", limit)
    while int(op) != end:
        if not int(op):
            raise ValidationError("ftrace_ops_list: a NULL link before ftrace_list_end")
        guard.step(int(op))
        yield op
        op = op.next.read_()


def ftrace_hash_ips(hash_: Object, limit: int = DEFAULT_LIMIT) -> list[int]:
    """The instruction addresses in a ``struct ftrace_hash`` (an op's filter or notrace
    hash; empty for the empty hash, which for a filter means every function).

    :param hash_: ``struct ftrace_hash *`` (NULL: no addresses)
    :raises ValidationError: more buckets than ftrace allows, a corrupt bucket list
    """
    if not int(hash_):
        return []
    bits = int(hash_.size_bits)
    if not 0 <= bits <= _FTRACE_HASH_MAX_BITS:
        raise ValidationError(f"ftrace_hash {int(hash_):#x}: {bits} size bits")
    buckets = int(hash_.buckets)
    if not buckets:
        return []
    tm = hash_.memory_
    head_size = tm.sizeof("struct hlist_head")
    ips: list[int] = []
    for i in range(1 << bits):
        head = tm.object("struct hlist_head", buckets + i * head_size)
        entries = hlist_for_each_entry("struct ftrace_func_entry", head, "hlist", limit)
        ips.extend(int(entry.ip) for entry in entries)
        if len(ips) > limit:
            raise ValidationError(f"ftrace_hash {int(hash_):#x}: more than {limit} entries")
    return ips


def for_each_kprobe(kernel: Kernel, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Every registered ``struct kprobe``: each one on ``kprobe_table``, and for an
    aggregated probe (several at one address, ``kprobe_aggrprobe()``) the probes on its
    ``list`` instead of the aggregate itself.

    :return: iterator of ``struct kprobe *``
    :raises ValidationError: a corrupt bucket or aggregate list
    """
    table = kernel.symbols["kprobe_table"]
    found = kernel.symbols.lookup_size_offset(table)  # type: ignore[attr-defined]
    tm = kernel.types
    head_size = tm.sizeof("struct hlist_head")
    count = found[1] // head_size if found is not None and found[2] == 0 else 0
    if not 0 < count <= _MAX_KPROBE_TABLE:
        raise ValidationError(f"kprobe_table has an implausible size ({count} heads)")
    aggregate = kernel.symbols.get("aggr_pre_handler")  # type: ignore[attr-defined]
    for i in range(count):
        head = tm.object("struct hlist_head", table + i * head_size)
        for probe in hlist_for_each_entry("struct kprobe", head, "hlist", limit):
            if aggregate is not None and int(probe.pre_handler) == aggregate:
                yield from list_for_each_entry("struct kprobe", probe.list, "list", limit)
            else:
                yield probe


def kprobe_handlers(kernel: Kernel, probe: Object) -> dict[str, int]:
    """The non-NULL handlers a probe runs, by name: ``pre_handler`` and ``post_handler``,
    and for a kretprobe (``pre_handler_kretprobe``) its ``entry_handler`` and
    ``handler``."""
    handlers = {"pre_handler": int(probe.pre_handler), "post_handler": int(probe.post_handler)}
    if handlers["pre_handler"] == kernel.symbols.get("pre_handler_kretprobe"):  # type: ignore[attr-defined]
        rp = kernel.container_of(probe, "struct kretprobe", "kp")
        handlers = {"entry_handler": int(rp.entry_handler), "handler": int(rp.handler)}
    return {name: address for name, address in handlers.items() if address}
