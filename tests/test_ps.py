"""``sgmonitor ps`` against the guest's own /proc view, on every lab configuration,
from the live guest and from an ELF core, and against hostile guest data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dkom import pointer as _pointer
from dkom import tampered
from guests import MAIN, GuestUnderTest, only

from sgmonitor.bench import PARTS
from sgmonitor.enclave.memory import FIRST_WINDOW
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.guest.qmp import Qmp, held_still
from sgmonitor.ids.pslist import list_processes
from sgmonitor.kernel.helpers.sched import for_each_process
from sgmonitor.kernel.kallsyms import (
    MAX_IMAGE_SIZE,
    VmlinuxFile,
    decode_kallsyms,
    find_kallsyms_tables,
)
from sgmonitor.lab import machine
from sgmonitor.lab.kernel import fetch_kernel
from sgmonitor.local import local_deployment
from sgmonitor.traditional import open_guest_kernel
from sgmonitor.untrusted.library import CouldNotCheck, SecureMonitor

pytestmark = pytest.mark.guest

EXIT_COULD_NOT_CHECK = 3
# The letters /proc shows (fs/proc/array.c, task_state_array[]): one of these, never
# "" nor "?".
PROC_STATES = frozenset("RSDTtXZPI")
# Kernel threads woken (R) or back asleep between the guest's view and ours: a timer or
# a work item. On the lab's single vCPU a handful at most; user space never changes.
MAX_WOKEN_KERNEL_THREADS = 2


def ps(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgmonitor", "ps", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ps_json(*args: str) -> list[dict[str, object]]:
    result = ps(*args, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def same_as_guest(records: list[dict[str, object]], truth: machine.Truth) -> None:
    """Every process the guest lists, and no other, with its ppid, uid, name and state.

    A workqueue worker's /proc name ends in the work it last ran ("kworker/0:1-events");
    that suffix is volatile by design, so for those only the part before it must match.
    States: see :func:`same_states`.
    """
    ours = {r["pid"]: r for r in records}
    theirs = {p["pid"]: p for p in truth.processes}
    assert sorted(ours) == sorted(theirs)
    for pid, mine in ours.items():
        guest_view = theirs[pid]
        assert (mine["ppid"], mine["uid"]) == (guest_view["ppid"], guest_view["uid"]), pid
        name = str(guest_view["comm"])
        if str(mine["comm"]).startswith("kworker/"):
            assert name.split("+")[0].split("-")[0] == mine["comm"], pid
        else:
            assert mine["name"] == name, pid
        assert str(mine["name"]).startswith(str(mine["comm"])), pid
        assert mine["tgid"] == pid
    same_states(ours, theirs)


def same_states(
    ours: dict[object, dict[str, object]], theirs: dict[object, dict[str, object]]
) -> None:
    """sgmonitor's state letter is the guest's own (its ``State:`` line).

    The guest printed its view a moment before ours, and it ran on in between. User
    space cannot change state here: /init waits (S), the workload sleeps (S), the busy
    loop runs (R), and nothing wakes them. A kernel thread can be woken (S or I in one
    view, R in the other), so that alone is allowed, for a few of them.
    """
    woken = []
    for pid, mine in ours.items():
        state, guest_state = mine["state"], theirs[pid]["state"]
        assert state in PROC_STATES and guest_state in PROC_STATES, (pid, state, guest_state)
        if state == guest_state:
            continue
        kernel_thread = pid == 2 or theirs[pid]["ppid"] == 2
        assert kernel_thread and {state, guest_state} in ({"R", "S"}, {"R", "I"}), (
            pid,
            theirs[pid]["comm"],
            f"guest {guest_state}, sgmonitor {state}",
        )
        woken.append(pid)
    assert len(woken) <= MAX_WOKEN_KERNEL_THREADS, woken


def test_ps_lists_exactly_what_the_guest_lists(guest: GuestUnderTest) -> None:
    truth = machine.truth(guest.info, fresh=True)
    records = ps_json("--qemu", guest.info.qmp)
    same_as_guest(records, truth)
    workers = [r for r in records if r["comm"] == "sleep" and r["ppid"] == 1]
    assert len(workers) == guest.config.workload.procs
    assert {r["state"] for r in workers} <= {"S"}
    kernel_threads = [r for r in records if r["ppid"] == 2]
    assert len(kernel_threads) >= 20  # under kthreadd
    # Both sleeping kinds are there to compare: S (ksoftirqd, kswapd) and I (TASK_IDLE:
    # idle workqueue workers, rcu_gp), which a wrong TASK_IDLE check would turn into D.
    assert {"S", "I"} <= {str(r["state"]) for r in kernel_threads}
    if guest.config.workload.busy:  # the loop never sleeps
        assert any(r["comm"] == "init" and r["state"] == "R" for r in records)


def test_ps_from_an_elf_core_equals_the_live_guest(guest: GuestUnderTest, tmp_path: Path) -> None:
    core = tmp_path / "guest.core"
    with held_still(guest.info.qmp):
        with Qmp(guest.info.qmp) as qmp:
            qmp.command("dump-guest-memory", paging=False, protocol=f"file:{core}")
        live_records = ps_json("--qemu", guest.info.qmp)
    assert ps_json("--core", str(core)) == live_records


@only(MAIN)
def test_ps_from_a_raw_ram_image_with_registers_given(
    guest: GuestUnderTest, tmp_path: Path
) -> None:
    image = tmp_path / "guest.ram"
    with held_still(guest.info.qmp):
        with Qmp(guest.info.qmp) as qmp:
            regs = qmp.registers()
        shutil.copyfile(guest.info.ram, image)
        live_records = ps_json("--qemu", guest.info.qmp, "--mode", "traditional")
    raw = ("--raw", str(image), "--cr3", f"{regs['cr3']:x}", "--cr4", f"{regs['cr4']:x}")
    assert ps_json(*raw) == live_records
    missing = ps("--raw", str(image), "--cr3", f"{regs['cr3']:x}")
    assert missing.returncode == 1 and "--cr4" in missing.stderr


def test_vendor_vmlinux_is_checked(guest: GuestUnderTest) -> None:
    own = ps("--qemu", guest.info.qmp, "--mode", "traditional", "--vmlinux", guest.info.vmlinux)
    assert own.returncode == 0, own.stderr
    other_flavor = "amd64" if guest.config.flavor == "cloud" else "cloud"
    wrong = ps(
        "--qemu",
        guest.info.qmp,
        "--mode",
        "traditional",
        "--vmlinux",
        str(fetch_kernel(other_flavor).vmlinux),
    )
    assert wrong.returncode == EXIT_COULD_NOT_CHECK
    assert "BTF" in wrong.stderr and "differs" in wrong.stderr
    assert wrong.stdout == ""


@only(MAIN)
def test_system_map_is_used_when_it_fits(guest: GuestUnderTest, tmp_path: Path) -> None:
    """A System.map made from the vendor vmlinux's own kallsyms works; one that is off
    by a page is refused rather than used."""
    vendor = VmlinuxFile(guest.info.vmlinux)  # link-time addresses, as in System.map
    image = range(vendor.ranges[0].start, vendor.ranges[0].start + MAX_IMAGE_SIZE)
    symbols = decode_kallsyms(vendor, find_kallsyms_tables(vendor, image), image)
    entries = list(zip(symbols.addresses, symbols.types, symbols.names, strict=True))
    good, bad = tmp_path / "System.map", tmp_path / "System.map.bad"
    good.write_text("".join(f"{a:016x} {t} {n}\n" for a, t, n in entries))
    bad.write_text("".join(f"{a + 0x1000:016x} {t} {n}\n" for a, t, n in entries))
    with held_still(guest.info.qmp):
        with_map = ps_json(
            "--qemu", guest.info.qmp, "--mode", "traditional", "--system-map", str(good)
        )
        assert with_map == ps_json("--qemu", guest.info.qmp, "--mode", "traditional")
    refused = ps("--qemu", guest.info.qmp, "--mode", "traditional", "--system-map", str(bad))
    assert refused.returncode == EXIT_COULD_NOT_CHECK and "System.map" in refused.stderr


# -- hostile guest data: written into the paused guest's RAM file by the test --------


def assert_could_not_check(qmp: str, mode: str, *expected: str) -> None:
    started = time.monotonic()
    result = ps("--qemu", qmp, "--mode", mode, timeout=60)
    assert result.returncode == EXIT_COULD_NOT_CHECK, result.stderr
    assert result.stdout == ""
    assert any(word in result.stderr for word in expected), result.stderr
    assert time.monotonic() - started < 30, "a hostile guest must not make ps slow"
    if mode == "secure":  # the untrusted side learns what failed, not where in the kernel
        assert not re.search(r"0x[0-9a-fA-F]{5,}", result.stderr), result.stderr


@only(MAIN)
@pytest.mark.parametrize("mode", ["traditional", "secure"])
@pytest.mark.parametrize("how", ["cycle-skips-head", "cycle-keeps-prev", "wild", "unmapped"])
def test_hostile_task_list_is_a_bounded_error(guest: GuestUnderTest, how: str, mode: str) -> None:
    with held_still(guest.info.qmp), QemuGuest(guest.info.qmp) as live:
        kernel = open_guest_kernel(live)
        tasks = list(for_each_process(kernel))
        memory = kernel.memory
        first, second, later = (tasks[i].tasks for i in (3, 4, 10))  # struct list_head
        patches: dict[int, bytes] = {}
        if how == "cycle-skips-head":  # later -> first: a ring that never reaches init_task
            patches[memory.translate(later.next.address_)] = _pointer(first.address_)
        elif how == "cycle-keeps-prev":  # prev links kept consistent, still a ring
            patches[memory.translate(later.next.address_)] = _pointer(first.address_)
            patches[memory.translate(first.prev.address_)] = _pointer(later.address_)
        elif how == "wild":
            patches[memory.translate(second.next.address_)] = _pointer(0xDEAD_0000_0000_0000)
        elif how == "unmapped":  # a canonical kernel address with nothing mapped there
            patches[memory.translate(second.next.address_)] = _pointer(0xFFFF_FFFF_FF7F_0000)
        else:
            raise AssertionError(how)
        live.qmp.close()  # let ps have the monitor
        with tampered(live, patches):
            assert_could_not_check(
                guest.info.qmp, mode, "cycle", "seen twice", "broken", "unreadable"
            )
    assert ps("--qemu", guest.info.qmp).returncode == 0  # restored: the guest is fine


@only(MAIN)
def test_a_scan_broken_off_mid_stream_leaves_the_session_sound(guest: GuestUnderTest) -> None:
    """A broken link far down the task list stops the walk while the next list window
    is still out (streamed). The enclave must take that answer in before its ECALL
    returns, or the next scan of the same session would read it as its own: after the
    guest is restored, the next scan must list exactly what the traditional path does."""
    with held_still(guest.info.qmp), QemuGuest(guest.info.qmp) as live:
        kernel = open_guest_kernel(live)
        expected = [r.as_dict() for r in list_processes(kernel)]
        tasks = list(for_each_process(kernel))
        assert len(tasks) > 3 * FIRST_WINDOW  # the break lies beyond the first windows
        broken = tasks[3 * FIRST_WINDOW].tasks  # its prev no longer names the task before
        patch = {kernel.memory.translate(broken.prev.address_): _pointer(tasks[0].tasks.address_)}
        live.qmp.close()  # let the hypervisor service have the monitor
        with (
            local_deployment({"main": guest.info.qmp}) as local,
            SecureMonitor(
                local.hypervisor_socket, "main", local.verifier, local.monitor, pause=False
            ) as ids,  # no EndScan: nothing else takes the answer in before the ECALL ends
        ):
            local.records(ids)  # learn the windows and predictions, as a running IDS has
            with tampered(live, patch), pytest.raises(CouldNotCheck, match="broken"):
                ids.scan()
            records, stats = local.records(ids)
    assert records == expected
    assert stats["crossings"] > 2  # streamed: several windows


@only(MAIN)
@pytest.mark.parametrize("mode", ["traditional", "secure"])
@pytest.mark.parametrize("how", ["truncated", "lying-type-length", "bad-magic"])
def test_hostile_btf_is_rejected(guest: GuestUnderTest, how: str, mode: str) -> None:
    with held_still(guest.info.qmp), QemuGuest(guest.info.qmp) as live:
        kernel = open_guest_kernel(live)
        start = kernel.symbols["__start_BTF"]
        header = kernel.memory.read(start, 24)
        header_at = kernel.memory.translate(start)
        hdr_len = int.from_bytes(header[4:8], "little")
        type_len = int.from_bytes(header[12:16], "little")
        str_off = int.from_bytes(header[16:20], "little")
        if how == "truncated":  # the string section claims to run far past __stop_BTF
            patch = {header_at + 20: (0x7FFF_FFF0 - str_off).to_bytes(4, "little")}
        elif how == "lying-type-length":  # types claimed to run into the strings
            patch = {header_at + 12: (type_len + 4096).to_bytes(4, "little")}
        elif how == "bad-magic":
            patch = {header_at: b"\x00\x00"}
        else:
            raise AssertionError(how)
        assert hdr_len == 24
        live.qmp.close()  # let ps have the monitor
        with tampered(live, patch):
            assert_could_not_check(guest.info.qmp, mode, "BTF")


@only(MAIN)
def test_the_three_modes_agree(guest: GuestUnderTest) -> None:
    """The same IDS code over the in-process path, the unsealed secure path and the
    sealed one lists the same processes (the guest is held still across the three)."""
    with held_still(guest.info.qmp):
        traditional = ps_json("--qemu", guest.info.qmp, "--mode", "traditional")
        plain = ps_json("--qemu", guest.info.qmp, "--mode", "secure-plain")
        secure = ps_json("--qemu", guest.info.qmp)  # secure is the default for --qemu
    assert traditional == plain == secure
    assert len(secure) > guest.config.workload.procs


@only(MAIN)
def test_options_that_need_the_traditional_path_are_refused_in_secure_mode(
    guest: GuestUnderTest,
) -> None:
    refused = ps("--qemu", guest.info.qmp, "--mode", "secure", "--vmlinux", guest.info.vmlinux)
    assert refused.returncode == 1 and "traditional" in refused.stderr


def test_bench_json_has_every_mode_and_the_same_list() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgmonitor", "bench", "--processes", "60", "--runs", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)["runs"]
    assert [r["mode"] for r in runs] == ["traditional", "secure-plain", "secure"]
    for run in runs:
        assert {"mode", "processes", "cache_budget", "mean_s", "stdev_s", "crossings"} <= set(run)
        assert run["truth"] == "guest"  # every run against the guest's own listing
        assert run["records_match_truth"] and run["processes"] >= 60 and run["mean_s"] > 0
        assert len(run["scans"]) == 2 and all(s["matches_truth"] for s in run["scans"])
        assert all(0 <= s["crossing_s"] < s["elapsed_s"] for s in run["scans"])
    assert runs[0]["crossings"] == 0 and runs[2]["crossings"] > 0
    assert all(s["crossing_s"] == 0 for s in runs[0]["scans"])
    assert all(s["crossing_s"] > 0 for s in runs[2]["scans"])
    assert runs[2]["cache_budget"] == 32 << 20
    # Each secure scan's time, split where it was spent: the enclave's part of the wall
    # time, its waits, its opening of replies and the hypervisor's share all measured.
    assert all(s["parts"] == {} for s in runs[0]["scans"])
    for scan in runs[2]["scans"]:
        parts = scan["parts"]
        assert set(parts) == set(PARTS)
        assert 0 < parts["enclave_s"] < parts["ecall_s"] < scan["elapsed_s"]
        assert parts["crossing_s"] == scan["crossing_s"]
        assert 0 < parts["crossing_s"] + parts["opening_s"] < parts["enclave_s"]
        assert parts["hypervisor_s"] > 0 and parts["relay_s"] > 0 and parts["report_s"] > 0


@only(MAIN)
def test_bench_on_an_existing_guest_compares_with_traditional(guest: GuestUnderTest) -> None:
    command = ["bench", "--qemu", guest.info.qmp, "--runs", "2", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "sgmonitor", *command, "--modes", "traditional", "secure"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)["runs"]
    assert [r["mode"] for r in runs] == ["traditional", "secure"]
    for run in runs:
        assert run["truth"] == "traditional" and run["records_match_truth"], run["mismatch"]
        assert run["processes"] > 20 and len(run["scans"]) == 2
    with Qmp(guest.info.qmp) as qmp:
        assert qmp.is_running()  # held still for the measurement, then left running
