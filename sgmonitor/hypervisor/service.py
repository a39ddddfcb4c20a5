"""The hypervisor service: the one process that opens guest RAM and QMP.

It listens on a unix socket for untrusted libraries. Each connection may open sessions
(one per enclave key, :class:`sgmonitor.wire.OpenSession`); a session's requests arrive
sealed, are opened with the session's channel, served by the guest's
:class:`~sgmonitor.hypervisor.pages.PageServer` and answered with a sealed index
followed by one sealed page per present entry. Everything a library sends is hostile
input: frames are bounded by the wire module, every connection has receive deadlines,
work per request is bounded by the wire limits, and a failure on one connection (a
malformed frame, a forged seal, a dropped peer) ends at most that session or that
connection, never the service.

Threads: one per connection (bounded), one lock per guest (page tables, QMP and the
RAM mapping are shared by every session on that guest).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
from sgmonitor.hypervisor.pages import PageNotRam, PageServer
from sgmonitor.kernel.vmcoreinfo import find_vmcoreinfo
from sgmonitor.keywrap import InvalidWrappedKey, fingerprint, unwrap_session_key
from sgmonitor.wire import (
    HV_NONCE_LEN,
    MAX_VMCOREINFO_NOTES,
    Ack,
    Batch,
    BatchReply,
    BeginScan,
    CloseSession,
    ConnectionClosed,
    EndScan,
    Error,
    ErrorCode,
    FollowList,
    GetRegisters,
    GetVmcoreinfo,
    Hello,
    HelloReply,
    ListReply,
    Message,
    OpenSession,
    PageEntry,
    PagesReply,
    PageStatus,
    ReadPages,
    RegistersReply,
    Reply,
    Request,
    RequestFailed,
    SessionClosed,
    SessionOpened,
    VcpuRegisters,
    VmcoreinfoReply,
    WireError,
    WireTimeout,
    decode,
    encode,
    recv_encoded,
    send_frame,
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

    allow_unsealed: bool = False  # suite 0xFE (secure-plain): experiments only
    idle_timeout: float = 300.0  # a connection may be silent this long between frames
    frame_timeout: float = 10.0  # once a frame starts, all of it within this
    send_timeout: float = 30.0
    max_connections: int = 64
    max_sessions_per_connection: int = 16
    max_pause: float = 30.0  # a paused guest is resumed after this, whatever the library does
    remembered_sessions: int = 100_000  # session ids never accepted twice


class GuestHandle:
    """One guest: its memory source (opened on first use), page server, lock and pause
    count. ``opener`` makes the memory source, so tests may serve a dump instead."""

    def __init__(self, name: str, opener: Callable[[], PhysicalMemory]) -> None:
        self.name = name
        self.opener = opener
        self.lock = threading.Lock()
        self.memory: PhysicalMemory | None = None
        self.server: PageServer | None = None
        self.pauses = 0
        self.we_paused = False
        self.sessions = 0  # open sessions on this guest
        self.vmcoreinfo: list[tuple[int, bytes]] | None = None  # (address, note) found

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
        self.memory = self.server = None
        self.pauses, self.we_paused = 0, False

    def pause(self) -> bool:
        """Stop the vCPUs (reference counted across sessions); True if now paused."""
        self.ensure_open()
        if isinstance(self.memory, QemuGuest):
            if self.pauses == 0 and self.memory.qmp.is_running():
                self.memory.qmp.stop()
                self.we_paused = True
            self.pauses += 1
            return True
        return False

    def resume(self) -> None:
        """Undo one :meth:`pause`; the last one restarts the vCPUs we stopped."""
        if self.pauses == 0:
            return
        self.pauses -= 1
        if self.pauses == 0 and self.we_paused and isinstance(self.memory, QemuGuest):
            self.we_paused = False
            self.memory.qmp.cont()


@dataclass
class _Session:
    vm: str
    channel: SealingChannel
    guest: GuestHandle
    paused_at: float | None = None


@dataclass(eq=False)  # identity: a set member
class _Connection:
    sock: socket.socket
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    nonces: list[bytes] = field(default_factory=list)


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
        self.config = config or ServiceConfig()
        self.guests = {name: GuestHandle(name, opener) for name, opener in guests.items()}
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # connections, session registry
        self._connections: set[_Connection] = set()
        self._seen_sessions: OrderedDict[bytes, None] = OrderedDict()
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

    def listen(self) -> None:
        """Bind the socket (owner-only permissions) and start accepting."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        sock.listen(16)
        self._listener = sock

    def ready_info(self) -> dict[str, object]:
        """What the ready line says: where to connect and which key to pin."""
        return {
            "ready": True,
            "socket": self.socket_path,
            "fingerprint": fingerprint(self.public_key),
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
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5.0)
        for g in self.guests.values():
            with g.lock:
                with contextlib.suppress(Exception):
                    while g.pauses:
                        g.resume()
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
        conn.nonces = [*conn.nonces[-15:], nonce]  # for the attestation statement, later
        suites = [Suite.AES256GCM_HKDF_SHA256]
        if self.config.allow_unsealed:
            suites.append(Suite.UNSEALED_FOR_EXPERIMENTS_ONLY)
        return HelloReply(nonce, tuple(suites))

    def _open(self, conn: _Connection, msg: OpenSession) -> Message:
        guest = self.guests.get(msg.vm)
        if guest is None:
            raise _Refused(ErrorCode.UNKNOWN_VM, f"no guest named {msg.vm!r}")
        if msg.suite is Suite.UNSEALED_FOR_EXPERIMENTS_ONLY and not self.config.allow_unsealed:
            raise _Refused(
                ErrorCode.SUITE_REFUSED,
                "suite UNSEALED_FOR_EXPERIMENTS_ONLY refused (start with --allow-unsealed)",
            )
        if len(conn.sessions) >= self.config.max_sessions_per_connection:
            raise _Refused(ErrorCode.BUSY, "too many sessions on this connection")
        try:
            key = unwrap_session_key(
                self._key, msg.wrapped_key, session_id=msg.session_id, vm=msg.vm, suite=msg.suite
            )
        except InvalidWrappedKey:
            raise _Refused(ErrorCode.BAD_WRAPPED_KEY, "wrapped key does not unwrap") from None
        with self._lock:  # a session id is accepted once, ever: no session replay
            if msg.session_id in self._seen_sessions:
                raise _Refused(ErrorCode.SESSION_EXISTS, "session id already used")
            self._seen_sessions[msg.session_id] = None
            while len(self._seen_sessions) > self.config.remembered_sessions:
                self._seen_sessions.popitem(last=False)
        channel = make_channel(
            key,
            msg.session_id,
            msg.suite,
            Side.HYPERVISOR,
            msg.vm,
            allow_unsealed=self.config.allow_unsealed,
        )
        with guest.lock:
            try:
                guest.ensure_open()
            except Exception as exc:
                guest.reset()
                raise _Refused(ErrorCode.GUEST_UNAVAILABLE, f"guest {msg.vm!r}: {exc}") from None
            guest.sessions += 1
        conn.sessions[msg.session_id] = _Session(msg.vm, channel, guest)
        return SessionOpened(msg.session_id)

    def _require(self, conn: _Connection, session_id: bytes) -> _Session:
        session = conn.sessions.get(session_id)
        if session is None:
            raise _Refused(ErrorCode.UNKNOWN_SESSION, "no such session on this connection")
        return session

    def _end_session(self, conn: _Connection, session_id: bytes) -> None:
        session = conn.sessions.pop(session_id, None)
        if session is None:
            return
        session.channel.close()
        self._unpause(session)
        with session.guest.lock:
            session.guest.sessions -= 1
            if session.guest.sessions <= 0:
                session.guest.sessions = 0
                session.guest.release()

    def _unpause(self, session: _Session, held_longer_than: float | None = None) -> None:
        """Resume the guest if ``session`` paused it (more than ``held_longer_than``
        seconds ago, if given). Checked and cleared under the guest's lock, so a
        BeginScan or EndScan served meanwhile on the session's own thread is never
        undone."""
        with session.guest.lock:
            paused_at = session.paused_at
            if paused_at is None:
                return
            if held_longer_than is not None and time.monotonic() - paused_at <= held_longer_than:
                return
            session.paused_at = None
            try:
                session.guest.resume()
            except Exception:
                session.guest.reset()

    def _resume_overdue(self) -> None:
        """Resume guests a session has held paused beyond ``max_pause``."""
        with self._lock:
            sessions = [s for c in self._connections for s in list(c.sessions.values())]
        for s in sessions:
            if s.paused_at is not None:  # a cheap look first; _unpause decides under lock
                self._unpause(s, held_longer_than=self.config.max_pause)

    # --- sealed requests ---------------------------------------------------------------

    def _request(self, conn: _Connection, msg: Request) -> Message:
        session = self._require(conn, msg.session_id)
        try:
            body = session.channel.open(Kind.REQUEST, msg.request_id, msg.sealed)
        except (InvalidSeal, ChannelClosed, SessionExpired):
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
        seal = session.channel.seal
        sealed_index = seal(Kind.REPLY, msg.request_id, encode(index))
        sealed_pages = tuple(session.channel.seal_pages(msg.request_id, pages))
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
            walk = server.follow_list(
                request.head,
                request.next_offset,
                -request.member_offset,
                request.entry_size,
                request.limit,
                after=request.after or None,
                max_pages=list_pages,
            )
            addresses = list(walk.pages)
            index, pages = _pages_reply(addresses, [walk.pages[a] for a in addresses])
            assert isinstance(index, PagesReply)
            return ListReply(walk.nodes, walk.end, index.pages), pages
        if isinstance(request, GetVmcoreinfo):
            return VmcoreinfoReply(self._vmcoreinfo(guest, server)), []
        if isinstance(request, GetRegisters):
            r = server.registers
            return RegistersReply((VcpuRegisters(0, r.cr0, r.cr3, r.cr4, r.efer or 0),)), []
        if isinstance(request, BeginScan):
            paused = session.paused_at is not None
            if request.pause and not paused:
                paused = guest.pause()
                session.paused_at = time.monotonic() if paused else None
            server.refresh()
            return Ack(paused), []
        assert isinstance(request, EndScan)
        if session.paused_at is not None:
            session.paused_at = None
            guest.resume()
        return Ack(False), []

    def _vmcoreinfo(self, guest: GuestHandle, server: PageServer) -> tuple[bytes, ...]:
        """Every VMCOREINFO note in guest RAM (the enclave picks the genuine one). The
        RAM scan (~0.1 s per 256 MiB) is cached while every note found stays the same."""
        memory = server.memory
        if guest.vmcoreinfo is not None:
            with contextlib.suppress(SGMonitorError):
                if all(memory.read_physical(a, len(n)) == n for a, n in guest.vmcoreinfo):
                    return tuple(n for _, n in guest.vmcoreinfo)
        found = find_vmcoreinfo(memory)[:MAX_VMCOREINFO_NOTES]
        if not found:
            raise _NoVmcoreinfo("no VMCOREINFO note in guest RAM (QEMU -device vmcoreinfo?)")
        guest.vmcoreinfo = [(c.address, c.note) for c in found]
        return tuple(c.note for c in found)


class _NoVmcoreinfo(SGMonitorError):
    """The guest has no VMCOREINFO note (QEMU without ``-device vmcoreinfo``?)."""


def _pages_reply(
    addresses: list[int], found: list[bytes | PageFault]
) -> tuple[Message, list[tuple[int, bytes]]]:
    entries, pages = [], []
    for address, value in zip(addresses, found, strict=True):
        if isinstance(value, bytes):
            entries.append(PageEntry(address, PageStatus.PRESENT))
            pages.append((address, value))
        elif isinstance(value, PageNotRam):
            entries.append(PageEntry(address, PageStatus.NOT_RAM))
        else:
            entries.append(PageEntry(address, PageStatus.NOT_PRESENT))
    return PagesReply(tuple(entries)), pages


def _qemu_opener(qmp_socket: str) -> Callable[[], PhysicalMemory]:
    def open_guest() -> PhysicalMemory:
        return QemuGuest(qmp_socket)

    return open_guest
