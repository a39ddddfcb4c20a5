"""Real attacks in a running lab guest: our test rootkit (tests/rootkit/) is loaded with
each trick in turn over ``sgmonitor lab exec``, and the guest's own view shows that the
trick took effect (and, where the module can undo it, that rmmod undoes it).

These tests prove the attacks work; the checks that detect them are tested elsewhere.
One small guest of its own (4-level paging, two workload processes) serves them all, in
file order: hiding the module comes last, since a hidden module cannot be removed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rootkit

from sgmonitor.cli import main
from sgmonitor.lab import LabError, machine
from sgmonitor.lab.initramfs import Workload, build_initramfs
from sgmonitor.lab.kernel import fetch_kernel, resolve_release
from sgmonitor.local import local_deployment, read_json_lines
from sgmonitor.untrusted.library import SecureMonitor

KO = "/root/sgm_rootkit.ko"
GETPGID = 121  # getpgid(MAGIC) is -ESRCH (-3) unless a hook answers with its marker
ESRCH = -3


def sgmonitor(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgmonitor", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def name() -> Iterator[str]:
    release = resolve_release("cloud")
    module = rootkit.build_rootkit(release)
    tool = rootkit.build_syscall_tool()
    guest = f"rk{os.getpid()}"
    started = sgmonitor(
        "lab",
        "start",
        "--name",
        guest,
        "--paging",
        "4",
        "--procs",
        "2",
        "--add",
        str(module),
        "--add",
        f"{tool}:/bin/sgm_syscall",
    )
    assert started.returncode == 0, started.stderr
    try:
        assert json.loads(started.stdout)["release"] == release
        yield guest
    finally:
        sgmonitor("lab", "stop", guest)


def sh(name: str, line: str, timeout: float = 30) -> tuple[int, str]:
    """Run a shell command line in the guest through the CLI: (status, output)."""
    done = sgmonitor("lab", "exec", "--timeout", str(timeout), name, "--", "sh", "-c", line)
    assert f"exit status {done.returncode}" in done.stderr, done.stderr
    return done.returncode, done.stdout


def ok(name: str, line: str) -> str:
    status, out = sh(name, line)
    assert status == 0, out
    return out


def getpgid_magic(name: str) -> int:
    return int(ok(name, f"sgm_syscall {GETPGID}"))


def symbol(name: str, sym: str) -> int:
    """A kallsyms address, as the guest's /proc/kallsyms shows it (root sees them)."""
    return int(ok(name, f"grep -w {sym} /proc/kallsyms").split()[0], 16)


def peek(name: str, address: int) -> int:
    """The kernel word at ``address``, read by the guest from its /proc/kcore."""
    return int(ok(name, f"sgm_syscall peek {address:x}"), 16)


def destination(name: str, site: int) -> int:
    """Where the call (E8) or jump (E9) at ``site`` goes, read from the guest's kcore."""
    word = peek(name, site)
    assert word & 0xFF in (0xE8, 0xE9), hex(word)
    rel = (word >> 8) & 0xFFFF_FFFF
    rel -= (rel & 0x8000_0000) << 1
    return (site + 5 + rel) & 0xFFFF_FFFF_FFFF_FFFF


def checked(name: str, only: str) -> Iterator[list[dict[str, object]]]:
    """``sgmonitor check --only ONLY --json`` on the guest in each mode: its findings
    (the command must say it found some: exit 1)."""
    qmp = machine.load(name).qmp
    for mode in ("traditional", "secure"):
        done = sgmonitor("check", "--qemu", qmp, "--mode", mode, "--only", only, "--json")
        assert done.returncode == 1, (mode, done.stderr)
        yield [json.loads(line) for line in done.stdout.splitlines()]


def assert_alive_and_sane(name: str, *, undone: bool = True) -> None:
    """The guest still runs, its log shows no kernel error, and (when the trick was
    undone) every check finds it clean again."""
    assert ok(name, "echo alive") == "alive\n"
    log = ok(name, "dmesg")
    assert not re.search(r"BUG|Oops|general protection|kernel panic", log), log[-3000:]
    if undone:
        qmp = machine.load(name).qmp
        done = sgmonitor("check", "--qemu", qmp, "--mode", "traditional", "--json")
        assert (done.returncode, done.stdout) == (0, ""), done.stderr


@pytest.mark.guest
def test_exec_runs_commands_and_added_files_are_there(name: str) -> None:
    assert sh(name, "echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
    done = sgmonitor("lab", "exec", name, "--", "echo", "a  b", "$HOME;", "'q'")
    assert (done.returncode, done.stdout) == (0, "a  b $HOME; 'q'\n")
    status, _ = sh(name, "sleep 20", timeout=1)
    assert status == 143  # killed by the guest's timeout
    listing = ok(name, f"ls -l {KO} /bin/sgm_syscall").splitlines()
    assert [line.split()[0] for line in listing] == ["-rwxr-xr-x", "-rw-r--r--"]
    assert getpgid_magic(name) == ESRCH


@pytest.mark.guest
def test_patch_x64_sys_call_answers_getpgid_from_the_module(name: str) -> None:
    ok(name, f"insmod {KO} patch_x64_sys_call={GETPGID}")
    assert getpgid_magic(name) == rootkit.MARK_PATCH
    assert int(ok(name, f"sgm_syscall {GETPGID} 1")) == 0  # other calls go on (pid 1: pgid 0)
    log = ok(name, "dmesg")
    patched = re.search(r"x64_sys_call\+(0x[0-9a-f]+): (call|jmp) __x64_sys_getpgid", log)
    assert patched, log[-2000:]
    # The instruction as the guest's /proc/kcore shows it: E8/E9 and a rel32 that now
    # lands on the module's handler; after rmmod, on the system call again.
    site = symbol(name, "x64_sys_call") + int(patched[1], 16)
    assert destination(name, site) == symbol(name, "sgm_patch_handler")
    for found in checked(name, "syscall_dispatch"):
        assert [(f["check"], f["symbol"]) for f in found] == [
            ("syscall_dispatch", f"x64_sys_call+{patched[1]}")
        ]
        assert found[0]["address"] == symbol(name, "sgm_patch_handler")
        assert f"not dispatched any more: getpgid ({GETPGID})" in str(found[0]["summary"])
    ok(name, "rmmod sgm_rootkit")
    assert getpgid_magic(name) == ESRCH
    assert destination(name, site) == symbol(name, "__x64_sys_getpgid")
    assert_alive_and_sane(name)


def vendor_vmlinux() -> str:
    """The vmlinux inside the vmlinuz the lab guest booted (the vendor's image)."""
    return str(fetch_kernel("cloud").vmlinux)


@pytest.mark.guest
def test_text_patches_differ_from_the_vendor_image_and_from_the_baseline(name: str) -> None:
    """Two text patches (x64_sys_call's jump, the entry's call to do_syscall_64), found
    by the kernel_text check against the vendor image (traditional, one shot) and against
    the baseline an IDS took at attach (secure, continuous). A restarted IDS takes its
    baseline over the patched text: the monitor, which kept the first, alerts."""
    qmp = machine.load(name).qmp
    image = ("--vmlinux", vendor_vmlinux())
    clean = sgmonitor("check", "--qemu", qmp, "--mode", "traditional", "--json", *image)
    assert (clean.returncode, clean.stdout) == (0, ""), clean.stderr
    with local_deployment({name: qmp}) as local:
        first = SecureMonitor(local.hypervisor_socket, name, local.verifier, local.monitor)
        with first:
            attach = local.report(first, "kernel_text")
            assert attach["findings"] == [] and len(attach["text_baseline"]) == 64
            ok(name, f"insmod {KO} patch_x64_sys_call={GETPGID} patch_entry=1")
            assert getpgid_magic(name) == rootkit.MARK_PATCH  # the patches are live
            later = local.report(first, "kernel_text")
        assert later["text_baseline"] == attach["text_baseline"]
        changed = {f["symbol"] for f in later["findings"] if f["check"] == "kernel_text"}
        assert changed == {"x64_sys_call", "entry_SYSCALL_64_after_hwframe"}
        second = SecureMonitor(local.hypervisor_socket, name, local.verifier, local.monitor)
        with second:  # the same IDS, restarted: its baseline is the patched text
            again = local.report(second, "kernel_text")
        assert again["findings"] == [] and again["text_baseline"] != attach["text_baseline"]
        alerts = read_json_lines(local.alerts)
        assert [a["kind"] for a in alerts if a["kind"] == "text_baseline"] == ["text_baseline"]
    done = sgmonitor("check", "--qemu", qmp, "--mode", "traditional", "--json", *image)
    assert done.returncode == 1, done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines()]
    assert {f["symbol"] for f in found if f["check"] == "kernel_text"} == changed
    ok(name, "rmmod sgm_rootkit")
    assert_alive_and_sane(name)
    restored = sgmonitor("check", "--qemu", qmp, "--mode", "traditional", "--json", *image)
    assert (restored.returncode, restored.stdout) == (0, ""), restored.stderr


@pytest.mark.guest
def test_hook_syscall_rewrites_the_table_and_is_inert_on_this_kernel(name: str) -> None:
    """Debian 6.1 dispatches through x64_sys_call(): the table entry changes (the guest
    reads it in its /proc/kcore) but the system call does not (see DESIGN.md)."""
    entry = symbol(name, "sys_call_table") + 8 * GETPGID
    original = symbol(name, "__x64_sys_getpgid")
    assert peek(name, entry) == original  # read from the guest's /proc/kcore
    ok(name, f"insmod {KO} hook_syscall={GETPGID}")
    assert peek(name, entry) == symbol(name, "sgm_table_handler")
    assert getpgid_magic(name) == ESRCH  # inert: dispatch does not read the table
    for found in checked(name, "syscall_table"):
        assert [(f["check"], f["symbol"]) for f in found] == [
            ("syscall_table", f"sys_call_table[{GETPGID}]")
        ]
        assert found[0]["address"] == symbol(name, "sgm_table_handler")
    ok(name, "rmmod sgm_rootkit")
    assert peek(name, entry) == original
    assert_alive_and_sane(name)


@pytest.mark.guest
def test_ftrace_hook_redirects_getpgid_and_shows_in_enabled_functions(name: str) -> None:
    ok(name, f"insmod {KO} ftrace_hook=__x64_sys_getpgid")
    assert getpgid_magic(name) == rootkit.MARK_FTRACE
    tracing = "/sys/kernel/tracing"
    ok(name, f"grep -q tracefs /proc/mounts || mount -t tracefs nodev {tracing}")
    enabled = ok(name, f"cat {tracing}/enabled_functions")
    assert re.search(r"__x64_sys_getpgid .*\bR\b.*\bI\b", enabled), enabled  # regs, ipmodify
    for found in checked(name, "ftrace_kprobes"):
        assert [(f["check"], f["symbol"]) for f in found] == [
            ("ftrace_kprobes", "__x64_sys_getpgid")
        ]
        assert found[0]["address"] == symbol(name, "sgm_ftrace_cb")
    ok(name, "rmmod sgm_rootkit")
    assert getpgid_magic(name) == ESRCH
    assert "__x64_sys_getpgid" not in ok(name, f"cat {tracing}/enabled_functions")
    assert_alive_and_sane(name)


def hits(name: str, counter: str) -> int:
    """One of the rootkit's hit counters, as the guest's /sys/module shows it."""
    return int(ok(name, f"cat /sys/module/sgm_rootkit/parameters/{counter}"))


@pytest.mark.guest
def test_kprobe_hook_runs_the_modules_handler(name: str) -> None:
    ok(name, f"insmod {KO} kprobe_hook=__x64_sys_getpgid")
    debugfs = "/sys/kernel/debug"
    ok(name, f"grep -q debugfs /proc/mounts || mount -t debugfs none {debugfs}")
    assert re.search(r"\bk\s+__x64_sys_getpgid\+0x0", ok(name, f"cat {debugfs}/kprobes/list"))
    before = hits(name, "kprobe_hits")
    getpgid_magic(name)
    assert hits(name, "kprobe_hits") > before  # the module's handler runs at each call
    for found in checked(name, "ftrace_kprobes"):
        assert [(f["check"], f["symbol"]) for f in found] == [
            ("ftrace_kprobes", "__x64_sys_getpgid")
        ]
        assert found[0]["address"] == symbol(name, "sgm_kprobe_pre")
        assert "pre_handler" in str(found[0]["summary"])
    ok(name, "rmmod sgm_rootkit")
    assert "__x64_sys_getpgid" not in ok(name, f"cat {debugfs}/kprobes/list")
    assert_alive_and_sane(name)


@pytest.mark.guest
def test_patch_entry_sees_every_system_call_first(name: str) -> None:
    ok(name, f"insmod {KO} patch_entry=1")
    patched = re.search(r"entry_SYSCALL_64\+(0x[0-9a-f]+): call do_syscall_64", ok(name, "dmesg"))
    assert patched
    site = symbol(name, "entry_SYSCALL_64") + int(patched[1], 16)
    assert destination(name, site) == symbol(name, "sgm_entry_hook")  # the guest's kcore
    before = hits(name, "entry_hits")
    ok(name, "true")
    assert hits(name, "entry_hits") > before  # system calls now pass through the module
    for found in checked(name, "syscall_entry"):
        assert [f["check"] for f in found] == ["syscall_entry"]
        assert found[0]["address"] == symbol(name, "sgm_entry_hook")
    ok(name, "rmmod sgm_rootkit")
    assert destination(name, site) == symbol(name, "do_syscall_64")
    assert_alive_and_sane(name)


@pytest.mark.guest
def test_hook_idt_runs_the_modules_thunk_on_int3(name: str) -> None:
    ok(name, f"insmod {KO} hook_idt=3")
    before = hits(name, "idt_hits")
    assert sh(name, "sgm_syscall int3")[0] == 128 + 5  # SIGTRAP, as without the hook
    assert hits(name, "idt_hits") > before  # the trap went through the module's thunk
    for found in checked(name, "idt"):
        assert [(f["check"], f["symbol"]) for f in found] == [("idt", "idt_table[3]")]
        assert found[0]["address"] == symbol(name, "sgm_idt_thunk")
    ok(name, "rmmod sgm_rootkit")
    assert sh(name, "sgm_syscall int3")[0] == 128 + 5
    assert_alive_and_sane(name)


@pytest.mark.guest
def test_hide_pid_escapes_kill_minus_one_but_stays_in_proc(name: str) -> None:
    """Off the task list, the process escapes what walks it (kill -1: for_each_process);
    /proc (and so ps) lists pids from the pid IDR, where it stays."""
    spawn = "su -s /bin/sh worker -c 'exec sleep 1000' >/dev/null 2>&1 & echo $!"
    hidden, visible = int(ok(name, spawn)), int(ok(name, spawn))
    ok(name, f"insmod {KO} hide_pid={hidden}")
    assert f"pid {hidden} (sleep) unlinked" in ok(name, "dmesg")
    ok(name, f"su -s /bin/sh worker -c 'kill -TERM -1'; sleep 1; test -d /proc/{hidden}")
    assert ok(name, f"test -d /proc/{visible} || echo gone") == "gone\n"
    assert re.search(rf"^\s*{hidden}\s+worker\s+sleep 1000", ok(name, "ps"), re.MULTILINE)
    for found in checked(name, "hidden_processes"):
        assert [(f["check"], f["pid"]) for f in found] == [("hidden_processes", hidden)]
    ok(name, "rmmod sgm_rootkit")
    ok(name, f"su -s /bin/sh worker -c 'kill -TERM -1'; sleep 1; ! test -d /proc/{hidden}")
    assert_alive_and_sane(name)


def container_pids(name: str, member: int) -> set[int]:
    """The pids /proc shows inside the PID namespace of process ``member`` (the
    container's own view, through nsenter)."""
    listing = ok(name, f"nsenter -t {member} -p -m ls /proc").split()
    return {int(entry) for entry in listing if entry.isdigit()}


@pytest.mark.guest
def test_hide_pid_ns_hides_a_process_inside_its_container_only(name: str) -> None:
    """A container (a PID and mount namespace, /proc of its own): its init and one more
    process. Taken out of the container's PID IDR, the second vanishes from the
    container's /proc while the host still lists it."""
    ok(name, "unshare -p -f -m --mount-proc sh -c 'sleep 1001 & exec sleep 1002' >/dev/null 2>&1 &")
    ok(name, "sleep 1")
    host = {int(line.split()[0]): line for line in ok(name, "ps").splitlines()[1:]}
    init = next(pid for pid, line in host.items() if line.endswith("sleep 1002"))
    hidden = next(pid for pid, line in host.items() if line.endswith("sleep 1001"))
    assert {1, 2} <= container_pids(name, init)  # the container's init and the sleep
    ok(name, f"insmod {KO} hide_pid_ns={hidden}")
    assert "(where it is 2)" in ok(name, "dmesg")
    assert 2 not in container_pids(name, init)
    assert re.search(rf"^\s*{hidden}\s.*sleep 1001", ok(name, "ps"), re.MULTILINE)
    for found in checked(name, "hidden_processes"):
        assert [(f["check"], f["pid"]) for f in found] == [("hidden_processes", hidden)]
        assert "namespace level 1 (as 2)" in str(found[0]["summary"])
    ok(name, "rmmod sgm_rootkit")
    assert 2 in container_pids(name, init)
    ok(name, f"kill {init} {hidden}")
    assert_alive_and_sane(name)


@pytest.mark.guest
def test_root_pid_makes_a_users_shell_root(name: str) -> None:
    # A user's shell prints the ids of a fresh child process to a file root opened for it.
    # (A plain 'id', which busybox's shell runs as an in-process applet, was seen to print
    # uid=1000 with gid=0 after the rooting, while /proc and a child say 0: not chased.)
    loop = "while :; do /bin/busybox id; sleep 0.2; done"
    shell = int(ok(name, f"su -s /bin/sh worker -c '{loop}' >/tmp/ids 2>&1 & echo $!"))
    ok(name, "sleep 1")
    assert ok(name, "tail -n1 /tmp/ids").startswith("uid=1000(worker) gid=1000(worker)")
    ok(name, f"insmod {KO} root_pid={shell}")
    assert "Uid:\t0\t0\t0\t0" in ok(name, f"cat /proc/{shell}/status")
    assert wait_for_line(name, "/tmp/ids", "uid=0(root) gid=0(root)")
    assert re.search(rf"^\s*{shell}\s+root\s", ok(name, "ps"), re.MULTILINE)
    for found in checked(name, "credentials"):
        # The shell, and any child it forked since (its cred is a copy of the edited one).
        pids = {int(str(f["pid"])) for f in found if "overwritten in place" in str(f["summary"])}
        assert shell in pids and min(pids) == shell, found
        assert {f["check"] for f in found} == {"credentials"}
    ok(name, "rmmod sgm_rootkit")
    assert "Uid:\t1000\t1000\t1000\t1000" in ok(name, f"cat /proc/{shell}/status")
    assert wait_for_line(name, "/tmp/ids", "uid=1000(worker) gid=1000(worker)")
    ok(name, f"kill {shell}")
    assert_alive_and_sane(name)


def wait_for_line(name: str, path: str, prefix: str, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok(name, f"tail -n1 {path}").startswith(prefix):
            return True
        time.sleep(0.3)
    return False


@pytest.mark.guest
def test_hide_module_vanishes_from_lsmod_proc_and_sys_yet_runs(name: str) -> None:
    ok(name, f"insmod {KO} hide_module=1 patch_x64_sys_call={GETPGID}")
    assert "sgm_rootkit" not in ok(name, "lsmod; cat /proc/modules; ls /sys/module")
    assert getpgid_magic(name) == rootkit.MARK_PATCH  # still loaded and hooking
    for found in checked(name, "hidden_modules"):
        assert {(f["check"], f["module"]) for f in found} == {("hidden_modules", "sgm_rootkit")}
    status, out = sh(name, "rmmod sgm_rootkit")
    assert status != 0 and "No such file" in out  # and so it cannot be removed
    assert_alive_and_sane(name, undone=False)


def test_added_files_land_in_the_initramfs_where_asked(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o755)
    data = tmp_path / "data.txt"
    data.write_text("x")
    files = ((str(tool), "/root/tool"), (str(data), "/opt/deep/data.txt"))
    fw_cfg = tmp_path / "fw.ko"
    fw_cfg.write_bytes(b"ko")
    (tmp_path / "a.cpio").write_bytes(build_initramfs(fw_cfg, Workload(), files=files))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-i", "-d", "-F", str(tmp_path / "a.cpio")], cwd=out, check=True
    )
    assert (out / "root/tool").read_bytes() == b"#!/bin/sh\n"
    assert os.access(out / "root/tool", os.X_OK)
    assert (out / "opt/deep/data.txt").read_text() == "x"
    assert not os.access(out / "opt/deep/data.txt", os.X_OK)


def test_bad_added_files_and_commands_are_refused(tmp_path: Path) -> None:
    for bad in ("root/x", "/root/../etc/x", "/root//x", "/root/."):
        with pytest.raises(LabError, match="bad guest path"):
            machine.MachineConfig(files=(("/etc/hostname", bad),))
    with pytest.raises(LabError, match="nothing to run"):
        machine.exec_in_guest(machine.LabGuest("g", 0, "", "", "", "", "", "", {}), [])
    assert main(["lab", "exec", "no-such-guest", "--", "true"]) == 1


@pytest.mark.guest
def test_fully_hidden_module_leaves_memory_no_module_owns(name: str) -> None:
    """Out of the module list, /sys/module and mod_tree too: no view of modules has it,
    yet its code runs (its kprobe stays armed). What the loader allocated for it is
    found, owned by no module, and so is its kprobe's handler. (Runs last: a module
    hidden this way cannot be removed.)"""
    debugfs = "/sys/kernel/debug"
    ok(name, f"grep -q debugfs /proc/mounts || mount -t debugfs none {debugfs}")
    ok(name, f"insmod {KO} hide_module=2 kprobe_hook=__x64_sys_getppid")
    ok(name, "sleep 1")
    assert "sgm_rootkit: hidden from mod_tree" in ok(name, "dmesg | tail -n 3")
    assert "sgm_rootkit" not in ok(name, "lsmod; cat /proc/modules; ls /sys/module")
    assert re.search(r"\bk\s+__(x64|do)_sys_getppid\+0x0", ok(name, f"cat {debugfs}/kprobes/list"))
    for found in checked(name, "module_memory"):
        assert [f["check"] for f in found] == ["module_memory"]
        assert "allocated by load_module" in str(found[0]["summary"])
        memory = int(str(found[0]["address"]))
    for found in checked(name, "ftrace_kprobes"):
        handler = [f for f in found if f["symbol"] == "__x64_sys_getppid"]
        assert len(handler) == 1 and handler[0]["severity"] == "critical"
        assert memory <= int(str(handler[0]["address"])) < memory + (1 << 20)
    assert_alive_and_sane(name, undone=False)
