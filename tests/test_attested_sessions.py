"""Attested sessions on a live guest: each attack a hostile host can try, done for real.

Real processes (attestation service, hypervisor service, the measured enclave), real
sockets, a real QEMU guest. Every attack must fail with a clear refusal that names the
party, and no guest data may come back: an attack "succeeds" here only if a page, a
record or a process name reaches the attacker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from importlib._bootstrap_external import _code_to_timestamp_pyc  # type: ignore[attr-defined]
from pathlib import Path

import pytest
from attested_client import call, hold_session, prepare_session
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from dkom import file_offset
from guests import MAIN, GuestUnderTest, only

import sgmonitor
from sgmonitor.channel import Suite
from sgmonitor.daemon import read_ready_line, reap
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.hypervisor.pages import PageServer
from sgmonitor.keywrap import wrap_session_key
from sgmonitor.local import LocalDeployment, local_deployment
from sgmonitor.statement import (
    HypervisorEndorsement,
    Purpose,
    SessionBinding,
    Statement,
    session_report_data,
)
from sgmonitor.tee import edl
from sgmonitor.tee.backend import EnclaveIdentity
from sgmonitor.traditional import kernel_memory, open_guest_kernel
from sgmonitor.untrusted.library import (
    AttestationRefused,
    EnclaveCallFailed,
    ScanError,
    SecureMonitor,
)
from sgmonitor.wire.attestation import ChallengeRequest
from sgmonitor.wire.calls import Call, CallDirection, CallFailed
from sgmonitor.wire.core import (
    Error,
    ErrorCode,
    connect,
    decode,
    encode,
    recv_encoded,
    send_encoded,
)
from sgmonitor.wire.hypervisor import Hello, HelloReply, OpenSession
from sgmonitor.wire.sealed import (
    PAGE_SIZE,
    Ack,
    BeginScan,
    EndScan,
    FollowList,
    GetRegisters,
    ListReply,
    ListWalk,
    RegistersReply,
    Request,
)

pytestmark = [pytest.mark.guest, only(MAIN)]

REPO = Path(sgmonitor.__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sgmonitor.cli"]


@pytest.fixture(scope="module")
def local(guest: GuestUnderTest) -> Iterator[LocalDeployment]:
    with local_deployment({"main": guest.info.qmp}) as deployment:
        yield deployment


def pids(records: list[dict[str, object]]) -> set[object]:
    return {r["pid"] for r in records}


def refused_by(error: Error | object, code: ErrorCode, words: str) -> None:
    assert isinstance(error, Error), error
    assert error.code is code, error
    assert words in error.message, error.message


# --- the host's own session -----------------------------------------------------------


def test_the_hosts_own_session_is_refused(local: LocalDeployment) -> None:
    """The host wraps a key of its own for the service's key: without a statement, or
    with one it signed itself, the service opens nothing and serves nothing."""
    with connect(f"unix:{local.hypervisor_socket}", 10.0) as sock:
        hello = call(sock, Hello("main"))
        assert isinstance(hello, HelloReply)
        sid, key = os.urandom(16), os.urandom(32)
        suite = Suite.AES256GCM_HKDF_SHA256
        hv = X25519PublicKey.from_public_bytes(hello.hv_key)
        wrapped = wrap_session_key(hv, key, session_id=sid, vm="main", suite=suite)
        answer = call(sock, OpenSession("main", sid, suite, wrapped))
        refused_by(answer, ErrorCode.ATTESTATION_REQUIRED, "no attestation statement")
        binding = SessionBinding.for_wrapped_key(
            "main", sid, suite, wrapped, hello.hv_nonce, hello.hv_key
        )
        own = Ed25519PrivateKey.generate()  # the host's own "attestation service"
        ident = EnclaveIdentity(os.urandom(32), os.urandom(32), 1, 1, False, os.urandom(32))
        forged = Statement(ident, binding, time.time(), time.time() + 60).sign(own)
        answer = call(sock, OpenSession("main", sid, suite, wrapped, forged))
        refused_by(answer, ErrorCode.ATTESTATION_REFUSED, "not signed by a trusted")
        answer = call(sock, Request(sid, 1, os.urandom(64)))
        refused_by(answer, ErrorCode.UNKNOWN_SESSION, "no such session")


def test_a_substituted_hypervisor_key_is_refused(local: LocalDeployment) -> None:
    """A man in the middle with a stand-in hypervisor: the verifier endorses only the
    enrolled key, and the enclave wraps only for a key the verifier endorsed."""
    stand_in = os.urandom(32)
    with connect(local.verifier.address, 10.0) as verifier:
        refused_by(
            call(verifier, ChallengeRequest(Purpose.HYPERVISOR_SESSION, stand_in)),
            ErrorCode.ATTESTATION_REFUSED,
            "not enrolled",
        )
        genuine = call(verifier, ChallengeRequest(Purpose.HYPERVISOR_SESSION, local.hv_key))
    with SecureMonitor(local.hypervisor_socket, "main", local.verifier, local.monitor) as m:
        assert m.enclave is not None
        common = dict(vm="main", hv_nonce=os.urandom(32), verifier_nonce=genuine.nonce)  # type: ignore[attr-defined]
        with pytest.raises(EnclaveCallFailed, match="endorsement is for another"):
            m.enclave.ecall(
                "ecall_open_session",
                10.0,
                hv_key=stand_in,
                hv_endorsement=genuine.endorsement,  # type: ignore[attr-defined]
                **common,  # type: ignore[arg-type]
            )
        forged = HypervisorEndorsement("mitm", stand_in, time.time(), time.time() + 60).sign(
            Ed25519PrivateKey.generate()
        )
        with pytest.raises(EnclaveCallFailed, match="not signed by a trusted"):
            m.enclave.ecall(
                "ecall_open_session",
                10.0,
                hv_key=stand_in,
                hv_endorsement=forged,
                **common,  # type: ignore[arg-type]
            )


# --- statements that do not fit the session --------------------------------------------


def test_statements_for_another_session_nonce_or_key(local: LocalDeployment) -> None:
    with connect(f"unix:{local.hypervisor_socket}", 10.0) as sock:
        first, _, _ = prepare_session(local, "main", sock)
        second, _, _ = prepare_session(local, "main", sock)
        swapped = OpenSession(
            "main", second.session_id, second.suite, second.wrapped_key, first.statement
        )
        refused_by(call(sock, swapped), ErrorCode.ATTESTATION_REFUSED, "another session id")
        other_key = OpenSession(
            "main", first.session_id, first.suite, second.wrapped_key, first.statement
        )
        refused_by(call(sock, other_key), ErrorCode.ATTESTATION_REFUSED, "another wrapped key")
        with connect(f"unix:{local.hypervisor_socket}", 10.0) as other_connection:
            refused_by(
                call(other_connection, first),
                ErrorCode.ATTESTATION_REFUSED,
                "nonce this connection was not given",
            )
        opened = call(sock, second)  # the genuine pairing still opens: the refusals were real
        assert not isinstance(opened, Error), opened


def test_an_expired_statement_is_refused(guest: GuestUnderTest) -> None:
    with (
        local_deployment({"main": guest.info.qmp}, statement_lifetime=1.0) as short,
        connect(f"unix:{short.hypervisor_socket}", 10.0) as sock,
    ):
        msg, _, _ = prepare_session(short, "main", sock)
        time.sleep(1.2)
        refused_by(call(sock, msg), ErrorCode.ATTESTATION_REFUSED, "expired")


# --- replays --------------------------------------------------------------------------------


def test_replays_after_overflow_and_after_a_restart(guest: GuestUnderTest) -> None:
    """The remembered set full: new sessions are refused, nothing is forgotten. After a
    restart of the service (same key): the recorded session's OpenSession is refused
    (its nonce was another process's) and its sealed requests find no session, so
    nothing is sealed again under an old key and nonce."""
    limits = {"remembered_sessions": 2}
    with local_deployment({"main": guest.info.qmp}, hypervisor_limits=limits) as small:
        frames: list[bytes] = []

        def tap(link: str, frame: bytes) -> None:
            if link == "hypervisor":
                frames.append(frame)

        with SecureMonitor(
            small.hypervisor_socket, "main", small.verifier, small.monitor, tap=tap
        ) as m:
            records, _ = small.records(m)
            assert len(records) > 200
        held = hold_session(small, "main")
        with pytest.raises(AttestationRefused, match="hypervisor service: BUSY: too many"):
            SecureMonitor(small.hypervisor_socket, "main", small.verifier, small.monitor).open()
        held.sock.close()
        recorded_open = next(f for f in frames if f[1] == OpenSession.TYPE)
        recorded_requests = [f for f in frames if f[1] == Request.TYPE]
        with connect(f"unix:{small.hypervisor_socket}", 10.0) as sock:  # full, not forgetting
            call(sock, Hello("main"))
            send_encoded(sock, recorded_open, 10.0)
            refused_by(decode(recv_encoded(sock, 10.0)), ErrorCode.ATTESTATION_REFUSED, "nonce")
        os.kill(small.pids[1], signal.SIGTERM)  # restart the hypervisor service
        restarted = subprocess.Popen(
            [*CLI, "hypervisor", "serve", "--config", str(small.home / "hypervisor.toml")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            info = read_ready_line(restarted, 30.0, "restarted hypervisor")
            assert bytes.fromhex(str(info["public_key"])) == small.hv_key  # same key
            with connect(f"unix:{small.hypervisor_socket}", 10.0) as sock:
                call(sock, Hello("main"))  # a fresh nonce exists; the replay can't use it
                send_encoded(sock, recorded_open, 10.0)
                answer = decode(recv_encoded(sock, 10.0))
                refused_by(answer, ErrorCode.ATTESTATION_REFUSED, "nonce")
                for frame in recorded_requests[:3]:
                    send_encoded(sock, frame, 10.0)
                    answer = decode(recv_encoded(sock, 10.0))
                    refused_by(answer, ErrorCode.UNKNOWN_SESSION, "no such session")
        finally:
            restarted.terminate()
            reap(restarted, 5.0)
            assert restarted.stdout is not None
            restarted.stdout.close()


# --- the enclave's code and identity ------------------------------------------------------


def policy_file(tmp_path: Path, **extra: object) -> Path:
    measured = json.loads(
        subprocess.run(
            [*CLI, "enclave", "measure", "--json"], check=True, capture_output=True
        ).stdout
    )
    lines = [f'mrenclave = ["{measured["mrenclave"]}"]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "policy.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def ps(
    qmp: str, policy: Path, *, cwd: Path = REPO, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["SGMONITOR_HOME"] = str(home)
    return subprocess.run(
        [*CLI, "ps", "--qemu", qmp, "--policy", str(policy), "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def refusal(result: subprocess.CompletedProcess[str], party: str, words: str) -> None:
    """Exit 4, no process printed, one line naming the party that refused."""
    assert result.returncode == 4, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("sgmonitor: refused")]
    assert len(lines) == 1, result.stderr
    assert f"refused by the {party}:" in lines[0] and words in lines[0], lines[0]


def test_ps_with_a_policy_pinning_the_measurement(guest: GuestUnderTest, tmp_path: Path) -> None:
    result = ps(guest.info.qmp, policy_file(tmp_path))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    truth = {p["pid"] for p in guest.truth.processes}
    assert truth <= pids(records)


def project_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(
        REPO / "sgmonitor", copy / "sgmonitor", ignore=shutil.ignore_patterns("__pycache__")
    )
    return copy


def home_copy(tmp_path: Path, installed_enclave: Path) -> Path:
    """Another SGMONITOR_HOME with the same platform and signer keys."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for name in ("sim-platform.pem", "enclave-signer.pem"):
        shutil.copy2(installed_enclave / name, home / name)
    return home


def test_one_changed_source_line_is_refused(
    guest: GuestUnderTest, tmp_path: Path, installed_enclave: Path
) -> None:
    policy = policy_file(tmp_path)
    copy = project_copy(tmp_path)
    program = copy / "sgmonitor/enclave/program.py"
    text = program.read_text()
    assert "_MAX_TIMEOUT_MS = 600_000" in text
    program.write_text(text.replace("_MAX_TIMEOUT_MS = 600_000", "_MAX_TIMEOUT_MS = 600_001"))
    # as installed: the signature is for the genuine code, so the enclave does not start
    refusal(ps(guest.info.qmp, policy, cwd=copy), "enclave loader", "signed for")
    # re-signed by the same signer: it starts, and the verifier's policy refuses it
    home = home_copy(tmp_path, installed_enclave)
    env = {**os.environ, "SGMONITOR_HOME": str(home)}
    subprocess.run([*CLI, "enclave", "sign"], cwd=copy, env=env, check=True, capture_output=True)
    refusal(
        ps(guest.info.qmp, policy, cwd=copy, home=home),
        "attestation service",
        "is not in the policy",
    )


def test_a_planted_pyc_has_no_effect(guest: GuestUnderTest, tmp_path: Path) -> None:
    """A .pyc that Python's import would take for the source (same mtime and size)
    makes the process list empty; the enclave runs the genuine code all the same."""
    copy = project_copy(tmp_path)
    source = copy / "sgmonitor/ids/pslist.py"
    evil = source.read_text() + "\n\ndef list_processes(kernel):  # planted\n    return []\n"
    code = compile(evil, str(source), "exec")
    stat = source.stat()
    cached = Path(importlib.util.cache_from_source(str(source)))
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(_code_to_timestamp_pyc(code, int(stat.st_mtime), stat.st_size))
    probe = "from sgmonitor.ids import pslist; print(pslist.list_processes(None))"
    planted = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, capture_output=True, text=True, check=True
    )
    assert planted.stdout.strip() == "[]"  # an ordinary import runs the planted code
    result = ps(guest.info.qmp, policy_file(tmp_path), cwd=copy)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {p["pid"] for p in guest.truth.processes} <= pids(records)


def test_a_debug_enclave_and_an_outdated_version_are_refused(
    guest: GuestUnderTest, tmp_path: Path, installed_enclave: Path
) -> None:
    home = home_copy(tmp_path, installed_enclave)
    env = {**os.environ, "SGMONITOR_HOME": str(home)}
    subprocess.run([*CLI, "enclave", "sign", "--debug"], env=env, check=True, capture_output=True)
    refusal(
        ps(guest.info.qmp, policy_file(tmp_path), home=home),
        "attestation service",
        "debug enclave refused",
    )
    refusal(
        ps(guest.info.qmp, policy_file(tmp_path, min_isv_svn=2)),
        "attestation service",
        "isv_svn 1 is older",
    )


def test_no_evidence_for_chosen_report_data(local: LocalDeployment) -> None:
    """The enclave has no ECALL that signs caller-chosen report data, and its session
    evidence binds only the session it made itself."""
    with SecureMonitor(local.hypervisor_socket, "main", local.verifier, local.monitor) as m:
        assert m.enclave is not None
        with pytest.raises(edl.EdlError):
            edl.spec("ecall_get_evidence")
        send_encoded(
            m.enclave.sock,
            encode(Call(99, CallDirection.ECALL, "ecall_get_evidence", (bytes(64),))),
            5.0,
        )
        answer = decode(recv_encoded(m.enclave.sock, 5.0))
        assert isinstance(answer, CallFailed) and answer.code is ErrorCode.NO_SUCH_CALL
        with connect(local.verifier.address, 10.0) as verifier:
            challenge = call(verifier, ChallengeRequest(Purpose.HYPERVISOR_SESSION, local.hv_key))
        hv_nonce = os.urandom(32)
        out = m.enclave.ecall(
            "ecall_open_session",
            10.0,
            vm="main",
            hv_nonce=hv_nonce,
            hv_key=local.hv_key,
            hv_endorsement=challenge.endorsement,  # type: ignore[attr-defined]
            verifier_nonce=challenge.nonce,  # type: ignore[attr-defined]
        )
        evidence = out["evidence"]
        assert isinstance(evidence, bytes)
        binding = SessionBinding.for_wrapped_key(
            "main",
            out["session_id"],  # type: ignore[arg-type]
            Suite(int(out["suite"])),  # type: ignore[arg-type]
            out["wrapped_key"],  # type: ignore[arg-type]
            hv_nonce,
            local.hv_key,
        )
        report_data = evidence[111:175]  # the sim quote's report data field
        assert report_data == session_report_data(binding, challenge.nonce)  # type: ignore[attr-defined]


# --- revocation and the pause budget -------------------------------------------------------


def test_revocation_takes_effect_at_once(guest: GuestUnderTest) -> None:
    """A revoked session, then a revoked measurement: each open session is refused on its
    very next request, and the measurement can't open a new one."""
    with local_deployment({"main": guest.info.qmp}) as own:
        revoke = [*CLI, "hypervisor", "revoke", "--admin", own.admin_socket]
        held = hold_session(own, "main")
        assert isinstance(held.sealed(EndScan(), Ack), Ack)
        out = subprocess.run(
            [*revoke, "--session", held.session_id.hex()],
            check=True,
            capture_output=True,
            text=True,
        )
        assert "1 open session(s) ended" in out.stdout
        refused_by(held.sealed(EndScan(), Ack), ErrorCode.REVOKED, "revoked by the operator")
        held.sock.close()
        with SecureMonitor(own.hypervisor_socket, "main", own.verifier, own.monitor) as m:
            records, _ = own.records(m)
            assert len(records) > 200
            measured = json.loads(
                subprocess.run(
                    [*CLI, "enclave", "measure", "--json"], check=True, capture_output=True
                ).stdout
            )["mrenclave"]
            out = subprocess.run(
                [*revoke, "--mrenclave", measured], check=True, capture_output=True, text=True
            )
            assert "1 open session(s) ended" in out.stdout
            with pytest.raises(ScanError) as caught:
                m.scan()
            assert caught.value.code is ErrorCode.REVOKED
            assert caught.value.origin == "hypervisor"
            with pytest.raises(AttestationRefused, match="hypervisor service: REVOKED"):
                m.open_session()


def jiffies_reader(guest: GuestUnderTest) -> tuple[int, str]:
    """Where ``jiffies`` lies in the guest's RAM file: read it there to see whether the
    guest runs, while the hypervisor service holds QEMU's only QMP connection."""
    with QemuGuest(guest.info.qmp) as live, live.paused():
        kernel = open_guest_kernel(live)
        physical = kernel_memory(live).translate(kernel.symbols["jiffies"])  # type: ignore[index]
    return physical, guest.info.ram


def jiffies(where: tuple[int, str]) -> int:
    physical, ram = where
    with open(ram, "rb") as f:
        return int.from_bytes(os.pread(f.fileno(), 8, physical), "little")


def test_alternating_pauses_cannot_hold_the_guest_past_its_budget(guest: GuestUnderTest) -> None:
    where = jiffies_reader(guest)
    before = jiffies(where)
    time.sleep(1.0)
    hz = jiffies(where) - before  # the running guest's jiffies per second, as measured
    assert hz > 20
    limits = {"max_pause": 2.0, "pause_window": 60.0}
    with local_deployment({"main": guest.info.qmp}, hypervisor_limits=limits) as budget:
        a, b = hold_session(budget, "main"), hold_session(budget, "main")
        holder, other = a, b
        ack = holder.sealed(BeginScan(True), Ack)
        assert isinstance(ack, Ack) and ack.paused
        start, samples = time.monotonic(), []
        while time.monotonic() - start < 7.0:
            time.sleep(0.3)  # hand the pause over: the other session pauses, then this one ends
            other.sealed(BeginScan(True), Ack)
            holder.sealed(EndScan(), Ack)
            holder, other = other, holder
            samples.append((time.monotonic() - start, jiffies(where)))
        holder.sealed(EndScan(), Ack)
        a.sock.close()
        b.sock.close()
    early = [j for t, j in samples if t < 1.5]
    late = [j for t, j in samples if t > 3.0]
    assert early[-1] - early[0] < 0.3 * hz  # the pauses are real while the budget lasts
    assert late[-1] - late[0] > 0.5 * hz * (samples[-1][0] - 3.0 - 0.6)  # then it runs


# --- a list window walked ahead ---------------------------------------------------------


def test_a_window_walked_ahead_serves_its_own_scan_only(
    guest: GuestUnderTest, local: LocalDeployment
) -> None:
    """A FollowList announcing the next window (``then``) has the hypervisor walk that
    window once the reply is out, and the next FollowList of the scan is answered from
    that walk; one of a new scan never is. Shown by changing a task's ``comm`` in the
    RAM file (as the host can) after the walk ahead: the scan that announced it gets
    the old bytes, a scan begun since gets the new ones (the old ones, were a walk made
    ahead to outlive its scan)."""
    with QemuGuest(guest.info.qmp) as live, live.paused():
        kernel = open_guest_kernel(live)
        types = kernel.types
        first = ListWalk(
            kernel.symbols["init_task"] + types.offsetof("struct task_struct", "tasks"),
            types.offsetof("struct list_head", "next"),
            types.offsetof("struct task_struct", "tasks"),
            types.sizeof("struct task_struct"),
            limit=8,
            max_pages=64,
        )
        server = PageServer(live)
        window = server.follow_list(first)
        second = replace(first, after=window.nodes[-1])
        expected = server.follow_list(second).nodes
        comm = expected[1] - first.member_offset + types.offsetof("struct task_struct", "comm")
        where = file_offset(live, kernel_memory(live).translate(comm))
    page, at = comm & ~(PAGE_SIZE - 1), comm % PAGE_SIZE
    assert at + 16 <= PAGE_SIZE  # comm lies in one page: one page shows it
    held = hold_session(local, "main")

    def walk_ahead_then_change() -> None:
        """Begin a scan, take the first window announcing the second, wait until the
        second is walked ahead, then change the task's comm."""
        assert isinstance(held.sealed(BeginScan(True), Ack), Ack)
        reply, _ = held.sealed_with_pages(FollowList(first, then=8), ListReply)
        assert isinstance(reply, ListReply) and reply.entries == window.nodes
        # answered after the walk ahead: a connection's requests are served in turn
        assert isinstance(held.sealed(GetRegisters(), RegistersReply), RegistersReply)
        os.pwrite(ram.fileno(), changed, where)

    def second_window_comm() -> bytes:
        reply, pages = held.sealed_with_pages(FollowList(second), ListReply)
        assert isinstance(reply, ListReply) and reply.entries == expected
        return pages[page][at : at + 16]

    with open(guest.info.ram, "r+b") as ram:
        original = os.pread(ram.fileno(), 16, where)
        changed = b"walked-ahead\0\0\0\0"
        try:
            walk_ahead_then_change()
            assert second_window_comm() == original  # the walk made ahead
            os.pwrite(ram.fileno(), original, where)
            walk_ahead_then_change()
            assert isinstance(held.sealed(BeginScan(True), Ack), Ack)  # a new scan
            assert second_window_comm() == changed  # walked now
        finally:
            os.pwrite(ram.fileno(), original, where)
            held.sealed(EndScan(), Ack)
            held.sock.close()
