"""``sgmonitor ids run --config FILE``: the IDS as a deployment runs it, scanning on a schedule.

The untrusted library and its enclave: it links the enclave to the remote monitor,
opens a hypervisor session, runs the configured checks every ``interval`` seconds and
carries each sealed report to the monitor; the enclave answers the monitor's heartbeats
in between. A failed session is reopened at the next scan; a lost monitor link or a
refusal restarts the whole enclave, with back-off (1 s doubling to 60 s). It stops
cleanly on SIGTERM/SIGINT. Configuration (TOML; relative paths relative to it)::

    name = "web-ids"                    # this IDS at the monitor
    vm = "web"                          # the guest's name at the hypervisor service
    hypervisor = "/run/sgmonitor/hv.sock"
    attestation = "verifier.example:7380"
    verifier_key = "<64 hex>"           # the verifier the enclave trusts
    monitor = "monitor.example:7390"
    monitor_key = "<64 hex>"            # the monitor the enclave reports to
    mode = "secure"
    checks = ["pslist"]
    interval = 10.0                     # seconds between scans
    cache_budget_mib = 32
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sgmonitor.daemon import on_stop, print_ready
from sgmonitor.errors import GuestDataError, SGMonitorError
from sgmonitor.untrusted.library import (
    MODES,
    LibraryError,
    MonitorEndpoint,
    ScanError,
    SecureMonitor,
    Verifier,
)
from sgmonitor.untrusted.monitor_link import MonitorLinkError

__all__ = ["IdsConfig", "main", "run"]

_MAX_BACKOFF = 60.0
_KEYS = {
    "name",
    "vm",
    "hypervisor",
    "attestation",
    "verifier_key",
    "monitor",
    "monitor_key",
    "mode",
    "checks",
    "interval",
    "cache_budget_mib",
}


@dataclass(frozen=True)
class IdsConfig:
    """An IDS's configuration (see the module docstring)."""

    name: str
    vm: str
    hypervisor: str
    verifier: Verifier
    monitor: MonitorEndpoint
    mode: str = "secure"
    checks: tuple[str, ...] = ("pslist",)
    interval: float = 10.0
    cache_budget: int = 32 << 20

    @classmethod
    def load(cls, path: Path) -> IdsConfig:
        try:
            doc: dict[str, Any] = tomllib.loads(Path(path).read_text())
            unknown = set(doc) - _KEYS
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
            if doc.get("mode", "secure") not in MODES:
                raise ValueError(f"mode must be one of {MODES}")
            base = Path(path).parent
            verifier = Verifier(
                str(doc["attestation"]),
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(doc["verifier_key"])),
            )
            monitor = MonitorEndpoint(str(doc["monitor"]), bytes.fromhex(doc["monitor_key"]))
            hypervisor = str(doc["hypervisor"])
            return cls(
                name=str(doc["name"]),
                vm=str(doc["vm"]),
                hypervisor=str(base / hypervisor) if not hypervisor.startswith("/") else hypervisor,
                verifier=verifier,
                monitor=monitor,
                mode=str(doc.get("mode", "secure")),
                checks=tuple(str(c) for c in doc.get("checks", ["pslist"])),
                interval=float(doc.get("interval", 10.0)),
                cache_budget=int(doc.get("cache_budget_mib", 32)) << 20,
            )
        except (OSError, KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise SGMonitorError(f"bad IDS configuration {path}: {exc!r}") from None


def _say(message: str) -> None:
    print(f"sgmonitor ids: {message}", file=sys.stderr, flush=True)


def run(config: IdsConfig, stop: threading.Event) -> None:
    """Scan until ``stop`` is set; restart the enclave (with back-off) when it fails."""
    backoff = 1.0
    ready = False
    while not stop.is_set():
        ids = SecureMonitor(
            config.hypervisor,
            config.vm,
            config.verifier,
            config.monitor,
            ids=config.name,
            mode=config.mode,
            cache_budget=config.cache_budget,
        )
        try:
            ids.open()
            if not ready:
                print_ready({"ids": config.name, "pid": os.getpid()})
                ready = True
            backoff = 1.0
            while not stop.is_set():
                for check in config.checks:
                    try:
                        result = ids.scan(check)
                        _say(f"{check}: report {result.report_seq} sent")
                    except ScanError as exc:
                        _say(f"{check}: session failed ({exc.code.name}); a new one next scan")
                    except GuestDataError as exc:
                        _say(f"{check}: could not check the guest: {exc}")
                stop.wait(config.interval)
        except (LibraryError, MonitorLinkError, SGMonitorError, OSError) as exc:
            _say(f"restarting in {backoff:.0f}s: {exc}")
            stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
        finally:
            ids.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sgmonitor ids", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="action", required=True)
    run_cmd = sub.add_parser("run", help="scan a guest on a schedule, reporting to the monitor")
    run_cmd.add_argument("--config", type=Path, required=True)
    run_cmd.add_argument("--exit-with-stdin", action="store_true", help="stop when stdin closes")
    args = p.parse_args(argv)
    try:
        config = IdsConfig.load(args.config)
    except SGMonitorError as exc:
        print(f"sgmonitor ids: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    on_stop(stop.set, exit_with_stdin=args.exit_with_stdin)
    run(config, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
