"""Process ids, as in kernel/pid.c and include/linux/pid.h, validated by default.

A pid namespace maps numbers to ``struct pid`` through its IDR (``ns->idr``, since
v4.15); a ``struct pid`` lists its tasks per ``enum pid_type`` (``pid->tasks[type]``,
linked through ``task->pid_links[type]``). Every ``struct pid`` found is checked to carry
the number it was found under (``pid->numbers[ns->level]``), and every walk validates
(:mod:`.xarray`, :mod:`.list`): hostile data raises
:class:`~sgmonitor.errors.ValidationError`.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.kernel.helpers.list import DEFAULT_LIMIT, hlist_for_each
from sgmonitor.kernel.helpers.sched import HasInitTask
from sgmonitor.kernel.helpers.xarray import idr_find, idr_for_each
from sgmonitor.kernel.objects import Object

__all__ = ["find_pid", "find_task", "for_each_pid", "pid_task"]

MAX_PID_NS_LEVEL = 32  # include/linux/pid_namespace.h


def _ns(kernel_or_ns: HasInitTask | Object) -> Object:
    """``struct pid_namespace *``: the one given, or the kernel's ``init_pid_ns``."""
    if isinstance(kernel_or_ns, Object):
        return kernel_or_ns
    return kernel_or_ns.object("init_pid_ns").address_of_()


def _checked_pid(ns: Object, nr: int, entry: Object) -> Object:
    """``entry`` as a ``struct pid *`` after checking it is ``nr`` in ``ns``."""
    pid = ns.memory_.cast("struct pid *", entry)
    level = int(ns.level)
    if not level <= int(pid.level) <= MAX_PID_NS_LEVEL:
        raise ValidationError(
            f"struct pid at {int(pid):#x} (pid {nr}) has level {int(pid.level)}, "
            f"its namespace {level}"
        )
    upid = pid.member_(f"numbers[{level}]")
    if int(upid.nr) != nr or int(upid.ns) != int(ns):
        raise ValidationError(
            f"struct pid at {int(pid):#x} is {int(upid.nr)} in namespace {int(upid.ns):#x}, "
            f"found as {nr} in {int(ns):#x}"
        )
    return pid


def find_pid(kernel_or_ns: HasInitTask | Object, nr: int) -> Object | None:
    """The ``struct pid *`` of number ``nr`` (``find_pid_ns()``), or None.

    :param kernel_or_ns: ``struct pid_namespace *``, or a kernel (its ``init_pid_ns``)
    :raises ValidationError: a corrupt IDR, or a ``struct pid`` that is not ``nr``
    """
    ns = _ns(kernel_or_ns)
    entry = idr_find(ns.idr, nr)
    return _checked_pid(ns, nr, entry) if int(entry) else None


def for_each_pid(
    kernel_or_ns: HasInitTask | Object, limit: int = DEFAULT_LIMIT
) -> Iterator[Object]:
    """Every ``struct pid *`` of a namespace, by number (its IDR, as ``/proc`` lists).

    :param kernel_or_ns: ``struct pid_namespace *``, or a kernel (its ``init_pid_ns``)
    :raises ValidationError: as :func:`find_pid`
    """
    ns = _ns(kernel_or_ns)
    for nr, entry in idr_for_each(ns.idr, limit):
        yield _checked_pid(ns, nr, entry)


def pid_task(pid: Object | None, type: int | str) -> Object | None:
    """The first task using ``pid`` as ``type`` (``pid_task()``), or None.

    :param pid: ``struct pid *`` (None or NULL: None)
    :param type: ``enum pid_type``, as a number or an enumerator name (``"PIDTYPE_TGID"``,
        looked up in the guest's BTF: the order changed in v4.19)
    :return: ``struct task_struct *``
    :raises ValidationError: the first link of ``pid->tasks[type]`` is broken
    """
    if pid is None or not int(pid):
        return None
    tm = pid.memory_
    if isinstance(type, str):
        type = tm.btf.enumerator_value(type)
    first = next(hlist_for_each(pid.member_(f"tasks[{type}]"), limit=1), None)
    if first is None:
        return None
    return tm.container_of(first, "struct task_struct", f"pid_links[{type}]")


def find_task(kernel_or_ns: HasInitTask | Object, nr: int) -> Object | None:
    """The task with process id ``nr`` (``find_task_by_pid_ns()``), or None.

    :param kernel_or_ns: ``struct pid_namespace *``, or a kernel (its ``init_pid_ns``)
    :return: ``struct task_struct *``
    :raises ValidationError: as :func:`find_pid` and :func:`pid_task`; in the initial
        namespace also a task whose ``pid`` is not ``nr``
    """
    ns = _ns(kernel_or_ns)
    task = pid_task(find_pid(ns, nr), "PIDTYPE_PID")
    if task is not None and int(ns.level) == 0 and int(task.pid) != nr:
        raise ValidationError(f"pid {nr} leads to task {int(task):#x} of pid {int(task.pid)}")
    return task
