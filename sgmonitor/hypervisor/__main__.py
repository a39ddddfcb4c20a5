"""``python -m sgmonitor.hypervisor``: run the hypervisor service.

    python -m sgmonitor.hypervisor --socket /run/sgm/hv.sock --key hv.pem \\
        --guest web=/tmp/sgmonitor-lab/web/qmp.sock [--guest ...] [--allow-unsealed]

Prints one JSON line on stdout when it listens (socket, key fingerprint, guests) and
serves until SIGTERM/SIGINT, or, with ``--exit-with-stdin``, until its stdin closes
(how a parent that starts a private service makes sure it never outlives it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from sgmonitor.errors import SGMonitorError
from sgmonitor.hypervisor.service import HypervisorService, ServiceConfig
from sgmonitor.keywrap import (
    generate_private_key,
    load_private_key,
    public_key_to_pem,
    save_private_key,
    save_public_key,
)

UNSEALED_WARNING = (
    "sgmonitor hypervisor: --allow-unsealed: sessions may use the UNSEALED experiment "
    "suite (secure-plain). Guest pages then cross the untrusted library IN THE CLEAR. "
    "For experiments only."
)


def _guest(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--guest wants NAME=QMP_SOCKET, got {spec!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sgmonitor.hypervisor", description=__doc__)
    p.add_argument("--socket", required=True, help="unix socket to listen on")
    p.add_argument("--key", required=True, type=Path, help="X25519 private key (PEM)")
    p.add_argument(
        "--create-key", action="store_true", help="create --key (and KEY.pub) if missing"
    )
    p.add_argument("--guest", action="append", type=_guest, required=True, metavar="NAME=QMP")
    p.add_argument("--allow-unsealed", action="store_true", help="accept secure-plain sessions")
    p.add_argument("--max-pause", type=float, default=30.0, help="seconds a scan may pause")
    p.add_argument("--exit-with-stdin", action="store_true", help="stop when stdin closes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.create_key and not args.key.exists():
            key = generate_private_key()
            save_private_key(args.key, key)
            save_public_key(args.key.with_suffix(args.key.suffix + ".pub"), key.public_key())
        key = load_private_key(args.key)
    except (OSError, SGMonitorError) as exc:
        print(f"sgmonitor hypervisor: cannot load key {args.key}: {exc}", file=sys.stderr)
        return 2
    guests = dict(args.guest)
    if len(guests) != len(args.guest):
        print("sgmonitor hypervisor: a guest name is given twice", file=sys.stderr)
        return 2
    if args.allow_unsealed:
        print(UNSEALED_WARNING, file=sys.stderr, flush=True)
    config = ServiceConfig(allow_unsealed=args.allow_unsealed, max_pause=args.max_pause)
    service = HypervisorService.for_qemu(args.socket, key, guests, config)
    service.listen()

    def stop(signum: int, frame: FrameType | None) -> None:
        service.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.exit_with_stdin:
        threading.Thread(target=_watch_stdin, args=(service,), daemon=True).start()
    info = service.ready_info()
    info["public_key"] = public_key_to_pem(service.public_key).decode()
    print(json.dumps(info), flush=True)
    service.serve_forever()
    return 0


def _watch_stdin(service: HypervisorService) -> None:
    """Shut down when the parent's end of stdin closes (the parent exited or is done)."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        service.shutdown()


if __name__ == "__main__":
    sys.exit(main())
