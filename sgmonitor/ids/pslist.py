"""The process-list IDS of the paper's Figure 5, written as an IDS author would.

The paper's C version starts at ``init_task``, follows ``tasks.next`` with
``list_entry`` and prints ``pid`` and ``comm``; here the walk validates every link, so a
tampered list raises (the IDS reports "could not check") instead of looping.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from sgmonitor.kernel.helpers.sched import (
    HasInitTask,
    for_each_process,
    proc_task_name,
    task_cred_uid,
    task_ppid,
    task_state_to_char,
)


@dataclass(frozen=True, order=True)
class ProcessRecord:
    """One process as ``ps`` shows it: ``comm`` is the kernel's 16-byte field, ``name``
    what /proc shows (kernel threads' full names, workqueue workers' current work)."""

    pid: int
    tgid: int
    ppid: int
    uid: int
    state: str
    comm: str
    name: str

    def as_dict(self) -> dict[str, int | str]:
        """As ``dataclasses.asdict`` (every field is a scalar), without its deep copy."""
        return {name: getattr(self, name) for name in _FIELDS}


_FIELDS = tuple(f.name for f in fields(ProcessRecord))


def list_processes(kernel: HasInitTask) -> list[ProcessRecord]:
    """Every process of the guest, by pid.

    :raises GuestDataError: the task list or a task is corrupt or unreadable
    """
    return sorted(
        ProcessRecord(
            pid=int(task.pid),
            tgid=int(task.tgid),
            ppid=task_ppid(task),
            uid=task_cred_uid(task),
            state=task_state_to_char(task),
            comm=task.comm.string_(),
            name=proc_task_name(task),
        )
        for task in for_each_process(kernel)
    )
