"""The hypervisor service: the one process that opens guest RAM and QMP.

It listens on a unix socket for untrusted libraries. Each connection may open sessions
(one per enclave key, :class:`sgmonitor.wire.hypervisor.OpenSession`); a session's requests arrive
sealed, are opened with the session's channel, served by the guest's
:class:`~sgmonitor.hypervisor.pages.PageServer` and answered with a sealed index
followed by the present pages, sealed together. Everything a library sends is hostile
input: frames are bounded by the wire module, every connection has receive deadlines,
work per request is bounded by the wire limits, and a failure on one connection (a
malformed frame, a forged seal, a dropped peer) ends at most that session or that
connection, never the service.

Threads: one per connection (bounded), one lock per guest (page tables, QMP and the
RAM mapping are shared by every session on that guest).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.channel import (
    ChannelClosed,
    InvalidSeal,
    Kind,
    SealingChannel,
    SessionExpired,
    Side,
    Suite,
    make_channel,
)
from sgmonitor.errors import GuestDataError, PageFault, SGMonitorError
from sgmonitor.guest.memory import PhysicalMemory
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.hypervisor.pages import ListEnd, ListWalk, PageNotRam, PageServer
from sgmonitor.kernel.vmcoreinfo import iter_vmcoreinfo
from sgmonitor.keywrap import InvalidWrappedKey, fingerprint, raw_public_key, unwrap_session_key
from sgmonitor.statement import InvalidToken, SessionBinding, Statement
from sgmonitor.wire.admin import Revoke, Revoked, RevokeKind
from sgmonitor.wire.core import (
    ConnectionClosed,
    Error,
    ErrorCode,
    Message,
    WireError,
    WireTimeout,
    decode,
    encode,
    recv_encoded,
    send_frame,
)
from sgmonitor.wire.hypervisor import (
    HV_NONCE_LEN,
    CloseSession,
    Hello,
    HelloReply,
    OpenSession,
    SessionClosed,
    SessionOpened,
)
from sgmonitor.wire.sealed import (
    MAX_VMCOREINFO_NOTES,
    Ack,
    Batch,
    BatchReply,
    BeginScan,
    EndScan,
    FollowList,
    GetRegisters,
    GetVmcoreinfo,
    ListReply,
    PageIndex,
    PagesReply,
    PageStatus,
    ReadPages,
    RegistersReply,
    Reply,
    Request,
    RequestFailed,
    VcpuRegisters,
    VmcoreinfoReply,
)

__all__ = ["GuestHandle", "HypervisorService", "ServiceConfig"]

_SEALED_REQUESTS = (
    ReadPages,
    FollowList,
    GetVmcoreinfo,
    GetRegisters,
    BeginScan,
    EndScan,
    Batch,
)
_LINK_MESSAGES = (Hello, OpenSession, CloseSession, Request)


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and policy; the defaults suit a lab host."""

    # The attestation services whose statements open sessions (raw Ed25519 keys).
    attestation_keys: tuple[Ed25519PublicKey, ...] = ()
    allow_unsealed: bool = False  # suite 0xFE (secure-plain): experiments only
    idle_timeout: float = 300.0  # a connection may be silent this long between frames
    frame_timeout: float = 10.0  # once a frame starts, all of it within this
    send_timeout: float = 30.0
    max_connections: int = 64
    max_sessions_per_connection: int = 16
    # Per guest, whatever the sessions do: paused at most max_pause seconds in any
    # pause_window seconds; the service resumes it when the budget is spent.
    max_pause: float = 30.0
    pause_window: float = 120.0
    session_lifetime: float = 3600.0  # then the enclave must attest again
    # Session ids are never accepted twice; an id is forgotten only once the statement
    # that named it has expired (it can't be presented again). Full: refuse new ones.
    remembered_sessions: int = 100_000


class GuestHandle:
    """One guest: its memory source (opened on first use), page server, lock, and the
    pause budget shared by every session on it. ``opener`` makes the memory source, so
    tests may serve a dump instead."""

    def __init__(
        self,
        name: str,
        opener: Callable[[], PhysicalMemory],
        *,
        max_pause: float = 30.0,
        pause_window: float = 120.0,
    ) -> None:
        self.name = name
        self.opener = opener
        self.lock = threading.Lock()
        self.memory: PhysicalMemory | None = None
        self.server: PageServer | None = None
        self.pauses = 0
        self.we_paused = False
        self.sessions: set[_Session] = set()  # open sessions on this guest
        self.vmcoreinfo: list[tuple[int, bytes]] | None = None  # (address, note) found
        self.max_pause = max_pause
        self.pause_window = pause_window
        self._spans: list[list[float]] = []  # [start, end] of our pauses; end=inf: now

    def ensure_open(self) -> PageServer:
        """The page server, opening the guest if needed (call with the lock held)."""
        if self.server is None:
            self.memory = self.opener()
            self.server = PageServer(self.memory)
        return self.server

    def reset(self) -> None:
        """Forget the guest connection after a failure; the next use reopens it."""
        self.release()
        self.vmcoreinfo = None

    def release(self) -> None:
        """Let go of QMP and the RAM mapping (QEMU serves one QMP client at a time, so
        the service holds it only while a session needs it); resume what we paused."""
        if self.memory is not None:
            with contextlib.suppress(Exception):
                if self.we_paused and isinstance(self.memory, QemuGuest):
                    self.memory.qmp.cont()
            with contextlib.suppress(Exception):
                self.memory.close()
        self._end_span()
        self.memory = self.server = None
        self.pauses, self.we_paused = 0, False
        for session in self.sessions:
            session.paused = False

    def paused_seconds(self, now: float) -> float:
        """How long we held the guest paused within the last ``pause_window`` seconds."""
        start = now - self.pause_window
        self._spans = [s for s in self._spans if s[1] > start]
        return sum(min(end, now) - max(begin, start) for begin, end in self._spans)

    def pause(self, now: float) -> bool:
        """Stop the vCPUs (reference counted across sessions); True if now paused.
        Refused (False) while the guest's pause budget is spent."""
        self.ensure_open()
        if not isinstance(self.memory, QemuGuest):
            return False
        if self.pauses == 0:
            if self.paused_seconds(now) >= self.max_pause:
                return False
            if self.memory.qmp.is_running():
                self.memory.qmp.stop()
                self.we_paused = True
                self._spans.append([now, math.inf])
        self.pauses += 1
        return True

    def resume(self) -> None:
        """Undo one :meth:`pause`; the last one restarts the vCPUs we stopped."""
        if self.pauses == 0:
            return
        self.pauses -= 1
        if self.pauses == 0:
            self._resume_vcpus()

    def resume_if_over_budget(self, now: float) -> bool:
        """Resume the guest if our pauses spent its budget, whoever holds them."""
        if not self.we_paused or self.paused_seconds(now) < self.max_pause:
            return False
        self.pauses = 0
        for session in self.sessions:
            session.paused = False
        self._resume_vcpus()
        return True

    def _resume_vcpus(self) -> None:
        if self.we_paused and isinstance(self.memory, QemuGuest):
            self.we_paused = False
            self._end_span()
            self.memory.qmp.cont()

    def _end_span(self) -> None:
        if self._spans and self._spans[-1][1] == math.inf:
            self._spans[-1][1] = time.monotonic()


@dataclass(eq=False)  # identity: a set member
class _Session:
    session_id: bytes
    vm: str
    channel: SealingChannel
    guest: GuestHandle
    mrenclave: bytes
    paused: bool = False
    revoked: bool = False
    # A streamed list walk's next window: announced (FollowList.then), then walked
    # ahead once the reply is out, until the enclave asks for it or the scan ends.
    announced: ListWalk | None = None
    ahead: _WalkedList | None = None


@dataclass(frozen=True)
class _WalkedList:
    """One FollowList's walk as its reply: the index and the present pages (address,
    bytes) in index order, with the walk asked for and the page server (so the guest)
    that walked it."""

    walk: ListWalk
    server: PageServer
    index: ListReply
    pages: list[tuple[int, bytes]]

    @classmethod
    def of(cls, server: PageServer, walk: ListWalk, max_pages: int | None) -> _WalkedList:
        found = server.follow_list(walk, max_pages=max_pages)
        addresses = list(found.pages)
        index, pages = _pages_reply(addresses, [found.pages[a] for a in addresses])
        assert isinstance(index, PagesReply)
        return cls(walk, server, ListReply(found.nodes, found.end, index.pages), pages)

    def read(self) -> int:
        """Pages the walk read (present or not): what a reply budget counts."""
        return len(self.index.pages)


@dataclass(eq=False)  # identity: a set member
class _Connection:
    sock: socket.socket
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    nonces: list[bytes] = field(default_factory=list)  # issued by Hello, each used once


class _Refused(SGMonitorError):
    """A request the service refuses with a clear ``Error``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class HypervisorService:
    """Serve sealed guest pages to enclaves over a unix socket."""

    def __init__(
        self,
        socket_path: str,
        private_key: X25519PrivateKey,
        guests: Mapping[str, Callable[[], PhysicalMemory]],
        config: ServiceConfig | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._key = private_key
        self.public_key = private_key.public_key()
        self.hv_key = raw_public_key(self.public_key)
        self.config = config or ServiceConfig()
        self.guests = {
            name: GuestHandle(
                name,
                opener,
                max_pause=self.config.max_pause,
                pause_window=self.config.pause_window,
            )
            for name, opener in guests.items()
        }
        self._listener: socket.socket | None = None
        self._admin: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # connections, session registry, revocations
        self._connections: set[_Connection] = set()
        self._seen_sessions: dict[bytes, float] = {}  # id -> its statement's expiry
        self._revoked_measurements: set[bytes] = set()
        self._revoked_sessions: set[bytes] = set()
        self._threads: list[threading.Thread] = []

    @classmethod
    def for_qemu(
        cls,
        socket_path: str,
        private_key: X25519PrivateKey,
        qmp_sockets: Mapping[str, str],
        config: ServiceConfig | None = None,
    ) -> HypervisorService:
        """A service for live QEMU guests, each named by its QMP socket."""
        openers = {name: _qemu_opener(path) for name, path in qmp_sockets.items()}
        return cls(socket_path, private_key, openers, config)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def admin_socket_path(self) -> str:
        """The operator's socket (revocation): beside the library's, owner-only."""
        return self.socket_path + ".admin"

    def listen(self) -> None:
        """Bind the library's and the operator's sockets (owner-only) and start accepting."""
        self._listener = _bind_unix(self.socket_path)
        self._admin = _bind_unix(self.admin_socket_path)
        t = threading.Thread(target=self._serve_admin, daemon=True)
        t.start()

    def ready_info(self) -> dict[str, object]:
        """What the ready line says: where to connect and which key to pin."""
        return {
            "ready": True,
            "socket": self.socket_path,
            "admin_socket": self.admin_socket_path,
            "fingerprint": fingerprint(self.public_key),
            "public_key": self.hv_key.hex(),
            "guests": sorted(self.guests),
            "allow_unsealed": self.config.allow_unsealed,
            "pid": os.getpid(),
        }

    def serve_forever(self) -> None:
        """Accept connections until :meth:`shutdown`; one thread per connection."""
        if self._listener is None:
            self.listen()
        assert self._listener is not None
        self._listener.settimeout(0.5)
        while not self._stop.is_set():
            self._resume_overdue()
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            with self._lock:
                busy = len(self._connections) >= self.config.max_connections
            if busy:
                with contextlib.suppress(SGMonitorError, OSError):
                    send_frame(conn, Error(ErrorCode.BUSY, "too many connections"), 1.0)
                conn.close()
                continue
            t = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        self._close_all()

    def shutdown(self) -> None:
        """Stop accepting, drop every connection, resume paused guests."""
        self._stop.set()

    def _close_all(self) -> None:
        for sock, path in (
            (self._listener, self.socket_path),
            (self._admin, self.admin_socket_path),
        ):
            if sock is not None:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5.0)
        for g in self.guests.values():
            with g.lock:
                g.reset()

    # --- one connection ----------------------------------------------------------------

    def _serve_connection(self, sock: socket.socket) -> None:
        conn = _Connection(sock)
        with self._lock:
            self._connections.add(conn)
        try:
            while not self._stop.is_set():
                try:
                    data = self._recv(sock)
                except (ConnectionClosed, WireTimeout, OSError):
                    return  # peer gone, or silent / dripping past its deadline
                except WireError as exc:  # bad length prefix: the stream is out of step
                    self._send(sock, Error(ErrorCode.BAD_FRAME, str(exc)))
                    return
                reply = self._handle(conn, data)
                if not self._send(sock, reply):
                    return
                self._walk_ahead(conn)
        finally:
            for session_id in list(conn.sessions):
                self._end_session(conn, session_id)
            with self._lock:
                self._connections.discard(conn)
            sock.close()

    def _recv(self, sock: socket.socket) -> bytes:
        """The next frame: wait up to the idle timeout for it to start, then the frame
        deadline for all of it, so a dripping peer can't hold a thread for long."""
        deadline = time.monotonic() + self.config.idle_timeout
        while True:
            if self._stop.is_set():
                raise ConnectionClosed("service stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WireTimeout("connection idle too long")
            ready, _, _ = select.select([sock], [], [], min(remaining, 0.5))
            if ready:
                return recv_encoded(sock, self.config.frame_timeout)

    def _send(self, sock: socket.socket, msg: Message) -> bool:
        try:
            send_frame(sock, msg, self.config.send_timeout)
        except (WireError, OSError):
            return False
        return True

    def _handle(self, conn: _Connection, data: bytes) -> Message:
        """One frame in, one frame out; every failure becomes a clear ``Error``."""
        try:
            msg = decode(data, expect=_LINK_MESSAGES)
        except WireError as exc:
            return Error(ErrorCode.BAD_FRAME, str(exc)[:1000])
        try:
            if isinstance(msg, Hello):
                return self._hello(conn, msg)
            if isinstance(msg, OpenSession):
                return self._open(conn, msg)
            if isinstance(msg, CloseSession):
                self._require(conn, msg.session_id)
                self._end_session(conn, msg.session_id)
                return SessionClosed(msg.session_id)
            assert isinstance(msg, Request)
            return self._request(conn, msg)
        except _Refused as exc:
            sid = getattr(msg, "session_id", b"")
            rid = getattr(msg, "request_id", 0)
            return Error(exc.code, str(exc)[:1000], sid, rid)
        except Exception as exc:  # a bug must not take the service down with it
            sid = getattr(msg, "session_id", b"")
            if sid in conn.sessions:
                self._end_session(conn, sid)
            # Clear text to the untrusted library: the kind of bug only, since the
            # message may name guest data (an address, bytes read while serving).
            return Error(ErrorCode.INTERNAL, type(exc).__name__, sid)

    def _hello(self, conn: _Connection, msg: Hello) -> Message:
        if msg.vm not in self.guests:
            raise _Refused(ErrorCode.UNKNOWN_VM, f"no guest named {msg.vm!r}")
        nonce = os.urandom(HV_NONCE_LEN)
        conn.nonces = [*conn.nonces[-15:], nonce]  # the statement must bind one of these
        suites = [Suite.AES256GCM_HKDF_SHA256]
        if self.config.allow_unsealed:
            suites.append(Suite.UNSEALED_FOR_EXPERIMENTS_ONLY)
        return HelloReply(nonce, tuple(suites), self.hv_key)

    def _open(self, conn: _Connection, msg: OpenSession) -> Message:
        guest = self.guests.get(msg.vm)
        if guest is None:
            raise _Refused(ErrorCode.UNKNOWN_VM, f"no guest named {msg.vm!r}")
        if msg.suite is Suite.UNSEALED_FOR_EXPERIMENTS_ONLY and not self.config.allow_unsealed:
            raise _Refused(
                ErrorCode.SUITE_REFUSED,
                "suite UNSEALED_FOR_EXPERIMENTS_ONLY refused (start with allow_unsealed)",
            )
        if len(conn.sessions) >= self.config.max_sessions_per_connection:
            raise _Refused(ErrorCode.BUSY, "too many sessions on this connection")
        statement = self._check_statement(conn, msg)
        try:
            key = unwrap_session_key(
                self._key, msg.wrapped_key, session_id=msg.session_id, vm=msg.vm, suite=msg.suite
            )
        except InvalidWrappedKey:
            raise _Refused(ErrorCode.BAD_WRAPPED_KEY, "wrapped key does not unwrap") from None
        self._remember(msg.session_id, statement.not_after)
        not_after = time.time() + self.config.session_lifetime
        channel = make_channel(
            key,
            msg.session_id,
            statement.binding.peer_nonce,
            msg.suite,
            Side.HYPERVISOR,
            msg.vm,
            not_after=not_after,
            allow_unsealed=self.config.allow_unsealed,
        )
        session = _Session(msg.session_id, msg.vm, channel, guest, statement.identity.mrenclave)
        with guest.lock:
            try:
                guest.ensure_open()
            except Exception as exc:
                guest.reset()
                raise _Refused(ErrorCode.GUEST_UNAVAILABLE, f"guest {msg.vm!r}: {exc}") from None
            guest.sessions.add(session)
        conn.sessions[msg.session_id] = session
        return SessionOpened(msg.session_id)

    def _check_statement(self, conn: _Connection, msg: OpenSession) -> Statement:
        """The attestation statement for exactly this session, or a precise refusal.
        The nonce it binds is one this connection was given, and is used up here."""
        if not msg.statement:
            raise _Refused(
                ErrorCode.ATTESTATION_REQUIRED,
                "no attestation statement: a session needs one from a trusted attestation service",
            )
        refused = ErrorCode.ATTESTATION_REFUSED
        try:
            statement = Statement.verify(msg.statement, self.config.attestation_keys)
        except InvalidToken as exc:
            raise _Refused(refused, str(exc)) from None
        bound = statement.binding
        expected = SessionBinding.for_wrapped_key(
            msg.vm, msg.session_id, msg.suite, msg.wrapped_key, bound.peer_nonce, self.hv_key
        )
        for name in ("vm", "session_id", "suite", "wrapped_key_sha256", "peer_key", "purpose"):
            if getattr(bound, name) != getattr(expected, name):
                raise _Refused(refused, f"the statement is for another {name.replace('_', ' ')}")
        if bound.peer_nonce not in conn.nonces:
            raise _Refused(refused, "the statement binds a nonce this connection was not given")
        conn.nonces.remove(bound.peer_nonce)
        with self._lock:
            if statement.identity.mrenclave in self._revoked_measurements:
                raise _Refused(ErrorCode.REVOKED, "this enclave measurement is revoked")
            if msg.session_id in self._revoked_sessions:
                raise _Refused(ErrorCode.REVOKED, "this session is revoked")
        return statement

    def _remember(self, session_id: bytes, statement_expiry: float) -> None:
        """Accept a session id once, ever: ids whose statements expired are forgotten
        (nothing can present them again); when full, refuse rather than forget."""
        with self._lock:
            if session_id in self._seen_sessions:
                raise _Refused(ErrorCode.SESSION_EXISTS, "session id already used")
            if len(self._seen_sessions) >= self.config.remembered_sessions:
                now = time.time()
                self._seen_sessions = {sid: t for sid, t in self._seen_sessions.items() if t > now}
                if len(self._seen_sessions) >= self.config.remembered_sessions:
                    raise _Refused(
                        ErrorCode.BUSY, "too many recent sessions to remember; try again later"
                    )
            self._seen_sessions[session_id] = statement_expiry

    def _require(self, conn: _Connection, session_id: bytes) -> _Session:
        session = conn.sessions.get(session_id)
        if session is None:
            raise _Refused(ErrorCode.UNKNOWN_SESSION, "no such session on this connection")
        return session

    def _end_session(self, conn: _Connection, session_id: bytes) -> None:
        session = conn.sessions.pop(session_id, None)
        if session is not None:
            self._drop(session)

    def _drop(self, session: _Session) -> None:
        """Close the session's keys, resume what it paused, let go of an unused guest."""
        session.channel.close()
        guest = session.guest
        with guest.lock:
            if session.paused:
                session.paused = False
                try:
                    guest.resume()
                except Exception:
                    guest.reset()
            guest.sessions.discard(session)
            if not guest.sessions:
                guest.release()

    def _resume_overdue(self) -> None:
        """Resume every guest whose pause budget is spent, whichever sessions hold it."""
        now = time.monotonic()
        for guest in self.guests.values():
            with guest.lock:
                try:
                    guest.resume_if_over_budget(now)
                except Exception:
                    guest.reset()

    # --- the operator's socket ---------------------------------------------------------

    def _serve_admin(self) -> None:
        """Revocations, one connection at a time; they take effect before the answer."""
        assert self._admin is not None
        self._admin.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self._admin.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    msg = decode(recv_encoded(conn, 5.0), expect=(Revoke,))
                    answer: Message = Revoked(self.revoke(msg.kind, msg.value))
                except WireError as exc:
                    answer = Error(ErrorCode.BAD_FRAME, str(exc)[:1000])
                with contextlib.suppress(WireError, OSError):
                    send_frame(conn, answer, 5.0)

    def revoke(self, kind: RevokeKind, value: bytes) -> int:
        """Refuse the measurement (or session) from now on and end its open sessions at
        once: their keys are closed before this returns. The number of sessions ended."""
        with self._lock:
            if kind is RevokeKind.MEASUREMENT:
                self._revoked_measurements.add(value)
            else:
                self._revoked_sessions.add(value)
            hit = [
                s
                for c in self._connections
                for s in c.sessions.values()
                if (s.mrenclave if kind is RevokeKind.MEASUREMENT else s.session_id) == value
            ]
        for session in hit:
            session.revoked = True
            self._drop(session)
        return len(hit)

    # --- sealed requests ---------------------------------------------------------------

    def _request(self, conn: _Connection, msg: Request) -> Message:
        session = self._require(conn, msg.session_id)
        if session.revoked:
            self._end_session(conn, msg.session_id)
            raise _Refused(ErrorCode.REVOKED, "this session was revoked by the operator")
        try:
            body = session.channel.open(Kind.REQUEST, msg.request_id, msg.sealed)
        except SessionExpired:
            self._end_session(conn, msg.session_id)
            raise _Refused(ErrorCode.EXPIRED, "the session expired: attest again") from None
        except (InvalidSeal, ChannelClosed):
            # The relay tampered, replayed or reordered: this session is over.
            self._end_session(conn, msg.session_id)
            raise _Refused(ErrorCode.INVALID_SEAL, "request did not authenticate") from None
        try:
            request = decode(body, expect=_SEALED_REQUESTS)
        except WireError as exc:  # authentic but malformed: the enclave's bug
            index: Message = RequestFailed(ErrorCode.BAD_REQUEST, str(exc)[:1000])
            pages: list[tuple[int, bytes]] = []
        else:
            index, pages = self._serve(session, request)
        channel = session.channel
        sealed_index = channel.seal(Kind.REPLY, msg.request_id, encode(index))
        sealed_pages = b""
        if pages:  # one seal for all of them: the index says which is where
            block = b"".join(page for _, page in pages)
            sealed_pages = channel.seal(Kind.PAGE, msg.request_id, block, address=pages[0][0])
        return Reply(msg.session_id, msg.request_id, sealed_index, sealed_pages)

    def _serve(
        self, session: _Session, request: Message
    ) -> tuple[Message, list[tuple[int, bytes]]]:
        """The reply index and the (address, bytes) of each present page, in index order."""
        guest = session.guest
        with guest.lock:
            if not isinstance(request, Batch):
                return self._serve_one(session, request)
            # In order, under one lock: a BeginScan first refreshes what the rest reads.
            replies, pages = [], []
            for sub in request.requests:
                index, found = self._serve_one(session, sub, request.list_page_budget())
                replies.append(index)
                pages += found
            return BatchReply(tuple(replies)), pages

    def _serve_one(
        self, session: _Session, request: Message, list_pages: int | None = None
    ) -> tuple[Message, list[tuple[int, bytes]]]:
        """One request with the guest's lock held; failures become ``RequestFailed``."""
        guest = session.guest
        try:
            server = guest.ensure_open()
            return self._serve_locked(session, server, request, list_pages)
        except ValueError as exc:  # beyond what the page server accepts
            return RequestFailed(ErrorCode.BAD_REQUEST, str(exc)[:1000]), []
        except (GuestDataError, _NoVmcoreinfo) as exc:  # the guest's state, not QEMU
            return RequestFailed(ErrorCode.GUEST_UNAVAILABLE, str(exc)[:1000]), []
        except (SGMonitorError, OSError, EOFError) as exc:
            guest.reset()  # QEMU went away or QMP broke: reopen next time
            return RequestFailed(ErrorCode.GUEST_UNAVAILABLE, str(exc)[:1000]), []

    def _serve_locked(
        self,
        session: _Session,
        server: PageServer,
        request: Message,
        list_pages: int | None = None,
    ) -> tuple[Message, list[tuple[int, bytes]]]:
        guest = session.guest
        if isinstance(request, ReadPages):
            found = server.read_pages(request.pages())
            return _pages_reply(request.pages(), found)
        if isinstance(request, FollowList):
            walked = self._follow(session, server, request, list_pages)
            return walked.index, walked.pages
        if isinstance(request, GetVmcoreinfo):
            return VmcoreinfoReply(self._vmcoreinfo(guest, server)), []
        if isinstance(request, GetRegisters):
            r = server.registers
            return RegistersReply((VcpuRegisters(0, r.cr0, r.cr3, r.cr4, r.efer or 0),)), []
        if isinstance(request, BeginScan | EndScan):  # nothing walked ahead outlives a scan
            session.announced = session.ahead = None
        if isinstance(request, BeginScan):
            if request.pause and not session.paused:
                session.paused = guest.pause(time.monotonic())
            server.refresh()
            return Ack(session.paused), []
        assert isinstance(request, EndScan)
        if session.paused:
            session.paused = False
            guest.resume()
        return Ack(False), []

    @staticmethod
    def _follow(
        session: _Session, server: PageServer, request: FollowList, list_pages: int | None
    ) -> _WalkedList:
        """Serve a FollowList: from the window walked ahead (its reply made already) if
        it is exactly this walk, walked by this page server in this scan and within this
        reply's page budget (then a walk now would stop at the same entry), else walked
        now. Note the window it announces, for :meth:`_walk_ahead`."""
        ahead, session.ahead = session.ahead, None
        if (
            ahead is not None
            and ahead.server is server
            and ahead.walk == request.walk
            and (list_pages is None or ahead.read() <= list_pages)
        ):
            walked = ahead
        else:
            walked = _WalkedList.of(server, request.walk, list_pages)
        nodes = walked.index.entries
        session.announced = None
        if nodes and walked.index.end in (ListEnd.LIMIT, ListEnd.REPLY_FULL):
            session.announced = request.following(nodes[-1])
        return walked

    def _walk_ahead(self, conn: _Connection) -> None:
        """Walk the window each session announced, now that its reply is on the way:
        the enclave works on that reply meanwhile, and its next request finds the walk
        done. Bounded like any FollowList; a failure is left for that request to meet."""
        for session in list(conn.sessions.values()):
            walk, session.announced = session.announced, None
            if walk is None or session.revoked:
                continue
            guest = session.guest
            with guest.lock:
                server = guest.server
                if server is None:
                    continue
                try:
                    session.ahead = _WalkedList.of(server, walk, None)
                except (SGMonitorError, OSError, EOFError, ValueError):
                    session.ahead = None

    def _vmcoreinfo(self, guest: GuestHandle, server: PageServer) -> tuple[bytes, ...]:
        """Every VMCOREINFO note in guest RAM (the enclave picks the genuine one). The
        RAM scan (~0.1 s per 256 MiB) is cached while every note found stays the same."""
        memory = server.memory
        if guest.vmcoreinfo is not None:
            with contextlib.suppress(SGMonitorError):
                if all(memory.read_physical(a, len(n)) == n for a, n in guest.vmcoreinfo):
                    return tuple(n for _, n in guest.vmcoreinfo)
        found = list(itertools.islice(iter_vmcoreinfo(memory), MAX_VMCOREINFO_NOTES))
        if not found:
            raise _NoVmcoreinfo("no VMCOREINFO note in guest RAM (QEMU -device vmcoreinfo?)")
        guest.vmcoreinfo = [(c.address, c.note) for c in found]
        return tuple(c.note for c in found)


class _NoVmcoreinfo(SGMonitorError):
    """The guest has no VMCOREINFO note (QEMU without ``-device vmcoreinfo``?)."""


def _pages_reply(
    addresses: list[int], found: list[bytes | PageFault]
) -> tuple[Message, list[tuple[int, bytes]]]:
    statuses, pages = bytearray(), []
    for address, value in zip(addresses, found, strict=True):
        if isinstance(value, bytes):
            statuses.append(PageStatus.PRESENT)
            pages.append((address, value))
        elif isinstance(value, PageNotRam):
            statuses.append(PageStatus.NOT_RAM)
        else:
            statuses.append(PageStatus.NOT_PRESENT)
    return PagesReply(PageIndex(tuple(addresses), bytes(statuses))), pages


def _bind_unix(path: str) -> socket.socket:
    """A listening unix socket only its owner may connect to."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _qemu_opener(qmp_socket: str) -> Callable[[], PhysicalMemory]:
    def open_guest() -> PhysicalMemory:
        return QemuGuest(qmp_socket)

    return open_guest
