"""``sgmonitor bench``: the paper's Figures 9 and 10, in one run per guest.

On lab guests it boots (the default), or on an existing QEMU guest (``--qemu SOCK``).
Every mode scans the same guest, held stopped for the whole measurement so that each
run times the scan alone (a periodic IDS would pause and resume around each scan; that
costs the same few milliseconds in every mode and is left out of all of them):

- ``traditional``: the IDS reads the RAM file in its own process (the paper's dom0
  method, the baseline every ratio uses);
- ``secure-plain``: the whole secure path with sealing switched off (experiments only);
- ``secure``: enclave process, untrusted relay, hypervisor service, sealed pages.

Each run is one full scan of the process list from an empty enclave page cache (it is
invalidated at the start of every scan) and an empty translation cache. The modes take
turns in up to five rounds (:func:`rounds`), each mode's runs of a round back to back,
so that a slow stretch of the machine is shared by every mode rather than making one
of them look fast or slow against the others.

Every timed run's list is compared with a reference named in each result's ``truth``:
``"guest"``, the lab guest's own /proc listing (printed by its /init just before the
guest is stopped; see :func:`Reference.differences` for what may differ), or, for an
existing guest, which prints no such listing, ``"traditional"``: the list of the first
traditional scan, which every other run must equal exactly. Each run also carries its
own ``elapsed_s`` (the wall time the bench measured) and ``crossing_s`` (the time the
enclave spent outside itself waiting for its OCALLs: relay, hypervisor service and
sealing; 0 for the in-process traditional mode).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple, cast

from sgmonitor.attestation.policy import Policy
from sgmonitor.errors import SGMonitorError
from sgmonitor.guest.paging import VirtualMemory
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.guest.qmp import held_still
from sgmonitor.ids.pslist import list_processes
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import local_deployment
from sgmonitor.traditional import open_guest_kernel
from sgmonitor.untrusted.library import ScanResult, SecureMonitor

MIB = 1 << 20
# Kernel threads and /init's own processes on a lab guest: added to --procs N.
_BASE_PROCESSES = 46
# Kernel threads the guest may wake between printing its listing and being stopped
# (the guest ran on a moment in between; user space on a lab guest cannot change).
MAX_WOKEN_KERNEL_THREADS = 2

Records = list[dict[str, object]]


@dataclass(frozen=True)
class Reference:
    """The list every timed run is compared with.

    ``kind`` is ``"guest"`` (a lab guest's own listing: ``{"pid", "ppid", "uid",
    "state", "comm"}`` per process, ``helper_pid`` the process that printed it) or
    ``"traditional"`` (the first traditional scan's records).
    """

    kind: str
    processes: Records
    helper_pid: int = 0

    @classmethod
    def of_lab_guest(cls, guest: machine.LabGuest) -> Reference:
        """A fresh listing from the guest's /init (the guest must be running)."""
        truth = machine.truth(guest, fresh=True)
        return cls("guest", truth.processes, truth.helper_pid)

    def differences(self, records: Records) -> list[str]:
        """What differs between ``records`` and this reference; empty when they agree.

        Against a traditional scan: nothing may differ. Against the guest's listing:
        the same processes (the one that printed the listing may still be exiting),
        each with its ppid, uid, tgid (= pid) and /proc name (a workqueue worker's name
        ends in the volatile work it last ran: only the part before must match) and its
        state, except that up to ``MAX_WOKEN_KERNEL_THREADS`` kernel threads may have
        been woken (R against S or I).
        """
        if self.kind == "traditional":
            if records == self.processes:
                return []
            ours = {r["pid"]: r for r in records}
            theirs = {r["pid"]: r for r in self.processes}
            out = [
                f"pid {p}: {ours.get(p)} != {theirs.get(p)}"
                for p in sorted({*ours, *theirs}, key=str)
                if ours.get(p) != theirs.get(p)
            ]
            return out or ["the same records in another order"]
        ours = {r["pid"]: r for r in records if r["pid"] != self.helper_pid}
        theirs = {p["pid"]: p for p in self.processes}
        out = [f"pid {p}: not listed by the guest" for p in ours if p not in theirs]
        out += [f"pid {p}: not found by the scan" for p in theirs if p not in ours]
        woken = []
        for pid in ours.keys() & theirs.keys():
            mine, guest = ours[pid], theirs[pid]
            name, comm = str(guest["comm"]), str(mine["comm"])
            expected = name.split("+")[0].split("-")[0] if comm.startswith("kworker/") else name
            found = comm if comm.startswith("kworker/") else mine["name"]
            if (mine["ppid"], mine["uid"], mine["tgid"], found) != (
                guest["ppid"],
                guest["uid"],
                pid,
                expected,
            ):
                out.append(f"pid {pid}: scan {mine}, guest {guest}")
            elif mine["state"] != guest["state"]:
                kernel_thread = pid == 2 or guest["ppid"] == 2
                if kernel_thread and {mine["state"], guest["state"]} in ({"R", "S"}, {"R", "I"}):
                    woken.append(pid)
                else:
                    out.append(f"pid {pid}: state {mine['state']}, guest {guest['state']}")
        if len(woken) > MAX_WOKEN_KERNEL_THREADS:
            out.append(f"{len(woken)} kernel threads changed state: {woken}")
        return out


@dataclass(frozen=True)
class Scan:
    """One timed run: its wall time, its time in crossings, whether its list agreed with
    the reference, and (secure modes) where its time went, each part measured where it
    is spent (:data:`PARTS`)."""

    elapsed_s: float
    crossing_s: float
    matches_truth: bool
    parts: dict[str, float] = field(default_factory=dict)


# The parts of a secure scan, as measured by the code that spends them. In the enclave:
# ``enclave_s`` its whole scan, of which ``crossing_s`` waiting for OCALLs, ``opening_s``
# opening what they brought (decrypting, decoding) and the rest the IDS over its cache;
# ``report_s`` its JSON report's encoding and sealing. In the untrusted library:
# ``ecall_s`` the ECALL's wall time, ``hypervisor_s`` waiting on the hypervisor link (its
# walk, reads and sealing, and the transfer), ``relay_s`` the library's own work on the
# OCALLs. The bench itself: the elapsed time, whose rest after the ECALL is handing the
# sealed report to the monitor and its acknowledgement. The hypervisor and the relay run
# while the enclave works (streamed list windows), so parts overlap and do not add up.
PARTS = (
    "enclave_s",
    "crossing_s",
    "opening_s",
    "report_s",
    "ecall_s",
    "hypervisor_s",
    "relay_s",
)


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
    crossing_mean_s: float
    crossings: int
    pages_fetched: int
    truth: str  # what the lists were compared with: "guest" or "traditional"
    records_match_truth: bool  # every timed run's list
    mismatch: str  # the first difference found, "" if none
    scans: tuple[Scan, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def joined(cls, parts: Sequence[Run]) -> Run:
        """One mode's runs measured in several calls (e.g. rounds with another tool's
        runs in between) as one: every scan, the statistics over all of them, the
        crossings and pages of the last."""
        scans = tuple(scan for part in parts for scan in part.scans)
        if not scans or len({(p.mode, p.cache_budget, p.truth) for p in parts}) != 1:
            raise ValueError("join the scans of one mode, budget and reference")
        times = [scan.elapsed_s for scan in scans]
        last = parts[-1]
        return replace(
            last,
            runs=len(scans),
            mean_s=statistics.mean(times),
            stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
            min_s=min(times),
            crossing_mean_s=statistics.mean(scan.crossing_s for scan in scans),
            records_match_truth=all(p.records_match_truth for p in parts),
            mismatch=next((p.mismatch for p in parts if p.mismatch), ""),
            scans=scans,
        )


class _Outcome(NamedTuple):
    """What one scan returns: its result (records, or how to get them), its crossings,
    pages fetched, time spent in crossings, and its measured parts."""

    result: object
    crossings: int
    pages: int
    crossing_s: float
    parts: tuple[tuple[str, float], ...] = ()


# Each mode's runs are spread over this many rounds (fewer if there are fewer runs):
# in every round each mode takes its share of runs in turn, so a slow stretch of the
# machine, which lasts long enough to cover a whole block of runs, falls on every mode
# instead of making one look fast or slow against the others.
ROUNDS = 5


def rounds(runs: int) -> list[int]:
    """Each round's share of a mode's ``runs``: as even as may be, at most ``ROUNDS``."""
    count = min(runs, ROUNDS)
    return [runs // count + (i < runs % count) for i in range(count)]


@contextlib.contextmanager
def traditional_scan(qmp_socket: str) -> Iterator[Callable[[], Records]]:
    """The traditional mode on a running guest: each call is one scan in this process,
    from an empty translation cache, as records. QEMU's one QMP connection is given up
    once the kernel is open, so that a hypervisor service can take it."""
    with QemuGuest(qmp_socket) as live:
        kernel = open_guest_kernel(live)
        live.qmp.close()
        memory = kernel.memory
        assert isinstance(memory, VirtualMemory)  # what open_guest_kernel gives

        def scan() -> Records:
            memory.walker.invalidate()
            return cast(Records, [r.as_dict() for r in list_processes(kernel)])

        yield scan


def delivered_scan(
    monitor: SecureMonitor, check: str = "pslist", timeout: float = 30.0
) -> ScanResult:
    """One secure scan, returned once the monitor has acknowledged its report."""
    result = monitor.scan(check)
    assert monitor.link is not None
    if not monitor.link.wait_ack(result.report_seq, timeout):
        raise SGMonitorError(f"the monitor did not take report {result.report_seq}")
    return result


def measure_guest(
    qmp_socket: str,
    modes: Sequence[str],
    budgets: Sequence[int],
    runs: int,
    policy: Policy | None = None,
    say: Callable[[str], None] | None = None,
    reference: Reference | None = None,
) -> list[Run]:
    """All modes (secure ones at every cache budget) on one running guest, in
    :func:`rounds` (each mode scans once untimed first); the secure ones through a
    local deployment attesting against ``policy`` (default: the installed enclave).
    Without a ``reference`` (an existing guest) every run is compared with the first
    traditional scan's list, made untimed first if ``traditional`` is not among
    ``modes``."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    results: list[Run] = []
    truth = reference

    def record(
        mode: str,
        budget: int | None,
        timed: list[tuple[_Outcome, float]],
        records_of: Callable[[object], Records],
    ) -> None:
        nonlocal truth
        lists = [records_of(outcome.result) for outcome, _ in timed]  # after the timing
        if truth is None:
            truth = Reference("traditional", lists[0])
        found = [truth.differences(records) for records in lists]
        times = [elapsed for _, elapsed in timed]
        last = timed[-1][0]
        results.append(
            Run(
                mode=mode,
                processes=len(lists[-1]),
                cache_budget=budget,
                runs=runs,
                mean_s=statistics.mean(times),
                stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
                min_s=min(times),
                crossing_mean_s=statistics.mean(o.crossing_s for o, _ in timed),
                crossings=last.crossings,
                pages_fetched=last.pages,
                truth=truth.kind,
                records_match_truth=not any(found),
                mismatch=next((d[0] for d in found if d), ""),
                scans=tuple(
                    Scan(elapsed, outcome.crossing_s, not diff, dict(outcome.parts))
                    for (outcome, elapsed), diff in zip(timed, found, strict=True)
                ),
            )
        )

    def own(result: object) -> Records:
        return result  # type: ignore[return-value]

    # mode and budget -> the scan, and how to get its records after the timing
    scans: dict[tuple[str, int | None], tuple[Callable[[], _Outcome], Callable[[object], Records]]]
    scans = {}
    with held_still(qmp_socket), contextlib.ExitStack() as stack:
        if "traditional" in modes or truth is None:
            scan_here = stack.enter_context(traditional_scan(qmp_socket))

            def traditional() -> _Outcome:
                return _Outcome(scan_here(), 0, 0, 0.0)

            if truth is None and "traditional" not in modes:
                truth = Reference("traditional", own(traditional().result))
            if "traditional" in modes:
                scans["traditional", None] = (traditional, own)
        secure_modes = [m for m in modes if m != "traditional"]
        if secure_modes:
            unsealed = "secure-plain" in secure_modes
            guests = {"guest": qmp_socket}
            local = stack.enter_context(
                local_deployment(guests, policy=policy, allow_unsealed=unsealed, say=say)
            )
            for mode in secure_modes:
                for budget in budgets:
                    monitor = local.secure_monitor(
                        mode=mode,
                        cache_budget=budget,
                        pause=False,
                        ids=f"bench-{mode}-{budget}",  # one link each, all open at once
                    )
                    stack.enter_context(monitor)

                    def secure(m: SecureMonitor = monitor) -> _Outcome:
                        """One scan, its report delivered to the monitor."""
                        result = delivered_scan(m)
                        stats = result.stats
                        parts = {k: float(stats[k]) for k in PARTS if k != "enclave_s"}  # type: ignore[arg-type]
                        parts["enclave_s"] = float(stats["elapsed_s"])  # type: ignore[arg-type]
                        return _Outcome(
                            result.report_seq,
                            int(stats["crossings"]),  # type: ignore[call-overload]
                            int(stats["pages_fetched"]),  # type: ignore[call-overload]
                            float(stats["crossing_s"]),  # type: ignore[arg-type]
                            tuple(parts.items()),
                        )

                    def opened(seq: object, m: SecureMonitor = monitor) -> Records:
                        report = local.opened_report(m.ids, int(seq))  # type: ignore[call-overload]
                        return list(report["records"])

                    scans[mode, budget] = (secure, opened)
        timed: dict[tuple[str, int | None], list[tuple[_Outcome, float]]]
        timed = {key: [] for key in scans}
        for scan, _ in scans.values():  # warm-up: imports, first connections, learning
            scan()
        for share in rounds(runs):
            for key, (scan, _) in scans.items():
                for _run in range(share):
                    started = time.perf_counter()
                    outcome = scan()
                    timed[key].append((outcome, time.perf_counter() - started))
        for key, (_, records_of) in scans.items():
            record(*key, timed[key], records_of)
    return results


def run_benchmark(
    processes: Sequence[int],
    modes: Sequence[str],
    budgets: Sequence[int],
    runs: int,
    progress: Callable[[str], None] = lambda _: None,
    policy: Policy | None = None,
) -> list[Run]:
    """Boot a lab guest per process count, take its own listing, measure every mode on
    it, stop it."""
    results = []
    for count in processes:
        name = f"bench{os.getpid()}-{count}"
        extra = max(0, count - _BASE_PROCESSES)
        mem = 256 if count <= 1200 else 1024
        progress(f"booting a guest with ~{count} processes")
        guest = machine.start(name, machine.MachineConfig(mem_mib=mem, workload=Workload(extra)))
        try:
            reference = Reference.of_lab_guest(guest)
            progress(f"measuring {', '.join(modes)} ({runs} runs each)")
            results += measure_guest(
                guest.qmp, modes, budgets, runs, policy, progress, reference=reference
            )
        finally:
            machine.stop(name)
    return results


def run_on_guest(
    qmp_socket: str,
    modes: Sequence[str],
    budgets: Sequence[int],
    runs: int,
    progress: Callable[[str], None] = lambda _: None,
    policy: Policy | None = None,
) -> list[Run]:
    """Measure every mode on an existing guest (any QEMU guest whose RAM is a shared
    memory backend, given its QMP socket), held stopped meanwhile (and left as it was).
    There is no listing of the guest's own: every run is compared with the first
    traditional scan (``truth: "traditional"``)."""
    progress(f"measuring {', '.join(modes)} ({runs} runs each) on {qmp_socket}")
    return measure_guest(qmp_socket, modes, budgets, runs, policy, progress)


def table(results: Sequence[Run]) -> str:
    """Figure 9 as text: each mode against traditional at the same size."""
    base = {r.processes: r.mean_s for r in results if r.mode == "traditional"}
    lines = [
        "| processes | mode | cache | mean (ms) | stdev (ms) | ratio to traditional "
        "| crossing (ms) | crossings/scan | pages/scan | same list as |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        ratio = f"{r.mean_s / base[r.processes]:.2f}" if r.processes in base else "-"
        cache = f"{r.cache_budget // MIB} MiB" if r.cache_budget else "-"
        lines.append(
            f"| {r.processes} | {r.mode} | {cache} | {r.mean_s * 1e3:.1f} | "
            f"{r.stdev_s * 1e3:.1f} | {ratio} | {r.crossing_mean_s * 1e3:.1f} | {r.crossings} | "
            f"{r.pages_fetched} | {r.truth if r.records_match_truth else 'NOT ' + r.truth} |"
        )
    return "\n".join(lines)


def breakdown(results: Sequence[Run]) -> str:
    """Where each secure run's time went (means over its scans), as measured by the
    code that spent it (:data:`PARTS`)."""
    lines = [
        "| processes | mode | cache | scan (ms) | enclave (ms) | IDS (ms) | waiting on "
        "crossings (ms) | opening replies (ms) | report (ms) | ECALL out and report "
        "delivery (ms) | hypervisor (ms) | relay (ms) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if not r.scans or not r.scans[0].parts:
            continue

        def mean(part: str, r: Run = r) -> float:
            return statistics.mean(s.parts[part] for s in r.scans) * 1e3

        ids = mean("enclave_s") - mean("crossing_s") - mean("opening_s")
        outside = r.mean_s * 1e3 - mean("enclave_s") - mean("report_s")
        cache = f"{r.cache_budget // MIB} MiB" if r.cache_budget else "-"
        lines.append(
            f"| {r.processes} | {r.mode} | {cache} | {r.mean_s * 1e3:.1f} | "
            f"{mean('enclave_s'):.1f} | {ids:.1f} | {mean('crossing_s'):.1f} | "
            f"{mean('opening_s'):.1f} | {mean('report_s'):.1f} | {outside:.1f} | "
            f"{mean('hypervisor_s'):.1f} | {mean('relay_s'):.1f} |"
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
