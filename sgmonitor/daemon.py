"""What every long-running party does the same way: stop cleanly, say it is ready.

A service stops on SIGTERM or SIGINT, or, started with ``--exit-with-stdin`` by a parent
that runs a private one, when that parent's end of its stdin closes (so it never
outlives the parent). It prints one JSON line on stdout when it is ready to serve.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType

__all__ = ["on_stop", "print_ready"]


def on_stop(callback: Callable[[], None], *, exit_with_stdin: bool = False) -> None:
    """Call ``callback`` on SIGTERM/SIGINT, and when stdin closes if asked to."""

    def handler(signum: int, frame: FrameType | None) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if exit_with_stdin:
        threading.Thread(target=_watch_stdin, args=(callback,), daemon=True).start()


def _watch_stdin(callback: Callable[[], None]) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        callback()


def print_ready(info: Mapping[str, object]) -> None:
    """The one ready line: ``{"ready": true, ...}``."""
    print(json.dumps({"ready": True, **info}), flush=True)
