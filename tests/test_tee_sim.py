"""The enclave boundary: EDL checks, sim measurement, SIGSTRUCT, evidence, sealing."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import sgmonitor
from sgmonitor.tee import edl, sim
from sgmonitor.tee.backend import (
    EnclaveIdentity,
    EnclaveLoadError,
    InvalidEvidence,
    SealedDataError,
    TeeBackend,
)
from sgmonitor.wire.calls import Call, CallDirection

REPO = Path(sgmonitor.__file__).resolve().parent.parent
NOW = 1_800_000_000.0
RD = bytes(range(64))


@pytest.fixture
def backend() -> sim.SimBackend:
    identity = EnclaveIdentity(
        b"\x11" * 32, b"\x22" * 32, 7, 3, debug=False, config_id=b"\x33" * 32
    )
    return sim.SimBackend(identity, PLATFORM, announce=io.StringIO())


PLATFORM = sim.SimPlatform.generate()


# --- identity ------------------------------------------------------------------------


def test_mrsigner_is_hash_of_public_key() -> None:
    """RFC 8032 section 7.1 test 1: secret 9d61..., public key d75a...; MRSIGNER = SHA-256."""
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    key = Ed25519PrivateKey.from_private_bytes(secret).public_key()
    assert key.public_bytes_raw().hex() == public
    assert sim.mrsigner_of(key) == hashlib.sha256(bytes.fromhex(public)).digest()


# --- SIGSTRUCT / load ----------------------------------------------------------------


def test_signed_enclave_loads_and_tampering_is_refused() -> None:
    signer = Ed25519PrivateKey.generate()
    mre = hashlib.sha256(b"the code as measured at launch").digest()
    sig = sim.sign_enclave(signer, mre, isv_prod_id=1, isv_svn=2, debug=True)
    ident = sim.load_signed_enclave(mre, b"cfg", sig)
    config_id = hashlib.sha256(b"cfg").digest()
    assert ident == EnclaveIdentity(
        mre, sim.mrsigner_of(signer.public_key()), 1, 2, True, config_id
    )
    # the configuration is reported, not signed: another one loads, with its own CONFIGID
    assert (
        sim.load_signed_enclave(mre, b"other", sig).config_id == hashlib.sha256(b"other").digest()
    )
    with pytest.raises(EnclaveLoadError, match="measures"):
        sim.load_signed_enclave(bytes(32), b"cfg", sig)  # other code than was signed
    forged = bytearray(sig)
    forged[50] ^= 1  # the product id / svn region
    with pytest.raises(EnclaveLoadError, match="signature"):
        sim.load_signed_enclave(mre, b"cfg", bytes(forged))
    with pytest.raises(EnclaveLoadError):
        sim.load_signed_enclave(mre, b"cfg", sig[:-1])
    assert sim.sigstruct_identity(sig) == EnclaveIdentity(
        mre, sim.mrsigner_of(signer.public_key()), 1, 2, True, b""
    )


# --- the backend -------------------------------------------------------------------------


def test_backend_announces_no_protection() -> None:
    out = io.StringIO()
    b = sim.SimBackend(
        EnclaveIdentity(bytes(32), bytes(32), 0, 0, False, bytes(32)), PLATFORM, announce=out
    )
    assert "NO protection against root" in out.getvalue()
    assert isinstance(b, TeeBackend)
    assert b.name == "sim" and b.protects_against_root is False


def test_backend_announces_on_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    sim.SimBackend(EnclaveIdentity(bytes(32), bytes(32), 0, 0, False, bytes(32)), PLATFORM)
    assert "NO protection against root" in capsys.readouterr().err


def test_evidence_round_trip(backend: sim.SimBackend) -> None:
    ev = backend.evidence(RD, now=NOW)
    assert len(ev) == sim.QUOTE_LEN
    claims = sim.SimEvidenceVerifier([PLATFORM.public_key]).verify(ev, report_data=RD, now=NOW + 1)
    assert claims.backend == "sim"
    assert claims.identity == backend.identity()
    assert claims.report_data == RD and claims.timestamp == NOW


def test_evidence_needs_64_bytes(backend: sim.SimBackend) -> None:
    with pytest.raises(ValueError):
        backend.evidence(b"short", now=NOW)


def test_forged_signature_rejected(backend: sim.SimBackend) -> None:
    ev = bytearray(backend.evidence(RD, now=NOW))
    ev[-1] ^= 1
    with pytest.raises(InvalidEvidence, match="signature"):
        sim.SimEvidenceVerifier([PLATFORM.public_key]).verify(bytes(ev), report_data=RD, now=NOW)


def test_untrusted_platform_rejected(backend: sim.SimBackend) -> None:
    other = sim.SimPlatform.generate()
    verifier = sim.SimEvidenceVerifier([other.public_key])
    with pytest.raises(InvalidEvidence, match="trusted platform"):
        verifier.verify(backend.evidence(RD, now=NOW), report_data=RD, now=NOW)
    both = sim.SimEvidenceVerifier([other.public_key, PLATFORM.public_key])
    both.verify(backend.evidence(RD, now=NOW), report_data=RD, now=NOW)


# offsets in the quote body: magic 0, version 4, backend 6, mrenclave 10, mrsigner 42,
# prod 74, svn 76, flags 78, config_id 79, report_data 111, timestamp 175
@pytest.mark.parametrize("offset", [0, 4, 6, 10, 42, 74, 76, 78, 79, 110, 111, 174, 175, 182])
def test_altered_field_rejected(backend: sim.SimBackend, offset: int) -> None:
    ev = bytearray(backend.evidence(RD, now=NOW))
    ev[offset] ^= 0x01
    with pytest.raises(InvalidEvidence):
        sim.SimEvidenceVerifier([PLATFORM.public_key]).verify(bytes(ev), report_data=RD, now=NOW)


def test_resigned_bad_fields_rejected_after_signature(backend: sim.SimBackend) -> None:
    """Fields are checked even when the signature is good (a platform that signs junk)."""
    body = bytearray(backend.evidence(RD, now=NOW)[: sim.QUOTE_LEN - 64])
    struct.pack_into(">H", body, 4, 99)  # version
    ev = bytes(body) + PLATFORM._sign(bytes(body))
    with pytest.raises(InvalidEvidence, match="version 99"):
        sim.SimEvidenceVerifier([PLATFORM.public_key]).verify(ev, report_data=RD, now=NOW)


def test_wrong_report_data_rejected(backend: sim.SimBackend) -> None:
    ev = backend.evidence(RD, now=NOW)
    with pytest.raises(InvalidEvidence, match="report data"):
        sim.SimEvidenceVerifier([PLATFORM.public_key]).verify(ev, report_data=bytes(64), now=NOW)


def test_freshness_uses_the_given_clock(backend: sim.SimBackend) -> None:
    ev = backend.evidence(RD, now=NOW)
    v = sim.SimEvidenceVerifier([PLATFORM.public_key], max_age=60, max_skew=5)
    v.verify(ev, report_data=RD, now=NOW + 60)
    with pytest.raises(InvalidEvidence, match="old"):
        v.verify(ev, report_data=RD, now=NOW + 61)
    with pytest.raises(InvalidEvidence, match="future"):
        v.verify(ev, report_data=RD, now=NOW - 6)


@pytest.mark.parametrize("ev", [b"", b"\0" * 10, b"\0" * (sim.QUOTE_LEN + 1)])
def test_malformed_evidence_rejected(ev: bytes) -> None:
    with pytest.raises(InvalidEvidence):
        sim.SimEvidenceVerifier([PLATFORM.public_key]).verify(ev, report_data=RD, now=NOW)


def test_platform_pem_round_trip(backend: sim.SimBackend) -> None:
    again = sim.SimPlatform.from_pem(PLATFORM.to_pem())
    assert again.public_pem() == PLATFORM.public_pem()


def test_sealing_bound_to_enclave_and_platform(backend: sim.SimBackend) -> None:
    blob = backend.seal_data(b"secret", aad=b"ctx")
    assert backend.unseal_data(blob, aad=b"ctx") == b"secret"
    with pytest.raises(SealedDataError):
        backend.unseal_data(blob, aad=b"other")
    other_enclave = sim.SimBackend(
        EnclaveIdentity(b"\x12" * 32, b"\x22" * 32, 7, 3, False, bytes(32)),
        PLATFORM,
        announce=io.StringIO(),
    )
    with pytest.raises(SealedDataError):
        other_enclave.unseal_data(blob, aad=b"ctx")
    other_platform = sim.SimBackend(
        backend.identity(), sim.SimPlatform.generate(), announce=io.StringIO()
    )
    with pytest.raises(SealedDataError):
        other_platform.unseal_data(blob, aad=b"ctx")
    with pytest.raises(SealedDataError):
        backend.unseal_data(blob[:-1], aad=b"ctx")


# --- EDL ------------------------------------------------------------------------------------


def test_edl_declares_each_call_once_with_direction() -> None:
    names = [c.name for c in edl.CALLS]
    assert len(names) == len(set(names))
    for c in edl.CALLS:
        assert c.name.startswith("ecall_" if c.direction is edl.ECALL else "ocall_")


def test_edl_make_and_check_call() -> None:
    call = edl.make_call(1, "ecall_heartbeat", challenge=bytes(32))
    found = edl.check_call(call, CallDirection.ECALL)
    assert edl.named_args(found, call) == {"challenge": bytes(32)}
    assert edl.named_results(found, (5, 9, bytes(32))) == {
        "sequence": 5,
        "progress": 9,
        "mac": bytes(32),
    }


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (Call(1, CallDirection.ECALL, "ecall_format_disk", ()), "no such call"),
        (Call(1, CallDirection.ECALL, "ocall_log", (1, "x")), "is an OCALL"),
        (Call(1, CallDirection.ECALL, "ecall_heartbeat", ()), "expected 1 values"),
        (Call(1, CallDirection.ECALL, "ecall_heartbeat", (bytes(31),)), "exactly 32"),
        (Call(1, CallDirection.ECALL, "ecall_heartbeat", ("x" * 32,)), "expected bytes"),
        (
            Call(1, CallDirection.ECALL, "ecall_open_monitor_link", ("ids", b"1", bytes(32))),
            "exactly 32",
        ),
        (
            Call(1, CallDirection.ECALL, "ecall_open_monitor_link", (1, bytes(32), bytes(32))),
            "expected str",
        ),
        (
            Call(
                1,
                CallDirection.ECALL,
                "ecall_open_session",
                ("v" * 65, bytes(32), bytes(32), b"", bytes(32)),
            ),
            "exceeds",
        ),
    ],
)
def test_edl_rejects_bad_calls(call: Call, words: str) -> None:
    with pytest.raises(edl.EdlError, match=words):
        edl.check_call(call, CallDirection.ECALL)


def test_edl_rejects_bad_results_and_kwargs() -> None:
    found = edl.spec("ocall_hv_exchange", CallDirection.OCALL)
    with pytest.raises(edl.EdlError):
        edl.check_results(found, ())
    with pytest.raises(edl.EdlError, match="missing"):
        edl.make_call(1, "ocall_hv_exchange", frame=b"x")
    with pytest.raises(edl.EdlError, match="unexpected"):
        edl.make_call(1, "ocall_log", level=1, message="m", extra=1)


def test_backend_registry() -> None:
    from sgmonitor import tee

    assert tee.backend_class("sim") is sim.SimBackend
    assert tee.verifier_class("sim") is sim.SimEvidenceVerifier
    with pytest.raises(ValueError, match="unknown TEE backend"):
        tee.backend_class("sgx-hardware-we-do-not-have")


def test_nothing_outside_sim_assumes_simulation() -> None:
    """Parties reach backends by name through sgmonitor.tee, never sim directly."""
    for path in (REPO / "sgmonitor").rglob("*.py"):
        if path.name == "sim.py" or path == REPO / "sgmonitor/tee/__init__.py":
            continue
        text = path.read_text()
        assert "tee.sim" not in text and "SimBackend" not in text, path
