"""``sgmonitor hypervisor ...``: run and administer the hypervisor service.

    sgmonitor hypervisor keygen --key hv.pem        # make the service's key (0600), print it
    sgmonitor hypervisor serve --config hv.toml [--exit-with-stdin]
    sgmonitor hypervisor revoke --admin hv.sock.admin (--mrenclave HEX | --session HEX)

The configuration (TOML; relative paths are relative to it) names everything the
service trusts and serves, so no client can add a guest or a verifier::

    socket = "hv.sock"                    # the library's; hv.sock.admin is the operator's
    key = "hv.pem"                        # X25519, made (0600) on first start
    attestation_keys = ["<64 hex>"]       # raw Ed25519 keys of trusted attestation services
    allow_unsealed = false                # the secure-plain experiment suite
    max_pause = 30                        # seconds a guest may be held paused ...
    pause_window = 120                    # ... within any window this long
    session_lifetime = 3600
    remembered_sessions = 100000          # session ids never accepted twice (full: refuse)
    [guests]
    web = "/run/qemu/web/qmp.sock"

``serve`` prints one JSON ready line (socket, admin socket, key fingerprint and raw
public key, guests, pid) and serves until SIGTERM/SIGINT (or stdin closes).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.daemon import on_stop, print_ready
from sgmonitor.errors import SGMonitorError
from sgmonitor.hypervisor.service import HypervisorService, ServiceConfig
from sgmonitor.keyfiles import load_or_create
from sgmonitor.keywrap import raw_public_key
from sgmonitor.wire.admin import Revoke, Revoked, RevokeKind
from sgmonitor.wire.core import Error, connect, decode, recv_encoded, send_encoded
from sgmonitor.wire.core import encode as encode_message

UNSEALED_WARNING = (
    "sgmonitor hypervisor: allow_unsealed: sessions may use the UNSEALED experiment "
    "suite (secure-plain). Guest pages then cross the untrusted library IN THE CLEAR. "
    "For experiments only."
)
_NUMBERS = ("max_pause", "pause_window", "session_lifetime", "remembered_sessions")
_KEYS = {"socket", "key", "attestation_keys", "allow_unsealed", "guests", *_NUMBERS}


class ConfigError(SGMonitorError):
    """The service's configuration file is malformed."""


def load_config(path: Path) -> tuple[str, Path, Mapping[str, str], ServiceConfig]:
    """(socket, key file, guests: name -> QMP socket, limits and trust) from the file."""
    try:
        doc: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    unknown = set(doc) - _KEYS
    missing = {"socket", "key", "attestation_keys", "guests"} - set(doc)
    if unknown or missing:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    base = Path(path).parent
    guests = doc["guests"]
    if not isinstance(guests, dict) or not guests:
        raise ConfigError(f"{path}: [guests] must name at least one NAME = QMP_SOCKET")
    try:
        keys = tuple(
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for k in doc["attestation_keys"]
        )
        limits = {k: type(getattr(ServiceConfig, k))(doc[k]) for k in _NUMBERS if k in doc}
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not keys:
        raise ConfigError(f"{path}: attestation_keys is empty: no session could ever open")
    config = ServiceConfig(
        attestation_keys=keys, allow_unsealed=bool(doc.get("allow_unsealed", False)), **limits
    )
    if config.pause_window <= config.max_pause:
        raise ConfigError(f"{path}: pause_window must be longer than max_pause")
    resolved = {str(n): str(base / str(q)) for n, q in guests.items()}
    return str(base / str(doc["socket"])), base / str(doc["key"]), resolved, config


def _keygen(args: argparse.Namespace) -> int:
    key, made = load_or_create(args.key, X25519PrivateKey)
    print(raw_public_key(key.public_key()).hex())
    print(f"sgmonitor hypervisor: key {'made' if made else 'kept'}: {args.key}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    socket_path, key_path, guests, config = load_config(args.config)
    key, _ = load_or_create(key_path, X25519PrivateKey)
    if config.allow_unsealed:
        print(UNSEALED_WARNING, file=sys.stderr, flush=True)
    service = HypervisorService.for_qemu(socket_path, key, guests, config)
    service.listen()
    on_stop(service.shutdown, exit_with_stdin=args.exit_with_stdin)
    print_ready(service.ready_info())
    service.serve_forever()
    return 0


def _revoke(args: argparse.Namespace) -> int:
    kind = RevokeKind.MEASUREMENT if args.mrenclave else RevokeKind.SESSION
    value = bytes.fromhex(args.mrenclave or args.session)
    with connect(f"unix:{args.admin}", 5.0) as sock:
        send_encoded(sock, encode_message(Revoke(kind, value)), 5.0)
        answer = decode(recv_encoded(sock, 5.0), expect=(Revoked, Error))
    if isinstance(answer, Error):
        raise SGMonitorError(f"revocation refused: {answer.code.name}: {answer.message}")
    assert isinstance(answer, Revoked)  # what decode() was told to expect
    print(f"revoked; {answer.sessions_closed} open session(s) ended")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgmonitor hypervisor", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="action", required=True)
    keygen = sub.add_parser("keygen", help="make the service's X25519 key; print its public key")
    keygen.add_argument("--key", type=Path, required=True)
    keygen.set_defaults(func=_keygen)
    serve = sub.add_parser("serve", help="serve sealed guest pages to attested enclaves")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--exit-with-stdin", action="store_true", help="stop when stdin closes")
    serve.set_defaults(func=_serve)
    revoke = sub.add_parser("revoke", help="revoke a measurement or a session, at once")
    revoke.add_argument("--admin", required=True, help="the service's admin socket")
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--mrenclave", metavar="HEX")
    what.add_argument("--session", metavar="HEX")
    revoke.set_defaults(func=_revoke)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, SGMonitorError) as exc:
        print(f"sgmonitor hypervisor: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
