"""The wire format, one module per message family (see :mod:`sgmonitor.wire.core`).

Import from the family that declares a name: ``sgmonitor.wire.core`` (framing, the
field spec, ``Error``, ``WireError``), ``.sealed``, ``.calls``, ``.hypervisor``,
``.attestation``, ``.monitor``, ``.admin``. This package imports none of them, so
importing one family never loads another: the enclave measures and loads only
``core``, ``sealed`` and ``calls`` (``sgmonitor.tee.boot.ENCLAVE_SOURCES``).
"""

from __future__ import annotations
