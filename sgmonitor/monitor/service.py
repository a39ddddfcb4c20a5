"""The remote monitor: attested links to IDS enclaves, heartbeats, sealed reports, alerts.

Run by the cloud's users outside the cloud. Each IDS (the untrusted library relaying
for its enclave) connects over TCP and opens a link: the monitor gives a fresh nonce and
its key, and accepts the enclave's wrapped link key only with the verifier's statement
for exactly that link (signed by the verifier key this monitor pins, for an enclave its
own policy accepts, launched with a configuration naming this monitor and that
verifier). Then, on the same connection:

- every ``interval`` the monitor sends a random challenge; the enclave answers with a
  MAC over it, its answer count and its progress (scans completed). Per IDS the state is
  ``ok``, ``late`` (the answer took longer than an interval), ``failed`` (nothing valid
  for ``failed_after`` intervals), ``stalled`` (valid answers, no progress for
  ``stall_after`` seconds) or ``invalid`` (a wrong MAC or a replayed answer). While an
  IDS does not answer, challenges back off (doubling, up to 8 intervals);
- the IDS sends each scan's report sealed for the monitor; a dropped, replayed or
  forged report is an alert, and the report's content never crosses the host in clear.

Every state change and every rejected report is an alert: one JSON line on stdout and in
the log, with the time it was detected (``detected_after_s``: since the last good
answer). One thread serves every link (a selector loop), so one core keeps a fleet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.attestation.policy import Policy, Refused
from sgmonitor.channel import InvalidSeal, Suite
from sgmonitor.errors import SGMonitorError
from sgmonitor.keywrap import InvalidWrappedKey, raw_public_key, unwrap_session_key
from sgmonitor.monitor.metrics import MonitorMetrics
from sgmonitor.monitorlink import (
    LinkKeys,
    ReportOpener,
    ReportRejected,
    check_heartbeat,
)
from sgmonitor.statement import InvalidToken, Purpose, SessionBinding, Statement
from sgmonitor.tee.launch_config import LaunchConfig, LaunchConfigError, raw_ed25519
from sgmonitor.wire.core import (
    Error,
    ErrorCode,
    Message,
    WireError,
    decode,
    framed,
    parse_address,
    pop_frame,
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

__all__ = ["STATES", "MonitorConfig", "MonitorService"]

STATES = ("starting", "ok", "late", "failed", "stalled", "invalid")
_MIN_INTERVAL = 0.1
_MAX_BACKOFF = 8
_KEPT_CHALLENGES = 4  # answers to the last few challenges are still checked (late ones)


class ConfigError(SGMonitorError):
    """The monitor's configuration file is malformed."""


@dataclass(frozen=True)
class MonitorConfig:
    """The monitor's configuration (TOML; relative paths relative to the file)::

    listen = "0.0.0.0:7390"             # where IDS hosts connect
    key = "monitor.pem"                 # X25519, made (0600) on first start
    verifier_key = "<64 hex>"           # the attestation service it trusts
    policy = "policy.toml"              # which enclaves it accepts (as the verifier's)
    log = "alerts.jsonl"                # alerts (JSON Lines), also printed on stdout
    reports = "reports.jsonl"           # optional: every opened report, JSON Lines
    metrics = "127.0.0.1:9390"          # optional: Prometheus exposition
    interval = 2.0                      # seconds between challenges (>= 0.1)
    failed_after = 3                    # intervals without a valid answer: failed
    stall_after = 30.0                  # seconds of answers without progress: stalled
    """

    listen: str
    key: Path
    verifier_key: Ed25519PublicKey
    policy: Policy
    log: Path | None = None
    reports: Path | None = None
    metrics: str | None = None
    interval: float = 2.0
    failed_after: int = 3
    stall_after: float = 30.0

    def __post_init__(self) -> None:
        if not _MIN_INTERVAL <= self.interval <= 3600:
            raise ConfigError(f"interval must be {_MIN_INTERVAL}..3600 seconds")
        if not 1 <= self.failed_after <= 1000 or self.stall_after <= 0:
            raise ConfigError("failed_after must be 1..1000 and stall_after positive")

    @classmethod
    def load(cls, path: Path) -> MonitorConfig:
        """Read the configuration file and the policy it names."""
        try:
            doc: dict[str, Any] = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        known = {"listen", "key", "verifier_key", "policy", "log", "reports", "metrics"}
        known |= {"interval", "failed_after", "stall_after"}
        if set(doc) - known or {"listen", "key", "verifier_key", "policy"} - set(doc):
            raise ConfigError(f"{path}: keys must be among {sorted(known)}, with the first four")
        base = Path(path).parent
        try:
            verifier = Ed25519PublicKey.from_public_bytes(bytes.fromhex(doc["verifier_key"]))
        except ValueError as exc:
            raise ConfigError(f"{path}: verifier_key: {exc}") from None
        return cls(
            listen=str(doc["listen"]),
            key=base / str(doc["key"]),
            verifier_key=verifier,
            policy=Policy.load(base / str(doc["policy"])),
            log=base / str(doc["log"]) if "log" in doc else None,
            reports=base / str(doc["reports"]) if "reports" in doc else None,
            metrics=str(doc["metrics"]) if "metrics" in doc else None,
            interval=float(doc.get("interval", 2.0)),
            failed_after=int(doc.get("failed_after", 3)),
            stall_after=float(doc.get("stall_after", 30.0)),
        )


@dataclass
class _Link:
    """One IDS connection: its buffers, and once opened its keys and heartbeat state."""

    sock: socket.socket
    peer: str
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    ids: str = ""
    nonce: bytes = b""
    link_id: bytes = b""  # the enclave's, once open: tells a restarted IDS's reports apart
    keys: LinkKeys | None = None
    opener: ReportOpener | None = None
    state: str = "starting"
    opened_at: float = 0.0
    last_good: float = 0.0  # last valid answer (or the opening)
    last_answer_seq: int = -1
    progress: int = -1
    progress_at: float = 0.0
    challenges: dict[int, tuple[bytes, float]] = field(default_factory=dict)
    next_number: int = 0
    next_challenge_at: float = 0.0
    backoff: int = 1

    @property
    def is_open(self) -> bool:
        return self.keys is not None


class MonitorService:
    """The monitor's state and its selector loop."""

    def __init__(
        self,
        config: MonitorConfig,
        key: X25519PrivateKey,
        *,
        out: TextIO | None = None,
        log: TextIO | None = None,
        reports: TextIO | None = None,
        metrics: MonitorMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._key = key
        self.public_key = raw_public_key(key.public_key())
        self._out = out if out is not None else sys.stdout
        self._log = log
        self._reports = reports
        self._baselines: dict[tuple[str, str], str] = {}  # (ids, vm) -> text baseline digest
        self.metrics = metrics or MonitorMetrics()
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._links: dict[int, _Link] = {}
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.address = ""

    # --- lifecycle ---------------------------------------------------------------------

    def listen(self) -> str:
        """Bind and listen; the bound ``HOST:PORT`` (port 0 picks one)."""
        family, where = parse_address(self.config.listen)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        return self.address

    def shutdown(self) -> None:
        """Stop the loop (from any thread or a signal handler)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        """The selector loop: accept, read, answer, send challenges, judge states."""
        if self._listener is None:
            self.listen()
        tick = min(self.config.interval / 4, 0.05)
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(timeout=tick):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        os.read(self._wake_r, 64)
                    else:
                        self._ready(key.data, events)
                self._tick(self._clock())
        finally:
            for link in list(self._links.values()):
                self._close(link, "monitor stopping")
            self._selector.close()
            if self._listener is not None:
                self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # --- connections -------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:  # every connection waiting, not one per pass
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return
            sock.setblocking(False)
            link = _Link(sock, str(addr))
            self._links[sock.fileno()] = link
            self._selector.register(sock, selectors.EVENT_READ, link)

    def _ready(self, link: _Link, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(link)
        if events & selectors.EVENT_READ:
            try:
                chunk = link.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._close(link, "connection closed")
                return
            link.inbox += chunk
            self._frames(link)

    def _frames(self, link: _Link) -> None:
        """Handle every whole frame in the inbox; bad framing ends the connection."""
        while True:
            try:
                data = pop_frame(link.inbox)
            except WireError as exc:
                self._send(link, Error(ErrorCode.BAD_FRAME, str(exc)))
                self._close(link, "bad framing")
                return
            if data is None:
                return
            try:
                self._handle(link, decode(data))
            except (WireError, SGMonitorError) as exc:
                self._send(link, Error(ErrorCode.BAD_FRAME, str(exc)[:1000]))
            if link.sock.fileno() < 0:
                return

    def _send(self, link: _Link, msg: Message) -> None:
        link.outbox += framed(msg)
        self._flush(link)

    def _flush(self, link: _Link) -> None:
        try:
            while link.outbox:
                sent = link.sock.send(link.outbox)
                del link.outbox[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(link, "connection lost")
            return
        with contextlib.suppress(KeyError, ValueError):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.outbox else 0)
            self._selector.modify(link.sock, events, link)

    def _close(self, link: _Link, why: str) -> None:
        if self._links.pop(link.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(link.sock)
        link.sock.close()
        if link.is_open:
            self._event({"kind": "link", "ids": link.ids, "event": "closed", "reason": why})
            if not self._stop.is_set():  # an IDS that is gone has failed, whatever it did
                self._set_state(link, "failed", self._clock(), f"the link closed: {why}")

    # --- the protocol ------------------------------------------------------------------

    def _handle(self, link: _Link, msg: Message) -> None:
        if isinstance(msg, LinkHello) and not link.is_open:
            link.ids, link.nonce = msg.ids, os.urandom(32)
            self._send(link, LinkChallenge(link.nonce, self.public_key))
        elif isinstance(msg, LinkOpen) and link.nonce and not link.is_open:
            try:
                self._open(link, msg)
            except Refused as exc:
                self._event(
                    {"kind": "link", "ids": link.ids, "event": "refused", "reason": str(exc)}
                )
                self._send(link, Error(ErrorCode.ATTESTATION_REFUSED, str(exc)[:1000]))
                return
            self._send(link, LinkOpened(msg.link_id))
        elif isinstance(msg, HeartbeatAnswer) and link.is_open:
            self._answer(link, msg, self._clock())
        elif isinstance(msg, SealedReport) and link.is_open:
            self._report(link, msg)
        else:
            raise SGMonitorError(f"{type(msg).__name__} is not expected now")

    def _open(self, link: _Link, msg: LinkOpen) -> None:
        """Accept the link key only with the pinned verifier's statement for exactly
        this link, from an enclave the policy accepts, configured for this monitor."""
        try:
            statement = Statement.verify(msg.statement, (self.config.verifier_key,))
        except InvalidToken as exc:
            raise Refused(str(exc)) from None
        bound = statement.binding
        expected = SessionBinding.for_wrapped_key(
            link.ids,
            msg.link_id,
            Suite.AES256GCM_HKDF_SHA256,
            msg.wrapped_key,
            link.nonce,
            self.public_key,
            Purpose.MONITOR_LINK,
        )
        if bound != expected:
            raise Refused("the statement is for another link, nonce, key or monitor")
        if hashlib.sha256(msg.config).digest() != statement.identity.config_id:
            raise Refused("the launch configuration is not the one the statement reports")
        try:
            config = LaunchConfig.from_bytes(msg.config)
        except LaunchConfigError as exc:
            raise Refused(str(exc)) from None
        if raw_ed25519(config.verifier_key) != raw_ed25519(self.config.verifier_key):
            raise Refused("the enclave trusts another attestation service")
        if config.monitor_key != self.public_key:
            raise Refused("the enclave reports to another monitor")
        self.config.policy.check(statement.identity)
        try:
            link_key = unwrap_session_key(
                self._key, msg.wrapped_key, session_id=msg.link_id, vm=link.ids
            )
        except InvalidWrappedKey:
            raise Refused("the wrapped link key does not unwrap") from None
        now = self._clock()
        link.keys = LinkKeys.derive(link_key, msg.link_id, link.nonce)
        link.link_id = msg.link_id
        link.opener = ReportOpener(link.keys, link.ids)
        link.opened_at = link.last_good = link.progress_at = now
        link.next_challenge_at = now
        self._event(
            {
                "kind": "link",
                "ids": link.ids,
                "event": "opened",
                "mrenclave": statement.identity.mrenclave.hex(),
                "peer": link.peer,
            }
        )
        self._set_state(link, "starting", now, "link opened")

    # --- heartbeats --------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        interval = self.config.interval
        for link in list(self._links.values()):
            if not link.is_open:
                continue
            if now >= link.next_challenge_at:
                self._challenge(link, now)
            silent = now - link.last_good
            if silent > self.config.failed_after * interval:
                if link.state != "failed":
                    self.metrics.heartbeat(link.ids, "missing", None, time.time())
                self._set_state(link, "failed", now, f"no valid answer for {silent:.2f}s")
            elif link.state in ("ok", "starting") and self._overdue(link, now):
                self._set_state(link, "late", now, "the last challenge is unanswered")

    def _overdue(self, link: _Link, now: float) -> bool:
        sent = [at for _, at in link.challenges.values()]
        return bool(sent) and now - min(sent) > self.config.interval

    def _challenge(self, link: _Link, now: float) -> None:
        number, challenge = link.next_number, os.urandom(32)
        link.next_number += 1
        link.challenges[number] = (challenge, now)
        for old in [n for n in link.challenges if n <= number - _KEPT_CHALLENGES]:
            del link.challenges[old]
        # answered: every interval; unanswered: back off, doubling up to _MAX_BACKOFF
        link.backoff = 1 if len(link.challenges) <= 1 else min(link.backoff * 2, _MAX_BACKOFF)
        # from its own due time (no drift, no bunching with links due in the same pass)
        due = max(link.next_challenge_at, now - self.config.interval)
        link.next_challenge_at = due + self.config.interval * link.backoff
        self._send(link, HeartbeatChallenge(number, challenge))
        self.metrics.challenge(link.ids)

    def _answer(self, link: _Link, msg: HeartbeatAnswer, now: float) -> None:
        assert link.keys is not None
        sent = link.challenges.get(msg.number)
        try:
            if sent is None:
                raise InvalidSeal()
            check_heartbeat(link.keys, sent[0], msg.sequence, msg.progress, msg.mac)
            if msg.sequence <= link.last_answer_seq:
                raise InvalidSeal()  # an old answer again
        except InvalidSeal:
            self.metrics.heartbeat(link.ids, "invalid", None, time.time())
            self._set_state(link, "invalid", now, f"a wrong or replayed answer to {msg.number}")
            return
        del link.challenges[msg.number]
        link.last_answer_seq = msg.sequence
        rtt = now - sent[1]
        link.last_good = now
        link.backoff = 1
        if msg.progress > link.progress:
            link.progress, link.progress_at = msg.progress, now
        late = rtt > self.config.interval
        self.metrics.heartbeat(link.ids, "late" if late else "answered", rtt, time.time())
        if now - link.progress_at > self.config.stall_after:
            self._set_state(
                link, "stalled", now, f"no scan completed for {now - link.progress_at:.1f}s"
            )
        else:
            self._set_state(link, "late" if late else "ok", now, f"rtt {rtt * 1000:.1f} ms")

    def _set_state(self, link: _Link, state: str, now: float, details: str) -> None:
        if state == link.state:
            return
        previous, link.state = link.state, state
        self.metrics.set_state(link.ids, state)
        self._alert(
            {
                "kind": "state",
                "ids": link.ids,
                "from": previous,
                "to": state,
                "details": details,
                "detected_after_s": round(now - link.last_good, 3),
            }
        )

    # --- reports -----------------------------------------------------------------------

    def _report(self, link: _Link, msg: SealedReport) -> None:
        assert link.opener is not None
        try:
            plain, dropped = link.opener.open(msg.seq, msg.sealed)
        except ReportRejected as exc:
            self.metrics.report_rejected(link.ids, exc.problem.value)
            self._alert(
                {
                    "kind": "report",
                    "ids": link.ids,
                    "problem": exc.problem.value,
                    "details": str(exc),
                }
            )
            return
        if dropped:
            self.metrics.report_rejected(link.ids, "dropped")
            self._alert(
                {
                    "kind": "report",
                    "ids": link.ids,
                    "problem": "dropped",
                    "details": f"{dropped} report(s) before {msg.seq} never came",
                }
            )
        text = plain.decode("utf-8")
        report = json.loads(text)
        self.metrics.scan(link.ids, float(report.get("elapsed_s", 0.0)))
        self._text_baseline(link, report)
        for finding in report.get("findings", []):
            self.metrics.finding(link.ids, str(finding["check"]), str(finding["severity"]))
            self._alert({"kind": "finding", "ids": link.ids, **finding})
        if self._reports is not None:
            # The report as the enclave wrote it, not dumped again (at 1,000 processes
            # that was ~0.8 ms before the ack). JSON allows a raw line break only
            # between tokens, where a space means the same: the line stays one line.
            head = json.dumps({"ids": link.ids, "link": link.link_id.hex(), "seq": msg.seq})
            body = text.replace("\n", " ").replace("\r", " ")
            self._append(self._reports, f'{head[:-1]}, "report": {body}}}')
        self._send(link, ReportAck(msg.seq))

    def _text_baseline(self, link: _Link, report: Mapping[str, object]) -> None:
        """Keep the first kernel-text baseline digest each IDS reports for each guest, and
        alert when a later report (a restarted IDS, a reopened kernel) carries another:
        a baseline taken again over modified text would otherwise hide the change."""
        digest = report.get("text_baseline")
        if not isinstance(digest, str):
            return
        key = (link.ids, str(report.get("vm", "")))
        kept = self._baselines.setdefault(key, digest)
        if kept != digest:
            self._baselines[key] = digest
            self._alert(
                {
                    "kind": "text_baseline",
                    "ids": link.ids,
                    "vm": key[1],
                    "details": f"the kernel text baseline changed from {kept[:16]} to "
                    f"{digest[:16]}: the guest rebooted, or its text was modified before "
                    "the baseline was taken again",
                }
            )

    # --- output ------------------------------------------------------------------------

    def _alert(self, alert: dict[str, object]) -> None:
        """One JSON line on stdout and in the log."""
        line = {"time": time.time(), **alert}
        self._write(self._out, line)
        if self._log is not None:
            self._write(self._log, line)

    def _event(self, event: dict[str, object]) -> None:
        """Link events go to the log only (and to stdout when there is no log)."""
        line = {"time": time.time(), **event}
        self._write(self._log if self._log is not None else self._out, line)

    @staticmethod
    def _write(stream: TextIO, line: Mapping[str, object]) -> None:
        MonitorService._append(stream, json.dumps(line, sort_keys=True))

    @staticmethod
    def _append(stream: TextIO, text: str) -> None:
        """One JSON line, flushed at once: readers take complete lines only."""
        stream.write(text + "\n")
        stream.flush()
