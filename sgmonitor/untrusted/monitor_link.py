"""The untrusted library's relay between its enclave and the remote monitor.

The library opens the link (LinkHello -> the monitor's nonce -> the verifier's nonce ->
the enclave wraps a link key for the monitor its launch configuration names and attests
it -> the verifier's statement -> LinkOpen), then carries the enclave's sealed reports
to the monitor and the monitor's heartbeat challenges into the enclave. It holds no key
that opens a report or makes an answer: what it can do to this traffic (drop, delay,
replay, edit) the monitor sees and raises an alert for.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sgmonitor.errors import SGMonitorError
from sgmonitor.wire.calls import Value
from sgmonitor.wire.core import (
    ConnectionClosed,
    Error,
    Message,
    WireError,
    WireTimeout,
    connect,
    decode,
    encode,
    recv_encoded,
    send_encoded,
)
from sgmonitor.wire.monitor import (
    HeartbeatAnswer,
    HeartbeatChallenge,
    LinkChallenge,
    LinkHello,
    LinkOpen,
    LinkOpened,
    ReportAck,
    SealedReport,
)

__all__ = ["MonitorEndpoint", "MonitorLinkClient", "MonitorLinkError"]

Tap = Callable[[str, bytes], None]  # (link, frame bytes): what the relay sees
EcallFn = Callable[..., Mapping[str, Value]]


class MonitorLinkError(SGMonitorError):
    """The monitor refused the link or went away."""


@dataclass(frozen=True)
class MonitorEndpoint:
    """Where the remote monitor listens, and its X25519 key (raw), which the enclave's
    launch configuration names: the enclave seals its reports for that key only."""

    address: str
    key: bytes


class MonitorLinkClient:
    """One link: opened through the enclave, then heartbeats answered in the background
    (``ecall`` makes an ECALL, serialized with the library's others)."""

    def __init__(
        self,
        endpoint: MonitorEndpoint,
        ids: str,
        ecall: EcallFn,
        *,
        timeout: float = 30.0,
        tap: Tap | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.ids = ids
        self._ecall = ecall
        self.timeout = timeout
        self.tap = tap
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._acks = threading.Condition()
        self.acked: set[int] = set()
        self.errors: list[str] = []
        self.answered = 0
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self.link_id = b""  # the enclave's id for this link, once open

    def open(self, make_link: Callable[[bytes], tuple[bytes, bytes, bytes]], config: bytes) -> None:
        """Open the link: ``make_link(monitor_nonce)`` has the enclave make and attest it
        and returns (link id, wrapped link key, the verifier's statement); ``config`` is
        the enclave's launch configuration (the monitor checks it names the monitor)."""
        self._sock = connect(self.endpoint.address, self.timeout)
        challenge = self._call(LinkHello(self.ids), LinkChallenge)
        assert isinstance(challenge, LinkChallenge)
        if challenge.monitor_key != self.endpoint.key:
            raise MonitorLinkError("the monitor's key is not the one the enclave reports to")
        link_id, wrapped, statement = make_link(challenge.monitor_nonce)
        opened = self._call(LinkOpen(link_id, wrapped, statement, config), LinkOpened)
        assert isinstance(opened, LinkOpened)
        self.link_id = link_id
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._serve, daemon=True)
        self._reader.start()

    def send_report(self, seq: int, sealed: bytes) -> None:
        """Carry one sealed report to the monitor."""
        self._send(SealedReport(seq, sealed))

    def wait_ack(self, seq: int, timeout: float) -> bool:
        """True once the monitor acknowledged report ``seq`` (opened and accepted)."""
        with self._acks:
            return self._acks.wait_for(lambda: seq in self.acked, timeout)

    def close(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._reader is not None:
            self._reader.join(5.0)

    # --- the wire --------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        data = encode(msg)
        if self.tap is not None:
            self.tap("monitor", data)
        assert self._sock is not None
        with self._send_lock:
            try:
                send_encoded(self._sock, data, self.timeout)
            except (WireError, OSError) as exc:
                raise MonitorLinkError(f"the monitor went away: {exc}") from None

    def _recv(self, timeout: float) -> Message:
        assert self._sock is not None
        data = recv_encoded(self._sock, timeout)
        if self.tap is not None:
            self.tap("monitor", data)
        return decode(data)

    def _call(self, msg: Message, expect: type[Message]) -> Message:
        try:
            self._send(msg)
            answer = self._recv(self.timeout)
        except (WireError, OSError) as exc:
            raise MonitorLinkError(f"{type(msg).__name__}: {exc}") from None
        if isinstance(answer, Error):
            raise MonitorLinkError(f"the monitor refused: {answer.message or answer.code.name}")
        if not isinstance(answer, expect):
            raise MonitorLinkError(f"the monitor answered {type(answer).__name__}")
        return answer

    def _serve(self) -> None:
        """Answer challenges through the enclave; note acknowledgements."""
        while not self._stopping.is_set():
            try:
                msg = self._recv(3600.0)
            except WireTimeout:
                continue
            except (ConnectionClosed, WireError, OSError):
                return
            if isinstance(msg, HeartbeatChallenge):
                try:
                    out = self._ecall("ecall_heartbeat", self.timeout, challenge=msg.challenge)
                    answer = HeartbeatAnswer(
                        msg.number,
                        int(out["sequence"]),
                        int(out["progress"]),
                        bytes(out["mac"]),  # type: ignore[arg-type]
                    )
                    self._send(answer)
                    self.answered += 1
                except SGMonitorError as exc:
                    self.errors.append(str(exc))
            elif isinstance(msg, ReportAck):
                with self._acks:
                    self.acked.add(msg.seq)
                    self._acks.notify_all()
            elif isinstance(msg, Error):
                self.errors.append(f"{msg.code.name}: {msg.message}")
