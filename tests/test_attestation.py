"""The attestation service's decisions, the tokens it signs, and the policy file.

Real cryptography and real sim quotes, the service called in-process with its clock as
a parameter, so staleness and expiry are tested without sleeping. Every refusal is
checked for its reason and for its line in the JSON Lines decision log. (The same
service as a process, with the hypervisor service and a live guest, is in
``test_attested_sessions.py``.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sgmonitor.attestation.policy import Policy, PolicyError, Refused
from sgmonitor.attestation.service import AttestationConfig, AttestationService
from sgmonitor.channel import Suite
from sgmonitor.statement import (
    HypervisorEndorsement,
    InvalidToken,
    Purpose,
    SessionBinding,
    Statement,
    session_report_data,
)
from sgmonitor.tee.backend import EnclaveIdentity
from sgmonitor.tee.launch_config import LaunchConfig, LaunchConfigError
from sgmonitor.tee.sim import SimBackend, SimPlatform
from sgmonitor.wire.attestation import AttestSession, Challenge, ChallengeRequest, StatementIssued
from sgmonitor.wire.core import Error, ErrorCode, encode

NOW = 1_800_000_000.0
MRENCLAVE = hashlib.sha256(b"the enclave's code").digest()
PLATFORM = SimPlatform.generate()
SIGNER = hashlib.sha256(b"the signer's key").digest()
HV_KEY = os.urandom(32)
MONITOR_KEY = os.urandom(32)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def service(clock: Clock, log: io.StringIO) -> AttestationService:
    policy = Policy(frozenset({MRENCLAVE}), frozenset({SIGNER}), min_isv_svn=2)
    config = AttestationConfig(
        listen="127.0.0.1:0",
        key=Path("unused"),
        policy=policy,
        platforms={"sim": (PLATFORM.public_key,)},
        hypervisors={HV_KEY: "host-1"},
    )
    return AttestationService(config, Ed25519PrivateKey.generate(), log=log, clock=clock)


def identity(service: AttestationService, **changes: object) -> EnclaveIdentity:
    config = LaunchConfig("secure", service.public_key, MONITOR_KEY).to_bytes()
    ident = EnclaveIdentity(MRENCLAVE, SIGNER, 1, 2, False, hashlib.sha256(config).digest())
    return replace(ident, **changes)  # type: ignore[arg-type]


def request(
    service: AttestationService,
    *,
    ident: EnclaveIdentity | None = None,
    config: bytes | None = None,
    platform: SimPlatform = PLATFORM,
    suite: Suite = Suite.AES256GCM_HKDF_SHA256,
    report_nonce: bytes | None = None,
    hv_key: bytes = HV_KEY,
    purpose: Purpose = Purpose.HYPERVISOR_SESSION,
) -> AttestSession:
    """Evidence for one session, as the enclave makes it; arguments spoil one part."""
    asked = HV_KEY if purpose is Purpose.HYPERVISOR_SESSION else hv_key  # enrolled, to get a nonce
    challenge = service.challenge(ChallengeRequest(purpose, asked))
    config = config or LaunchConfig("secure", service.public_key, MONITOR_KEY).to_bytes()
    binding = SessionBinding.for_wrapped_key(
        "web", os.urandom(16), suite, os.urandom(81), os.urandom(32), hv_key, purpose
    )
    rd = session_report_data(binding, report_nonce or challenge.nonce)
    backend = SimBackend(ident or identity(service), platform, announce=io.StringIO())
    return AttestSession(
        "sim", backend.evidence(rd, now=NOW), config, challenge.nonce, binding.encode()
    )


def binding_of(req: AttestSession) -> SessionBinding:
    return SessionBinding.decode(req.binding)[0]


def decisions(log: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.getvalue().splitlines()]


def test_accepted_evidence_gets_a_statement_for_that_session(
    service: AttestationService, log: io.StringIO
) -> None:
    req = request(service)
    issued = service.attest(req)
    statement = Statement.verify(issued.statement, [service.public_key], now=NOW + 1)
    assert statement.identity == identity(service)
    assert statement.binding == binding_of(req)
    assert statement.not_after == NOW + service.config.statement_lifetime
    last = decisions(log)[-1]
    assert last["decision"] == "accept" and last["mrenclave"] == MRENCLAVE.hex()
    # the endorsement handed out with the nonce names the enrolled key
    challenge = service.challenge(ChallengeRequest(Purpose.HYPERVISOR_SESSION, HV_KEY))
    endorsed = HypervisorEndorsement.verify(challenge.endorsement, [service.public_key], now=NOW)
    assert endorsed.hv_key == HV_KEY and endorsed.name == "host-1"


def refused(service: AttestationService, log: io.StringIO, req: AttestSession) -> str:
    """The reason, as the decision log records it too."""
    with pytest.raises(Refused) as caught:
        service.attest(req)
    last = decisions(log)[-1]
    assert last["decision"] == "refuse" and last["reason"] == str(caught.value)
    return str(caught.value)


def test_stale_evidence(service: AttestationService, log: io.StringIO, clock: Clock) -> None:
    req = request(service)
    clock.now += service.config.nonce_lifetime + 1
    assert "stale" in refused(service, log, req)


def test_replayed_evidence(service: AttestationService, log: io.StringIO) -> None:
    req = request(service)
    service.attest(req)
    assert "replayed" in refused(service, log, req)


def test_evidence_for_another_nonce(service: AttestationService, log: io.StringIO) -> None:
    other = service.challenge(ChallengeRequest(Purpose.HYPERVISOR_SESSION, HV_KEY)).nonce
    req = request(service, report_nonce=other)  # made for one nonce, sent with another
    assert "another nonce or session" in refused(service, log, req)
    unknown = replace(request(service), nonce=os.urandom(32))
    assert "did not issue" in refused(service, log, unknown)


def test_evidence_for_another_session(service: AttestationService, log: io.StringIO) -> None:
    req = request(service)
    for field, value in (
        ("session_id", os.urandom(16)),
        ("wrapped_key_sha256", os.urandom(32)),
        ("peer_nonce", os.urandom(32)),
        ("vm", "other"),
    ):
        fresh = request(service)
        other = replace(binding_of(fresh), **{field: value})  # type: ignore[arg-type]
        moved = replace(fresh, binding=other.encode())
        assert "another nonce or session" in refused(service, log, moved), field
    service.attest(req)


def test_unknown_platform(service: AttestationService, log: io.StringIO) -> None:
    req = request(service, platform=SimPlatform.generate())
    assert "trusted platform" in refused(service, log, req)
    assert "does not know" in refused(service, log, replace(request(service), backend="sgx"))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"mrenclave": os.urandom(32)}, "measurement"),
        ({"mrsigner": os.urandom(32)}, "signer"),
        ({"isv_svn": 1}, "isv_svn 1 is older"),
        ({"debug": True}, "debug enclave refused"),
    ],
)
def test_policy_refusals(
    service: AttestationService, log: io.StringIO, change: dict[str, object], words: str
) -> None:
    assert words in refused(service, log, request(service, ident=identity(service, **change)))


def test_launch_configuration_must_name_this_verifier(
    service: AttestationService, log: io.StringIO
) -> None:
    """The host writes the launch configuration; one naming its own verifier is seen in
    the CONFIGID and refused, and so is one sent that differs from the CONFIGID."""
    rogue = LaunchConfig(
        "secure", Ed25519PrivateKey.generate().public_key(), MONITOR_KEY
    ).to_bytes()
    ident = identity(service, config_id=hashlib.sha256(rogue).digest())
    reason = refused(service, log, request(service, ident=ident, config=rogue))
    assert "trusts another attestation service" in reason
    mismatch = request(service, config=rogue)  # the evidence reports the genuine one
    assert "not the one the evidence reports" in refused(service, log, mismatch)


def test_unenrolled_hypervisor_and_unsealed_suite(
    service: AttestationService, log: io.StringIO
) -> None:
    with pytest.raises(Refused, match="not enrolled"):
        service.challenge(ChallengeRequest(Purpose.HYPERVISOR_SESSION, os.urandom(32)))
    assert decisions(log)[-1]["request"] == "challenge"
    assert "not enrolled" in refused(service, log, request(service, hv_key=os.urandom(32)))
    plain = LaunchConfig("secure-plain", service.public_key, MONITOR_KEY).to_bytes()
    ident = identity(service, config_id=hashlib.sha256(plain).digest())
    req = request(service, ident=ident, config=plain, suite=Suite.UNSEALED_FOR_EXPERIMENTS_ONLY)
    assert "unsealed experiment suite is refused" in refused(service, log, req)


def test_monitor_links(service: AttestationService, log: io.StringIO) -> None:
    """A monitor link's nonce comes without an endorsement; its statement needs the
    monitor key the enclave's own launch configuration names."""
    challenge = service.challenge(ChallengeRequest(Purpose.MONITOR_LINK, MONITOR_KEY))
    assert challenge.endorsement == b""
    issued = service.attest(request(service, hv_key=MONITOR_KEY, purpose=Purpose.MONITOR_LINK))
    statement = Statement.verify(issued.statement, [service.public_key], now=NOW)
    assert statement.binding.purpose is Purpose.MONITOR_LINK
    other = request(service, hv_key=os.urandom(32), purpose=Purpose.MONITOR_LINK)
    assert "another monitor" in refused(service, log, other)


def test_the_wire_face(service: AttestationService, log: io.StringIO) -> None:
    """Through ``handle``: refusals are ``Error(ATTESTATION_REFUSED)``, garbage BAD_FRAME."""
    assert isinstance(
        service.handle(encode(ChallengeRequest(Purpose.HYPERVISOR_SESSION, HV_KEY))), Challenge
    )
    assert isinstance(service.handle(encode(request(service))), StatementIssued)
    answer = service.handle(encode(ChallengeRequest(Purpose.HYPERVISOR_SESSION, os.urandom(32))))
    assert isinstance(answer, Error) and answer.code is ErrorCode.ATTESTATION_REFUSED
    answer = service.handle(b"\x01\x53garbage")
    assert isinstance(answer, Error) and answer.code is ErrorCode.BAD_FRAME
    assert decisions(log)[-1]["request"] == "malformed"


# --- tokens --------------------------------------------------------------------------------


def statement(key: Ed25519PrivateKey, lifetime: float = 60.0) -> bytes:
    binding = SessionBinding("web", bytes(16), Suite(1), bytes(32), bytes(32), bytes(32))
    ident = EnclaveIdentity(MRENCLAVE, SIGNER, 1, 2, False, bytes(32))
    return Statement(ident, binding, NOW, NOW + lifetime).sign(key)


def test_statement_expiry_signer_and_tampering() -> None:
    key = Ed25519PrivateKey.generate()
    token = statement(key)
    assert Statement.verify(token, [key.public_key()], now=NOW + 59).identity.mrenclave == MRENCLAVE
    with pytest.raises(InvalidToken, match="expired"):
        Statement.verify(token, [key.public_key()], now=NOW + 60)
    with pytest.raises(InvalidToken, match="not signed by a trusted"):
        Statement.verify(token, [Ed25519PrivateKey.generate().public_key()], now=NOW)
    for at in (0, 5, 30, len(token) - 70, len(token) - 1):
        bad = bytearray(token)
        bad[at] ^= 1
        with pytest.raises(InvalidToken):
            Statement.verify(bytes(bad), [key.public_key()], now=NOW)
    for cut in (0, 10, len(token) - 1):
        with pytest.raises(InvalidToken):
            Statement.verify(token[:cut], [key.public_key()], now=NOW)
    with pytest.raises(InvalidToken, match="impossible lifetime"):
        Statement.verify(statement(key, 10 * 86400), [key.public_key()], now=NOW)


def test_a_token_cannot_pass_for_another() -> None:
    """An endorsement's signature is over another domain: even with the statement's
    magic it does not verify as a statement, and the reverse."""
    key = Ed25519PrivateKey.generate()
    endorsement = HypervisorEndorsement("h", bytes(32), NOW, NOW + 60).sign(key)
    with pytest.raises(InvalidToken):
        Statement.verify(b"SGMS" + endorsement[4:], [key.public_key()], now=NOW)
    with pytest.raises(InvalidToken):
        HypervisorEndorsement.verify(b"SGME" + statement(key)[4:], [key.public_key()], now=NOW)


def test_report_data_is_domain_separated_and_covers_every_field() -> None:
    binding = SessionBinding("web", bytes(16), Suite(1), bytes(32), bytes(32), bytes(32))
    nonce = bytes(32)
    base = session_report_data(binding, nonce)
    assert base != hashlib.sha512(nonce + binding.encode()).digest()  # labelled
    for field, value in (
        ("vm", "web2"),
        ("session_id", b"\1" * 16),
        ("suite", Suite.UNSEALED_FOR_EXPERIMENTS_ONLY),
        ("wrapped_key_sha256", b"\1" * 32),
        ("peer_nonce", b"\1" * 32),
        ("peer_key", b"\1" * 32),
        ("purpose", Purpose.MONITOR_LINK),
    ):
        assert session_report_data(replace(binding, **{field: value}), nonce) != base, field
    assert session_report_data(binding, b"\1" * 32) != base


# --- the policy and the launch configuration ----------------------------------------------


def test_policy_file_round_trip_and_refusals() -> None:
    policy = Policy(frozenset({MRENCLAVE}), frozenset(), min_isv_svn=3, allow_debug=True)
    assert Policy.from_toml(policy.to_toml()) == policy
    assert Policy.from_toml(f'mrsigner = ["{SIGNER.hex()}"]').allow_debug is False
    for text, words in (
        ("allow_debug = true", "must pin"),
        (f'mrenclave = ["{MRENCLAVE.hex()}"]\nalow_debug = true', "unknown policy keys"),
        ('mrenclave = ["abcd"]', "not 32 bytes"),
        ('mrenclave = ["zz"]', "not hex"),
        (f'mrenclave = ["{MRENCLAVE.hex()}"]\nmin_isv_svn = -1', "min_isv_svn"),
        ("mrenclave = [", "not TOML"),
    ):
        with pytest.raises(PolicyError, match=words):
            Policy.from_toml(text)


def test_launch_configuration_is_canonical() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    config = LaunchConfig("secure", key, MONITOR_KEY)
    assert LaunchConfig.from_bytes(config.to_bytes()).config_id == config.config_id
    doc = json.loads(config.to_bytes())
    for bad in (
        json.dumps(doc).encode(),  # same content, not canonical
        json.dumps({**doc, "extra": 1}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps({**doc, "mode": "open"}, sort_keys=True, separators=(",", ":")).encode(),
        b"not json",
    ):
        with pytest.raises(LaunchConfigError):
            LaunchConfig.from_bytes(bad)
