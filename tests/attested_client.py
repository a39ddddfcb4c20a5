"""A root attacker's tools on the real services: sessions the test holds the keys of.

The simulation backend says it gives no protection against root: whoever reads the
platform key can make quotes. A test uses that to play an enclave whose identity the
policy accepts, so it can send sealed requests at will (pause the guest, hold it) and
to forge what a host would forge (its own statements, its own wrapped keys). Everything
it talks to is real: the attestation service, the hypervisor service, QEMU.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from sgmonitor import installed
from sgmonitor.channel import Kind, SealingChannel, Side, Suite, make_channel
from sgmonitor.keywrap import wrap_session_key
from sgmonitor.local import LocalDeployment
from sgmonitor.statement import Purpose, SessionBinding, session_report_data
from sgmonitor.tee import backend_class
from sgmonitor.tee.backend import EnclaveIdentity
from sgmonitor.tee.boot import measure_installed
from sgmonitor.tee.launch_config import LaunchConfig
from sgmonitor.tee.sim import SimBackend, SimPlatform
from sgmonitor.wire.attestation import AttestSession, Challenge, ChallengeRequest, StatementIssued
from sgmonitor.wire.core import Error, Message, connect, decode, encode, recv_frame, send_frame
from sgmonitor.wire.hypervisor import Hello, HelloReply, OpenSession
from sgmonitor.wire.sealed import PAGE_SIZE, ListReply, PagesReply, Reply, Request


def call(sock: socket.socket, msg: Message) -> Message:
    """One request, one answer (an ``Error`` is returned, not raised)."""
    send_frame(sock, msg, 10.0)
    return recv_frame(sock, 10.0)


def accepted_identity(local: LocalDeployment, *, debug: bool = False) -> EnclaveIdentity:
    """The identity of the installed enclave launched for ``local``'s verifier."""
    signed = backend_class("sim").signed_identity(installed.installed_sigstruct())
    config = LaunchConfig("secure", local.verifier.public_key, local.monitor.key).to_bytes()
    return EnclaveIdentity(
        measure_installed().mrenclave,
        signed.mrsigner,
        signed.isv_prod_id,
        signed.isv_svn,
        debug,
        hashlib.sha256(config).digest(),
    )


def forged_evidence(identity: EnclaveIdentity, report_data: bytes) -> bytes:
    """A quote made with the simulated platform's key, read from disk as root can."""
    platform = SimPlatform.from_pem(installed.platform_key_path().read_bytes())
    return SimBackend(identity, platform, announce=io.StringIO()).evidence(report_data)


@dataclass
class HeldSession:
    """An attested session whose keys the test holds, on its own hypervisor connection."""

    sock: socket.socket
    vm: str
    session_id: bytes
    channel: SealingChannel
    next_request: int = 1

    def sealed(self, request: Message, expect: type[Message]) -> Message:
        """Seal ``request``, send it, open the reply index (of a reply without pages)."""
        index, pages = self.sealed_with_pages(request, expect)
        assert not pages, "this request was to bring no pages"
        return index

    def sealed_with_pages(
        self, request: Message, expect: type[Message]
    ) -> tuple[Message, dict[int, bytes]]:
        """Seal ``request``, send it, open the reply index and its pages (by address)."""
        rid, self.next_request = self.next_request, self.next_request + 1
        body = self.channel.seal(Kind.REQUEST, rid, encode(request))
        answer = call(self.sock, Request(self.session_id, rid, body))
        if isinstance(answer, Error):
            return answer, {}
        assert isinstance(answer, Reply)
        index = decode(self.channel.open(Kind.REPLY, rid, answer.sealed_reply), expect=(expect,))
        present = index.present() if isinstance(index, PagesReply | ListReply) else []
        if not present:
            assert not answer.sealed_pages
            return index, {}
        size = PAGE_SIZE * len(present)
        block = self.channel.open(
            Kind.PAGE, rid, answer.sealed_pages, address=present[0], length=size
        )
        return index, {a: block[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i, a in enumerate(present)}


def prepare_session(
    local: LocalDeployment, vm: str, sock: socket.socket
) -> tuple[OpenSession, bytes, bytes]:
    """Everything up to OpenSession, done as the genuine flow does but with keys the
    test makes: (the OpenSession with its statement, the session key, the hv nonce)."""
    hello = call(sock, Hello(vm))
    assert isinstance(hello, HelloReply), hello
    with connect(local.verifier.address, 10.0) as verifier:
        challenge = call(verifier, ChallengeRequest(Purpose.HYPERVISOR_SESSION, hello.hv_key))
        assert isinstance(challenge, Challenge), challenge
        session_key, session_id = os.urandom(32), os.urandom(16)
        suite = Suite.AES256GCM_HKDF_SHA256
        wrapped = wrap_session_key(
            X25519PublicKey.from_public_bytes(hello.hv_key),
            session_key,
            session_id=session_id,
            vm=vm,
            suite=suite,
        )
        binding = SessionBinding.for_wrapped_key(
            vm, session_id, suite, wrapped, hello.hv_nonce, hello.hv_key
        )
        identity = accepted_identity(local)
        evidence = forged_evidence(identity, session_report_data(binding, challenge.nonce))
        issued = call(
            verifier,
            AttestSession(
                "sim",
                evidence,
                LaunchConfig("secure", local.verifier.public_key, local.monitor.key).to_bytes(),
                challenge.nonce,
                binding.encode(),
            ),
        )
        assert isinstance(issued, StatementIssued), issued
    return (
        OpenSession(vm, session_id, suite, wrapped, issued.statement),
        session_key,
        hello.hv_nonce,
    )


def hold_session(local: LocalDeployment, vm: str) -> HeldSession:
    """An open, attested session on a connection of its own."""
    sock = connect(f"unix:{local.hypervisor_socket}", 10.0)
    msg, session_key, hv_nonce = prepare_session(local, vm, sock)
    opened = call(sock, msg)
    assert not isinstance(opened, Error), opened
    channel = make_channel(session_key, msg.session_id, hv_nonce, msg.suite, Side.ENCLAVE, vm)
    return HeldSession(sock, vm, msg.session_id, channel)
