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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from guests import MAIN, GuestUnderTest, only

from sgmonitor.channel import Kind
from sgmonitor.hypervisor.service import HypervisorService, ServiceConfig
from sgmonitor.keyfiles import load_or_create
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.local import LocalDeployment, local_deployment
from sgmonitor.untrusted.library import EnclaveCallFailed, ScanError, SecureMonitor
from sgmonitor.untrusted.malicious import Attack, MaliciousMonitor, Recording
from sgmonitor.wire.calls import Call, Return
from sgmonitor.wire.core import (
    Error,
    ErrorCode,
    Message,
    decode,
    recv_frame,
    send_encoded,
    send_frame,
)
from sgmonitor.wire.hypervisor import OpenSession
from sgmonitor.wire.sealed import Request

pytestmark = [pytest.mark.guest, only(MAIN)]

SHORT = 3.0  # seconds per exchange: a dropped reply must fail about this fast
FORGED = [Attack.FLIP, Attack.REPLAY, Attack.REORDER, Attack.SWAP_ADDRESS, Attack.INJECT]


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


class Relay:
    """What the relay carried to and from the enclave, decoded."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    def __call__(self, link: str, frame: bytes) -> None:
        self.frames.append((link, frame))

    def enclave_messages(self, since: int = 0) -> list[object]:
        return [decode(f) for link, f in self.frames[since:] if link == "enclave"]


def monitor(hv: LocalDeployment, vm: str = "a", **kw: object) -> MaliciousMonitor:
    kw.setdefault("tap", Relay())
    return MaliciousMonitor(hv.hypervisor_socket, vm, hv.verifier, hv.monitor, timeout=SHORT, **kw)  # type: ignore[arg-type]


def attacked_scan(m: SecureMonitor) -> ScanError:
    """Scan under attack: it must fail in the enclave's own checks, the attack must have
    run, no ``ecall_run_scan`` Return (a report) may have come back, and the session
    must be dead on both sides: the enclave has no session for the guest any more, and
    the hypervisor refuses the session's requests."""
    relay = m.tap
    assert isinstance(relay, Relay)
    old_session = m.session_id
    assert old_session is not None
    start = len(relay.frames)
    with pytest.raises(ScanError) as caught:
        m.scan()
    assert getattr(m, "attacked", True)
    sent = relay.enclave_messages(start)
    scans = {c.call_id for c in sent if isinstance(c, Call) and c.name == "ecall_run_scan"}
    assert scans and not [r for r in sent if isinstance(r, Return) and r.call_id in scans]
    assert m.enclave is not None
    with pytest.raises(EnclaveCallFailed) as gone:
        m.enclave.ecall("ecall_run_scan", 10.0, vm=m.vm, check="pslist", options=b"{}")
    assert gone.value.code is ErrorCode.UNKNOWN_SESSION
    sock = m._connect()
    send_frame(sock, Request(old_session, 1, os.urandom(64)), 5.0)
    refused = recv_frame(sock, 5.0)
    assert isinstance(refused, Error) and refused.code is ErrorCode.UNKNOWN_SESSION
    return caught.value


def recovers(hv: LocalDeployment, m: MaliciousMonitor, expected: int) -> None:
    """After the failed session, an honest scan in a new session works again."""
    m.attack = None
    records, _ = hv.records(m)
    assert len(records) == expected


@pytest.fixture(scope="module")
def honest_count(hv: LocalDeployment) -> int:
    with SecureMonitor(hv.hypervisor_socket, "a", hv.verifier, hv.monitor) as m:
        records, _ = hv.records(m)
    assert len(records) > 200
    return len(records)


@pytest.mark.parametrize("attack", FORGED, ids=str)
def test_forged_replies_are_caught(hv: LocalDeployment, honest_count: int, attack: Attack) -> None:
    with monitor(hv, attack=attack) as m:
        error = attacked_scan(m)
        assert error.code is ErrorCode.INVALID_SEAL and error.origin == "enclave"
        assert "did not authenticate" in str(error)
        recovers(hv, m, honest_count)


def test_pages_swapped_between_guests_are_caught(hv: LocalDeployment, honest_count: int) -> None:
    recording = Recording()
    with monitor(hv, "b", recording=recording) as other:
        records, _ = hv.records(other)  # honest, recorded: genuine sealed pages of guest b
        assert 0 < len(records) < honest_count
    with monitor(hv, "a", attack=Attack.SWAP_GUEST, recording=recording) as m:
        error = attacked_scan(m)
        assert error.code is ErrorCode.INVALID_SEAL and error.origin == "enclave"
        recovers(hv, m, honest_count)


def test_dropped_reply_times_out(hv: LocalDeployment, honest_count: int) -> None:
    with monitor(hv, attack=Attack.DROP) as m:
        started = time.monotonic()
        error = attacked_scan(m)
        assert error.code is ErrorCode.TIMEOUT and error.origin == "enclave"
        assert time.monotonic() - started < 4 * SHORT
        recovers(hv, m, honest_count)


def test_replayed_session_is_caught(hv: LocalDeployment, honest_count: int) -> None:
    with monitor(hv) as m:
        records, _ = hv.records(m)  # recorded
        assert len(records) == honest_count
        m.attack = Attack.REPLAY_SESSION
        m.new_session()  # a fresh key and id; the relay answers from the old session
        error = attacked_scan(m)
        assert error.code is ErrorCode.INVALID_SEAL and error.origin == "enclave"
        recovers(hv, m, honest_count)


def test_hypervisor_refuses_a_replayed_session(hv: LocalDeployment) -> None:
    """Replaying a whole recorded session towards the hypervisor: its OpenSession is
    refused (its statement binds a nonce the service gave another connection, once), so
    nothing is served a second time."""
    frames: list[bytes] = []

    def tap(link: str, frame: bytes) -> None:
        if link == "hypervisor":
            frames.append(frame)

    with SecureMonitor(hv.hypervisor_socket, "a", hv.verifier, hv.monitor, tap=tap) as m:
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


class ForgingHypervisor(HypervisorService):
    """The worst relay: it holds the hypervisor service's private key (stolen from its
    file), so it can seal whatever it likes with the session's right key and sequence
    number. It seals one reply's pages under the wrong first address (the second
    page's), or the wrong VM, in the associated data; nothing else differs from the
    genuine reply."""

    attack = ""
    done = False

    def _serve(self, session: Any, request: Message) -> tuple[Message, list[tuple[int, bytes]]]:
        index, pages = super()._serve(session, request)
        if self.done or len(pages) < 2:
            return index, pages
        self.done = True
        if self.attack == "address":  # the pages, sealed as if the first were the second
            return index, [(pages[1][0], pages[0][1]), *pages[1:]]
        channel = session.channel
        state = channel._state
        honest = channel.seal

        def as_other_vm(kind: Kind, request_id: int, plaintext: bytes, **kw: Any) -> bytes:
            if kind is not Kind.PAGE:
                return honest(kind, request_id, plaintext, **kw)
            saved = state.send  # the AD names guest "b"
            state.send = type(saved)(state.suite, state.session_id, saved.direction, "b")
            try:
                return honest(kind, request_id, plaintext, **kw)
            finally:
                state.send = saved
                channel.seal = honest

        channel.seal = as_other_vm
        return index, pages


@pytest.mark.parametrize("attack", ["address", "vm"])
def test_pages_resealed_with_the_right_key_for_another_address_or_vm(
    hv: LocalDeployment, guest: GuestUnderTest, honest_count: int, attack: str, tmp_path: Path
) -> None:
    """The associated data's address and VM fields are checked by themselves: with the
    key and the sequence number right, a page sealed for another address or VM fails."""
    key, _ = load_or_create(hv.home / "hv.pem", X25519PrivateKey)
    config = ServiceConfig(attestation_keys=(hv.verifier.public_key,))
    forging = ForgingHypervisor.for_qemu(
        str(tmp_path / "f.sock"), key, {"a": guest.info.qmp}, config
    )
    forging.attack = attack
    forging.listen()
    thread = threading.Thread(target=forging.serve_forever, daemon=True)
    thread.start()
    try:
        m = SecureMonitor(
            forging.socket_path, "a", hv.verifier, hv.monitor, timeout=SHORT, tap=Relay()
        )
        with m:
            error = attacked_scan(m)
            assert forging.done  # the forgery was delivered
            assert error.code is ErrorCode.INVALID_SEAL and error.origin == "enclave"
    finally:
        forging.shutdown()
        thread.join(10.0)
