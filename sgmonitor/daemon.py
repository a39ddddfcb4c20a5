"""What every long-running party does the same way: stop cleanly, say it is ready.

A service stops on SIGTERM or SIGINT, or, started with ``--exit-with-stdin`` by a parent
that runs a private one, when that parent's end of its stdin closes (so it never
outlives the parent). It prints one JSON line on stdout when it is ready to serve.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType

from sgmonitor.errors import SGMonitorError

__all__ = ["on_stop", "print_ready", "read_ready_line", "reap"]


def on_stop(callback: Callable[[], None], *, exit_with_stdin: bool = False) -> None:
    """Call ``callback`` on SIGTERM/SIGINT, and when stdin closes if asked to."""

    def handler(signum: int, frame: FrameType | None) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if exit_with_stdin:
        threading.Thread(target=_watch_stdin, args=(callback,), daemon=True).start()


def _watch_stdin(callback: Callable[[], None]) -> None:
    # os.read, not sys.stdin: a daemon thread blocked inside the buffered reader makes the
    # interpreter's shutdown abort ("could not acquire lock for <stdin>").
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except OSError:
        pass
    finally:
        callback()


def print_ready(info: Mapping[str, object]) -> None:
    """The one ready line: ``{"ready": true, ...}``."""
    print(json.dumps({"ready": True, **info}), flush=True)


def read_ready_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, object]:
    """The ready line of a service started with ``stdout=PIPE``, within ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SGMonitorError(f"{what} not ready within {timeout:.0f}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise SGMonitorError(f"{what} exited (code {proc.wait()}) before it was ready")
        line += chunk
    try:
        info = json.loads(line)
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("ready") is not True:
        raise SGMonitorError(f"{what}: unexpected ready line {line[:200]!r}")
    return info


def reap(process: subprocess.Popen[bytes], grace: float) -> None:
    """Wait ``grace`` seconds for ``process`` to exit, then terminate, then kill it."""
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
