"""Cold start and warm scan of ``sgmonitor ps`` against the guest's process count.

    .venv/bin/python benchmarks/ps_scaling.py [--procs 200 5000] [--runs 10]
        [--mode traditional|secure]

For each size it boots a lab guest (1 GiB RAM for the large one), then measures
- cold: wall time of ``sgmonitor ps --mode MODE --qemu SOCK --json`` as a new process,
  best and mean of 5 runs. The mode is always passed: ``ps --qemu`` defaults to secure,
  which starts a hypervisor service, an attestation service and the enclave; the default
  here is ``traditional`` (Python start, QMP, vmcoreinfo scan, kallsyms, BTF, scan,
  output, all in the ps process), the measurement docs/benchmarks.md reports;
- warm: one traditional scan (``list_processes`` in this process) with the kernel
  already open and the translation cache cleared each time, guest paused, mean and
  spread of --runs runs.
Nothing but the QMP socket is given to ps. The table names the modes it measured. The
package's bytecode is compiled first, as an installed package's is (see
benchmarks/vs_drgn.py).
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.ids.pslist import list_processes
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.traditional import open_guest_kernel


def cold_runs(qmp: str, mode: str, runs: int = 5) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sgmonitor", "ps", "--mode", mode, "--qemu", qmp, "--json"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - start)
    return times


def warm_runs(qmp: str, runs: int) -> tuple[int, list[float]]:
    with QemuGuest(qmp) as live, live.paused():
        kernel = open_guest_kernel(live)
        count = len(list_processes(kernel))
        times = []
        for _ in range(runs):
            kernel.memory.walker.invalidate()
            start = time.perf_counter()
            list_processes(kernel)
            times.append(time.perf_counter() - start)
    return count, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[200, 5000])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--mode",
        choices=("traditional", "secure"),
        default="traditional",
        help="the mode of the cold 'sgmonitor ps' runs (default: traditional)",
    )
    args = parser.parse_args()
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "sgmonitor", quiet=1)
    print(
        f"| extra procs | processes | cold {args.mode} best (s) | cold {args.mode} mean (s) "
        "| warm traditional mean (ms) | warm stdev (ms) | warm per process (µs) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for procs in args.procs:
        name = f"bench{os.getpid()}-{procs}"
        mem = 256 if procs <= 1000 else 1024
        guest = machine.start(name, machine.MachineConfig(mem_mib=mem, workload=Workload(procs)))
        try:
            cold = cold_runs(guest.qmp, args.mode)
            count, warm = warm_runs(guest.qmp, args.runs)
        finally:
            machine.stop(name)
        mean = statistics.mean(warm)
        print(
            f"| {procs} | {count} | {min(cold):.3f} | {statistics.mean(cold):.3f} "
            f"| {mean * 1e3:.1f} | {statistics.stdev(warm) * 1e3:.1f} | {mean / count * 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
