"""Shared fixtures: real Linux guests booted under QEMU, one at a time.

``guest`` is parametrized over the lab configurations in ``guests.py``, which together
cover both paging modes, KASLR on and off, PTI with a busy user-space loop, and two
kernel flavours. pytest groups the tests by parameter, so each guest boots once per
session and is stopped before the next one starts (2 cores: never more than one guest
at a time). A test that needs some configurations only says so with ``guests.only``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from guests import LAB_CONFIGS, GuestUnderTest

from sgmonitor.lab import machine


def _boot(key: str) -> Iterator[GuestUnderTest]:
    name = f"t{os.getpid()}-{key.split('-')[0]}{len(key)}"
    config = LAB_CONFIGS[key]
    info = machine.start(name, config)
    try:
        yield GuestUnderTest(key, info, config)
    finally:
        machine.stop(name)


@pytest.fixture(scope="session", params=sorted(LAB_CONFIGS))
def guest(request: pytest.FixtureRequest) -> Iterator[GuestUnderTest]:
    """Each lab configuration in turn."""
    yield from _boot(request.param)
