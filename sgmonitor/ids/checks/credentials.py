"""Credentials: root without a way to have become root, and credentials shared.

Linux gives every process its own ``struct cred`` at fork (``copy_creds()``: only
threads, ``CLONE_THREAD``, share one), so two processes pointing at one ``cred`` did
not get there by fork: a rootkit's ``task->cred = &init_cred`` (or another process's)
looks exactly like that. And a process is root while its parent is not only through a
setuid-root executable; anything else is an escalation (Volatility's ``check_creds``
covers the first half). Finally, ``cred->user`` is the ``user_struct`` of the real uid
(``set_user()`` moves it whenever the uid changes): a rootkit that writes 0 into the
ids of a process's own cred, in place, leaves ``user`` behind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.sched import for_each_process
from sgmonitor.kernel.objects import Object

_S_ISUID = 0o4000


def _setuid_root_exe(task: Object) -> bool:
    """Whether ``task->mm->exe_file`` is a setuid-root file (no mm: a kernel thread)."""
    mm = task.mm
    if not int(mm):
        return False
    exe = mm.exe_file
    if not int(exe):
        return False
    inode = exe.f_inode
    return bool(int(inode.i_mode) & _S_ISUID) and int(inode.i_uid.val) == 0


@check("credentials", "root credentials without a setuid exec; a cred shared by processes")
def run(kernel: object) -> Iterator[Finding]:
    """``struct task_struct *`` of every process: its ``cred`` and its parent's. The idle
    task (pid 0, ``init_cred``) counts as an owner: ``&init_cred`` is the usual loan."""
    owners: dict[int, list[int]] = defaultdict(list)
    owners[int(kernel.object("init_task").cred)].append(0)  # type: ignore[attr-defined]
    for task in for_each_process(kernel):  # type: ignore[arg-type]
        pid, cred = int(task.pid), task.cred
        owners[int(cred)].append(pid)
        euid, parent_uid = int(cred.euid.val), int(task.real_parent.cred.uid.val)
        uid, user_uid = int(cred.uid.val), int(cred.user.uid.val)
        if uid != user_uid:
            yield Finding(
                "credentials",
                "critical",
                f"pid {pid} has uid {uid} in a cred whose user_struct is uid {user_uid}: "
                "its ids were overwritten in place",
                pid=pid,
                address=int(cred),
                expected=f"uid {user_uid} (cred->user, set with the uid by set_user())",
                found=f"uid {uid}",
            )
        if euid == 0 and parent_uid != 0 and not _setuid_root_exe(task):
            yield Finding(
                "credentials",
                "critical",
                f"pid {pid} runs as root under a parent of uid {parent_uid}, "
                "with no setuid-root executable",
                pid=pid,
                address=int(cred),
                expected=f"euid {parent_uid} (the parent's) or a setuid-root exec",
                found="euid 0",
            )
    for address, pids in owners.items():
        for pid in pids[1:]:  # the first owner (the oldest in the task list) keeps it
            yield Finding(
                "credentials",
                "high",
                f"pid {pid} uses the struct cred of pid {pids[0]}",
                pid=pid,
                address=address,
                expected="a cred of its own (copy_creds gives one at fork)",
                found=f"the cred of pid {pids[0]}",
            )
