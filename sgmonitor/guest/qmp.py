"""A synchronous QMP connection to a running QEMU (built on ``qemu.qmp``)."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from sgmonitor.errors import SGMonitorError


class QmpError(SGMonitorError):
    """QEMU refused a command, or its monitor could not be reached."""


class Qmp:
    """One QMP session; use as a context manager or call :meth:`close`."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self._monitor = QEMUMonitorProtocol(socket_path)
        try:
            self._monitor.connect(negotiate=True)
        except (OSError, Exception) as exc:  # qemu.qmp raises its own ConnectError family
            raise QmpError(f"cannot reach QMP at {socket_path}: {exc}") from exc
        self._timeout = timeout

    def command(self, name: str, **arguments: Any) -> Any:
        try:
            reply = self._monitor.cmd_raw(name, arguments or None)
        except Exception as exc:
            raise QmpError(f"QMP {name} failed: {exc}") from exc
        if "error" in reply:
            raise QmpError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

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
        with contextlib.suppress(EOFError, OSError):  # QEMU already hung up after ``quit``
            self._monitor.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
