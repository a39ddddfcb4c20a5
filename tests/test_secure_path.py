"""The secure data path on a real guest: hypervisor service, enclave, untrusted relay.

- ``secure`` and ``secure-plain`` list the same processes as the in-process
  (traditional) path, and as the guest itself;
- the hypervisor service survives malformed, truncated and oversized frames and bad
  sessions, and keeps serving a session that was open all along;
- the relay sees no plaintext in ``secure`` (no process name, kernel release or
  banner in any relayed byte), and does see it in ``secure-plain`` (so the check works).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from guests import MAIN, GuestUnderTest, only

from sgmonitor.channel import Suite
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.ids.pslist import list_processes
from sgmonitor.keywrap import wrap_session_key
from sgmonitor.local import LocalDeployment, local_deployment, scan_qemu
from sgmonitor.traditional import open_guest_kernel
from sgmonitor.untrusted.library import HypervisorUnavailable, SecureMonitor
from sgmonitor.wire.core import Error, ErrorCode, encode, recv_frame, send_encoded, send_frame
from sgmonitor.wire.hypervisor import Hello, HelloReply, OpenSession
from sgmonitor.wire.sealed import Request

pytestmark = [pytest.mark.guest, only(MAIN)]


def stable(records: list[dict[str, object]]) -> list[tuple[object, ...]]:
    """What can't change while the guest runs on (a kworker's name and a state can)."""
    return sorted((r["pid"], r["tgid"], r["ppid"], r["uid"], r["comm"]) for r in records)


@pytest.fixture(scope="module")
def traditional(guest: GuestUnderTest) -> dict[str, object]:
    """The in-process path's view, taken before the service holds the guest's QMP."""
    with QemuGuest(guest.info.qmp) as physical, physical.paused():
        kernel = open_guest_kernel(physical)
        records = [r.as_dict() for r in list_processes(kernel)]
        banner_at = kernel.symbols["linux_banner"]  # type: ignore[index]
        banner = kernel.memory.read(banner_at, 64).split(b"\0")[0]
    assert banner.startswith(b"Linux version ")
    return {"records": records, "banner": banner, "release": guest.info.release.encode()}


@pytest.fixture(scope="module")
def hv(guest: GuestUnderTest, traditional: dict[str, object]) -> Iterator[LocalDeployment]:
    with local_deployment({"main": guest.info.qmp}, allow_unsealed=True) as service:
        yield service


@pytest.mark.parametrize("mode", ["secure", "secure-plain"])
def test_same_processes_as_traditional(
    hv: LocalDeployment, traditional: dict[str, object], guest: GuestUnderTest, mode: str
) -> None:
    with SecureMonitor(hv.hypervisor_socket, "main", hv.verifier, hv.monitor, mode=mode) as m:
        records, stats = hv.records(m)
        again, _ = hv.records(m)  # a second scan starts from an empty cache
    assert stable(records) == stable(traditional["records"])  # type: ignore[arg-type]
    assert stable(again) == stable(records)
    # the guest's own view (workqueue workers come, go and rename: left out)
    truth = {(p["pid"], p["comm"]) for p in guest.truth.processes}
    ours = {(r["pid"], r["name"]) for r in records}
    assert {t for t in truth if not str(t[1]).startswith("kworker")} <= ours
    assert stats["mode"] == mode
    assert 0 < stats["crossings"] < 200  # batched: not one crossing per task
    assert stats["pages_fetched"] > 0 and stats["misses"] > 0
    if mode == "secure":
        assert stats["bytes_decrypted"] == stats["bytes_received"] > 0
    else:
        assert stats["bytes_decrypted"] == 0


def markers(traditional: dict[str, object]) -> list[bytes]:
    """Plaintext that must not cross the relay: names of processes, release, banner."""
    names = {str(r["comm"]).encode() for r in traditional["records"]}  # type: ignore[attr-defined]
    long_names = sorted(n for n in names if len(n) >= 8)[:20]
    assert b"kthreadd" in long_names
    return [*long_names, traditional["release"], traditional["banner"]]  # type: ignore[list-item]


@pytest.mark.parametrize("mode", ["secure", "secure-plain"])
def test_relay_sees_no_plaintext(
    hv: LocalDeployment, traditional: dict[str, object], mode: str
) -> None:
    relayed: list[bytes] = []
    to_enclave: list[bytes] = []

    def tap(link: str, frame: bytes) -> None:
        if link == "hypervisor":  # every byte carried between enclave and hypervisor
            relayed.append(frame)
        else:  # the library's socket to the enclave process
            to_enclave.append(frame)

    with SecureMonitor(
        hv.hypervisor_socket, "main", hv.verifier, hv.monitor, mode=mode, tap=tap
    ) as m:
        m.scan()
    everything = b"".join(relayed)
    assert len(everything) > 1 << 20  # megabytes of guest pages went through
    # ... handed over in the shared answer buffer, not through the enclave's socket
    assert sum(map(len, to_enclave)) < len(everything) // 20
    seen = [x for x in markers(traditional) if x in everything]
    if mode == "secure":
        assert seen == []
    else:  # the same check finds the plaintext when there is some
        assert b"kthreadd" in seen and traditional["release"] in seen


def raw(hv: LocalDeployment) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(hv.hypervisor_socket)
    return s


def hung_up(s: socket.socket) -> bool:
    """The service closed the connection (EOF, or a reset when our bytes were unread)."""
    s.settimeout(5.0)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_service_survives_malformed_frames(hv: LocalDeployment) -> None:
    with SecureMonitor(hv.hypervisor_socket, "main", hv.verifier, hv.monitor) as m:
        before, _ = hv.records(m)
        # garbage inside well-framed messages: a clear error each, the connection goes on
        with raw(hv) as s:
            for body in (
                b"\x01\xee",  # unknown type
                b"\x09\x01main",  # unknown version
                b"\x01\x07" + os.urandom(40),  # a Request of garbage
                b"\x01\x03\x00",  # a truncated OpenSession
                encode(HelloReply(os.urandom(32), (), os.urandom(32))),  # a type not accepted here
            ):
                send_encoded(s, body, 5.0)
                err = recv_frame(s, 5.0)
                assert isinstance(err, Error) and err.code is ErrorCode.BAD_FRAME, err
            send_frame(s, Hello("main"))
            assert isinstance(recv_frame(s, 5.0), HelloReply)
            send_frame(s, Hello("no-such-guest"))
            assert recv_frame(s, 5.0).code is ErrorCode.UNKNOWN_VM
        # a length prefix below the minimum: out of step, so refused and hung up
        with raw(hv) as s:
            s.sendall(struct.pack(">I", 1) + b"\x01")
            assert recv_frame(s, 5.0).code is ErrorCode.BAD_FRAME
            assert hung_up(s)
        # oversized length prefix: refused and hung up, without reading 4 GiB
        with raw(hv) as s:
            s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"\x01\x01")
            err = recv_frame(s, 5.0)
            assert isinstance(err, Error) and err.code is ErrorCode.BAD_FRAME
            assert hung_up(s)
        # truncated frames: the peer vanishes mid-frame, or stalls mid-frame
        with raw(hv) as s:
            s.sendall(struct.pack(">I", 100) + b"\x01\x01abc")
        stalled = raw(hv)
        stalled.sendall(struct.pack(">I", 100) + b"\x01")
        # bad sessions: unknown session, forged wrapped key, unsealed suite forged in
        with raw(hv) as s:
            send_frame(s, Request(os.urandom(16), 1, b"x" * 32))
            assert recv_frame(s, 5.0).code is ErrorCode.UNKNOWN_SESSION
            send_frame(s, OpenSession("main", os.urandom(16), Suite(1), os.urandom(81)))
            assert recv_frame(s, 5.0).code is ErrorCode.ATTESTATION_REQUIRED
        # the session open all along still works, during the stall and after
        during, _ = hv.records(m)
        stalled.close()
        after, _ = hv.records(m)
    assert stable(before) == stable(during) == stable(after)


def test_forged_request_ends_only_that_session(hv: LocalDeployment) -> None:
    frames: list[bytes] = []

    def tap(link: str, frame: bytes) -> None:
        if link == "hypervisor":
            frames.append(frame)

    with (
        SecureMonitor(hv.hypervisor_socket, "main", hv.verifier, hv.monitor, tap=tap) as victim,
        SecureMonitor(hv.hypervisor_socket, "main", hv.verifier, hv.monitor) as bystander,
    ):
        victim.scan()
        request = next(f for f in frames if f[1] == Request.TYPE)
        # the victim's connection is the library's own: inject there a replayed request
        sock = victim._connect()
        send_encoded(sock, request, 5.0)
        err = recv_frame(sock, 5.0)
        assert isinstance(err, Error) and err.code is ErrorCode.INVALID_SEAL
        records, _ = hv.records(bystander)
        assert len(records) > 200


def test_unsealed_suite_refused_unless_allowed(guest: GuestUnderTest) -> None:
    """A service configured without allow_unsealed refuses suite 0xFE, even with a
    well-formed wrapped key for it; the library says so before trying."""
    with local_deployment({"main": guest.info.qmp}) as strict:
        with raw(strict) as s:
            send_frame(s, Hello("main"))
            hello = recv_frame(s, 5.0)
            assert isinstance(hello, HelloReply)
            assert Suite.UNSEALED_FOR_EXPERIMENTS_ONLY not in hello.suites
            sid, suite = os.urandom(16), Suite.UNSEALED_FOR_EXPERIMENTS_ONLY
            hv_key = X25519PublicKey.from_public_bytes(strict.hv_key)
            wrapped = wrap_session_key(
                hv_key, os.urandom(32), session_id=sid, vm="main", suite=suite
            )
            send_frame(s, OpenSession("main", sid, suite, wrapped))
            assert recv_frame(s, 5.0).code is ErrorCode.SUITE_REFUSED
        with pytest.raises(HypervisorUnavailable, match="allow_unsealed"):
            SecureMonitor(
                strict.hypervisor_socket,
                "main",
                strict.verifier,
                strict.monitor,
                mode="secure-plain",
            ).open()


def test_scan_qemu_starts_and_stops_everything(
    guest: GuestUnderTest, traditional: dict[str, object], hv: LocalDeployment
) -> None:
    """The one-shot path ``sgmonitor ps --qemu SOCK --mode secure`` uses. QEMU serves
    one QMP client: the module's service, with no session open now, has let go of it."""
    children_before = _children()
    started = time.monotonic()
    records = scan_qemu(guest.info.qmp, mode="secure")["records"]
    assert stable(records) == stable(traditional["records"])  # type: ignore[arg-type]
    assert time.monotonic() - started < 60
    assert _children() == children_before  # no orphans: enclave and service are gone


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.add(int(pid))
    return out
