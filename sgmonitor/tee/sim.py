"""The simulation TEE backend: honest about being one.

Like the SGX SDK's SIM mode, it runs the enclave as an ordinary process and gives
**no protection against root**: anyone who can read the process or the platform key
can forge everything. It says so on start-up. What it does do, faithfully enough for
the rest of the system to be written against real semantics:

- MRENCLAVE, Gramine-style, taken by the measured launch (``sgmonitor.tee.boot``):
  SHA-256 over a canonical manifest of every byte the enclave process executes (its
  sources, the interpreter and the third-party modules it loads). The launch
  configuration is not in it: its SHA-256 is reported as the CONFIGID.
- MRSIGNER: SHA-256 of the enclave signing key's raw Ed25519 public key.
- A SIGSTRUCT analogue: the signer signs (MRENCLAVE, product id, SVN, debug); launch
  refuses to start on a measurement other than the signed one (EINIT).
- Evidence shaped like a quote, signed by a simulated platform key (Ed25519) that an
  attestation service can be configured to trust.
- Data sealing to MRENCLAVE with a key derived from the platform key.

The quote and SIGSTRUCT byte layouts are this backend's own formats (as a real SGX
quote is Intel's), carried as opaque blobs by ``sgmonitor.wire``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, TextIO

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgmonitor.errors import SGMonitorError
from sgmonitor.tee.backend import (
    REPORT_DATA_LEN,
    EnclaveIdentity,
    EnclaveLoadError,
    EvidenceClaims,
    EvidenceVerifier,
    InvalidEvidence,
    SealedDataError,
    TeeBackend,
)

__all__ = [
    "QUOTE_LEN",
    "SIM_WARNING",
    "SimBackend",
    "SimEvidenceVerifier",
    "SimPlatform",
    "load_signed_enclave",
    "mrsigner_of",
    "sign_enclave",
    "sigstruct_identity",
]

SIM_WARNING = (
    "sgmonitor: TEE backend 'sim' (SIMULATION): the enclave is an ordinary process and "
    "has NO protection against root or the host administrator; its evidence proves "
    "nothing on its own. Use for development and tests only."
)

_MANIFEST_HEADER = b"sgmonitor-sim-manifest v1\n"
_QUOTE_MAGIC = b"SGMQ"
_QUOTE_VERSION = 2  # 2: the launch configuration's hash (CONFIGID) is reported
_BACKEND = b"sim\0"
# magic 4 | version u16 | backend 4 | mrenclave 32 | mrsigner 32 | prod u16 | svn u16 |
# flags u8 | config_id 32 | report_data 64 | timestamp_ms u64 | signature 64
_QUOTE_BODY = struct.Struct(">4sH4s32s32sHHB32s64sQ")
QUOTE_LEN = _QUOTE_BODY.size + 64
_SIGSTRUCT_MAGIC = b"SGMSIG1\0"
# magic 8 | mrenclave 32 | prod u16 | svn u16 | flags u8 | signer public key 32 | sig 64
_SIGSTRUCT_BODY = struct.Struct(">8s32sHHB32s")
_FLAG_DEBUG = 1
_SEAL_VERSION = 1


# --- identity ------------------------------------------------------------------------


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def mrsigner_of(signer: Ed25519PublicKey) -> bytes:
    """MRSIGNER: SHA-256 of the signing key's raw public key."""
    return hashlib.sha256(_raw_public(signer)).digest()


def sign_enclave(
    signing_key: Ed25519PrivateKey,
    mrenclave: bytes,
    *,
    isv_prod_id: int,
    isv_svn: int,
    debug: bool,
) -> bytes:
    """The SIGSTRUCT analogue: the signer vouches for one measurement and its attributes."""
    body = _SIGSTRUCT_BODY.pack(
        _SIGSTRUCT_MAGIC,
        mrenclave,
        isv_prod_id,
        isv_svn,
        _FLAG_DEBUG if debug else 0,
        _raw_public(signing_key.public_key()),
    )
    return body + signing_key.sign(body)


def load_signed_enclave(mrenclave: bytes, config: bytes, sigstruct: bytes) -> EnclaveIdentity:
    """Check the SIGSTRUCT against the measurement taken at launch (EINIT); refuse on
    any mismatch. The configuration is reported as the CONFIGID, not signed."""
    if len(sigstruct) != _SIGSTRUCT_BODY.size + 64:
        raise EnclaveLoadError("SIGSTRUCT has the wrong length")
    body, sig = sigstruct[: _SIGSTRUCT_BODY.size], sigstruct[_SIGSTRUCT_BODY.size :]
    magic, signed_for, prod, svn, flags, signer = _SIGSTRUCT_BODY.unpack(body)
    if magic != _SIGSTRUCT_MAGIC:
        raise EnclaveLoadError("not a SIGSTRUCT")
    try:
        signer_key = Ed25519PublicKey.from_public_bytes(signer)
        signer_key.verify(sig, body)
    except (InvalidSignature, ValueError):
        raise EnclaveLoadError("SIGSTRUCT signature does not verify") from None
    if not hmac.compare_digest(mrenclave, signed_for):
        raise EnclaveLoadError(
            f"the enclave's code measures {mrenclave.hex()}, but it is signed for "
            f"{signed_for.hex()} (changed code, or run 'sgmonitor enclave sign')"
        )
    return EnclaveIdentity(
        mrenclave,
        mrsigner_of(signer_key),
        prod,
        svn,
        bool(flags & _FLAG_DEBUG),
        hashlib.sha256(config).digest(),
    )


def sigstruct_identity(sigstruct: bytes) -> EnclaveIdentity:
    """The identity a SIGSTRUCT vouches for, after checking its signature: what an
    operator pins in a policy. Its ``config_id`` is empty: that is the launcher's."""
    if len(sigstruct) != _SIGSTRUCT_BODY.size + 64:
        raise EnclaveLoadError("SIGSTRUCT has the wrong length")
    signed_for = _SIGSTRUCT_BODY.unpack(sigstruct[: _SIGSTRUCT_BODY.size])[1]
    identity = load_signed_enclave(signed_for, b"", sigstruct)
    return replace(identity, config_id=b"")


# --- the simulated platform ------------------------------------------------------------


class SimPlatform:
    """The simulated hardware: a quoting key, and a sealing root derived from it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()

    @classmethod
    def generate(cls) -> SimPlatform:
        """A new simulated platform."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SimPlatform:
        """Load the platform key (PKCS#8 PEM)."""
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SGMonitorError("sim platform key must be Ed25519")
        return cls(key)

    def to_pem(self) -> bytes:
        """The platform key as PKCS#8 PEM (keep it as secret as the 'hardware')."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        """The public key an attestation service is told to trust."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _sign(self, body: bytes) -> bytes:
        return self._key.sign(body)

    def _seal_key(self, mrenclave: bytes) -> bytes:
        raw = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        hkdf = HKDF(hashes.SHA256(), 32, salt=b"sgmonitor-sim seal", info=mrenclave)
        return hkdf.derive(raw)


class SimBackend(TeeBackend):
    """The enclave's view of the simulated TEE. Announces itself on construction."""

    name: ClassVar[str] = "sim"
    protects_against_root: ClassVar[bool] = False

    def __init__(
        self,
        identity: EnclaveIdentity,
        platform: SimPlatform,
        *,
        announce: TextIO | None = None,
    ) -> None:
        self._identity = identity
        self._platform = platform
        print(SIM_WARNING, file=announce if announce is not None else sys.stderr, flush=True)

    @classmethod
    def launch(
        cls,
        *,
        mrenclave: bytes,
        config: bytes,
        sigstruct: bytes,
        options: Mapping[str, str],
    ) -> SimBackend:
        """Check the SIGSTRUCT against the launch measurement (:func:`load_signed_enclave`)
        on the simulated platform whose key is in the PEM file ``options["platform_key"]``
        (a fresh platform without one); announces the simulation on stderr."""
        identity = load_signed_enclave(mrenclave, config, sigstruct)
        key_file = options.get("platform_key")
        if key_file:
            platform = SimPlatform.from_pem(Path(key_file).read_bytes())
        else:
            platform = SimPlatform.generate()
        return cls(identity, platform)

    @classmethod
    def sign(
        cls,
        signing_key: Ed25519PrivateKey,
        *,
        mrenclave: bytes,
        isv_prod_id: int,
        isv_svn: int,
        debug: bool,
    ) -> bytes:
        """The SIGSTRUCT over ``mrenclave`` (:func:`sign_enclave`)."""
        return sign_enclave(
            signing_key, mrenclave, isv_prod_id=isv_prod_id, isv_svn=isv_svn, debug=debug
        )

    @classmethod
    def signed_identity(cls, sigstruct: bytes) -> EnclaveIdentity:
        """See :func:`sigstruct_identity`."""
        return sigstruct_identity(sigstruct)

    def identity(self) -> EnclaveIdentity:
        """The identity checked at load."""
        return self._identity

    def evidence(self, report_data: bytes, *, now: float | None = None) -> bytes:
        """A quote over the identity and ``report_data``, signed by the platform key."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report_data must be {REPORT_DATA_LEN} bytes")
        ident = self._identity
        body = _QUOTE_BODY.pack(
            _QUOTE_MAGIC,
            _QUOTE_VERSION,
            _BACKEND,
            ident.mrenclave,
            ident.mrsigner,
            ident.isv_prod_id,
            ident.isv_svn,
            _FLAG_DEBUG if ident.debug else 0,
            ident.config_id,
            report_data,
            int((time.time() if now is None else now) * 1000),
        )
        return body + self._platform._sign(body)

    def seal_data(self, data: bytes, aad: bytes = b"") -> bytes:
        """AES-256-GCM under a key bound to this platform and MRENCLAVE."""
        nonce = os.urandom(12)
        aead = AESGCM(self._platform._seal_key(self._identity.mrenclave))
        return bytes([_SEAL_VERSION]) + nonce + aead.encrypt(nonce, data, aad)

    def unseal_data(self, blob: bytes, aad: bytes = b"") -> bytes:
        """Inverse of :meth:`seal_data`."""
        if len(blob) < 1 + 12 + 16 or blob[0] != _SEAL_VERSION:
            raise SealedDataError()
        aead = AESGCM(self._platform._seal_key(self._identity.mrenclave))
        try:
            return aead.decrypt(blob[1:13], blob[13:], aad)
        except InvalidTag:
            raise SealedDataError() from None


class SimEvidenceVerifier(EvidenceVerifier):
    """Verifies sim quotes against configured platform keys: signature, then fields."""

    backend: ClassVar[str] = "sim"

    def __init__(
        self,
        trusted_platforms: Sequence[Ed25519PublicKey],
        *,
        max_age: float = 300.0,
        max_skew: float = 30.0,
    ) -> None:
        if not trusted_platforms:
            raise ValueError("trust at least one platform key")
        self._trusted = tuple(trusted_platforms)
        self.max_age = max_age
        self.max_skew = max_skew

    def verify(
        self, evidence: bytes, *, report_data: bytes, now: float | None = None
    ) -> EvidenceClaims:
        """The claims of a genuine, fresh quote binding ``report_data``; else raise."""
        if not isinstance(evidence, bytes) or len(evidence) != QUOTE_LEN:
            raise InvalidEvidence(f"sim quote must be {QUOTE_LEN} bytes")
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report_data must be {REPORT_DATA_LEN} bytes")
        unverified_body = evidence[: _QUOTE_BODY.size]
        signature = evidence[_QUOTE_BODY.size :]
        for key in self._trusted:
            try:
                key.verify(signature, unverified_body)
                break
            except InvalidSignature:
                continue
        else:
            raise InvalidEvidence("quote signature is not from a trusted platform key")
        body = unverified_body  # verified from here on
        fields = _QUOTE_BODY.unpack(body)
        magic, version, backend, mre, mrs, prod, svn, flags, config_id, rd, ts_ms = fields
        if magic != _QUOTE_MAGIC or backend != _BACKEND:
            raise InvalidEvidence("not a sim quote")
        if version != _QUOTE_VERSION:
            raise InvalidEvidence(f"unsupported sim quote version {version}")
        if flags & ~_FLAG_DEBUG:
            raise InvalidEvidence(f"unknown quote flags {flags:#x}")
        if not hmac.compare_digest(rd, report_data):
            raise InvalidEvidence("report data does not match")
        now = time.time() if now is None else now
        ts = ts_ms / 1000
        if ts > now + self.max_skew:
            raise InvalidEvidence("quote timestamp is in the future")
        if now - ts > self.max_age:
            raise InvalidEvidence(f"quote is {now - ts:.0f}s old (max {self.max_age:.0f}s)")
        identity = EnclaveIdentity(mre, mrs, prod, svn, bool(flags & _FLAG_DEBUG), config_id)
        return EvidenceClaims("sim", version, identity, rd, ts)
