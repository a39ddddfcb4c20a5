"""A synchronous QMP connection to a running QEMU (built on ``qemu.qmp``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.events import EventListener

from sgmonitor.errors import SGMonitorError

T = TypeVar("T")
# Event-loop passes that take bytes already in the socket to a listener: one to read
# them, one for the reader task to parse and dispatch them, one to spare.
_EVENT_PASSES = 3


class QmpError(SGMonitorError):
    """QEMU refused a command, or its monitor could not be reached."""


class Qmp:
    """One QMP session; use as a context manager or call :meth:`close`.

    Every call has a deadline: QEMU serves one QMP client per socket, so a second
    client (another tool holding the monitor) would otherwise wait forever.
    """

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("sgmonitor")
        self._resets = EventListener(("RESET",))
        self._client.register_listener(self._resets)
        try:
            self._run(self._client.connect(socket_path))
        except TimeoutError:
            self._loop.close()
            raise QmpError(
                f"QMP at {socket_path} did not greet us in {timeout}s "
                "(is another client holding the monitor?)"
            ) from None
        except (OSError, QMPError) as exc:
            self._loop.close()
            raise QmpError(f"cannot reach QMP at {socket_path}: {exc}") from exc

    def _run(self, step: Awaitable[T]) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(step, self._timeout))

    def command(self, name: str, **arguments: Any) -> Any:
        try:
            return self._run(self._client.execute(name, arguments or None))
        except ExecuteError as exc:
            raise QmpError(f"QMP {name}: {exc}") from exc  # str(): the error's desc
        except TimeoutError:
            raise QmpError(f"QMP {name}: no answer in {self._timeout}s") from None
        except (OSError, QMPError, EOFError) as exc:
            raise QmpError(f"QMP {name} failed: {exc}") from exc

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command and return its text output."""
        return str(self.command("human-monitor-command", **{"command-line": command_line}))

    def registers(self) -> dict[str, int]:
        """The first vCPU's control registers, EFER and privilege level (``cpl``)."""
        text = self.hmp("info registers")
        found = {
            name.lower(): int(value, 16)
            for name, value in re.findall(r"\b(CR0|CR2|CR3|CR4|EFER|CPL)=([0-9a-fA-F]+)", text)
        }
        if not {"cr0", "cr3", "cr4", "efer"} <= found.keys():
            raise QmpError(f"unexpected 'info registers' output: {text[:200]!r}")
        return found

    def resets(self) -> int:
        """How many RESET events QEMU has sent on this connection so far (the guest
        rebooted, or was reset from outside). No round trip: the event loop runs just
        long enough to take in what QEMU has already written, which a reset does as it
        happens."""
        for _ in range(_EVENT_PASSES):
            self._loop.run_until_complete(asyncio.sleep(0))
        return len(self._resets.history)

    def is_running(self) -> bool:
        return bool(self.command("query-status")["running"])

    def stop(self) -> None:
        self.command("stop")

    def cont(self) -> None:
        self.command("cont")

    def memory_backend(self) -> tuple[str, str]:
        """The id and ``mem-path`` of the guest's shared file-backed RAM, found through QOM."""
        for obj in self.command("qom-list", path="/objects"):
            if not str(obj.get("type", "")).startswith("child<memory-backend-file"):
                continue
            path = f"/objects/{obj['name']}"
            if self.command("qom-get", path=path, property="share") is not True:
                continue
            return str(obj["name"]), str(self.command("qom-get", path=path, property="mem-path"))
        raise QmpError("the guest has no shared memory-backend-file (start QEMU with share=on)")

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(EOFError, OSError, QMPError, asyncio.TimeoutError):
            self._run(self._client.disconnect())  # QEMU may have hung up after ``quit``
        self._loop.close()

    def __del__(self) -> None:  # an unclosed session must not leave asyncio tasks behind
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def held_still(socket_path: str) -> Iterator[None]:
    """Keep the guest stopped without holding its monitor (QEMU serves one QMP client at
    a time, so whoever reads the guest meanwhile can still connect). A guest that was
    already stopped is left stopped."""
    with Qmp(socket_path) as qmp:
        was_running = qmp.is_running()
        qmp.stop()
    try:
        yield
    finally:
        if was_running:
            with Qmp(socket_path) as qmp:
                qmp.cont()
