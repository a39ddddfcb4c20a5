"""``sgmonitor check``: no false positive on clean guests of every configuration, and
each check's attack performed for real, confirmed by the guest's own view, then found
with the right evidence, in the traditional and the secure mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dkom import pointer, tampered
from guests import MAIN, GuestUnderTest, only

from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.ids.registry import Finding, check, registered, run_checks
from sgmonitor.kernel.helpers.sched import for_each_process
from sgmonitor.lab import machine
from sgmonitor.traditional import open_guest_kernel

pytestmark = pytest.mark.guest

EXIT_FINDINGS = 1
MODES = ("traditional", "secure")
PS = (sys.executable, "-m", "sgmonitor", "ps")


def check_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgmonitor", "check", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("mode", ["traditional", "secure"])
def test_a_clean_guest_has_no_finding(guest: GuestUnderTest, mode: str) -> None:
    """Every check, and in the traditional mode kernel_text against the vendor's image
    (the vmlinux inside the vmlinuz the guest booted)."""
    image = ("--vmlinux", guest.info.vmlinux) if mode == "traditional" else ()
    result = check_cli("--qemu", guest.info.qmp, "--mode", mode, *image)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@only(MAIN)
@pytest.mark.parametrize("mode", ["traditional", "secure"])
def test_a_borrowed_root_cred_is_found(guest: GuestUnderTest, mode: str) -> None:
    """DKOM from outside: a uid-1000 process's ``task->cred`` set to ``&init_cred``. The
    guest itself then says the process is root; the check names that pid."""
    victim = next(p for p in guest.truth.processes if p["uid"] == 1000)
    with QemuGuest(guest.info.qmp) as live:
        with live.paused():
            kernel = open_guest_kernel(live)
            task = next(t for t in for_each_process(kernel) if int(t.pid) == victim["pid"])
            for field in ("cred", "real_cred"):
                assert int(getattr(task, field)) != kernel.symbols["init_cred"]  # type: ignore[index]
            patches = {
                kernel.memory.translate(getattr(task, field).address_): pointer(
                    kernel.symbols["init_cred"]  # type: ignore[index]
                )
                for field in ("cred", "real_cred")
            }
        live.qmp.close()  # the check's own services need QEMU's one QMP connection
        with tampered(live, patches):
            rooted = {p["pid"]: p for p in machine.truth(guest.info, fresh=True).processes}
            assert rooted[victim["pid"]]["uid"] == 0  # the attack took effect in the guest
            result = check_cli("--qemu", guest.info.qmp, "--mode", mode)
    assert result.returncode == EXIT_FINDINGS, result.stderr
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(f["check"], f["pid"]) for f in findings] == [("credentials", victim["pid"])]
    assert findings[0]["address"] == kernel.symbols["init_cred"]  # type: ignore[index]
    after = check_cli("--qemu", guest.info.qmp, "--mode", "traditional")
    assert after.returncode == 0 and after.stdout == ""  # restored


@only(MAIN)
def test_a_hooked_syscall_table_entry_is_found(guest: GuestUnderTest) -> None:
    """DKOM from outside: ``sys_call_table[getppid]`` set to getpid's handler. (On these
    kernels ``x64_sys_call`` dispatches, so the hook is inert: the test confirms the
    write by reading it back, not by the guest's behaviour.)"""
    with QemuGuest(guest.info.qmp) as live:
        with live.paused():
            kernel = open_guest_kernel(live)
            symbols = kernel.symbols
            table = symbols["sys_call_table"]  # type: ignore[index]
            raw = kernel.memory.read(table, 8 * 512)
            entries = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
            nr = entries.index(symbols["__x64_sys_getppid"])  # type: ignore[index]
            slot = kernel.memory.translate(table + 8 * nr)
            hook = pointer(symbols["__x64_sys_getpid"])  # type: ignore[index]
        live.qmp.close()
        with tampered(live, {slot: hook}):
            assert live.read_physical(slot, 8) == hook
            results = {m: check_cli("--qemu", guest.info.qmp, "--mode", m) for m in MODES}
    for mode, result in results.items():
        assert result.returncode == EXIT_FINDINGS, (mode, result.stderr)
        findings = [json.loads(line) for line in result.stdout.splitlines()]
        assert [(f["check"], f["symbol"]) for f in findings] == [
            ("syscall_table", f"sys_call_table[{nr}]")
        ], mode
        assert findings[0]["found"] == "__x64_sys_getpid"


@only(MAIN)
def test_a_process_unlinked_from_the_task_list_is_found(guest: GuestUnderTest) -> None:
    """DKOM from outside: a sleeping process unlinked from ``init_task.tasks`` (its
    neighbours pointed past it). The guest still runs it and lists it in /proc; a task
    list walk (our ps) no longer sees it; the check names it from the other views."""
    victim = next(p for p in guest.truth.processes if p["comm"] == "sleep")
    with QemuGuest(guest.info.qmp) as live:
        with live.paused():
            kernel = open_guest_kernel(live)
            task = next(t for t in for_each_process(kernel) if int(t.pid) == victim["pid"])
            prev, nxt = task.tasks.prev, task.tasks.next
            patches = {
                kernel.memory.translate(prev.next.address_): pointer(int(nxt)),
                kernel.memory.translate(nxt.prev.address_): pointer(int(prev)),
            }
        live.qmp.close()
        with tampered(live, patches):
            alive = {p["pid"] for p in machine.truth(guest.info, fresh=True).processes}
            assert victim["pid"] in alive  # the guest still has it, /proc shows it
            listed = subprocess.run(
                [*PS, "--qemu", guest.info.qmp, "--mode", "traditional", "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            assert victim["pid"] not in {json.loads(x)["pid"] for x in listed.stdout.splitlines()}
            results = {m: check_cli("--qemu", guest.info.qmp, "--mode", m) for m in MODES}
    for mode, result in results.items():
        assert result.returncode == EXIT_FINDINGS, (mode, result.stderr)
        findings = [json.loads(line) for line in result.stdout.splitlines()]
        assert {(f["check"], f["pid"]) for f in findings} == {
            ("hidden_processes", victim["pid"])
        }, (mode, findings)


def test_the_registry_finds_checks_by_name_and_refuses_unknown_ones() -> None:
    checks = registered()
    assert {"credentials", "hidden_processes", "syscall_table"} <= set(checks)
    assert all(c.description for c in checks.values())
    with pytest.raises(KeyError, match="unknown checks"):
        run_checks(object(), ["no-such-check"])
    with pytest.raises(ValueError, match="registered twice"):
        check("credentials", "again")(lambda kernel: iter(()))
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "bad", "summary")
    unknown = subprocess.run(
        [sys.executable, "-m", "sgmonitor", "check", "--core", "/nonexistent", "--only", "nope"],
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "unknown checks" in unknown.stderr
