"""A malicious untrusted library against the real secure path.

Real processes (hypervisor service serving TWO live guests, enclave), real sockets,
real AES-GCM. Each attack of ``sgmonitor.untrusted.malicious`` must end the scan in a
clear error (INVALID_SEAL for anything forged, TIMEOUT for a dropped reply, quickly),
produce no records at all, and leave the monitor able to run an honest scan in a new
session afterwards.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
from guests import MAIN, GuestUnderTest, only

from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import LocalDeployment, local_deployment
from sgmonitor.untrusted.library import ScanError, SecureMonitor
from sgmonitor.untrusted.malicious import Attack, MaliciousMonitor, Recording
from sgmonitor.wire import (
    Error,
    ErrorCode,
    OpenSession,
    Request,
    recv_frame,
    send_encoded,
)

pytestmark = [pytest.mark.guest, only(MAIN)]

SHORT = 3.0  # seconds per exchange: a dropped reply must fail about this fast
FORGED = [Attack.FLIP, Attack.REPLAY, Attack.REORDER, Attack.SWAP_ADDRESS]


@pytest.fixture(scope="module")
def other_guest() -> Iterator[machine.LabGuest]:
    """A second, small lab guest, so one hypervisor service serves two VMs."""
    name = f"mal{os.getpid() % 100000}"
    config = machine.MachineConfig(paging=4, workload=Workload(procs=5))
    try:
        yield machine.start(name, config)
    finally:
        machine.stop(name)


@pytest.fixture(scope="module")
def hv(guest: GuestUnderTest, other_guest: machine.LabGuest) -> Iterator[LocalDeployment]:
    with local_deployment({"a": guest.info.qmp, "b": other_guest.qmp}) as service:
        yield service


def monitor(hv: LocalDeployment, vm: str = "a", **kw: object) -> MaliciousMonitor:
    return MaliciousMonitor(hv.hypervisor_socket, vm, hv.verifier, timeout=SHORT, **kw)  # type: ignore[arg-type]


def attacked_scan(m: MaliciousMonitor) -> ScanError:
    """Scan under attack: it must fail, with no records, and the attack must have run."""
    records = None
    with pytest.raises(ScanError) as caught:
        records, _ = m.scan()
    assert records is None  # no result at all, so no forged plaintext was used
    assert m.attacked
    return caught.value


def recovers(m: MaliciousMonitor, expected: int) -> None:
    """After the failed session, an honest scan in a new session works again."""
    m.attack = None
    records, _ = m.scan()
    assert len(records) == expected


@pytest.fixture(scope="module")
def honest_count(hv: LocalDeployment) -> int:
    with SecureMonitor(hv.hypervisor_socket, "a", hv.verifier) as m:
        records, _ = m.scan()
    assert len(records) > 200
    return len(records)


@pytest.mark.parametrize("attack", FORGED, ids=str)
def test_forged_replies_are_caught(hv: LocalDeployment, honest_count: int, attack: Attack) -> None:
    with monitor(hv, attack=attack) as m:
        error = attacked_scan(m)
        assert error.code is ErrorCode.INVALID_SEAL
        assert "did not authenticate" in str(error)
        recovers(m, honest_count)


def test_pages_swapped_between_guests_are_caught(hv: LocalDeployment, honest_count: int) -> None:
    recording = Recording()
    with monitor(hv, "b", recording=recording) as other:
        records, _ = other.scan()  # honest, recorded: genuine sealed pages of guest b
        assert 0 < len(records) < honest_count
    with monitor(hv, "a", attack=Attack.SWAP_GUEST, recording=recording) as m:
        assert attacked_scan(m).code is ErrorCode.INVALID_SEAL
        recovers(m, honest_count)


def test_dropped_reply_times_out(hv: LocalDeployment, honest_count: int) -> None:
    with monitor(hv, attack=Attack.DROP) as m:
        started = time.monotonic()
        error = attacked_scan(m)
        assert error.code is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 4 * SHORT
        recovers(m, honest_count)


def test_replayed_session_is_caught(hv: LocalDeployment, honest_count: int) -> None:
    with monitor(hv) as m:
        records, _ = m.scan()  # recorded
        assert len(records) == honest_count
        m.attack = Attack.REPLAY_SESSION
        m.new_session()  # a fresh key and id; the relay answers from the old session
        assert attacked_scan(m).code is ErrorCode.INVALID_SEAL
        recovers(m, honest_count)


def test_hypervisor_refuses_a_replayed_session(hv: LocalDeployment) -> None:
    """Replaying a whole recorded session towards the hypervisor: its OpenSession is
    refused (its statement binds a nonce the service gave another connection, once), so
    nothing is served a second time."""
    frames: list[bytes] = []

    def tap(link: str, frame: bytes) -> None:
        if link == "hypervisor":
            frames.append(frame)

    with SecureMonitor(hv.hypervisor_socket, "a", hv.verifier, tap=tap) as m:
        m.scan()
    opens = [f for f in frames if f[1] == OpenSession.TYPE]
    requests = [f for f in frames if f[1] == Request.TYPE]
    assert opens and requests
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(hv.hypervisor_socket)
        send_encoded(s, opens[0], 5.0)
        refused = recv_frame(s, 5.0)
        assert isinstance(refused, Error) and refused.code is ErrorCode.ATTESTATION_REFUSED
        assert "nonce this connection was not given" in refused.message
        send_encoded(s, requests[0], 5.0)
        refused = recv_frame(s, 5.0)
        assert isinstance(refused, Error) and refused.code is ErrorCode.UNKNOWN_SESSION
