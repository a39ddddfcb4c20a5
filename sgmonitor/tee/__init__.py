"""The enclave boundary: the ECALL/OCALL declaration (edl) and the TEE backends.

Only ``sim`` knows it is a simulation; everything else talks to ``backend.TeeBackend``
and ``backend.EvidenceVerifier``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sgmonitor.tee.backend import EvidenceVerifier, TeeBackend

# The one place that maps backend names to implementations; callers pick by name
# (configuration), never by importing a backend module.
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "sim": ("sgmonitor.tee.sim", "SimBackend", "SimEvidenceVerifier"),
}


def backend_names() -> list[str]:
    """Names accepted by :func:`backend_class` and :func:`verifier_class`."""
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[TeeBackend]:
    """The backend class called ``name``."""
    module, cls, _ = _lookup(name)
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def verifier_class(name: str) -> type[EvidenceVerifier]:
    """The evidence verifier for backend ``name``."""
    module, _, cls = _lookup(name)
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def _lookup(name: str) -> tuple[str, str, str]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown TEE backend {name!r}; known: {backend_names()}") from None


def load_backend(
    name: str,
    *,
    mrenclave: bytes,
    config: bytes,
    sigstruct: bytes,
    options: Mapping[str, str] | None = None,
) -> TeeBackend:
    """Start the enclave on backend ``name``: check the signer's ``sigstruct`` against
    the code measurement taken at launch (``sgmonitor.tee.boot``), report ``config``
    as the launch configuration, and return the backend."""
    return backend_class(name).launch(
        mrenclave=mrenclave, config=config, sigstruct=sigstruct, options=dict(options or {})
    )


def sign_enclave_for(
    name: str,
    signing_key: Ed25519PrivateKey,
    *,
    mrenclave: bytes,
    isv_prod_id: int = 1,
    isv_svn: int = 1,
    debug: bool = False,
) -> bytes:
    """The signer's step for backend ``name``: sign the code measurement ``mrenclave``
    (``sgmonitor enclave measure``) with its attributes, for :func:`load_backend`."""
    return backend_class(name).sign(
        signing_key, mrenclave=mrenclave, isv_prod_id=isv_prod_id, isv_svn=isv_svn, debug=debug
    )
