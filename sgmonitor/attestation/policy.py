"""The attestation policy: which enclaves the verifier vouches for (a TOML file).

::

    mrenclave = ["<64 hex>", ...]    # code measurements accepted (``sgmonitor enclave measure``)
    mrsigner = ["<64 hex>", ...]     # and/or signers accepted
    min_isv_svn = 1                  # refuse older security versions (pin mrsigner with it)
    allow_debug = false              # debug enclaves leak their memory: refused by default
    allow_unsealed = false           # the secure-plain experiment suite

At least one of ``mrenclave`` and ``mrsigner`` must be given; when both are, evidence
must match both. Unknown keys are refused, so a typo can't silently loosen a policy.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgmonitor.errors import SGMonitorError
from sgmonitor.tee.backend import EnclaveIdentity

__all__ = ["Policy", "PolicyError", "Refused"]

_KEYS = {"mrenclave", "mrsigner", "min_isv_svn", "allow_debug", "allow_unsealed"}


class PolicyError(SGMonitorError):
    """The policy file is malformed."""


class Refused(SGMonitorError):
    """Evidence or a request the verifier refuses; the message is the reason."""


def _digests(doc: dict[str, Any], key: str) -> frozenset[bytes]:
    values = doc.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PolicyError(f"{key} must be a list of hex strings")
    out = set()
    for v in values:
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise PolicyError(f"{key}: {v!r} is not hex") from None
        if len(raw) != 32:
            raise PolicyError(f"{key}: {v!r} is not 32 bytes")
        out.add(raw)
    return frozenset(out)


@dataclass(frozen=True)
class Policy:
    """What evidence must show to be vouched for."""

    mrenclave: frozenset[bytes]
    mrsigner: frozenset[bytes]
    min_isv_svn: int = 0
    allow_debug: bool = False
    allow_unsealed: bool = False

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """Parse a policy document; refuse anything unexpected."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy is not TOML: {exc}") from None
        unknown = set(doc) - _KEYS
        if unknown:
            raise PolicyError(f"unknown policy keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        mrenclave, mrsigner = _digests(doc, "mrenclave"), _digests(doc, "mrsigner")
        if not mrenclave and not mrsigner:
            raise PolicyError("a policy must pin mrenclave or mrsigner (or both)")
        svn = doc.get("min_isv_svn", 0)
        if not isinstance(svn, int) or isinstance(svn, bool) or not 0 <= svn < 1 << 16:
            raise PolicyError("min_isv_svn must be an integer 0..65535")
        flags = {}
        for key in ("allow_debug", "allow_unsealed"):
            flags[key] = doc.get(key, False)
            if not isinstance(flags[key], bool):
                raise PolicyError(f"{key} must be true or false")
        return cls(mrenclave, mrsigner, svn, **flags)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and parse a policy file."""
        try:
            return cls.from_toml(Path(path).read_text())
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc}") from None

    def to_toml(self) -> str:
        """The policy as a file :meth:`from_toml` reads back."""

        def hexes(values: frozenset[bytes]) -> str:
            return "[" + ", ".join(f'"{v.hex()}"' for v in sorted(values)) + "]"

        return (
            f"mrenclave = {hexes(self.mrenclave)}\n"
            f"mrsigner = {hexes(self.mrsigner)}\n"
            f"min_isv_svn = {self.min_isv_svn}\n"
            f"allow_debug = {str(self.allow_debug).lower()}\n"
            f"allow_unsealed = {str(self.allow_unsealed).lower()}\n"
        )

    def check(self, identity: EnclaveIdentity) -> None:
        """Raise :class:`Refused` with the first reason ``identity`` falls short."""
        if self.mrenclave and identity.mrenclave not in self.mrenclave:
            raise Refused(f"measurement {identity.mrenclave.hex()} is not in the policy")
        if self.mrsigner and identity.mrsigner not in self.mrsigner:
            raise Refused(f"signer {identity.mrsigner.hex()} is not in the policy")
        if identity.isv_svn < self.min_isv_svn:
            raise Refused(
                f"isv_svn {identity.isv_svn} is older than the policy's {self.min_isv_svn}"
            )
        if identity.debug and not self.allow_debug:
            raise Refused("debug enclave refused (the policy has allow_debug = false)")
