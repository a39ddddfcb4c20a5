"""What the enclave's process boundary costs a secure scan (issue 10's next lever).

    .venv/bin/python benchmarks/boundary.py --qemu QMP_SOCKET [--runs 20] [--json]

On one guest, held still, in one run, the three scans below take turns (one of each,
then again), each from an empty translation and page cache:
- ``traditional``: the IDS over guest RAM in this process (``sgmonitor bench``'s
  traditional mode);
- ``secure``: the deployed path (``sgmonitor bench``'s secure mode, 32 MiB): an ECALL
  into the enclave process, every crossing relayed by the untrusted library, the sealed
  report delivered to the monitor and acknowledged;
- ``data path``: the enclave's own code (``SealedTransport``, ``RemoteMemory``,
  ``list_processes``) run in this process, on an attested session of its own to the
  same hypervisor service: the same sealed requests, list walks, walk-ahead, replies
  and cache, without the enclave process, the relay and the report.

The third session is opened the way ``tests/attested_client.py`` opens one: with
evidence made from the simulated platform's key, which root can read (the simulation
backend's stated limit). That makes this a measuring tool, never a deployment: it
tells how much of a secure scan is the data path and how much the boundary around it.

Every scan's list is compared with the first traditional scan's; the script exits 1
if any differs. Start a guest to measure with ``sgmonitor lab start --procs N``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/attested_client

from sgmonitor.bench import Records, Reference, delivered_scan, traditional_scan
from sgmonitor.enclave.memory import DEFAULT_BUDGET, RemoteMemory
from sgmonitor.enclave.transport import SealedTransport
from sgmonitor.guest.qmp import held_still
from sgmonitor.ids.pslist import list_processes
from sgmonitor.kernel.kernel import open_kernel
from sgmonitor.local import local_deployment
from sgmonitor.wire.core import recv_encoded, send_encoded
from tests.attested_client import hold_session

MODES = ("traditional", "secure", "data path")


def measure(qmp_socket: str, runs: int) -> dict[str, object]:
    """Median wall time of each mode over ``runs`` turns, and whether every list matched."""
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    lists: dict[str, list[Records]] = {mode: [] for mode in MODES}
    with held_still(qmp_socket), traditional_scan(qmp_socket) as scan_here:

        def traditional() -> Callable[[], Records]:
            records = scan_here()
            return lambda: records

        with (
            local_deployment({"guest": qmp_socket}, say=lambda _: None) as local,
            contextlib.ExitStack() as stack,
        ):
            held = hold_session(local, "guest")
            stack.callback(held.sock.close)  # before the services stop

            def exchange(frame: bytes, timeout: float) -> Callable[[], bytes]:
                send_encoded(held.sock, frame, timeout)
                return lambda: recv_encoded(held.sock, timeout)

            transport = SealedTransport(held.channel, exchange, pause=False)
            remote = RemoteMemory(transport, DEFAULT_BUDGET)
            remote.begin_scan()
            own_kernel = open_kernel(remote, transport.vmcoreinfo_notes())
            remote.learn_from_here()
            transport.end_scan()

            def data_path() -> Callable[[], Records]:
                remote.begin_scan()
                records = [r.as_dict() for r in list_processes(own_kernel)]
                transport.end_scan()
                return lambda: records

            with local.secure_monitor(cache_budget=DEFAULT_BUDGET, pause=False) as monitor:

                def secure() -> Callable[[], Records]:
                    seq = delivered_scan(monitor).report_seq
                    return lambda: list(local.opened_report(monitor.ids, seq)["records"])

                scans = {"traditional": traditional, "secure": secure, "data path": data_path}
                for scan in scans.values():  # warm-up: imports, first connections, learning
                    for _ in range(3):
                        scan()
                for _ in range(runs):
                    for mode, scan in scans.items():
                        started = time.perf_counter()
                        records_of = scan()
                        times[mode].append(time.perf_counter() - started)
                        lists[mode].append(records_of())  # after the timing
    truth = Reference("traditional", lists["traditional"][0])
    matched = all(not truth.differences(r) for mode in MODES for r in lists[mode])
    medians = {mode: statistics.median(times[mode]) for mode in MODES}
    base = medians["traditional"]
    return {
        "processes": len(lists["traditional"][0]),
        "runs": runs,
        "median_s": medians,
        "ratio_to_traditional": {mode: medians[mode] / base for mode in MODES},
        "boundary_s": medians["secure"] - medians["data path"],
        "records_match_traditional": matched,
    }


def table(result: dict[str, object]) -> str:
    medians = result["median_s"]
    ratios = result["ratio_to_traditional"]
    assert isinstance(medians, dict) and isinstance(ratios, dict)
    rows = [
        "| processes | mode | median (ms) | ratio to traditional |",
        "| ---: | --- | ---: | ---: |",
    ]
    for mode in MODES:
        rows.append(
            f"| {result['processes']} | {mode} | {medians[mode] * 1e3:.1f} | {ratios[mode]:.2f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qemu", required=True, help="the guest's QMP socket")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    result = measure(args.qemu, args.runs)
    print(json.dumps(result, indent=2) if args.json else table(result))
    if not result["records_match_traditional"]:
        print("boundary: a scan's list differs from the traditional scan's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
