"""Hidden processes: a cross-view of three places the kernel keeps its tasks.

The task list (``init_task.tasks``: what ``for_each_process`` and most tools walk), the
PID IDR of every PID namespace (what ``/proc`` lists and ``kill`` finds, in the host and
in each container), and the run queues (what the scheduler runs). A rootkit that unlinks
a task from the list to hide it leaves it in the others; one that takes a number out of
a container's IDR hides the process from ``ps`` in that container only. A task present
in one view and missing from another is a finding (Volatility's ``psxview`` idea,
without its symbol files). A process has a number in its own namespace and in each
ancestor: ``thread_pid->numbers[0..level]``, each of which must find it again.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.percpu import for_each_online_cpu, for_each_runqueue_task
from sgmonitor.kernel.helpers.pid import MAX_PID_NS_LEVEL, find_pid, for_each_pid, pid_task
from sgmonitor.kernel.helpers.sched import for_each_process
from sgmonitor.kernel.objects import Object


def _leader(task: Object) -> Object:
    return task.group_leader


def _hidden(task: Object, view: str) -> Finding:
    pid = int(task.pid)
    return Finding(
        "hidden_processes",
        "critical",
        f"pid {pid} ({task.comm.string_()}) is in the {view} but not on the task list",
        pid=pid,
        address=int(task),
        expected="on init_task.tasks",
        found=f"only in the {view}",
    )


def _numbers(task: Object) -> list[tuple[int, Object, int]]:
    """(level, ``struct pid_namespace *``, number) of the task's pid at every level."""
    pid = task.thread_pid
    level = int(pid.level)
    if not 0 <= level <= MAX_PID_NS_LEVEL:
        raise ValidationError(f"struct pid {int(pid):#x} has level {level}")
    upids = [pid.member_(f"numbers[{i}]") for i in range(level + 1)]
    return [(i, upid.ns.read_(), int(upid.nr)) for i, upid in enumerate(upids)]


@check("hidden_processes", "cross-view of the task list, every PID IDR and the run queues")
def run(kernel: object) -> Iterator[Finding]:
    """``struct task_struct *`` from each view, compared by address."""
    listed = {int(task): task for task in for_each_process(kernel)}  # type: ignore[arg-type]
    namespaces = {int(kernel.object("init_pid_ns").address_): 0}  # type: ignore[attr-defined]
    for address, task in listed.items():
        for level, ns, nr in _numbers(task):
            namespaces.setdefault(int(ns), level)
            found = pid_task(find_pid(ns, nr), "PIDTYPE_PID")
            if found is None or int(found) != address:
                pid = int(task.pid)
                where = "the PID IDR" if level == 0 else f"the PID IDR of namespace level {level}"
                yield Finding(
                    "hidden_processes",
                    "critical",
                    f"pid {pid} ({task.comm.string_()}) is on the task list but not in {where}"
                    + (f" (as {nr})" if level else ""),
                    pid=pid,
                    address=address,
                    expected=f"found as {nr} (find_pid_ns), as /proc finds it",
                    found="missing" if found is None else f"another task {int(found):#x}",
                )
    reported: set[int] = set()
    tm = kernel.types  # type: ignore[attr-defined]
    for ns_address, level in namespaces.items():
        ns = tm.object("struct pid_namespace", ns_address).address_of_()
        for struct_pid in for_each_pid(ns):
            found_task = pid_task(struct_pid, "PIDTYPE_PID")
            if found_task is None:
                continue
            leader = _leader(found_task)
            if int(leader) not in listed and int(leader) not in reported:
                reported.add(int(leader))
                yield _hidden(leader, "PID IDR" if level == 0 else f"PID IDR of level {level}")
    for cpu in for_each_online_cpu(kernel):  # type: ignore[arg-type]
        for task in for_each_runqueue_task(kernel, cpu):  # type: ignore[arg-type]
            leader = _leader(task)
            if int(leader.pid) == 0:  # the idle task runs when nothing else does
                continue
            if int(leader) not in listed and int(leader) not in reported:
                reported.add(int(leader))
                yield _hidden(leader, "run queue")
