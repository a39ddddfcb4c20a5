"""Shared fixtures: real Linux guests booted under QEMU, one at a time.

``guest`` is parametrized over the lab configurations in ``guests.py``, which together
cover both paging modes, KASLR on and off, PTI with a busy user-space loop, and two
kernel flavours. pytest groups the tests by parameter, so each guest boots once per
session and is stopped before the next one starts (2 cores: never more than one guest
at a time). A test that needs some configurations only says so with ``guests.only``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session", autouse=True)
def installed_enclave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The enclave as ``sgmonitor enclave sign`` installs it, in a home of the test run's
    own (``SGMONITOR_HOME``, inherited by every process the tests start): a simulated
    platform key, a signer, and a SIGSTRUCT for the code under test."""
    home = tmp_path_factory.mktemp("sgmonitor-home")
    old = os.environ.get("SGMONITOR_HOME")
    os.environ["SGMONITOR_HOME"] = str(home)
    cli = [sys.executable, "-m", "sgmonitor.cli", "enclave"]
    subprocess.run([*cli, "platform"], check=True, capture_output=True)
    subprocess.run([*cli, "sign"], check=True, capture_output=True)
    yield home
    if old is None:
        del os.environ["SGMONITOR_HOME"]
    else:
        os.environ["SGMONITOR_HOME"] = old


@pytest.fixture(scope="session", params=sorted(LAB_CONFIGS))
def guest(request: pytest.FixtureRequest) -> Iterator[GuestUnderTest]:
    """Each lab configuration in turn."""
    yield from _boot(request.param)
