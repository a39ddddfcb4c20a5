"""The enclave process, started by the untrusted library through the measured launch.

    python -I -B -S -c <boot.STUB> <root>/sgmonitor/tee/boot.py --root <root> [--site DIR]...
        --fd 3 [--shared-fd 4] --config enclave.json --sigstruct enclave.sig [--backend sim]
        [--platform-key platform.pem]

(``sgmonitor.tee.boot.enclave_argv`` builds it.) The boot measures every byte the process
will run, seals its importer and calls :func:`main` with that measurement, MRENCLAVE.
:func:`main` loads the enclave through the TEE backend, which checks the signer's SIGSTRUCT
against MRENCLAVE (EINIT), reports the launch configuration as the CONFIGID and, for the
simulation, says on stderr that it gives no protection against root. Then it answers ECALLs
on the inherited socket ``--fd`` until the host closes it.

``python -m sgmonitor.enclave`` runs unmeasured: it claims the all-zero MRENCLAVE, which no
SIGSTRUCT is made for, so the backend refuses to start it.
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import sys
from pathlib import Path

from sgmonitor import tee
from sgmonitor.enclave.program import EnclaveProgram, HostPort
from sgmonitor.errors import SGMonitorError
from sgmonitor.tee.launch_config import LaunchConfig

UNMEASURED = bytes(32)


def main(argv: list[str], *, mrenclave: bytes) -> int:
    """Run the enclave whose code measured ``mrenclave`` at launch (``sgmonitor.tee.boot``)."""
    p = argparse.ArgumentParser(prog="sgmonitor enclave (measured boot)", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="inherited host socket")
    p.add_argument(
        "--shared-fd", type=int, help="inherited untrusted memory the host puts answers in"
    )
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--sigstruct", type=Path, required=True)
    p.add_argument("--backend", default="sim", choices=tee.backend_names())
    p.add_argument("--platform-key", default="", help="sim backend: platform key (PEM)")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        config_bytes = args.config.read_bytes()
        backend = tee.load_backend(
            args.backend,
            mrenclave=mrenclave,
            config=config_bytes,
            sigstruct=args.sigstruct.read_bytes(),
            options={"platform_key": args.platform_key},
        )
        config = LaunchConfig.from_bytes(config_bytes)
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
    shared = None
    if args.shared_fd is not None:  # read only: the enclave never writes untrusted memory
        shared = mmap.mmap(args.shared_fd, 0, prot=mmap.PROT_READ)
        os.close(args.shared_fd)
    port = HostPort(sock, shared)
    try:
        port.serve(EnclaveProgram(backend, config, port).handle)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], mrenclave=UNMEASURED))
