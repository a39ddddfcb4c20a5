"""The process-list IDS of the paper's Figure 5, written as an IDS author would.

The paper's C version starts at ``init_task``, follows ``tasks.next`` with
``list_entry`` and prints ``pid`` and ``comm``; here the walk validates every link, so a
tampered list raises (the IDS reports "could not check") instead of looping.
"""

from __future__ import annotations

from typing import NamedTuple

from sgmonitor.kernel.helpers.sched import (
    PF_KTHREAD,
    PF_WQ_WORKER,
    HasInitTask,
    for_each_process,
    proc_task_name,
    state_to_char,
    task_state_member,
)


class ProcessRecord(NamedTuple):
    """One process as ``ps`` shows it: ``comm`` is the kernel's 16-byte field, ``name``
    what /proc shows (kernel threads' full names, workqueue workers' current work).
    A named tuple: immutable, ordered by pid first, and cheap to make a thousand of."""

    pid: int
    tgid: int
    ppid: int
    uid: int
    state: str
    comm: str
    name: str

    def as_dict(self) -> dict[str, int | str]:
        """The record as JSON wants it."""
        return dict(zip(self._fields, self, strict=True))


def list_processes(kernel: HasInitTask) -> list[ProcessRecord]:
    """Every process of the guest, by pid.

    The fields are read through compiled layouts (one read of the span of a task's
    members, one of its parent's tgid, one of its cred's uid) rather than one typed
    read each; kernel threads and workqueue workers take the helpers' way for their
    names, which need more of their structures.

    :raises GuestDataError: the task list or a task is corrupt or unreadable
    """
    tm = kernel.types
    members = (
        *("pid", "tgid", "flags", task_state_member(tm)),
        *("exit_state", "real_parent", "cred", "comm"),
    )
    task = tm.layout("struct task_struct", members)
    parent_tgid = tm.layout("struct task_struct", ("tgid",))
    cred_uid = tm.layout("struct cred", ("uid.val",))
    records = []
    for entry in for_each_process(kernel):
        pid, tgid, flags, state, exit_state, parent, cred, comm = task.read(int(entry))
        records.append(
            ProcessRecord(
                pid,
                tgid,
                parent_tgid.read(parent)[0],
                cred_uid.read(cred)[0],
                state_to_char(state, exit_state),
                comm,
                proc_task_name(entry) if flags & _NAMED_ELSEWHERE else comm,
            )
        )
    return sorted(records)


# Tasks whose /proc name is not their comm (kernel threads, workqueue workers).
_NAMED_ELSEWHERE = PF_KTHREAD | PF_WQ_WORKER
