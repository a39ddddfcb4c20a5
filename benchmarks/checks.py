"""The full check set's scan time, traditional against secure, on the same guest.

    python benchmarks/checks.py [--processes 166 1000] [--runs 5] [--json]

For each size it boots a lab guest, holds it still, and times ``run_checks(kernel)``
(every registered check) in this process (the traditional path: guest RAM read here),
then the same checks in the enclave through a local deployment (``scan("all")``, the
sealed report delivered to the monitor and acknowledged). Both see the guest's kernel
opened already (the first, untimed run opens it), as a long-running IDS would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from sgmonitor.bench import delivered_scan
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.guest.qmp import held_still
from sgmonitor.ids.registry import registered, run_checks
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import local_deployment
from sgmonitor.traditional import open_guest_kernel
from sgmonitor.untrusted.library import SecureMonitor

_BASE_PROCESSES = 46  # the lab guest's own processes without a workload


def _times(scan: object, runs: int) -> list[float]:
    scan()  # type: ignore[operator]  # warm-up: the kernel opened, first connections
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        scan()  # type: ignore[operator]
        out.append(time.perf_counter() - started)
    return out


def measure(qmp: str, runs: int) -> dict[str, object]:
    with held_still(qmp):
        with QemuGuest(qmp) as live:
            kernel = open_guest_kernel(live)

            def traditional() -> None:
                kernel.memory.walker.invalidate()  # type: ignore[attr-defined]
                findings = run_checks(kernel)
                assert not findings, findings

            here = _times(traditional, runs)
        with (
            local_deployment({"guest": qmp}, heartbeat_interval=30.0) as local,
            local.secure_monitor(pause=False) as ids,
        ):

            def secure() -> None:
                delivered_scan(ids, "all", 60.0)

            enclave = _times(secure, runs)
            report = local.opened_report(ids.ids, result_seq(ids))
            assert report["findings"] == [], report["findings"]
    return {
        "traditional_s": statistics.median(here),
        "secure_s": statistics.median(enclave),
        "ratio": statistics.median(enclave) / statistics.median(here),
    }


def result_seq(ids: SecureMonitor) -> int:
    """The last report's sequence number (the monitor acknowledged it)."""
    assert ids.link is not None
    return max(ids.link.acked)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--processes", type=int, nargs="+", default=[166, 1000])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for count in args.processes:
        name = f"checks{os.getpid()}-{count}"
        workload = Workload(max(0, count - _BASE_PROCESSES))
        config = machine.MachineConfig(mem_mib=256 if count <= 1200 else 1024, workload=workload)
        guest = machine.start(name, config)
        try:
            rows.append({"processes": count, **measure(guest.qmp, args.runs)})
        finally:
            machine.stop(name)
    doc = {"checks": list(registered()), "runs": args.runs, "results": rows}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"checks: {', '.join(doc['checks'])}; median of {args.runs} runs")
    print("| processes | traditional (ms) | secure (ms) | secure / traditional |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['processes']} | {r['traditional_s'] * 1000:.1f} | {r['secure_s'] * 1000:.1f} "
            f"| {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
