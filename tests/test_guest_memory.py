"""Guest memory sources and the page walker against real booted Linux guests.

Every translation is checked against QEMU's own ``gva2gpa``; addresses come from the
guest's own /proc/kallsyms (printed by its /init), never from us.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from guests import GuestUnderTest

from sgmonitor.errors import PageFault
from sgmonitor.guest.elfcore import ElfCore
from sgmonitor.guest.paging import PageWalker, VirtualMemory
from sgmonitor.guest.qemu import QemuGuest

pytestmark = pytest.mark.guest


def qemu_gva2gpa(live: QemuGuest, address: int) -> int | None:
    reply = live.qmp.hmp(f"gva2gpa {address:#x}")
    m = re.search(r"gpa: (0x[0-9a-f]+)", reply)
    return int(m[1], 16) if m else None


def probe_addresses(guest: GuestUnderTest, memory: VirtualMemory) -> dict[str, int]:
    """Kernel text, rodata, data and direct-map addresses of this boot."""
    sym = guest.truth.symbols
    direct_map = int.from_bytes(memory.read(sym["page_offset_base"], 8), "little")
    init_task_phys = memory.translate(sym["init_task"])
    return {
        "text:schedule": sym["schedule"],
        "rodata:linux_banner": sym["linux_banner"],
        "rodata:sys_call_table": sym["sys_call_table"],
        "data:init_task": sym["init_task"],
        "data:init_task+0x1234": sym["init_task"] + 0x1234,
        "directmap:init_task": direct_map + init_task_phys,
        "directmap:1MiB": direct_map + 0x100000,
    }


def test_translations_agree_with_qemu(guest: GuestUnderTest) -> None:
    """Pause until the vCPU is in kernel mode on the kernel PGD (so QEMU's gva2gpa can
    see kernel addresses through CR3), then compare every probe; with PTI and a busy loop, also
    pause in user mode and check we still translate through the kernel PGD."""
    live = QemuGuest(guest.info.qmp)
    want_user_mode = guest.config.pti and guest.config.workload.busy
    compared = user_mode_checked = False
    reference: dict[str, int] = {}
    try:
        for _ in range(200):
            with live.paused():
                regs = live.qmp.registers()
                memory = VirtualMemory(PageWalker.for_kernel(live, live.registers()))
                probes = probe_addresses(guest, memory)
                ours = {name: memory.translate(addr) for name, addr in probes.items()}
                # In kernel mode on the kernel PGD: under PTI the entry code also runs
                # at CPL 0 on the user PGD for a few instructions, where QEMU's own
                # gva2gpa (through the live CR3) cannot see kernel text.
                if regs["cpl"] == 0 and not regs["cr3"] & 0x1000 and not compared:
                    for name, addr in probes.items():
                        assert ours[name] == qemu_gva2gpa(live, addr), name
                    reference, compared = ours, True
                elif regs["cpl"] == 3 and regs["cr3"] & 0x1000:
                    with pytest.raises(PageFault):  # the user PGD lacks kernel data
                        PageWalker(live, regs["cr3"], live.registers().la57).translate(
                            probes["data:init_task"]
                        )
                    user_mode_ours, user_mode_checked = ours, True
            if compared and (user_mode_checked or not want_user_mode):
                break
            time.sleep(0.02)
        assert compared, "never caught the vCPU in kernel mode"
        if want_user_mode:
            assert user_mode_checked, "never caught the busy vCPU in user mode under PTI"
            assert user_mode_ours == reference
    finally:
        live.close()


def test_paging_mode_matches_the_machine(guest: GuestUnderTest) -> None:
    with QemuGuest(guest.info.qmp) as live:
        regs = live.registers()
        walker = PageWalker.for_kernel(live, regs)
        assert len(walker.levels) == guest.config.paging
        assert regs.la57 == (guest.config.paging == 5)


def test_linux_banner_reads_as_the_booted_release(guest: GuestUnderTest) -> None:
    with QemuGuest(guest.info.qmp) as live, live.paused():
        memory = VirtualMemory(PageWalker.for_kernel(live, live.registers()))
        banner = memory.read(guest.truth.symbols["linux_banner"], 256).split(b"\0")[0]
    assert banner.decode().startswith(f"Linux version {guest.info.release} ")


def test_ram_file_found_through_qmp_alone(guest: GuestUnderTest) -> None:
    with QemuGuest(guest.info.qmp) as live:
        assert live.path == guest.info.ram
        assert sum(len(r) for r in live.ram_ranges()) <= guest.config.mem_mib << 20
        assert live.ram_ranges()[-1].stop == guest.config.mem_mib << 20
        with pytest.raises(Exception, match="not guest RAM"):
            live.read_physical(guest.config.mem_mib << 20, 8)


def test_elf_core_gives_the_same_bytes_as_the_live_guest(
    guest: GuestUnderTest, tmp_path: Path
) -> None:
    core_path = tmp_path / "guest.core"
    with QemuGuest(guest.info.qmp) as live, live.paused():
        live.qmp.command("dump-guest-memory", paging=False, protocol=f"file:{core_path}")
        live_memory = VirtualMemory(PageWalker.for_kernel(live, live.registers()))
        probes = probe_addresses(guest, live_memory)
        live_pages = {n: live_memory.read(a & ~0xFFF, 4096) for n, a in probes.items()}
        live_regs = live.registers()
    with ElfCore(str(core_path)) as core:
        regs = core.registers()
        assert (regs.cr0, regs.cr3, regs.cr4) == (live_regs.cr0, live_regs.cr3, live_regs.cr4)
        core_memory = VirtualMemory(PageWalker.for_kernel(core, regs))
        for name, address in probes.items():
            assert core_memory.read(address & ~0xFFF, 4096) == live_pages[name], name
        vmcoreinfo = core.vmcoreinfo()
        assert vmcoreinfo is not None
        assert f"OSRELEASE={guest.info.release}\n".encode() in vmcoreinfo
