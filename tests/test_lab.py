"""The lab's command line: start, list, truth and stop a real guest, and fail cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgmonitor.lab import LabError, machine
from sgmonitor.lab.initramfs import WORKLOAD_UID, CpioWriter, Workload


def sgmonitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgmonitor", *args], capture_output=True, text=True, timeout=300
    )


def qemu_running(pid: int) -> bool:
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.guest
def test_start_list_truth_stop() -> None:
    name = f"cli{os.getpid()}"
    started = sgmonitor("lab", "start", "--name", name, "--procs", "8", "--paging", "4")
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    try:
        assert {"qmp", "ram", "console", "pid"} <= info.keys()
        assert qemu_running(info["pid"]) and Path(info["ram"]).exists()
        listed = [json.loads(line) for line in sgmonitor("lab", "list").stdout.splitlines()]
        assert name in [g["name"] for g in listed]
        truth = [json.loads(line) for line in sgmonitor("lab", "truth", name).stdout.splitlines()]
        by_pid = {p["pid"]: p for p in truth}
        assert by_pid[1]["comm"] == "init" and by_pid[2]["comm"] == "kthreadd"
        workers = [p for p in truth if p["comm"] == "sleep" and p["ppid"] == 1]
        assert len(workers) == 8
        assert sum(p["uid"] == WORKLOAD_UID for p in workers) == 2  # every 4th
        assert all({"pid", "ppid", "uid", "state", "comm"} == p.keys() for p in truth)
        # The State: letter, as the guest's /proc shows it: /init waits for the printer
        # and the workload sleeps; idle workqueue workers are I (TASK_IDLE).
        assert all(p["state"] in set("RSDTtXZPI") for p in truth)
        assert by_pid[1]["state"] == "S" and {p["state"] for p in workers} == {"S"}
        assert any(p["state"] == "I" and p["ppid"] == 2 for p in truth)
        symbols = json.loads(sgmonitor("lab", "truth", name, "--symbols").stdout)
        assert int(symbols["init_task"], 16) >= 0xFFFF_8000_0000_0000
    finally:
        stopped = sgmonitor("lab", "stop", name)
    assert stopped.returncode == 0, stopped.stderr
    assert not qemu_running(info["pid"])
    assert not Path(info["ram"]).exists()
    assert name not in sgmonitor("lab", "list").stdout
    gone = sgmonitor("lab", "truth", name)
    assert gone.returncode == 1 and "no running lab guest" in gone.stderr


@pytest.mark.guest
def test_never_ready_guest_is_an_error_with_its_console_and_leaves_nothing() -> None:
    name = f"slow{os.getpid()}"
    with pytest.raises(LabError, match="did not become ready") as error:
        machine.start(name, machine.MachineConfig(workload=Workload()), timeout=3)
    assert "console tail" in str(error.value)
    assert not machine.ram_path(name).exists()
    assert name not in [g.name for g in machine.running()]
    assert not any(
        f"sgmonitor-{name}".encode() in p.read_bytes()
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if p.exists()
    )


def test_bad_names_and_options_are_refused() -> None:
    with pytest.raises(LabError, match="bad guest name"):
        machine.start("../etc", machine.MachineConfig())
    with pytest.raises(LabError, match="paging"):
        machine.MachineConfig(paging=3)


def test_cpio_writer_produces_what_cpio_reads(tmp_path: Path) -> None:
    """Our newc writer against busybox's cpio reader (an independent implementation)."""
    archive = CpioWriter()
    archive.add_dir("d")
    archive.add_file("d/hello", b"hello, guest\n", mode=0o644)
    archive.add_file("odd", b"x" * 5, mode=0o755)
    (tmp_path / "a.cpio").write_bytes(archive.finish())
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-i", "-d", "-F", str(tmp_path / "a.cpio")], cwd=out, check=True
    )
    assert (out / "d" / "hello").read_bytes() == b"hello, guest\n"
    assert (out / "odd").read_bytes() == b"xxxxx"
    assert os.access(out / "odd", os.X_OK)
