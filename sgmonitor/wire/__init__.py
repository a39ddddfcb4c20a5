"""The wire format, one module per message family (see :mod:`sgmonitor.wire.core`).

Import from the family that declares a name: ``sgmonitor.wire.core`` (framing, the
field spec, ``Error``, ``WireError``), ``.sealed``, ``.calls``, ``.hypervisor``,
``.attestation``, ``.monitor``, ``.admin``. This package imports none of them, so
importing one family never loads another: the enclave measures and loads only
``core``, ``sealed`` and ``calls`` (``sgmonitor.tee.boot.ENCLAVE_SOURCES``).

Transitional: ``from sgmonitor.wire import NAME`` still resolves, lazily, by importing
the first family (in the order below) that declares ``NAME``, for importers not yet
moved to the family modules. In the enclave a family it did not measure cannot load,
so this cannot put hypervisor-link code back into it.
"""

from __future__ import annotations

import importlib
from typing import Any

_FAMILIES = ("core", "sealed", "calls", "hypervisor", "attestation", "monitor", "admin")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _FAMILIES:
        return importlib.import_module(f"{__name__}.{name}")
    for family in _FAMILIES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ImportError:  # in the enclave: a family it did not measure
            continue
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
