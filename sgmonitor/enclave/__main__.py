"""``python -m sgmonitor.enclave``: the enclave process, started by the untrusted library.

    python -m sgmonitor.enclave --fd 3 --config enclave.json --sigstruct enclave.sig \\
        [--backend sim] [--platform-key platform.pem]

Loads itself through the TEE backend (which measures the enclave's files and the
configuration, checks the signer's SIGSTRUCT, and, for the simulation, says on stderr
that it gives no protection against root), then answers ECALLs on the inherited socket
``--fd`` until the host closes it.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import sgmonitor
from sgmonitor import tee
from sgmonitor.enclave.program import EnclaveConfig, EnclaveProgram, HostPort
from sgmonitor.errors import SGMonitorError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sgmonitor.enclave", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="inherited host socket")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--sigstruct", type=Path, required=True)
    p.add_argument("--backend", default="sim", choices=tee.backend_names())
    p.add_argument("--platform-key", default="", help="sim backend: platform key (PEM)")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        config_bytes = args.config.read_bytes()
        root = Path(sgmonitor.__file__).resolve().parent.parent
        backend = tee.load_backend(
            args.backend,
            root=root,
            config=config_bytes,
            sigstruct=args.sigstruct.read_bytes(),
            options={"platform_key": args.platform_key},
        )
        config = EnclaveConfig.from_bytes(config_bytes)
    except (OSError, SGMonitorError) as exc:
        print(f"sgmonitor enclave: refusing to start: {exc}", file=sys.stderr, flush=True)
        sock.close()
        return 2
    if config.mode == "secure-plain":
        print(
            "sgmonitor enclave: mode secure-plain: pages cross the host UNSEALED "
            "(experiments only)",
            file=sys.stderr,
            flush=True,
        )
    port = HostPort(sock)
    try:
        port.serve(EnclaveProgram(backend, config, port).handle)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
