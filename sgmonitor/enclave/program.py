"""The enclave program: ECALLs in, OCALLs out, IDS checks over sealed guest pages.

The enclave trusts its own measured code and the one attestation service its launch
configuration names (the configuration is reported in its evidence, so a host that
names another verifier is refused by the real one and by every relying party). It
wraps a session key only for a hypervisor key that verifier endorsed, so a stand-in the
host runs can't read the session; it makes every key itself; its evidence binds only
its own session's values, domain-separated; and it reads guest memory only through
:class:`~sgmonitor.enclave.transport.SealedTransport`.

The host connection is a stream socket carrying :mod:`sgmonitor.wire.calls` Call/Return
frames; every call is checked against :mod:`sgmonitor.tee.edl` on the way in and out.
An ECALL may make OCALLs; the host answers them on the same connection before it gets
the ECALL's Return. Every wait has a deadline, so a host that stops answering turns a
scan into a TIMEOUT error, never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from sgmonitor.channel import Side, Suite, make_channel
from sgmonitor.enclave.memory import DEFAULT_BUDGET, RemoteMemory
from sgmonitor.enclave.transport import ExchangeFailed, SealedTransport, SessionFailed
from sgmonitor.errors import GuestDataError, SGMonitorError
from sgmonitor.ids.pslist import ProcessRecord, list_processes
from sgmonitor.ids.registry import registered, run_checks
from sgmonitor.kernel.kernel import Kernel, open_kernel
from sgmonitor.keywrap import wrap_session_key
from sgmonitor.monitorlink import LinkKeys, ReportSealer, heartbeat_mac
from sgmonitor.statement import (
    HypervisorEndorsement,
    InvalidToken,
    Purpose,
    SessionBinding,
    session_report_data,
)
from sgmonitor.tee import edl
from sgmonitor.tee.backend import TeeBackend
from sgmonitor.tee.launch_config import LaunchConfig
from sgmonitor.wire.calls import Call, CallDirection, CallFailed, Return, Value
from sgmonitor.wire.core import (
    MAX_FRAME,
    ConnectionClosed,
    ErrorCode,
    Message,
    WireError,
    WireTimeout,
    recv_frame,
    send_frame,
)

__all__ = ["EnclaveCallError", "EnclaveProgram", "HostPort"]

LISTING = "pslist"  # the process list; any other name is one or more registered checks
_OCALL_IDS = 1 << 63  # OCALL ids count up from here, ECALL ids (the host's) below
_MAX_TIMEOUT_MS = 600_000
_MIN_BUDGET = 1 << 20


_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d{4,}")


def for_host(text: str) -> str:
    """A message for the untrusted host with its numbers blanked out: errors about
    guest data name kernel addresses (the guest's KASLR layout) and sizes read from
    guest memory, which the host must not learn. The kind of failure stays readable."""
    return _NUMBER.sub("#", text)


class EnclaveCallError(SGMonitorError):
    """An ECALL failed; the host gets ``CallFailed(code, message)``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Outstanding:
    """An OCALL sent and not answered yet."""

    call_id: int
    spec: edl.CallSpec
    sent: float  # time.monotonic() when sent


class HostPort:
    """The enclave's end of the host connection: receive ECALLs, make OCALLs (one at a
    time: a second is sent only once the first's answer is taken)."""

    def __init__(self, sock: socket.socket, shared: mmap.mmap | None = None) -> None:
        self.sock = sock
        self.shared = shared  # untrusted memory the host may put OCALL answers in
        self._next_ocall = _OCALL_IDS
        self.send_timeout = 30.0

    def take_shared(self, size: int) -> bytes:
        """The first ``size`` bytes of the shared buffer, copied out once (the host can
        change them at any time: nothing is read twice from there)."""
        if self.shared is None or not 0 < size <= len(self.shared):
            raise ExchangeFailed(ErrorCode.TOO_LARGE, f"no {size} bytes in the shared buffer")
        return self.shared[:size]

    def serve(
        self, handle: Callable[[edl.CallSpec, Mapping[str, Value]], tuple[Value, ...]]
    ) -> None:
        """Answer ECALLs until the host closes the connection."""
        while True:
            try:
                select.select([self.sock], [], [])
                msg = recv_frame(self.sock, 30.0)
            except ConnectionClosed:
                return
            except WireError as exc:  # the host broke the framing: nothing sane follows
                self._log(f"host connection broken: {exc}")
                return
            if isinstance(msg, Call):
                self._answer(msg, handle)
            # a late Return/CallFailed for an OCALL that already timed out: drop it

    def _answer(
        self, call: Call, handle: Callable[[edl.CallSpec, Mapping[str, Value]], tuple[Value, ...]]
    ) -> None:
        reply: Message
        try:
            found = edl.check_call(call, CallDirection.ECALL)
            results = handle(found, edl.named_args(found, call))
            edl.check_results(found, results)
            reply = Return(call.call_id, results)
        except edl.EdlError as exc:
            reply = CallFailed(call.call_id, ErrorCode.NO_SUCH_CALL, str(exc)[:1000])
        except EnclaveCallError as exc:
            reply = CallFailed(call.call_id, exc.code, for_host(str(exc))[:1000])
        except Exception as exc:  # a bug: say what kind, keep serving
            reply = CallFailed(call.call_id, ErrorCode.INTERNAL, f"{type(exc).__name__}")
        send_frame(self.sock, reply, self.send_timeout)

    def ocall(self, name: str, timeout: float, **args: Value) -> Mapping[str, Value]:
        """Make one OCALL and wait at most ``timeout`` seconds for its result."""
        return self.ocall_wait(self.ocall_send(name, **args), timeout)

    def ocall_send(self, name: str, **args: Value) -> _Outstanding:
        """Send an OCALL and return at once (the host works on it meanwhile); take its
        result with :meth:`ocall_wait` before sending another."""
        call_id = self._next_ocall
        self._next_ocall += 1
        call = edl.make_call(call_id, name, **args)
        found = edl.spec(name, CallDirection.OCALL)
        send_frame(self.sock, call, self.send_timeout)
        return _Outstanding(call_id, found, time.monotonic())

    def ocall_wait(self, out: _Outstanding, timeout: float) -> Mapping[str, Value]:
        """The result of OCALL ``out``, at most ``timeout`` seconds after it was sent."""
        name = out.spec.name
        deadline = out.sent + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WireTimeout(f"{name}: no answer from the host within {timeout:.1f}s")
            msg = recv_frame(self.sock, remaining)
            if isinstance(msg, Return) and msg.call_id == out.call_id:
                return edl.named_results(out.spec, msg.results)
            if isinstance(msg, CallFailed) and msg.call_id == out.call_id:
                raise ExchangeFailed(msg.code, f"{name} failed on the host: {msg.message}")
            if isinstance(msg, Call):  # no re-entrant ECALLs while an OCALL is out
                busy = CallFailed(msg.call_id, ErrorCode.BUSY, "enclave is in an OCALL")
                send_frame(self.sock, busy, self.send_timeout)
            # else: a stale answer to an earlier, timed-out OCALL: drop it

    def _log(self, message: str) -> None:
        with contextlib.suppress(SGMonitorError, OSError):
            self.ocall("ocall_log", 5.0, level=30, message=message[:4000])


@dataclass
class _Link:
    """The link to the remote monitor: its keys, the report sealer, answers given."""

    keys: LinkKeys
    sealer: ReportSealer
    answers: int = 0


@dataclass
class _Session:
    transport: SealedTransport  # and its channel: the session's keys and counters
    memory: RemoteMemory | None = None
    # Symbols and types of the guest kernel, found on the first scan: they do not
    # change while that kernel runs, so later scans only re-read guest data.
    kernel: Kernel | None = None


class EnclaveProgram:
    """The ECALL handlers; state is one session per guest."""

    def __init__(self, backend: TeeBackend, config: LaunchConfig, port: HostPort) -> None:
        self.backend = backend
        self.config = config
        self.port = port
        self.sessions: dict[str, _Session] = {}
        self.link: _Link | None = None
        self.progress = 0  # scans completed (ok or could-not-check), for the heartbeat

    def handle(self, found: edl.CallSpec, args: Mapping[str, Value]) -> tuple[Value, ...]:
        """Dispatch one checked ECALL."""
        handler = getattr(self, found.name, None)
        if handler is None:
            raise EnclaveCallError(ErrorCode.NO_SUCH_CALL, f"{found.name} is not implemented")
        return handler(**args)  # type: ignore[no-any-return]

    def _exchange(self, frame: bytes, timeout: float) -> Callable[[], bytes]:
        """Send ``frame`` to the hypervisor now; the returned call waits for its answer
        (the transport's ``Exchange``)."""
        timeout_ms = max(1, min(int(timeout * 1000), _MAX_TIMEOUT_MS))
        # The host is asked to give up at the deadline; the enclave doesn't rely on it.
        sent = self.port.ocall_send("ocall_hv_exchange", frame=frame, timeout_ms=timeout_ms)

        def answer() -> bytes:
            out = self.port.ocall_wait(sent, timeout + 1.0)
            got, shared = out["frame"], out["shared"]
            assert isinstance(got, bytes) and isinstance(shared, int)
            if shared:
                got = self.port.take_shared(shared)
            if len(got) > MAX_FRAME:
                raise ExchangeFailed(ErrorCode.TOO_LARGE, "reply frame too large")
            return got

        return answer

    # --- ECALLs --------------------------------------------------------------------------

    def ecall_open_session(
        self,
        vm: str,
        hv_nonce: bytes,
        hv_key: bytes,
        hv_endorsement: bytes,
        verifier_nonce: bytes,
    ) -> tuple[Value, ...]:
        """A fresh session key and id for ``vm``, wrapped for ``hv_key`` once the trusted
        verifier's endorsement says it is an enrolled hypervisor's, and evidence binding
        that session (see :func:`sgmonitor.statement.session_report_data`). The session
        keys mix in ``hv_nonce``. Replaces an earlier session."""
        try:
            endorsed = HypervisorEndorsement.verify(hv_endorsement, (self.config.verifier_key,))
        except InvalidToken as exc:
            raise EnclaveCallError(ErrorCode.ATTESTATION_REFUSED, f"{exc}") from None
        if endorsed.hv_key != hv_key:
            raise EnclaveCallError(
                ErrorCode.ATTESTATION_REFUSED, "the endorsement is for another hypervisor key"
            )
        self.ecall_close_session(vm)
        suite = self.config.suite
        session_key, session_id, wrapped, evidence = self._attested_key(
            vm, suite, hv_key, hv_nonce, verifier_nonce, Purpose.HYPERVISOR_SESSION
        )
        channel = make_channel(
            session_key,
            session_id,
            hv_nonce,
            suite,
            Side.ENCLAVE,
            vm,
            allow_unsealed=self.config.mode == "secure-plain",
        )
        del session_key
        self.sessions[vm] = _Session(SealedTransport(channel, self._exchange))
        return session_id, int(suite), wrapped, evidence

    def _attested_key(
        self,
        name: str,
        suite: Suite,
        peer_key: bytes,
        peer_nonce: bytes,
        verifier_nonce: bytes,
        purpose: Purpose,
    ) -> tuple[bytes, bytes, bytes, bytes]:
        """A fresh key and id for one relying party, the key wrapped for ``peer_key``,
        and evidence binding exactly that: (key, id, wrapped key, evidence)."""
        key, key_id = os.urandom(32), os.urandom(16)
        wrapped = wrap_session_key(
            X25519PublicKey.from_public_bytes(peer_key),
            key,
            session_id=key_id,
            vm=name,
            suite=suite,
        )
        binding = SessionBinding.for_wrapped_key(
            name, key_id, suite, wrapped, peer_nonce, peer_key, purpose
        )
        evidence = self.backend.evidence(session_report_data(binding, verifier_nonce))
        return key, key_id, wrapped, evidence

    def ecall_close_session(self, vm: str) -> tuple[Value, ...]:
        """Forget ``vm``'s session keys and cached pages."""
        session = self.sessions.pop(vm, None)
        if session is not None:
            session.transport.channel.close()
        return ()

    def ecall_open_monitor_link(
        self, ids: str, monitor_nonce: bytes, verifier_nonce: bytes
    ) -> tuple[Value, ...]:
        """A fresh link key for the monitor the launch configuration names, wrapped for
        it, and evidence binding the link (the monitor accepts it with the verifier's
        statement). Replaces an earlier link; the progress counter goes on."""
        link_key, link_id, wrapped, evidence = self._attested_key(
            ids,
            Suite.AES256GCM_HKDF_SHA256,
            self.config.monitor_key,
            monitor_nonce,
            verifier_nonce,
            Purpose.MONITOR_LINK,
        )
        keys = LinkKeys.derive(link_key, link_id, monitor_nonce)
        del link_key
        self.link = _Link(keys, ReportSealer(keys, ids))
        return link_id, wrapped, evidence

    def ecall_heartbeat(self, challenge: bytes) -> tuple[Value, ...]:
        """The monitor's challenge answered: MAC over it, this link's answer count and
        the scans completed, so the monitor sees a frozen scan loop and a replay."""
        link = self._require_link()
        sequence = link.answers
        link.answers += 1
        return sequence, self.progress, heartbeat_mac(link.keys, challenge, sequence, self.progress)

    def _require_link(self) -> _Link:
        if self.link is None:
            raise EnclaveCallError(
                ErrorCode.BAD_REQUEST, "no monitor link: open one (ecall_open_monitor_link)"
            )
        return self.link

    def ecall_run_scan(self, vm: str, check: str, options: bytes) -> tuple[Value, ...]:
        """Run ``check`` over ``vm`` with a cache emptied first: the JSON report sealed
        for the monitor (its sequence number and ciphertext), and the scan's status and
        counters in the clear.

        Guest data that does not make sense gives status ``could-not-check``; a failed
        session (forgery, timeout, refusal) fails the call and the session.
        """
        link = self._require_link()
        session = self.sessions.get(vm)
        if session is None:
            raise EnclaveCallError(ErrorCode.UNKNOWN_SESSION, f"no session for {vm!r}")
        names = _check_names(check)
        budget, timeout, pause = _options(options)
        transport = session.transport
        if transport.failure is not None:
            raise EnclaveCallError(
                transport.failure.code, f"session failed earlier: {transport.failure}"
            )
        transport.timeout, transport.pause = timeout, pause
        if session.memory is None or session.memory.cache.budget != budget:
            session.memory, session.kernel = RemoteMemory(transport, budget), None
        memory = session.memory
        before, crossings, opened, decrypted, waited, opening = (
            memory.stats(),
            transport.crossings,
            transport.bytes_opened,
            transport.bytes_decrypted,
            transport.crossing_s,
            transport.opening_s,
        )
        started = time.perf_counter()
        status, error = "ok", ""
        records: list[ProcessRecord] = []
        findings: list[dict[str, object]] = []
        opened_kernel = session.kernel is None
        try:
            try:
                memory.begin_scan()
                if session.kernel is None:
                    session.kernel = open_kernel(memory, transport.vmcoreinfo_notes())
                    memory.learn_from_here()  # later scans do not open the kernel
                if names is None:
                    records = list_processes(session.kernel)
                else:
                    found = run_checks(session.kernel, names, discover=False)
                    findings = [f.as_dict() for f in found]
            except GuestDataError as exc:
                # Perhaps the guest rebooted (new KASLR slide): find the kernel afresh.
                session.kernel = None
                status, error, records = "could-not-check", for_host(str(exc))[:2000], []
                findings = []
            finally:
                if transport.failure is None:
                    transport.end_scan()
        except SessionFailed:
            pass
        if transport.failure is not None:  # even if some layer swallowed the exception
            self.ecall_close_session(vm)
            raise EnclaveCallError(transport.failure.code, str(transport.failure))
        elapsed = time.perf_counter() - started
        stats: dict[str, int | float | bool] = dict(memory.stats().since(before).as_dict())
        stats.update(
            page_crossings=stats.pop("crossings"),
            crossings=transport.crossings - crossings,
            bytes_received=transport.bytes_opened - opened,
            bytes_decrypted=transport.bytes_decrypted - decrypted,
            cache_budget=budget,
            opened_kernel=opened_kernel,
            crossing_s=transport.crossing_s - waited,
            opening_s=transport.opening_s - opening,
        )
        self.progress += 1
        clear = {
            "vm": vm,
            "check": check,
            "mode": self.config.mode,
            "status": status,
            "error": error,
            "elapsed_s": elapsed,
            "stats": stats,
            "scan": self.progress,
        }
        sealed_part = {**clear, "findings": findings}
        if names is None:  # rows under their field names: a third of the JSON of dicts
            sealed_part.update(record_fields=ProcessRecord._fields, records=records)
        if session.kernel is not None and session.kernel.text_baseline is not None:
            # kept by the monitor: a baseline retaken over changed text shows there
            sealed_part["text_baseline"] = hashlib.sha256(session.kernel.text_baseline).hexdigest()
        seq, sealed = link.sealer.seal(_json(sealed_part))
        stats["report_s"] = time.perf_counter() - started - elapsed  # JSON and sealing
        return seq, sealed, _json(clear)


def _check_names(check: str) -> list[str] | None:
    """None for the process list; else the checks asked for ("all", or names joined
    by commas), each of them registered."""
    if check == LISTING:
        return None
    known = registered(discover=False)
    names = list(known) if check == "all" else check.split(",")
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise EnclaveCallError(
            ErrorCode.BAD_REQUEST, f"unknown check {check!r}: {LISTING}, all, or {list(known)}"
        )
    return names


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _options(data: bytes) -> tuple[int, float, bool]:
    """cache_budget (bytes), timeout (seconds per exchange), pause, from JSON options."""
    try:
        doc = json.loads(data or b"{}")
        if not isinstance(doc, dict) or set(doc) - {"cache_budget", "timeout_ms", "pause"}:
            raise ValueError("unknown option")
        budget = int(doc.get("cache_budget", DEFAULT_BUDGET))
        timeout_ms = int(doc.get("timeout_ms", 30_000))
        pause = bool(doc.get("pause", True))
        if not _MIN_BUDGET <= budget <= 1 << 34 or not 0 < timeout_ms <= _MAX_TIMEOUT_MS:
            raise ValueError("cache_budget or timeout_ms out of range")
    except (ValueError, TypeError) as exc:
        raise EnclaveCallError(ErrorCode.BAD_REQUEST, f"bad scan options: {exc}") from None
    return budget, timeout_ms / 1000, pause
