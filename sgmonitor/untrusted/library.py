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

Use::

    with SecureMonitor(hv_socket, hv_public_key, "web", mode="secure") as m:
        records, stats = m.scan("pslist")

or, given only a QEMU QMP socket, :func:`scan_qemu` (a private hypervisor service with a
throwaway key for one run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

import sgmonitor
from sgmonitor.channel import Suite
from sgmonitor.errors import GuestDataError, SGMonitorError
from sgmonitor.keywrap import (
    fingerprint,
    generate_private_key,
    load_public_key,
    public_key_from_pem,
    public_key_to_pem,
    save_private_key,
)
from sgmonitor.tee import edl, sign_enclave_for
from sgmonitor.wire import (
    Call,
    CallDirection,
    CallFailed,
    CloseSession,
    ConnectionClosed,
    Error,
    ErrorCode,
    Hello,
    HelloReply,
    Message,
    OpenSession,
    Return,
    SessionClosed,
    SessionOpened,
    Value,
    WireError,
    WireTimeout,
    decode,
    encode,
    recv_encoded,
    send_encoded,
)

__all__ = [
    "DEFAULT_CACHE_BUDGET",
    "MODES",
    "CouldNotCheck",
    "EnclaveCallFailed",
    "EnclaveDied",
    "EnclaveHost",
    "HypervisorUnavailable",
    "LibraryError",
    "PrivateHypervisor",
    "ScanError",
    "SecureMonitor",
    "private_hypervisor",
    "scan_qemu",
    "start_hypervisor",
]

log = logging.getLogger("sgmonitor.untrusted")

MODES = ("secure", "secure-plain")
DEFAULT_CACHE_BUDGET = 32 << 20
_CONFIG_FORMAT = "sgmonitor-enclave-config/1"
_MAX_RELAY_TIMEOUT = 600.0
_ROOT = Path(sgmonitor.__file__).resolve().parent.parent
Tap = Callable[[str, bytes], None]  # (link, frame bytes): what the relay sees


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
    never a result about the guest."""


class CouldNotCheck(LibraryError, GuestDataError):
    """The scan ran but guest data did not make sense: report "could not check"."""


class HypervisorUnavailable(LibraryError):
    """The hypervisor service refused, dropped the connection or did not answer."""


# --- the enclave process ---------------------------------------------------------------


_SIGNER: Ed25519PrivateKey | None = None


def _dev_signer() -> Ed25519PrivateKey:
    """A development signing key for this process (like an SDK's debug signing key)."""
    global _SIGNER
    if _SIGNER is None:
        _SIGNER = Ed25519PrivateKey.generate()
    return _SIGNER


def enclave_config(hv_public_key: X25519PublicKey, mode: str) -> bytes:
    """The enclave's configuration: measured into MRENCLAVE, so it pins the hypervisor
    key and the mode for anyone who checks the evidence."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    doc = {
        "format": _CONFIG_FORMAT,
        "hv_public_key": public_key_to_pem(hv_public_key).decode(),
        "mode": mode,
    }
    return json.dumps(doc, sort_keys=True).encode()


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
        signing_key: Ed25519PrivateKey | None = None,
        backend: str = "sim",
        platform_key: Path | None = None,
        tap: Tap | None = None,
    ) -> None:
        self._ocall_handler = ocall_handler
        self.tap = tap
        self._dir = Path(tempfile.mkdtemp(prefix="sgm-enclave-"))
        self._next_call = 1
        key = signing_key or _dev_signer()
        sigstruct = sign_enclave_for(backend, key, root=_ROOT, config=config)
        (self._dir / "enclave.json").write_bytes(config)
        (self._dir / "enclave.sig").write_bytes(sigstruct)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable,
            "-m",
            "sgmonitor.enclave",
            "--fd",
            str(theirs.fileno()),
            "--config",
            str(self._dir / "enclave.json"),
            "--sigstruct",
            str(self._dir / "enclave.sig"),
            "--backend",
            backend,
        ]
        if platform_key is not None:
            argv += ["--platform-key", str(platform_key)]
        try:
            self.process = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd=_ROOT
            )
        except BaseException:
            ours.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        finally:
            theirs.close()
        self.sock = ours

    def ecall(self, name: str, timeout: float, **args: Value) -> Mapping[str, Value]:
        """Make one ECALL, serving its OCALLs, within ``timeout`` seconds in total."""
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
                msg = decode(recv_encoded(self.sock, remaining), expect=(Call, Return, CallFailed))
            except WireTimeout:
                continue
            except (ConnectionClosed, OSError) as exc:
                code = self.process.poll()
                self.close()
                raise EnclaveDied(f"{name}: the enclave went away (exit {code}): {exc}") from None
            if isinstance(msg, Return) and msg.call_id == call_id:
                return edl.named_results(found, msg.results)
            if isinstance(msg, CallFailed) and msg.call_id == call_id:
                raise EnclaveCallFailed(name, msg.code, msg.message)
            if isinstance(msg, Call):
                reply = self._serve_ocall(msg)
                if reply is not None:
                    self._send(reply)

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

    def close(self) -> None:
        """Close the connection (the enclave exits on EOF), reap the process."""
        with contextlib.suppress(OSError):
            self.sock.close()
        _reap(self.process, 5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class _OcallFailed(LibraryError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _reap(process: subprocess.Popen[bytes], grace: float) -> None:
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the monitor: enclave + hypervisor connection ---------------------------------------


class SecureMonitor:
    """One enclave IDS monitoring one guest through a hypervisor service.

    :param hypervisor_socket: the service's unix socket
    :param hv_public_key: the service's X25519 public key (key object, PEM bytes or a
        PEM file); measured into the enclave's configuration, so it is pinned
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
        hv_public_key: X25519PublicKey | bytes | Path | str,
        vm: str,
        *,
        mode: str = "secure",
        cache_budget: int = DEFAULT_CACHE_BUDGET,
        timeout: float = 30.0,
        scan_timeout: float = 300.0,
        pause: bool = True,
        tap: Tap | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (traditional runs in-process)")
        self.hypervisor_socket = hypervisor_socket
        self.hv_public_key = _public_key(hv_public_key)
        self.vm = vm
        self.mode = mode
        self.cache_budget = cache_budget
        self.timeout = timeout
        self.scan_timeout = scan_timeout
        self.pause = pause
        self.tap = tap
        self.enclave: EnclaveHost | None = None
        self._hv: socket.socket | None = None
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
        """Start the enclave and open a session with the hypervisor service."""
        config = enclave_config(self.hv_public_key, self.mode)
        self.enclave = EnclaveHost(config, self._ocall, tap=self.tap)
        try:
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
        if self.enclave is not None:
            self.enclave.close()
            self.enclave = None
        self._drop_hv()

    # --- sessions and scans --------------------------------------------------------------

    def open_session(self) -> None:
        """Hello -> the enclave makes and wraps a session key -> OpenSession."""
        assert self.enclave is not None, "open() first"
        hello = self._hv_call(Hello(self.vm), (HelloReply,), self.timeout)
        assert isinstance(hello, HelloReply)
        suite = Suite.UNSEALED_FOR_EXPERIMENTS_ONLY if self.mode == "secure-plain" else None
        if suite is not None and suite not in hello.suites:
            raise HypervisorUnavailable(
                "the hypervisor service does not allow the unsealed secure-plain mode "
                "(start it with --allow-unsealed)"
            )
        out = self.enclave.ecall(
            "ecall_open_session", self.timeout, vm=self.vm, hv_nonce=hello.hv_nonce
        )
        session_id, wrapped = out["session_id"], out["wrapped_key"]
        assert isinstance(session_id, bytes) and isinstance(wrapped, bytes)
        msg = OpenSession(self.vm, session_id, Suite(int(out["suite"])), wrapped)
        self._hv_call(msg, (SessionOpened,), self.timeout)
        self.session_id = session_id

    def new_session(self) -> None:
        """Close the current session (if any) and open a fresh one: new key, new id."""
        assert self.enclave is not None, "open() first"
        if self.session_id is not None:
            self._session_failed()
        self.open_session()

    def scan(
        self, check: str = "pslist", *, cache_budget: int | None = None
    ) -> tuple[list[dict[str, int | str]], dict[str, object]]:
        """Run one IDS check in the enclave: (records, stats).

        :raises ScanError: the session failed (forgery, dropped reply, refusal); the
            next scan opens a new session
        :raises CouldNotCheck: guest data did not make sense
        """
        if self.enclave is None:
            raise LibraryError("SecureMonitor is closed")
        if self.session_id is None:
            self.open_session()
        options = {
            "cache_budget": cache_budget or self.cache_budget,
            "timeout_ms": int(self.timeout * 1000),
            "pause": self.pause,
        }
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
        report = out["report"]
        assert isinstance(report, bytes)
        doc = json.loads(report)
        stats = dict(doc["stats"], elapsed_s=doc["elapsed_s"], mode=doc["mode"])
        if doc["status"] != "ok":
            raise CouldNotCheck(f"{check} on {self.vm}: could not check: {doc['error']}")
        return list(doc["records"]), stats

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
        try:
            send_encoded(sock, frame, timeout)
            answer = recv_encoded(sock, timeout)
        except (WireError, OSError):
            self._drop_hv()  # out of step or gone: a fresh connection next time
            raise
        if self.tap is not None:
            self.tap("hypervisor", answer)
        return answer

    def _hv_call(self, msg: Message, expect: tuple[type[Message], ...], timeout: float) -> Message:
        try:
            answer = self._relay(encode(msg), timeout)
            if answer is None:
                raise HypervisorUnavailable("no answer")
            reply = decode(answer, expect=(*expect, Error))
        except WireTimeout:
            raise HypervisorUnavailable(
                f"{type(msg).__name__}: no answer from the hypervisor within {timeout:.1f}s"
            ) from None
        except (WireError, OSError) as exc:
            raise HypervisorUnavailable(f"{type(msg).__name__}: {exc}") from None
        if isinstance(reply, Error):
            raise HypervisorUnavailable(
                f"{type(msg).__name__} refused: {reply.code.name}: {reply.message}"
            )
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
        return None if answer is None else (answer,)


def _public_key(key: X25519PublicKey | bytes | Path | str) -> X25519PublicKey:
    if isinstance(key, X25519PublicKey):
        return key
    if isinstance(key, bytes):
        return public_key_from_pem(key)
    return load_public_key(Path(key))


# --- a private hypervisor service for one run ---------------------------------------------


@dataclass(frozen=True)
class PrivateHypervisor:
    """A hypervisor service started for one run: where it listens and its key."""

    socket: str
    public_key: X25519PublicKey
    guests: tuple[str, ...]
    pid: int

    @property
    def vm(self) -> str:
        """The first (for a private service: the only) guest's name."""
        return self.guests[0]


@contextlib.contextmanager
def start_hypervisor(
    guests: Mapping[str, str],
    *,
    allow_unsealed: bool = False,
    start_timeout: float = 30.0,
) -> Iterator[PrivateHypervisor]:
    """Start ``python -m sgmonitor.hypervisor`` for ``guests`` (name -> QMP socket) with
    a throwaway key, wait for its ready line, and stop it afterwards (it also exits if
    we die: its stdin is our pipe)."""
    home = Path(tempfile.mkdtemp(prefix="sgm-hv-"))
    key = generate_private_key()
    save_private_key(home / "hv.pem", key)
    sock_path = str(home / "hv.sock")
    argv = [sys.executable, "-m", "sgmonitor.hypervisor", "--socket", sock_path]
    argv += ["--key", str(home / "hv.pem"), "--exit-with-stdin"]
    for name, qmp in guests.items():
        argv += ["--guest", f"{name}={qmp}"]
    if allow_unsealed:
        argv.append("--allow-unsealed")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_ROOT)
    try:
        info = _ready_line(proc, start_timeout)
        if info.get("fingerprint") != fingerprint(key.public_key()):
            raise HypervisorUnavailable("the private hypervisor service reports another key")
        yield PrivateHypervisor(sock_path, key.public_key(), tuple(guests), proc.pid)
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.terminate()
        _reap(proc, 5.0)
        proc.stdout.close()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def private_hypervisor(
    qmp_socket: str, vm: str = "guest", *, allow_unsealed: bool = False
) -> Iterator[PrivateHypervisor]:
    """A hypervisor service for one QMP socket, for one run (see :func:`start_hypervisor`)."""
    with start_hypervisor({vm: qmp_socket}, allow_unsealed=allow_unsealed) as hv:
        yield hv


def _ready_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HypervisorUnavailable(f"hypervisor service not ready within {timeout:.0f}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise HypervisorUnavailable(f"hypervisor service exited (code {proc.wait()})")
        line += chunk
    try:
        info = json.loads(line)
    except ValueError:
        raise HypervisorUnavailable(f"unexpected ready line {line[:200]!r}") from None
    if not isinstance(info, dict) or info.get("ready") is not True:
        raise HypervisorUnavailable(f"unexpected ready line {line[:200]!r}")
    return info


def scan_qemu(
    qmp_socket: str,
    *,
    mode: str = "secure",
    check: str = "pslist",
    cache_budget: int = DEFAULT_CACHE_BUDGET,
    timeout: float = 30.0,
) -> tuple[list[dict[str, int | str]], dict[str, object]]:
    """One secure scan of a QEMU guest: private hypervisor service + enclave, both
    stopped afterwards (``sgmonitor ps --qemu SOCK --mode secure``)."""
    with private_hypervisor(qmp_socket, allow_unsealed=mode == "secure-plain") as hv:
        monitor = SecureMonitor(
            hv.socket, hv.public_key, hv.vm, mode=mode, cache_budget=cache_budget, timeout=timeout
        )
        with monitor:
            return monitor.scan(check)
