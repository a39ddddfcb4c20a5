"""Lab guest configurations the tests run on, and the marker to pick some of them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload


@dataclass(frozen=True)
class GuestUnderTest:
    """A running lab guest together with the configuration it was booted with."""

    key: str
    info: machine.LabGuest
    config: machine.MachineConfig

    @property
    def truth(self) -> machine.Truth:
        return machine.truth(self.info)


LAB_CONFIGS = {
    # The paper's guest: ~250 processes, 5-level paging (-cpu max), KASLR.
    "cloud-5level-kaslr": machine.MachineConfig(paging=5, workload=Workload(procs=200)),
    # PTI with a busy user-space loop: the paused vCPU is often in user mode.
    "cloud-4level-nokaslr-pti-busy": machine.MachineConfig(
        paging=4, kaslr=False, pti=True, workload=Workload(procs=20, busy=True)
    ),
    # Another flavour of Debian kernel: other struct layouts, other config.
    "amd64-4level-kaslr": machine.MachineConfig(
        flavor="amd64", paging=4, workload=Workload(procs=20)
    ),
}


def only(*keys: str) -> pytest.MarkDecorator:
    """Run a test on the named lab configurations only (the guests are shared)."""
    return pytest.mark.parametrize("guest", keys, indirect=True)


MAIN = "cloud-5level-kaslr"
