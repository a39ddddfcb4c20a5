"""The attestation service: endorse hypervisors, issue nonces, verify, sign statements.

One request, one decision, one JSON line in the decision log. Two requests, both from
the untrusted library (which only relays; everything it sends is checked):

- :class:`~sgmonitor.wire.attestation.ChallengeRequest`: a fresh single-use nonce, and, for a
  hypervisor session, an endorsement of the hypervisor key asked about if that key is
  enrolled in the configuration (the enclave wraps its session key only for an endorsed
  key);
- :class:`~sgmonitor.wire.attestation.AttestSession`: evidence for one session. Checked in order:
  the nonce is one this service issued, unused and not stale; the evidence verifies
  for a platform it trusts and binds exactly this session and nonce; its CONFIGID is
  the hash of the launch configuration sent along, which names *this* service's key;
  the hypervisor key is enrolled (for a monitor link: the monitor key is the one the
  configuration names); the suite is allowed; the policy accepts the identity. Then it
  signs a :class:`~sgmonitor.statement.Statement` that expires soon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import socketserver
import sys
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sgmonitor import tee
from sgmonitor.attestation.policy import Policy, Refused
from sgmonitor.channel import Suite
from sgmonitor.errors import SGMonitorError
from sgmonitor.statement import (
    HypervisorEndorsement,
    InvalidToken,
    Purpose,
    SessionBinding,
    Statement,
    session_report_data,
)
from sgmonitor.tee.backend import EvidenceVerifier, InvalidEvidence
from sgmonitor.tee.launch_config import LaunchConfig, LaunchConfigError, raw_ed25519
from sgmonitor.wire.attestation import (
    VERIFIER_NONCE_LEN,
    AttestSession,
    Challenge,
    ChallengeRequest,
    StatementIssued,
)
from sgmonitor.wire.core import (
    ConnectionClosed,
    Error,
    ErrorCode,
    Message,
    WireError,
    decode,
    parse_address,
    recv_encoded,
    send_frame,
)

__all__ = ["AttestationConfig", "AttestationService", "ConfigError", "serve"]


class ConfigError(SGMonitorError):
    """The service's configuration file is malformed."""


def _hex_key(value: object, size: int, where: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not hex") from None
    if len(raw) != size:
        raise ConfigError(f"{where}: must be {size} bytes of hex")
    return raw


@dataclass(frozen=True)
class AttestationConfig:
    """The service's own configuration (TOML)::

        listen = "127.0.0.1:7380"           # or "unix:/run/sgm/attestation.sock"
        key = "attestation.pem"             # Ed25519, made (0600) on first start
        policy = "policy.toml"              # see sgmonitor.attestation.policy
        log = "decisions.jsonl"             # JSON Lines; stderr if absent
        statement_lifetime = 300            # seconds a statement is good for
        nonce_lifetime = 60                 # seconds evidence may take to come back
        [platforms]
        sim = ["<64 hex: raw Ed25519 platform key>"]
        [[hypervisor]]
        name = "host-17"
        public_key = "<64 hex: raw X25519 key, 'sgmonitor hypervisor keygen'>"

    Relative paths are relative to the configuration file.
    """

    listen: str
    key: Path
    policy: Policy
    platforms: Mapping[str, tuple[Ed25519PublicKey, ...]]
    hypervisors: Mapping[bytes, str]
    log: Path | None = None
    statement_lifetime: float = 300.0
    nonce_lifetime: float = 60.0
    endorsement_lifetime: float = 3600.0
    evidence_max_age: float = 60.0
    max_outstanding_nonces: int = 10_000

    @classmethod
    def load(cls, path: Path) -> AttestationConfig:
        """Read the configuration file and the policy it names."""
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(doc, path.parent)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], base: Path) -> AttestationConfig:
        """The configuration from a parsed document; paths relative to ``base``."""
        known = {
            "listen",
            "key",
            "policy",
            "log",
            "statement_lifetime",
            "nonce_lifetime",
            "platforms",
            "hypervisor",
        }
        unknown = set(doc) - known
        if unknown:
            raise ConfigError(f"unknown keys {sorted(unknown)}")
        for need in ("listen", "key", "policy", "platforms", "hypervisor"):
            if need not in doc:
                raise ConfigError(f"missing {need!r}")
        platforms: dict[str, tuple[Ed25519PublicKey, ...]] = {}
        for backend, keys in dict(doc["platforms"]).items():
            tee.verifier_class(backend)  # an unknown backend is a configuration error
            platforms[backend] = tuple(
                Ed25519PublicKey.from_public_bytes(_hex_key(k, 32, f"platforms.{backend}"))
                for k in keys
            )
        hypervisors = {}
        for i, hv in enumerate(doc["hypervisor"]):
            where = f"hypervisor[{i}]"
            if set(hv) != {"name", "public_key"} or not str(hv["name"]):
                raise ConfigError(f"{where} needs exactly name and public_key")
            hypervisors[_hex_key(hv["public_key"], 32, where)] = str(hv["name"])
        policy_path = base / str(doc["policy"])
        return cls(
            listen=str(doc["listen"]),
            key=base / str(doc["key"]),
            policy=Policy.load(policy_path),
            platforms=platforms,
            hypervisors=hypervisors,
            log=base / str(doc["log"]) if "log" in doc else None,
            statement_lifetime=float(doc.get("statement_lifetime", 300.0)),
            nonce_lifetime=float(doc.get("nonce_lifetime", 60.0)),
        )


@dataclass
class _Nonces:
    """Outstanding nonces (single use, bounded) and recently used ones (to say
    "replayed" rather than "unknown")."""

    limit: int
    outstanding: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    used: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def issue(self, now: float, lifetime: float) -> bytes:
        while self.outstanding:
            oldest, issued = next(iter(self.outstanding.items()))
            if now - issued <= lifetime:
                break
            del self.outstanding[oldest]
        if len(self.outstanding) >= self.limit:
            raise Refused("too many outstanding nonces; try again later")
        nonce = os.urandom(VERIFIER_NONCE_LEN)
        self.outstanding[nonce] = now
        return nonce

    def redeem(self, nonce: bytes, now: float, lifetime: float) -> None:
        issued = self.outstanding.pop(nonce, None)
        if issued is None:
            if nonce in self.used:
                raise Refused("replayed: this nonce was already used")
            raise Refused("evidence for a nonce this service did not issue (or one expired)")
        self.used[nonce] = None
        while len(self.used) > self.limit:
            self.used.popitem(last=False)
        if now - issued > lifetime:
            raise Refused(f"stale: the nonce was issued {now - issued:.0f}s ago")


class AttestationService:
    """The verifier's decisions; transport-free, so tests can call it directly."""

    def __init__(
        self,
        config: AttestationConfig,
        key: Ed25519PrivateKey,
        *,
        log: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._key = key
        self.public_key = key.public_key()
        self._clock = clock
        self._log = log if log is not None else sys.stderr
        self._lock = threading.Lock()
        self._nonces = _Nonces(config.max_outstanding_nonces)
        self._verifiers: dict[str, EvidenceVerifier] = {
            backend: tee.verifier_class(backend)(keys, max_age=config.evidence_max_age)  # type: ignore[call-arg]
            for backend, keys in config.platforms.items()
            if keys
        }

    # --- decisions -------------------------------------------------------------------

    def handle(self, data: bytes, peer: str = "") -> Message:
        """One request frame in, one answer out; every decision is logged."""
        try:
            request = decode(data, expect=(ChallengeRequest, AttestSession))
        except WireError as exc:
            self._decide("malformed", peer, False, str(exc))
            return Error(ErrorCode.BAD_FRAME, str(exc)[:1000])
        try:
            if isinstance(request, ChallengeRequest):
                return self.challenge(request, peer)
            assert isinstance(request, AttestSession)  # what decode() was told to expect
            return self.attest(request, peer)
        except Refused as exc:
            return Error(ErrorCode.ATTESTATION_REFUSED, str(exc)[:1000])

    def challenge(self, request: ChallengeRequest, peer: str = "") -> Challenge:
        """A nonce; for a hypervisor session also the endorsement of its enrolled key."""
        now = self._clock()
        hypervisor = request.purpose == Purpose.HYPERVISOR_SESSION
        name = self.config.hypervisors.get(request.peer_key) if hypervisor else None
        fields = {"purpose": Purpose(request.purpose).name, "peer_key": request.peer_key.hex()}
        if hypervisor and name is None:
            self._decide("challenge", peer, False, "hypervisor key is not enrolled", **fields)
            raise Refused(f"hypervisor key {request.peer_key.hex()} is not enrolled")
        with self._lock:
            try:
                nonce = self._nonces.issue(now, self.config.nonce_lifetime)
            except Refused as exc:
                self._decide("challenge", peer, False, str(exc), **fields)
                raise
        endorsement = b""
        if name is not None:
            endorsement = HypervisorEndorsement(
                name, request.peer_key, now, now + self.config.endorsement_lifetime
            ).sign(self._key)
        self._decide("challenge", peer, True, "", hypervisor=name or "", **fields)
        return Challenge(nonce, endorsement)

    def attest(self, request: AttestSession, peer: str = "") -> StatementIssued:
        """A statement for accepted evidence, or :class:`Refused` with the reason."""
        now = self._clock()
        fields: dict[str, object] = {}
        try:
            statement = self._verify(request, now, fields)
        except Refused as exc:
            self._decide("attest", peer, False, str(exc), **fields)
            raise
        self._decide("attest", peer, True, "", not_after=statement.not_after, **fields)
        return StatementIssued(statement.sign(self._key))

    def _verify(self, request: AttestSession, now: float, fields: dict[str, object]) -> Statement:
        try:
            binding, used = SessionBinding.decode(request.binding)
        except InvalidToken as exc:
            raise Refused(str(exc)) from None
        if used != len(request.binding):
            raise Refused("session binding has trailing bytes")
        fields.update(vm=binding.vm, session_id=binding.session_id.hex())
        with self._lock:
            self._nonces.redeem(request.nonce, now, self.config.nonce_lifetime)
        verifier = self._verifiers.get(request.backend)
        if verifier is None:
            raise Refused(
                f"evidence from a platform it does not know (backend {request.backend!r})"
            )
        report_data = session_report_data(binding, request.nonce)
        try:
            claims = verifier.verify(request.evidence, report_data=report_data, now=now)
        except InvalidEvidence as exc:
            reason = str(exc)
            if "report data" in reason:
                reason = "evidence is for another nonce or session (report data differs)"
            raise Refused(f"evidence refused: {reason}") from None
        identity = claims.identity
        fields.update(mrenclave=identity.mrenclave.hex(), mrsigner=identity.mrsigner.hex())
        fields.update(isv_svn=identity.isv_svn, debug=identity.debug)
        if hashlib.sha256(request.config).digest() != identity.config_id:
            raise Refused("the launch configuration sent is not the one the evidence reports")
        try:
            config = LaunchConfig.from_bytes(request.config)
        except LaunchConfigError as exc:
            raise Refused(str(exc)) from None
        trusted = raw_ed25519(config.verifier_key)
        if trusted != raw_ed25519(self.public_key):
            raise Refused(f"the enclave trusts another attestation service ({trusted.hex()})")
        unsealed = binding.suite is Suite.UNSEALED_FOR_EXPERIMENTS_ONLY
        # The mode is the guest pages' suite; a monitor link is always sealed.
        wanted = Suite.AES256GCM_HKDF_SHA256
        if binding.purpose is Purpose.HYPERVISOR_SESSION:
            wanted = config.suite
        if binding.suite is not wanted:
            raise Refused(f"suite {binding.suite.name} does not match mode {config.mode}")
        if unsealed and not self.config.policy.allow_unsealed:
            raise Refused("the unsealed experiment suite is refused by the policy")
        if binding.purpose is Purpose.MONITOR_LINK:
            if binding.peer_key != config.monitor_key:
                raise Refused("the link is for another monitor than the enclave's configuration")
        elif binding.peer_key not in self.config.hypervisors:
            raise Refused(f"hypervisor key {binding.peer_key.hex()} is not enrolled")
        self.config.policy.check(identity)
        return Statement(identity, binding, now, now + self.config.statement_lifetime)

    def _decide(
        self, request: str, peer: str, accepted: bool, reason: str, **fields: object
    ) -> None:
        line = {
            "time": self._clock(),
            "request": request,
            "decision": "accept" if accepted else "refuse",
            "reason": reason,
            "peer": peer,
            **fields,
        }
        with self._lock:
            self._log.write(json.dumps(line, sort_keys=True) + "\n")
            self._log.flush()


# --- the network service ------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        if not self.server.slots.acquire(blocking=False):
            with contextlib.suppress(SGMonitorError, OSError):
                send_frame(self.request, Error(ErrorCode.BUSY, "too many connections"), 1.0)
            return
        try:
            peer = str(self.client_address or "unix")
            while not self.server.stopping.is_set():
                try:
                    data = recv_encoded(self.request, self.server.idle_timeout)
                except (ConnectionClosed, OSError, WireError):
                    return  # gone, silent too long, or out of step: drop the connection
                send_frame(self.request, self.server.service.handle(data, peer), 10.0)
        except (SGMonitorError, OSError):
            return
        finally:
            self.server.slots.release()


class _Server(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True
    service: AttestationService
    slots: threading.BoundedSemaphore
    stopping: threading.Event
    idle_timeout: float


def serve(
    service: AttestationService,
    address: str,
    *,
    ready: Callable[[str], None] | None = None,
    max_connections: int = 64,
    idle_timeout: float = 60.0,
) -> Callable[[], None]:
    """Listen on ``address`` and serve in a background thread; ``ready`` gets the bound
    address (``HOST:PORT`` or ``unix:PATH``). Returns the function that stops it."""
    family, where = parse_address(address)
    if family == socket.AF_UNIX:
        assert isinstance(where, str)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        server_class: type = type("_UnixServer", (_Server, socketserver.UnixStreamServer), {})
        old = os.umask(0o177)
        try:
            server = server_class(where, _Handler)
        finally:
            os.umask(old)
        bound = f"unix:{where}"
    else:
        tcp: type[socketserver.TCPServer] = type(
            "_TcpServer",
            (_Server, socketserver.TCPServer),
            {"address_family": family, "allow_reuse_address": True},
        )
        assert isinstance(where, tuple)
        server = tcp(where, _Handler)
        host, port = str(server.server_address[0]), int(server.server_address[1])
        bound = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    server.service = service
    server.slots = threading.BoundedSemaphore(max_connections)
    server.stopping = threading.Event()
    server.idle_timeout = idle_timeout
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True)
    thread.start()
    if ready is not None:
        ready(bound)

    def stop() -> None:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(5.0)
        if family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(where))

    return stop
