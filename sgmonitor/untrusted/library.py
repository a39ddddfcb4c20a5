"""The SGmonitor library: UNTRUSTED host of the enclave and relay to the hypervisor.

It starts the enclave process (``python -m sgmonitor.enclave``, over a socketpair),
connects to the hypervisor service's unix socket, and relays: ECALLs into the enclave,
the enclave's OCALLs out (``ocall_hv_exchange`` frames go to the hypervisor as opaque
bytes, ``send_encoded``/``recv_encoded``). It never holds a key that opens a sealed
page, so everything it relays in the ``secure`` mode is ciphertext; what it can do to
that traffic is exactly what ``sgmonitor.untrusted.malicious`` does.

Everything that does not arrive ends in an error within a deadline (the enclave dies,
the hypervisor drops the connection, a reply never comes), and the child processes
never outlive their parent: the enclave exits when its socket closes, a private
hypervisor service when its stdin closes.

Opening a session is the paper's key registration, closed with attestation: Hello (the
hypervisor's nonce and key) -> the attestation service's nonce and endorsement of that
key -> the enclave makes, wraps and attests a session key -> the attestation service's
statement -> OpenSession. The library carries each step and can forge none of them.

Use::

    verifier = Verifier("127.0.0.1:7380", attestation_public_key)
    with SecureMonitor(hv_socket, "web", verifier) as m:
        records, stats = m.scan("pslist")

or, given only a QEMU QMP socket, ``sgmonitor.local.scan_qemu``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import sgmonitor
from sgmonitor import installed
from sgmonitor.channel import Suite
from sgmonitor.daemon import reap
from sgmonitor.errors import GuestDataError, SGMonitorError
from sgmonitor.statement import Purpose, SessionBinding
from sgmonitor.tee import boot, edl
from sgmonitor.tee.launch_config import MODES, LaunchConfig
from sgmonitor.untrusted.monitor_link import (
    MonitorEndpoint,
    MonitorLinkClient,
    MonitorLinkError,
    Tap,
)
from sgmonitor.wire.attestation import AttestSession, Challenge, ChallengeRequest, StatementIssued
from sgmonitor.wire.calls import MAX_CALL_VALUE, Call, CallDirection, CallFailed, Return, Value
from sgmonitor.wire.core import (
    ConnectionClosed,
    Error,
    ErrorCode,
    Message,
    WireError,
    WireTimeout,
    connect,
    decode,
    encode,
    recv_encoded,
    send_encoded,
    send_frame,
)
from sgmonitor.wire.hypervisor import (
    CloseSession,
    Hello,
    HelloReply,
    OpenSession,
    SessionClosed,
    SessionOpened,
)

__all__ = [
    "DEFAULT_CACHE_BUDGET",
    "MODES",
    "AttestationRefused",
    "CouldNotCheck",
    "EnclaveCallFailed",
    "EnclaveDied",
    "EnclaveHost",
    "EnclaveRefused",
    "HypervisorRefused",
    "HypervisorUnavailable",
    "LibraryError",
    "MonitorEndpoint",
    "ScanError",
    "ScanResult",
    "SecureMonitor",
    "Verifier",
]

log = logging.getLogger("sgmonitor.untrusted")

DEFAULT_CACHE_BUDGET = 32 << 20
# How the enclave starts a failure it did not decide itself (see enclave.transport).
HYPERVISOR_ORIGIN = "hypervisor link error (unauthenticated)"
_MAX_RELAY_TIMEOUT = 600.0
_ROOT = Path(sgmonitor.__file__).resolve().parent.parent


class LibraryError(SGMonitorError):
    """Base of the untrusted library's errors."""


class EnclaveDied(LibraryError):
    """The enclave process exited or stopped answering."""


class EnclaveCallFailed(LibraryError):
    """An ECALL returned ``CallFailed``."""

    def __init__(self, name: str, code: ErrorCode, message: str) -> None:
        super().__init__(f"{name}: {code.name}: {message}")
        self.code = code
        self.detail = message


class ScanError(EnclaveCallFailed):
    """The enclave could not complete a scan (forged or missing replies, timeout, ...):
    never a result about the guest. ``origin`` says who decided: ``"enclave"`` (its own
    checks: a seal that did not open, a deadline) or ``"hypervisor"`` (a clear-text,
    unauthenticated refusal the enclave relayed)."""

    @property
    def origin(self) -> str:
        return "hypervisor" if self.detail.startswith(HYPERVISOR_ORIGIN) else "enclave"


class CouldNotCheck(LibraryError, GuestDataError):
    """The scan ran but guest data did not make sense: report "could not check"."""


class HypervisorUnavailable(LibraryError):
    """The hypervisor service refused, dropped the connection or did not answer."""


class HypervisorRefused(HypervisorUnavailable):
    """The hypervisor service answered with a clear-text (unauthenticated) ``Error``."""

    def __init__(self, request: str, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{request} refused: {code.name}: {reason}")
        self.code = code
        self.reason = f"{code.name}: {reason}"


# --- the enclave process ---------------------------------------------------------------

# How the enclave process (sgmonitor.enclave.__main__) says it will not start.
_REFUSAL = "sgmonitor enclave: refusing to start:"


@dataclass(frozen=True)
class Verifier:
    """The attestation service: where the library reaches it, and the key the enclave's
    launch configuration names (the only verifier the enclave then trusts)."""

    address: str
    public_key: Ed25519PublicKey


@dataclass(frozen=True)
class ScanResult:
    """What the host learns of a scan: the sealed report's sequence number (the monitor
    acknowledges it by that number) and the scan's counters."""

    report_seq: int
    stats: dict[str, object]


class AttestationRefused(LibraryError):
    """A party refused to attest or to accept a session; the message names the party."""

    def __init__(self, party: str, reason: str) -> None:
        super().__init__(f"refused by the {party}: {reason}")
        self.party = party
        self.reason = reason


class EnclaveRefused(AttestationRefused, EnclaveDied):
    """The enclave did not start: its code is not what its signature vouches for."""


class EnclaveHost:
    """Starts the enclave process and carries ECALLs in and OCALLs out.

    ``ocall_handler`` answers every OCALL except ``ocall_log``; it returns the results,
    or raises :class:`EnclaveCallFailed`-like errors that become ``CallFailed``.
    """

    def __init__(
        self,
        config: bytes,
        ocall_handler: Callable[[edl.CallSpec, Mapping[str, Value]], tuple[Value, ...] | None],
        *,
        sigstruct: bytes | None = None,
        backend: str = "sim",
        platform_key: Path | None = None,
        tap: Tap | None = None,
    ) -> None:
        self._ocall_handler = ocall_handler
        self.tap = tap
        self.ocall_s = 0.0  # time serving OCALLs (relaying them included), all ECALLs
        self.backend = backend
        self._dir = Path(tempfile.mkdtemp(prefix="sgm-enclave-"))
        self._next_call = 1
        self._ecall_lock = threading.Lock()  # one ECALL at a time (scans and heartbeats)
        if sigstruct is None:
            sigstruct = installed.installed_sigstruct()
        if platform_key is None:
            platform_key = installed.platform_key_path()
        (self._dir / "enclave.json").write_bytes(config)
        (self._dir / "enclave.sig").write_bytes(sigstruct)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Untrusted memory the enclave reads the hypervisor's answers from (as an SGX
        # enclave reads the host's memory): the answer is not copied through the socket.
        shared_fd = os.memfd_create("sgmonitor-ocall-answers", os.MFD_CLOEXEC)
        os.ftruncate(shared_fd, MAX_CALL_VALUE)
        self.shared = mmap.mmap(shared_fd, MAX_CALL_VALUE)
        args = ["--fd", str(theirs.fileno()), "--shared-fd", str(shared_fd)]
        args += ["--backend", backend]
        args += ["--config", str(self._dir / "enclave.json")]
        args += ["--sigstruct", str(self._dir / "enclave.sig")]
        args += ["--platform-key", str(platform_key)]
        self.refusal = ""  # the enclave loader's reason, if it refused to start
        try:
            self.process = subprocess.Popen(
                boot.enclave_argv(root=_ROOT, extra=args),
                pass_fds=(theirs.fileno(), shared_fd),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=boot.clean_env(),
                cwd="/",
            )
        except BaseException:
            ours.close()
            self.shared.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        finally:
            theirs.close()
            os.close(shared_fd)
        self.sock = ours
        self._stderr = threading.Thread(target=self._forward_stderr, daemon=True)
        self._stderr.start()

    def _forward_stderr(self) -> None:
        """Pass the enclave's stderr on (the simulation's warning, its log), except a
        launch refusal, which becomes the reason :class:`EnclaveDied` gives."""
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(_REFUSAL):
                self.refusal = line[len(_REFUSAL) :].strip()
            else:
                print(line, file=sys.stderr, flush=True)

    def ecall(self, name: str, timeout: float, **args: Value) -> Mapping[str, Value]:
        """Make one ECALL, serving its OCALLs, within ``timeout`` seconds in total (the
        wait for another thread's ECALL included)."""
        if not self._ecall_lock.acquire(timeout=timeout):
            raise EnclaveDied(f"{name}: the enclave was busy for {timeout:.1f}s")
        try:
            return self._ecall_locked(name, timeout, **args)
        finally:
            self._ecall_lock.release()

    def _ecall_locked(self, name: str, timeout: float, **args: Value) -> Mapping[str, Value]:
        call_id = self._next_call
        self._next_call += 1
        call = edl.make_call(call_id, name, **args)
        found = edl.spec(name, CallDirection.ECALL)
        self._send(call)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()  # an enclave that does not answer is not trusted to later
                raise EnclaveDied(f"{name}: no answer from the enclave within {timeout:.1f}s")
            try:
                data = recv_encoded(self.sock, remaining)
                if self.tap is not None:
                    self.tap("enclave", data)
                msg = decode(data, expect=(Call, Return, CallFailed))
            except WireTimeout:
                continue
            except (ConnectionClosed, OSError) as exc:
                self.close()
                if self.refusal:
                    raise EnclaveRefused("enclave loader", self.refusal) from None
                code = self.process.returncode
                raise EnclaveDied(f"{name}: the enclave went away (exit {code}): {exc}") from None
            if isinstance(msg, Return) and msg.call_id == call_id:
                return edl.named_results(found, msg.results)
            if isinstance(msg, CallFailed) and msg.call_id == call_id:
                raise EnclaveCallFailed(name, msg.code, msg.message)
            if isinstance(msg, Call):
                started = time.perf_counter()
                reply = self._serve_ocall(msg)
                if reply is not None:
                    self._send(reply)
                self.ocall_s += time.perf_counter() - started

    def _send(self, msg: Message) -> None:
        data = encode(msg)
        if self.tap is not None:
            self.tap("enclave", data)
        try:
            send_encoded(self.sock, data, 30.0)
        except (WireError, OSError) as exc:
            raise EnclaveDied(f"cannot reach the enclave: {exc}") from None

    def _serve_ocall(self, call: Call) -> Message | None:
        try:
            found = edl.check_call(call, CallDirection.OCALL)
            args = edl.named_args(found, call)
            if found.name == "ocall_log":
                log.log(int(args["level"]), "enclave: %s", args["message"])
                return Return(call.call_id, ())
            results = self._ocall_handler(found, args)
            if results is None:
                return None  # deliberately unanswered (a dropping relay)
            edl.check_results(found, results)
            return Return(call.call_id, results)
        except edl.EdlError as exc:
            return CallFailed(call.call_id, ErrorCode.NO_SUCH_CALL, str(exc)[:1000])
        except _OcallFailed as exc:
            return CallFailed(call.call_id, exc.code, str(exc)[:1000])

    def share(self, data: bytes) -> int:
        """Put an OCALL's answer where the enclave reads it; its length."""
        self.shared[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Close the connection (the enclave exits on EOF), reap the process."""
        with contextlib.suppress(OSError):
            self.sock.close()
        reap(self.process, 5.0)
        self.shared.close()
        self._stderr.join(2.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class _OcallFailed(LibraryError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- the monitor: enclave + hypervisor connection ---------------------------------------


class SecureMonitor:
    """One enclave IDS monitoring one guest through a hypervisor service.

    :param hypervisor_socket: the service's unix socket
    :param vm: the guest's name at that service
    :param verifier: the attestation service (address, and the key the enclave trusts)
    :param monitor: the remote monitor the enclave reports to (its reports are sealed
        for it: this library never sees them in clear)
    :param ids: this IDS's name at the monitor (default: ``vm``)
    :param mode: ``secure`` (sealed, default) or ``secure-plain`` (UNSEALED, for
        experiments: the hypervisor must also allow it)
    :param cache_budget: the enclave page cache's byte budget (the EPC)
    :param timeout: seconds to wait for any one reply (hypervisor or enclave start)
    :param scan_timeout: seconds a whole scan may take
    :param tap: called with every frame the relay carries (for tests and tracing)
    """

    def __init__(
        self,
        hypervisor_socket: str,
        vm: str,
        verifier: Verifier,
        monitor: MonitorEndpoint,
        *,
        ids: str | None = None,
        mode: str = "secure",
        cache_budget: int = DEFAULT_CACHE_BUDGET,
        timeout: float = 30.0,
        scan_timeout: float = 300.0,
        pause: bool = True,
        tap: Tap | None = None,
        sigstruct: bytes | None = None,
        platform_key: Path | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (traditional runs in-process)")
        self.hypervisor_socket = hypervisor_socket
        self.verifier = verifier
        self.monitor = monitor
        self.ids = ids or vm
        self.link: MonitorLinkClient | None = None
        self.config = LaunchConfig(mode, verifier.public_key, monitor.key).to_bytes()
        self.sigstruct = sigstruct
        self.platform_key = platform_key
        self.vm = vm
        self.mode = mode
        self.cache_budget = cache_budget
        self.timeout = timeout
        self.scan_timeout = scan_timeout
        self.pause = pause
        self.tap = tap
        self.enclave: EnclaveHost | None = None
        self._hv: socket.socket | None = None
        self.hypervisor_s = 0.0  # time waiting on the hypervisor link, all scans
        self._verifier_sock: socket.socket | None = None
        self.session_id: bytes | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SecureMonitor:
        self.open()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Start the enclave, link it to the monitor, open a hypervisor session."""
        self.enclave = EnclaveHost(
            self.config,
            self._ocall,
            sigstruct=self.sigstruct,
            platform_key=self.platform_key,
            tap=self.tap,
        )
        try:
            self.open_link()
            self.open_session()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the session (best effort), stop the enclave, drop the connection."""
        if self.enclave is not None and self.session_id is not None:
            with contextlib.suppress(SGMonitorError, OSError):
                self.enclave.ecall("ecall_close_session", 5.0, vm=self.vm)
            with contextlib.suppress(SGMonitorError, OSError):
                self._hv_call(CloseSession(self.session_id), (SessionClosed,), 5.0)
        self.session_id = None
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.enclave is not None:
            self.enclave.close()
            self.enclave = None
        self._drop_hv()
        if self._verifier_sock is not None:
            with contextlib.suppress(OSError):
                self._verifier_sock.close()
            self._verifier_sock = None

    # --- sessions and scans --------------------------------------------------------------

    def open_session(self) -> None:
        """Register a fresh, attested session key (the paper's Fig. 6, closed):
        Hello -> Challenge -> the enclave's wrapped key and evidence -> Statement ->
        OpenSession. Any refusal raises :class:`AttestationRefused` naming the party."""
        assert self.enclave is not None, "open() first"
        hello = self._hv_call(Hello(self.vm), (HelloReply,), self.timeout)
        assert isinstance(hello, HelloReply)
        suite = Suite.UNSEALED_FOR_EXPERIMENTS_ONLY if self.mode == "secure-plain" else None
        if suite is not None and suite not in hello.suites:
            raise HypervisorUnavailable(
                "the hypervisor service does not allow the unsealed secure-plain mode "
                "(allow_unsealed in its configuration)"
            )
        challenge = self._verifier_call(
            ChallengeRequest(Purpose.HYPERVISOR_SESSION, hello.hv_key), Challenge
        )
        assert isinstance(challenge, Challenge)
        out = self._attesting_ecall(
            "ecall_open_session",
            vm=self.vm,
            hv_nonce=hello.hv_nonce,
            hv_key=hello.hv_key,
            hv_endorsement=challenge.endorsement,
            verifier_nonce=challenge.nonce,
        )
        session_id, wrapped = out["session_id"], out["wrapped_key"]
        assert isinstance(session_id, bytes) and isinstance(wrapped, bytes)
        suite = Suite(int(out["suite"]))
        binding = SessionBinding.for_wrapped_key(
            self.vm, session_id, suite, wrapped, hello.hv_nonce, hello.hv_key
        )
        statement = self._statement(binding, out["evidence"], challenge.nonce)
        msg = OpenSession(self.vm, session_id, suite, wrapped, statement)
        try:
            self._hv_call(msg, (SessionOpened,), self.timeout)
        except HypervisorRefused as exc:
            raise AttestationRefused("hypervisor service", exc.reason) from None
        self.session_id = session_id

    def open_link(self) -> None:
        """Link the enclave to the remote monitor (attested, like a hypervisor session:
        purpose MONITOR_LINK), then answer its heartbeats in the background."""
        enclave = self.enclave
        assert enclave is not None, "open() first"

        def make_link(monitor_nonce: bytes) -> tuple[bytes, bytes, bytes]:
            request = ChallengeRequest(Purpose.MONITOR_LINK, self.monitor.key)
            challenge = self._verifier_call(request, Challenge)
            assert isinstance(challenge, Challenge)
            out = self._attesting_ecall(
                "ecall_open_monitor_link",
                ids=self.ids,
                monitor_nonce=monitor_nonce,
                verifier_nonce=challenge.nonce,
            )
            link_id, wrapped = out["link_id"], out["wrapped_key"]
            assert isinstance(link_id, bytes) and isinstance(wrapped, bytes)
            binding = SessionBinding.for_wrapped_key(
                self.ids,
                link_id,
                Suite.AES256GCM_HKDF_SHA256,
                wrapped,
                monitor_nonce,
                self.monitor.key,
                Purpose.MONITOR_LINK,
            )
            return link_id, wrapped, self._statement(binding, out["evidence"], challenge.nonce)

        link = MonitorLinkClient(
            self.monitor, self.ids, enclave.ecall, timeout=self.timeout, tap=self.tap
        )
        try:
            link.open(make_link, self.config)
        except MonitorLinkError as exc:
            link.close()
            raise AttestationRefused("monitor", str(exc)) from None
        self.link = link

    def _attesting_ecall(self, name: str, **args: Value) -> Mapping[str, Value]:
        """An ECALL that makes a key and its evidence; a refusal names the enclave."""
        assert self.enclave is not None, "open() first"
        try:
            return self.enclave.ecall(name, self.timeout, **args)
        except EnclaveCallFailed as exc:
            raise AttestationRefused("enclave", exc.detail) from None

    def _statement(self, binding: SessionBinding, evidence: Value, nonce: bytes) -> bytes:
        """The verifier's statement for the enclave's ``evidence`` over ``binding``."""
        assert self.enclave is not None and isinstance(evidence, bytes)
        attest = AttestSession(self.enclave.backend, evidence, self.config, nonce, binding.encode())
        issued = self._verifier_call(attest, StatementIssued)
        assert isinstance(issued, StatementIssued)
        return issued.statement

    def _verifier_call(self, msg: Message, expect: type[Message]) -> Message:
        """One request to the attestation service (a connection kept for the run)."""
        try:
            if self._verifier_sock is None:
                self._verifier_sock = connect(self.verifier.address, self.timeout)
            send_frame(self._verifier_sock, msg, self.timeout)
            reply = decode(recv_encoded(self._verifier_sock, self.timeout), expect=(expect, Error))
        except (WireError, OSError) as exc:
            if self._verifier_sock is not None:
                self._verifier_sock.close()
                self._verifier_sock = None
            raise AttestationRefused(
                "attestation service", f"unreachable at {self.verifier.address}: {exc}"
            ) from None
        if isinstance(reply, Error):
            raise AttestationRefused("attestation service", reply.message or reply.code.name)
        return reply

    def new_session(self) -> None:
        """Close the current session (if any) and open a fresh one: new key, new id."""
        assert self.enclave is not None, "open() first"
        if self.session_id is not None:
            self._session_failed()
        self.open_session()

    @property
    def link_id(self) -> bytes:
        """The enclave's id of the open monitor link (empty before it opens)."""
        return self.link.link_id if self.link is not None else b""

    def scan(self, check: str = "pslist", *, cache_budget: int | None = None) -> ScanResult:
        """Run one IDS check in the enclave and carry its sealed report to the monitor.

        :returns: the report's sequence number and the scan's clear-text counters; the
            records are the monitor's to read
        :raises ScanError: the session failed (forgery, dropped reply, refusal); the
            next scan opens a new session
        :raises CouldNotCheck: guest data did not make sense
        """
        if self.enclave is None or self.link is None:
            raise LibraryError("SecureMonitor is closed")
        if self.session_id is None:
            self.open_session()
        options = {
            "cache_budget": cache_budget or self.cache_budget,
            "timeout_ms": int(self.timeout * 1000),
            "pause": self.pause,
        }
        served, waited, started = self.enclave.ocall_s, self.hypervisor_s, time.perf_counter()
        try:
            out = self.enclave.ecall(
                "ecall_run_scan",
                self.scan_timeout,
                vm=self.vm,
                check=check,
                options=json.dumps(options).encode(),
            )
        except EnclaveCallFailed as exc:
            self._session_failed()
            raise ScanError(f"{check} on {self.vm}", exc.code, exc.detail) from None
        ecall_s = time.perf_counter() - started
        hypervisor_s = self.hypervisor_s - waited
        seq, report, clear = out["report_seq"], out["report"], out["stats"]
        assert isinstance(seq, int) and isinstance(report, bytes) and isinstance(clear, bytes)
        self.link.send_report(seq, report)
        doc = json.loads(clear)
        stats = dict(doc["stats"], elapsed_s=doc["elapsed_s"], mode=doc["mode"])
        # Measured here, outside the enclave: the ECALL's wall time, the hypervisor's
        # share of the OCALLs (its walk and sealing, and the transfer to this process),
        # and the relay's own (taking each OCALL, passing its answer on).
        stats.update(
            ecall_s=ecall_s,
            hypervisor_s=hypervisor_s,
            relay_s=self.enclave.ocall_s - served - hypervisor_s,
        )
        if doc["status"] != "ok":
            raise CouldNotCheck(f"{check} on {self.vm}: could not check: {doc['error']}")
        return ScanResult(seq, stats)

    def _session_failed(self) -> None:
        """The enclave dropped the session; tell the hypervisor, start afresh next time."""
        if self.session_id is not None:
            with contextlib.suppress(SGMonitorError, OSError):
                self._hv_call(CloseSession(self.session_id), (SessionClosed,), 2.0)
        self.session_id = None

    # --- the hypervisor link -------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._hv is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.hypervisor_socket)
            except OSError as exc:
                sock.close()
                raise HypervisorUnavailable(
                    f"cannot connect to the hypervisor service at {self.hypervisor_socket}: {exc}"
                ) from None
            self._hv = sock
        return self._hv

    def _drop_hv(self) -> None:
        if self._hv is not None:
            with contextlib.suppress(OSError):
                self._hv.close()
            self._hv = None

    def _relay(self, frame: bytes, timeout: float) -> bytes | None:
        """Carry one opaque frame to the hypervisor and its answer back (None: drop).
        The malicious library overrides this."""
        sock = self._connect()
        if self.tap is not None:
            self.tap("hypervisor", frame)
        started = time.perf_counter()
        try:
            send_encoded(sock, frame, timeout)
            answer = recv_encoded(sock, timeout)
        except (WireError, OSError):
            self._drop_hv()  # out of step or gone: a fresh connection next time
            raise
        finally:
            self.hypervisor_s += time.perf_counter() - started
        if self.tap is not None:
            self.tap("hypervisor", answer)
        return answer

    def _hv_call(self, msg: Message, expect: tuple[type[Message], ...], timeout: float) -> Message:
        try:
            answer = self._relay(encode(msg), timeout)
            if answer is None:
                raise HypervisorUnavailable("no answer")
            reply: Message = decode(answer, expect=(*expect, Error))
        except WireTimeout:
            raise HypervisorUnavailable(
                f"{type(msg).__name__}: no answer from the hypervisor within {timeout:.1f}s"
            ) from None
        except (WireError, OSError) as exc:
            raise HypervisorUnavailable(f"{type(msg).__name__}: {exc}") from None
        if isinstance(reply, Error):
            raise HypervisorRefused(type(msg).__name__, reply.code, reply.message)
        return reply

    def _ocall(self, found: edl.CallSpec, args: Mapping[str, Value]) -> tuple[Value, ...] | None:
        if found.name != "ocall_hv_exchange":
            raise _OcallFailed(ErrorCode.NO_SUCH_CALL, f"{found.name} is not served")
        frame, timeout_ms = args["frame"], args["timeout_ms"]
        assert isinstance(frame, bytes) and isinstance(timeout_ms, int)
        timeout = min(timeout_ms / 1000, _MAX_RELAY_TIMEOUT)
        try:
            answer = self._relay(frame, timeout)
        except WireTimeout:
            raise _OcallFailed(ErrorCode.TIMEOUT, "hypervisor did not answer in time") from None
        except (WireError, OSError, HypervisorUnavailable) as exc:
            raise _OcallFailed(ErrorCode.GUEST_UNAVAILABLE, f"hypervisor link: {exc}") from None
        if answer is None:
            return None
        if self.enclave is None or not answer:
            return (answer, 0)
        return (b"", self.enclave.share(answer))
