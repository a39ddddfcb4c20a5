"""``sgmonitor attestation serve --config FILE``: run the attestation service.

Prints one JSON ready line (``address``, ``public_key`` hex, ``pid``) and serves until
SIGTERM/SIGINT (or, with ``--exit-with-stdin``, until stdin closes).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sgmonitor.attestation.service import AttestationConfig, AttestationService, serve
from sgmonitor.daemon import on_stop, print_ready
from sgmonitor.errors import SGMonitorError
from sgmonitor.keyfiles import load_or_create
from sgmonitor.tee.launch_config import raw_ed25519


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgmonitor attestation", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    serve_cmd = sub.add_parser("serve", help="run the service (see AttestationConfig)")
    serve_cmd.add_argument("--config", type=Path, required=True, help="the service's TOML file")
    serve_cmd.add_argument("--exit-with-stdin", action="store_true", help="stop when stdin closes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = AttestationConfig.load(args.config)
        key, _ = load_or_create(config.key, Ed25519PrivateKey)
        log: TextIO = open(config.log, "a", buffering=1) if config.log else sys.stderr  # noqa: SIM115
    except (OSError, SGMonitorError) as exc:
        print(f"sgmonitor attestation: refusing to start: {exc}", file=sys.stderr)
        return 2
    stopped = threading.Event()
    on_stop(stopped.set, exit_with_stdin=args.exit_with_stdin)
    service = AttestationService(config, key, log=log)
    try:
        stop = serve(
            service,
            config.listen,
            ready=lambda address: print_ready(
                {
                    "address": address,
                    "public_key": raw_ed25519(service.public_key).hex(),
                    "pid": os.getpid(),
                }
            ),
        )
    except OSError as exc:
        print(f"sgmonitor attestation: cannot listen on {config.listen}: {exc}", file=sys.stderr)
        return 2
    stopped.wait()
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
