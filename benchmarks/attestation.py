"""What attestation costs: the enclave's measured launch and an attested session opening.

    python benchmarks/attestation.py [--runs 20] [--json]

Boots a small lab guest, starts a local deployment (attestation service, hypervisor
service) and times, in one run:

- ``launch``: starting the enclave process through the measured boot, to its first answer;
- ``open_session``: Hello, the verifier's nonce and endorsement, the enclave's wrapped
  key and evidence, the verifier's statement, OpenSession (the key registration);
- ``scan``: one pslist scan in that session, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import local_deployment
from sgmonitor.untrusted.library import SecureMonitor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    name = f"attest{os.getpid()}"
    guest = machine.start(name, machine.MachineConfig(paging=4, workload=Workload(procs=20)))
    times: dict[str, list[float]] = {"launch": [], "open_session": [], "scan": []}
    try:
        with local_deployment({"g": guest.qmp}) as local:
            for _ in range(args.runs):
                monitor = SecureMonitor(local.hypervisor_socket, "g", local.verifier)
                started = time.perf_counter()
                monitor.open()  # launch + first session
                opened = time.perf_counter()
                monitor.new_session()
                renewed = time.perf_counter()
                monitor.scan()
                scanned = time.perf_counter()
                monitor.close()
                times["open_session"].append(renewed - opened)
                times["launch"].append((opened - started) - (renewed - opened))
                times["scan"].append(scanned - renewed)
    finally:
        machine.stop(name)
    result = {
        k: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v)}
        for k, v in times.items()
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(
                f"{k:>13}: median {v['median_s'] * 1000:7.1f} ms, best {v['min_s'] * 1000:7.1f} ms"
            )


if __name__ == "__main__":
    main()
