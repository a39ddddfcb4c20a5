"""DKOM from outside: a test writes the guest's RAM file, as a host attacker could, and
puts the original bytes back afterwards."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

from sgmonitor.guest.qemu import QemuGuest


@contextlib.contextmanager
def tampered(live: QemuGuest, patches: dict[int, bytes]) -> Iterator[None]:
    """Write ``patches`` (guest-physical address -> bytes) into the paused guest's RAM
    file, and put the original bytes back afterwards."""
    saved = {gpa: live.read_physical(gpa, len(data)) for gpa, data in patches.items()}
    fd = os.open(live.path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as ram:
            for gpa, data in patches.items():
                offset = file_offset(live, gpa)
                ram[offset : offset + len(data)] = data
            try:
                yield
            finally:
                for gpa, data in saved.items():
                    offset = file_offset(live, gpa)
                    ram[offset : offset + len(data)] = data
    finally:
        os.close(fd)


def file_offset(live: QemuGuest, gpa: int) -> int:
    seg = next(s for s in live.segments if s.address <= gpa < s.end)
    return seg.file_offset + gpa - seg.address


def pointer(value: int) -> bytes:
    return value.to_bytes(8, "little")
