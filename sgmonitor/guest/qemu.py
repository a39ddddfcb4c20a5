"""A live QEMU guest as a physical memory source: its shared RAM file plus QMP."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from sgmonitor.guest.memory import MappedFile, Registers, Segment, qemu_ram_layout
from sgmonitor.guest.qmp import Qmp

# A flat-view line of 'info mtree -f': "  start-end (prio N, ram): region [@offset]"
_MTREE_RAM = re.compile(
    r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)(?: @([0-9a-f]+))?", re.M
)


class QemuGuest(MappedFile):
    """Guest RAM from a ``memory-backend-file,share=on`` file, registers from QMP.

    The RAM file is found through QMP (the backend's ``mem-path``) unless given; the
    guest-physical layout comes from QEMU's own flat view of the address space, so ROM
    and device holes below 1 MiB read as errors, as they are not RAM.
    """

    def __init__(self, qmp_socket: str, ram_path: str | None = None) -> None:
        self.qmp = Qmp(qmp_socket)
        try:
            backend_id, backend_path = self.qmp.memory_backend()
            path = ram_path or backend_path
            segments = _segments_from_mtree(self.qmp.hmp("info mtree -f"), backend_id)
            if not segments:
                segments = qemu_ram_layout(os.path.getsize(path))
            super().__init__(path, segments)
        except BaseException:
            self.qmp.close()
            raise
        self._pause_depth = 0

    def registers(self) -> Registers:
        regs = self.qmp.registers()
        return Registers(cr0=regs["cr0"], cr3=regs["cr3"], cr4=regs["cr4"], efer=regs["efer"])

    def resets(self) -> int:
        return self.qmp.resets()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the vCPUs (if running) for the duration; nested uses are cheap."""
        resume = self._pause_depth == 0 and self.qmp.is_running()
        if resume:
            self.qmp.stop()
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if resume:
                self.qmp.cont()

    def close(self) -> None:
        super().close()
        self.qmp.close()


def _segments_from_mtree(text: str, backend_id: str) -> list[Segment]:
    """RAM segments of ``backend_id`` in the flat view of the "memory" address space."""
    views = text.split("FlatView #")
    memory_view = next((v for v in views if '\n AS "memory"' in v), "")
    segments = []
    for m in _MTREE_RAM.finditer(memory_view):
        if m[3] != backend_id:
            continue
        start, end = int(m[1], 16), int(m[2], 16)
        segments.append(Segment(start, end - start + 1, int(m[4] or "0", 16)))
    return segments
