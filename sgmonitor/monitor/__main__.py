"""``sgmonitor monitor serve --config FILE``: run the remote monitor.

Prints one JSON ready line (``address``, ``public_key`` hex, ``metrics``, ``pid``), then
the alerts as JSON Lines, and serves until SIGTERM/SIGINT (or stdin closes, with
``--exit-with-stdin``). Its configuration is documented in
``sgmonitor.monitor.service.MonitorConfig``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.daemon import on_stop, print_ready
from sgmonitor.errors import SGMonitorError
from sgmonitor.keyfiles import load_or_create
from sgmonitor.monitor.metrics import MonitorMetrics
from sgmonitor.monitor.service import MonitorConfig, MonitorService


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgmonitor monitor", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run the remote monitor")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--exit-with-stdin", action="store_true", help="stop when stdin closes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as stack:
        try:
            config = MonitorConfig.load(args.config)
            key, _ = load_or_create(config.key, X25519PrivateKey)

            def append(path: Path | None) -> TextIO | None:
                return stack.enter_context(open(path, "a", buffering=1)) if path else None

            log, reports = append(config.log), append(config.reports)
        except (OSError, SGMonitorError) as exc:
            print(f"sgmonitor monitor: refusing to start: {exc}", file=sys.stderr)
            return 2
        metrics = MonitorMetrics()
        service = MonitorService(config, key, log=log, reports=reports, metrics=metrics)
        try:
            address = service.listen()
            metrics_address = ""
            if config.metrics:
                metrics_address, stop_metrics = metrics.serve(config.metrics)
                stack.callback(stop_metrics)
        except OSError as exc:
            print(f"sgmonitor monitor: cannot listen: {exc}", file=sys.stderr)
            return 2
        on_stop(service.shutdown, exit_with_stdin=args.exit_with_stdin)
        print_ready(
            {
                "address": address,
                "public_key": service.public_key.hex(),
                "metrics": metrics_address,
                "pid": os.getpid(),
            }
        )
        service.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
