"""The traditional path (the paper's dom0 method): the IDS reads guest RAM itself.

It is the baseline every benchmark ratio uses, and the way to read an ELF core or a
raw image. It runs the same IDS code as the enclave, over an in-process page walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sgmonitor.guest.memory import PhysicalMemory
from sgmonitor.guest.paging import PageWalker, VirtualMemory
from sgmonitor.kernel.kernel import Kernel, open_kernel
from sgmonitor.kernel.vmcoreinfo import iter_vmcoreinfo


def kernel_memory(physical: PhysicalMemory) -> VirtualMemory:
    """Kernel virtual memory through the vCPU's current page tables (PTI-aware)."""
    return VirtualMemory(PageWalker.for_kernel(physical, physical.registers()))


def vmcoreinfo_notes(physical: PhysicalMemory) -> Iterator[bytes]:
    """The VMCOREINFO notes in guest RAM (genuine or planted; the kernel view picks), in
    address order, scanned for as they are asked for: the kernel view stops at the
    kernel's own, so the scan reads RAM only up to it."""
    return (candidate.note for candidate in iter_vmcoreinfo(physical))


def open_guest_kernel(
    physical: PhysicalMemory,
    *,
    vendor_vmlinux: Path | None = None,
    system_map: Path | None = None,
    btf_sha256: str | None = None,
) -> Kernel:
    """The guest's kernel, read in this process. Hold the guest paused while using it."""
    return open_kernel(
        kernel_memory(physical),
        vmcoreinfo_notes(physical),
        vendor_vmlinux=vendor_vmlinux,
        system_map=system_map,
        btf_sha256=btf_sha256,
    )
