"""A guest that reboots between two secure scans of one session.

The hypervisor service keeps the vCPU registers between scans while the guest has not
reset (``PageServer.refresh``). A reboot leaves the old kernel's page tables and task
list in RAM, wherever the new kernel has not written yet, so a service that missed the
reset could go on walking them and report processes that are gone. This test reboots a
guest from inside, with a process it started beforehand, and demands that the next
scan lists the new boot's processes only, as the guest itself prints them.

Here the new kernel happens to overwrite the old top-level table, so the kernel-half
check alone would also catch it; the case where that table survives (and only the RESET
event tells) is tests/test_page_server.py's, on hand-built tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guests import MAIN, only

from sgmonitor.guest.qmp import Qmp
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import local_deployment
from sgmonitor.untrusted.library import CouldNotCheck, SecureMonitor

pytestmark = [pytest.mark.guest, only(MAIN)]

MARKER = "sgmbefore"  # the comm of a process that lives only until the reboot


@pytest.fixture(scope="module")
def rebootable() -> Iterator[machine.LabGuest]:
    """A small guest whose reboot resets it (the lab's QEMU runs with -no-reboot)."""
    name = f"rst{os.getpid() % 100000}"
    guest = machine.start(name, machine.MachineConfig(paging=4, workload=Workload(procs=3)))
    try:
        with Qmp(guest.qmp) as qmp:
            qmp.command("set-action", reboot="reset")
        yield guest
    finally:
        machine.stop(name)


def boots(guest: machine.LabGuest) -> int:
    """How many times the guest's /init has said it is ready (the console survives a
    reset)."""
    return Path(guest.console).read_text(errors="replace").count("SGM-READY")


def test_a_scan_after_a_reboot_lists_the_new_boot(
    guest: object, rebootable: machine.LabGuest
) -> None:
    status, _ = machine.exec_in_guest(
        rebootable,
        ["sh", "-c", f"sh -c 'printf {MARKER} > /proc/self/comm; while :; do sleep 9; done' &"],
    )
    assert status == 0
    with (
        local_deployment({"r": rebootable.qmp}) as local,
        SecureMonitor(local.hypervisor_socket, "r", local.verifier, local.monitor) as ids,
    ):
        before, _ = local.records(ids)
        assert MARKER in {r["comm"] for r in before}
        old_boot = machine.truth(rebootable)
        assert {r["pid"] for r in before} >= {p["pid"] for p in old_boot.processes}
        first = boots(rebootable)
        status, _ = machine.exec_in_guest(
            rebootable, ["sh", "-c", "(sleep 1; echo b > /proc/sysrq-trigger) >/dev/null 2>&1 &"]
        )
        assert status == 0
        deadline = time.monotonic() + 180
        while boots(rebootable) == first:
            assert time.monotonic() < deadline, "the guest did not come back after its reboot"
            time.sleep(0.5)
        new_boot = machine.truth(rebootable)  # (KASLR may even pick the same slide)
        try:
            after, _ = local.records(ids)
        except CouldNotCheck:  # the enclave's kernel view was the old boot's: reopened
            after, _ = local.records(ids)
    assert MARKER not in {r["comm"] for r in after}
    truth = {(p["pid"], p["comm"]) for p in new_boot.processes}
    ours = {(r["pid"], r["name"]) for r in after}
    assert {t for t in truth if not str(t[1]).startswith("kworker")} <= ours
