"""Hidden processes: a cross-view of three places the kernel keeps its tasks.

The task list (``init_task.tasks``: what ``for_each_process`` and most tools walk), the
PID IDR of the initial namespace (what ``/proc`` lists and ``kill`` finds), and the run
queues (what the scheduler runs). A rootkit that unlinks a task from the list to hide
it leaves it in the other two; a task present in one view and missing from another is
a finding (Volatility's ``psxview`` idea, without its symbol files).
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.percpu import for_each_online_cpu, for_each_runqueue_task
from sgmonitor.kernel.helpers.pid import find_pid, for_each_pid, pid_task
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


@check("hidden_processes", "cross-view of the task list, the PID IDR and the run queues")
def run(kernel: object) -> Iterator[Finding]:
    """``struct task_struct *`` from each view, compared by address."""
    listed = {int(task): task for task in for_each_process(kernel)}  # type: ignore[arg-type]
    reported: set[int] = set()
    for pid in for_each_pid(kernel):  # type: ignore[arg-type]
        task = pid_task(pid, "PIDTYPE_PID")
        if task is None:
            continue
        leader = _leader(task)
        if int(leader) not in listed and int(leader) not in reported:
            reported.add(int(leader))
            yield _hidden(leader, "PID IDR")
    for address, task in listed.items():
        found = pid_task(find_pid(kernel, int(task.pid)), "PIDTYPE_PID")  # type: ignore[arg-type]
        if found is None or int(found) != address:
            pid = int(task.pid)
            yield Finding(
                "hidden_processes",
                "critical",
                f"pid {pid} ({task.comm.string_()}) is on the task list but not in the PID IDR",
                pid=pid,
                address=address,
                expected="found by its number (find_pid), as /proc finds it",
                found="missing" if found is None else f"another task {int(found):#x}",
            )
    for cpu in for_each_online_cpu(kernel):  # type: ignore[arg-type]
        for task in for_each_runqueue_task(kernel, cpu):  # type: ignore[arg-type]
            leader = _leader(task)
            if int(leader.pid) == 0:  # the idle task runs when nothing else does
                continue
            if int(leader) not in listed and int(leader) not in reported:
                reported.add(int(leader))
                yield _hidden(leader, "run queue")
