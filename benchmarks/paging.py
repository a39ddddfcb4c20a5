"""Translation and page-read throughput of the page walker on a real lab guest.

    .venv/bin/python benchmarks/paging.py [--qemu QMP_SOCKET]

Without --qemu it boots (and stops) a default lab guest. Numbers are rates and ratios
against a plain guest-physical read measured in the same run (machines here are noisy).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from sgmonitor.guest.paging import PageWalker, VirtualMemory
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.lab import machine


def rate(label: str, work: Callable[[], int], seconds: float = 1.0) -> float:
    """Operations per second of ``work`` (which returns how many it did), best of 3."""
    best = 0.0
    for _ in range(3):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            done += work()
        best = max(best, done / elapsed)
    print(f"{label:<44} {best:>12,.0f} /s")
    return best


def run(qmp: str) -> None:
    with QemuGuest(qmp) as live, live.paused():
        walker = PageWalker.for_kernel(live, live.registers())
        memory = VirtualMemory(walker)
        text = live.qmp.hmp("info registers")
        rip = int(text.split("RIP=")[1].split()[0], 16)
        direct = int(text.split("GS =")[1].split()[1], 16) or rip
        pages = [(direct & ~0xFFF) + i * 4096 for i in range(64)]
        physical = [memory.translate(p) for p in pages]

        def cold_walks() -> int:
            for p in pages:
                walker.invalidate()
                walker.translate(p)
            return len(pages)

        def cached_translations() -> int:
            for p in pages:
                walker.translate(p)
            return len(pages)

        def virtual_page_reads() -> int:
            for p in pages:
                memory.read(p, 4096)
            return len(pages)

        def physical_page_reads() -> int:
            for p in physical:
                live.read_physical(p, 4096)
            return len(pages)

        def virtual_small_reads() -> int:
            for p in pages:
                memory.read(p + 0x10, 8)
            return len(pages)

        print(f"guest: {qmp} ({len(walker.levels)}-level paging)")
        base = rate("baseline: physical 4 KiB page reads", physical_page_reads)
        rate("cold page walks (translation cache cleared)", cold_walks)
        rate("cached translations", cached_translations)
        pages_per_s = rate("virtual 4 KiB page reads (cached walk)", virtual_page_reads)
        rate("virtual 8-byte reads (cached walk)", virtual_small_reads)
        print(f"virtual/physical page-read throughput ratio: {pages_per_s / base:.2f}")
        print(f"virtual page-read bandwidth: {pages_per_s * 4096 / 2**20:,.0f} MiB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", help="QMP socket of a running guest")
    args = parser.parse_args()
    if args.qemu:
        run(args.qemu)
        return
    name = f"benchpaging{os.getpid()}"
    guest = machine.start(name, machine.MachineConfig())
    try:
        run(guest.qmp)
    finally:
        machine.stop(name)


if __name__ == "__main__":
    main()
