"""``sgmonitor bench``: the paper's Figures 9 and 10 on lab guests, in one run.

Every mode scans the same guest, held stopped for the whole measurement so that each
run times the scan alone (a periodic IDS would pause and resume around each scan; that
costs the same few milliseconds in every mode and is left out of all of them):

- ``traditional``: the IDS reads the RAM file in its own process (the paper's dom0
  method, the baseline every ratio uses);
- ``secure-plain``: the whole secure path with sealing switched off (experiments only);
- ``secure``: enclave process, untrusted relay, hypervisor service, sealed pages.

Each run is one full scan of the process list from an empty enclave page cache (it is
invalidated at the start of every scan) and an empty translation cache.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from sgmonitor.attestation.policy import Policy
from sgmonitor.errors import SGMonitorError
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.guest.qmp import held_still
from sgmonitor.ids.pslist import list_processes
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import local_deployment
from sgmonitor.traditional import open_guest_kernel
from sgmonitor.untrusted.library import SecureMonitor

MIB = 1 << 20
# Kernel threads and /init's own processes on a lab guest: added to --procs N.
_BASE_PROCESSES = 46


@dataclass(frozen=True)
class Run:
    """One mode at one guest size and cache budget: timings over ``runs`` scans."""

    mode: str
    processes: int
    cache_budget: int | None
    runs: int
    mean_s: float
    stdev_s: float
    min_s: float
    crossings: int
    pages_fetched: int
    records_match_traditional: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _timed(
    scan: Callable[[], tuple[object, int, int]],
    runs: int,
    records_of: Callable[[object], list[dict[str, object]]] = lambda r: r,  # type: ignore[assignment,return-value]
) -> tuple[list[dict[str, object]], list[float], int, int]:
    """Time ``runs`` scans after a warm-up; the last one's records (``records_of`` its
    result, read after the timing: for a secure scan, from the monitor)."""
    result, crossings, pages = scan()  # warm-up: imports, first connections
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result, crossings, pages = scan()
        times.append(time.perf_counter() - start)
    return records_of(result), times, crossings, pages


def measure_guest(
    qmp_socket: str,
    modes: Sequence[str],
    budgets: Sequence[int],
    runs: int,
    policy: Policy | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Run]:
    """All modes (secure ones at every cache budget) on one running guest; the secure
    ones through a local deployment attesting against ``policy`` (default: the
    installed enclave)."""
    results: list[Run] = []
    reference: list[dict[str, object]] | None = None

    def record(mode: str, budget: int | None, outcome: tuple) -> None:  # type: ignore[type-arg]
        nonlocal reference
        records, times, crossings, pages = outcome
        if reference is None:
            reference = records
        results.append(
            Run(
                mode=mode,
                processes=len(records),
                cache_budget=budget,
                runs=runs,
                mean_s=statistics.mean(times),
                stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
                min_s=min(times),
                crossings=crossings,
                pages_fetched=pages,
                records_match_traditional=records == reference,
            )
        )

    with held_still(qmp_socket):
        if "traditional" in modes:
            with QemuGuest(qmp_socket) as live:
                kernel = open_guest_kernel(live)

                def traditional() -> tuple[list[dict[str, object]], int, int]:
                    kernel.memory.walker.invalidate()
                    return [r.as_dict() for r in list_processes(kernel)], 0, 0

                record("traditional", None, _timed(traditional, runs))
        secure_modes = [m for m in modes if m != "traditional"]
        if secure_modes:
            unsealed = "secure-plain" in secure_modes
            guests = {"guest": qmp_socket}
            with local_deployment(guests, policy=policy, allow_unsealed=unsealed, say=say) as local:
                for mode in secure_modes:
                    for budget in budgets:
                        monitor = SecureMonitor(
                            local.hypervisor_socket,
                            local.vm,
                            local.verifier,
                            local.monitor,
                            mode=mode,
                            cache_budget=budget,
                            pause=False,
                        )
                        with monitor:

                            def secure(m: SecureMonitor = monitor) -> tuple[object, int, int]:
                                """One scan, its report delivered to the monitor."""
                                result = m.scan("pslist")
                                assert m.link is not None
                                if not m.link.wait_ack(result.report_seq, 30.0):
                                    raise SGMonitorError("the monitor did not take a report")
                                return (
                                    result.report_seq,
                                    int(result.stats["crossings"]),  # type: ignore[call-overload]
                                    int(result.stats["pages_fetched"]),  # type: ignore[call-overload]
                                )

                            def opened(
                                seq: object, m: SecureMonitor = monitor
                            ) -> list[dict[str, object]]:
                                report = local.opened_report(m.ids, int(seq))  # type: ignore[call-overload]
                                return list(report["records"])

                            record(mode, budget, _timed(secure, runs, opened))
    return results


def run_benchmark(
    processes: Sequence[int],
    modes: Sequence[str],
    budgets: Sequence[int],
    runs: int,
    progress: Callable[[str], None] = lambda _: None,
    policy: Policy | None = None,
) -> list[Run]:
    """Boot a lab guest per process count, measure every mode on it, stop it."""
    results = []
    for count in processes:
        name = f"bench{os.getpid()}-{count}"
        extra = max(0, count - _BASE_PROCESSES)
        mem = 256 if count <= 1200 else 1024
        progress(f"booting a guest with ~{count} processes")
        guest = machine.start(name, machine.MachineConfig(mem_mib=mem, workload=Workload(extra)))
        try:
            progress(f"measuring {', '.join(modes)} ({runs} runs each)")
            results += measure_guest(guest.qmp, modes, budgets, runs, policy, progress)
        finally:
            machine.stop(name)
    return results


def table(results: Sequence[Run]) -> str:
    """Figure 9 as text: each mode against traditional at the same size."""
    base = {r.processes: r.mean_s for r in results if r.mode == "traditional"}
    lines = [
        "| processes | mode | cache | mean (ms) | stdev (ms) | ratio to traditional "
        "| crossings/scan | pages/scan | same list |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        ratio = f"{r.mean_s / base[r.processes]:.2f}" if r.processes in base else "-"
        cache = f"{r.cache_budget // MIB} MiB" if r.cache_budget else "-"
        lines.append(
            f"| {r.processes} | {r.mode} | {cache} | {r.mean_s * 1e3:.1f} | "
            f"{r.stdev_s * 1e3:.1f} | {ratio} | {r.crossings} | {r.pages_fetched} | "
            f"{'yes' if r.records_match_traditional else 'NO'} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Run], path: str) -> None:
    """Figure 10: scan time against process count, one line per mode and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        label = r.mode if r.cache_budget is None else f"{r.mode}, {r.cache_budget // MIB} MiB cache"
        series.setdefault(label, []).append((r.processes, r.mean_s * 1e3))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("processes in the guest")
    ax.set_ylabel("time to walk the process list (ms)")
    ax.set_title("SGmonitor: scan time against process count (Figure 10)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
