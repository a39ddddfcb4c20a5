"""Per-CPU data and runqueues, as in include/linux/percpu-defs.h, include/linux/cpumask.h
and kernel/sched/sched.h, validating.

A per-CPU symbol's kallsyms address is an offset into the per-CPU area (x86-64's
absolute per-CPU symbols); CPU ``n``'s copy is at that offset plus
``__per_cpu_offset[n]``. CPU numbers are checked against ``nr_cpu_ids``, itself checked
against :data:`MAX_NR_CPUS`, so hostile values bound every loop.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.kernel.helpers.list import DEFAULT_LIMIT
from sgmonitor.kernel.helpers.rbtree import rbtree_inorder_for_each_entry
from sgmonitor.kernel.kernel import Kernel
from sgmonitor.kernel.objects import Object

__all__ = [
    "MAX_NR_CPUS",
    "cpu_curr",
    "cpu_rq",
    "for_each_online_cpu",
    "for_each_runqueue_task",
    "nr_cpu_ids",
    "per_cpu",
    "per_cpu_ptr",
]

# The largest NR_CPUS x86-64 allows (CONFIG_MAXSMP, arch/x86/Kconfig NR_CPUS_RANGE_END).
MAX_NR_CPUS = 8192
# Task groups nest at most this deep here (a cgroup tree is rarely more than a few deep).
MAX_GROUP_DEPTH = 64


def nr_cpu_ids(kernel: Kernel) -> int:
    """``nr_cpu_ids`` (``unsigned int``, kernel/smp.c): one more than the highest possible
    CPU number.

    :raises ValidationError: 0 or more than :data:`MAX_NR_CPUS`
    """
    count = int(kernel.object("nr_cpu_ids", "unsigned int"))
    if not 0 < count <= MAX_NR_CPUS:
        raise ValidationError(f"nr_cpu_ids is {count}, not in 1..{MAX_NR_CPUS}")
    return count


def _check_cpu(kernel: Kernel, cpu: int) -> None:
    if not 0 <= cpu < nr_cpu_ids(kernel):
        raise ValueError(f"CPU {cpu} is not below nr_cpu_ids")


def per_cpu_ptr(kernel: Kernel, ptr: Object | int, cpu: int) -> Object | int:
    """``per_cpu_ptr(ptr, cpu)``: CPU ``cpu``'s copy of per-CPU ``ptr``.

    :param ptr: a pointer into the per-CPU area (``T __percpu *``), or its address as an int
    :return: ``T *`` (an int for an int)
    :raises ValueError: ``cpu`` is not below ``nr_cpu_ids``
    """
    _check_cpu(kernel, cpu)
    offsets = kernel.object("__per_cpu_offset", f"unsigned long [{MAX_NR_CPUS}]")
    offset = int(offsets[cpu])
    address = (int(ptr) + offset) & 0xFFFFFFFFFFFFFFFF
    return address if isinstance(ptr, int) else kernel.types.value(ptr.type_, address)


def per_cpu(kernel: Kernel, name: str, cpu: int) -> Object:
    """``per_cpu(var, cpu)``: CPU ``cpu``'s copy of the per-CPU variable ``name``, typed
    from its BTF ``VAR`` record (vmlinux BTF describes every per-CPU variable).

    :return: a reference object of the variable's type
    """
    var = kernel.object(name)
    address = per_cpu_ptr(kernel, var.address_of_(), cpu)
    return var.memory_.object(var.type_, int(address))


def for_each_online_cpu(kernel: Kernel) -> Iterator[int]:
    """The CPU numbers set in ``__cpu_online_mask`` (``struct cpumask``, kernel/cpu.c),
    below ``nr_cpu_ids``.

    :return: iterator of ``int``
    """
    count = nr_cpu_ids(kernel)
    word = kernel.types.sizeof("unsigned long")
    size = (count + 8 * word - 1) // (8 * word) * word  # BITS_TO_LONGS(nr_cpu_ids) longs
    raw = kernel.types.read(kernel.symbols["__cpu_online_mask"], size)
    bits = int.from_bytes(raw, kernel.types.byteorder)
    return (cpu for cpu in range(count) if bits >> cpu & 1)


def cpu_rq(kernel: Kernel, cpu: int) -> Object:
    """``cpu_rq(cpu)``: the CPU's runqueue, ``&per_cpu(runqueues, cpu)``.

    :return: ``struct rq *``
    """
    return per_cpu(kernel, "runqueues", cpu).address_of_()


def cpu_curr(kernel: Kernel, cpu: int) -> Object:
    """``cpu_curr(cpu)``: the task running on the CPU (its idle task when idle).

    :return: ``struct task_struct *``
    """
    return cpu_rq(kernel, cpu).curr


def _cfs_tasks(cfs_rq: Object, limit: int, depth: int = 0) -> Iterator[Object]:
    """The tasks queued in a ``struct cfs_rq *`` tree: entities with ``my_q`` are task
    groups (CONFIG_FAIR_GROUP_SCHED), whose own queue is walked in turn."""
    if depth > MAX_GROUP_DEPTH:
        raise ValidationError(f"cfs_rq {int(cfs_rq):#x}: groups nest deeper than {depth - 1}")
    timeline = cfs_rq.tasks_timeline.rb_root
    for se in rbtree_inorder_for_each_entry("struct sched_entity", timeline, "run_node", limit):
        try:
            group = int(se.my_q)
        except AttributeError:  # no CONFIG_FAIR_GROUP_SCHED: every entity is a task
            group = 0
        if group:
            yield from _cfs_tasks(se.my_q, limit, depth + 1)
        else:
            yield se.memory_.container_of(se, "struct task_struct", "se")


def for_each_runqueue_task(
    kernel: Kernel, cpu: int, limit: int = DEFAULT_LIMIT
) -> Iterator[Object]:
    """The CPU's running task (``rq->curr``), then the tasks queued in its CFS tree
    (``rq->cfs.tasks_timeline`` of ``sched_entity.run_node``, in vruntime order). The
    running task is not in the tree; real-time and deadline queues are not walked.

    :return: iterator of ``struct task_struct *``
    :raises ValidationError: a corrupt tree
    """
    rq = cpu_rq(kernel, cpu)
    yield rq.curr
    yield from _cfs_tasks(rq.cfs.address_of_(), limit)
