"""Processes, as in include/linux/sched.h, sched/signal.h and fs/proc/array.c.

All walks validate (see :mod:`.list`): a hostile task list ends in a
:class:`~sgmonitor.errors.ValidationError`, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from sgmonitor.kernel.helpers.list import DEFAULT_LIMIT, list_for_each_entry
from sgmonitor.kernel.objects import Object, TypedMemory

__all__ = [
    "for_each_process",
    "for_each_thread",
    "get_kthread_comm",
    "kthread_data",
    "proc_task_name",
    "state_to_char",
    "task_cred_uid",
    "task_ppid",
    "task_state",
    "task_state_member",
    "task_state_to_char",
    "to_kthread",
    "wq_worker_comm",
]

# include/linux/sched.h
PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000

# fs/proc/array.c: task_state_array[], indexed by fls(state & TASK_REPORT).
_TASK_STATE_CHARS = "RSDTtXZPI"
_TASK_REPORT = 0x7F  # RUNNING..PARKED bits (include/linux/sched.h)
_TASK_UNINTERRUPTIBLE = 0x2
_TASK_NOLOAD = 0x400
_TASK_IDLE = _TASK_UNINTERRUPTIBLE | _TASK_NOLOAD
_TASK_RTLOCK_WAIT = 0x1000
_TASK_REPORT_IDLE = _TASK_REPORT + 1
# proc_task_name() formats into a 64-byte buffer (fs/proc/array.c).
_PROC_NAME_MAX = 64


class HasInitTask(Protocol):
    types: TypedMemory

    def object(self, name: str, type_name: str | None = None) -> Object: ...


def for_each_process(kernel: HasInitTask, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Every thread-group leader, as ``for_each_process()`` walks them: the
    ``init_task.tasks`` ring, without ``init_task`` (the idle task, pid 0) itself.

    :return: iterator of ``struct task_struct *``
    :raises ValidationError: the list is corrupt (cycle, broken link, wild pointer)
    """
    init_task = kernel.object("init_task")
    return list_for_each_entry("struct task_struct", init_task.tasks, "tasks", limit)


def for_each_thread(task: Object, limit: int = DEFAULT_LIMIT) -> Iterator[Object]:
    """Every thread of ``task``'s thread group (``for_each_thread()``), in list order
    (the leader first, unless a thread other than it exec'd: ``de_thread()``).

    Walks ``signal->thread_head`` through ``thread_node`` (v3.14, commit 0c740d0afc3b,
    "introduce for_each_thread() to replace the buggy while_each_thread()"); older
    kernels only have the headless ``thread_group`` ring, which v6.7 removed (commit
    8e1f385104ac, "kill task_struct->thread_group").

    :param task: ``struct task_struct *``
    :return: iterator of ``struct task_struct *``
    :raises ValidationError: the thread list is corrupt
    """
    try:
        head = task.signal.thread_head
    except AttributeError:
        leader = task.group_leader
        yield leader
        yield from list_for_each_entry(
            "struct task_struct", leader.thread_group, "thread_group", limit
        )
        return
    yield from list_for_each_entry("struct task_struct", head, "thread_node", limit)


def task_state_member(tm: TypedMemory) -> str:
    """The name of the scheduler state member: ``__state`` since v5.14 (commit
    2f064a59a11f, "sched: Change task_struct::state"), ``state`` before."""
    try:
        tm.offsetof("struct task_struct", "__state")
    except (AttributeError, LookupError):
        return "state"
    return "__state"


def task_state(task: Object) -> int:
    """The raw scheduler state of a ``struct task_struct *`` (its member's name:
    :func:`task_state_member`)."""
    return int(task.member_(task_state_member(task.memory_)))


def task_state_to_char(task: Object) -> str:
    """The one-letter state /proc shows (``task_state_to_char()``, fs/proc/array.c).

    :param task: ``struct task_struct *``
    """
    return state_to_char(task_state(task), int(task.exit_state))


def state_to_char(tsk_state: int, exit_state: int) -> str:
    """:func:`task_state_to_char` from the two fields it reads, already read."""
    state = (tsk_state | exit_state) & _TASK_REPORT
    if tsk_state == _TASK_IDLE:
        state = _TASK_REPORT_IDLE
    if tsk_state == _TASK_RTLOCK_WAIT:
        state = _TASK_UNINTERRUPTIBLE
    index = state.bit_length()  # fls()
    return _TASK_STATE_CHARS[index] if index < len(_TASK_STATE_CHARS) else "?"


def task_ppid(task: Object) -> int:
    """The parent's tgid, as /proc/PID/status prints ``PPid`` (``real_parent->tgid``).

    :param task: ``struct task_struct *``
    """
    return int(task.real_parent.tgid)


def task_cred_uid(task: Object) -> int:
    """The real uid (``task->cred->uid.val``), the first ``Uid`` field of /proc status.

    :param task: ``struct task_struct *``
    """
    return int(task.cred.uid.val)


def to_kthread(task: Object) -> Object | None:
    """The ``struct kthread *`` of a kernel thread (kernel/kthread.c), or None.

    Kept in ``worker_private`` since v5.17 (commit e32cf5dfbe22, "kthread: Generalize
    pf_io_worker so it can point to struct kthread"), in ``set_child_tid`` before.
    """
    if not int(task.flags) & PF_KTHREAD:
        return None
    try:
        private = task.worker_private
    except AttributeError:
        private = task.set_child_tid
    pointer = int(private)
    return task.memory_.value("struct kthread *", pointer) if pointer else None


def kthread_data(task: Object) -> Object | None:
    """The ``data`` a kernel thread was created with (``kthread_data()``), or None."""
    kthread = to_kthread(task)
    return kthread.data if kthread is not None else None


def get_kthread_comm(task: Object) -> str:
    """A kernel thread's full name (``get_kthread_comm()``): ``kthread->full_name`` when
    the name did not fit ``comm`` (v6.1, commit d6986ce24fc0), else ``comm``."""
    kthread = to_kthread(task)
    try:
        full_name = kthread.full_name if kthread is not None else None
    except AttributeError:
        full_name = None
    if full_name is not None and int(full_name):
        return full_name.string_(_PROC_NAME_MAX)
    return task.comm.string_()


def wq_worker_comm(task: Object) -> str:
    """A workqueue worker's name as /proc shows it (``wq_worker_comm()``,
    kernel/workqueue.c): ``comm`` then ``+desc`` while running a work item, ``-desc``
    after. The description is volatile: it names the last work the worker ran."""
    name = task.comm.string_()
    data = kthread_data(task)
    if data is None:
        return name
    worker = task.memory_.cast("struct worker *", data)
    if not int(worker.pool):
        return name
    desc = worker.desc.string_()
    if desc:
        name += ("+" if int(worker.current_work) else "-") + desc
    return name[: _PROC_NAME_MAX - 1]


def proc_task_name(task: Object) -> str:
    """The name /proc/PID/status and /proc/PID/comm print (``proc_task_name()``,
    fs/proc/array.c), unescaped.

    :param task: ``struct task_struct *``
    """
    flags = int(task.flags)
    if flags & PF_WQ_WORKER:
        return wq_worker_comm(task)
    if flags & PF_KTHREAD:
        return get_kthread_comm(task)
    return task.comm.string_()
