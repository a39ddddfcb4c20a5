"""Boot, list, query and stop lab guests: real Debian kernels under QEMU (TCG)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sgmonitor.guest.qmp import Qmp, QmpError
from sgmonitor.lab import LabError
from sgmonitor.lab.initramfs import (
    MAX_COMMAND,
    MAX_OUTPUT,
    Workload,
    build_initramfs,
    guest_path,
)
from sgmonitor.lab.kernel import fetch_kernel

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_PROC = re.compile(r"^SGM-PROC (\d+) (\d+) (\d+) (\S) (.*)$")
_SYM = re.compile(r"^SGM-SYM ([0-9a-f]+) (\S+)$")
_HELPER = re.compile(r"^SGM-HELPER (\d+)$")
_END = re.compile(r"^SGM-END (\d+)$")


@dataclass(frozen=True)
class MachineConfig:
    """How to boot a lab guest."""

    flavor: str = "cloud"
    mem_mib: int = 256
    paging: int = 5
    kaslr: bool = True
    pti: bool = False
    workload: Workload = field(default_factory=Workload)
    # (host file, guest path) pairs put into the initramfs.
    files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for _, path in self.files:
            try:
                guest_path(path)
            except ValueError as exc:
                raise LabError(str(exc)) from None
        if self.paging not in (4, 5):
            raise LabError("--paging must be 4 or 5")
        if not 64 <= self.mem_mib <= 16384:
            raise LabError("--mem must be between 64 and 16384 MiB")

    def kernel_command_line(self) -> str:
        args = ["console=ttyS0", "panic=-1", "quiet", "loglevel=3"]
        if not self.kaslr:
            args.append("nokaslr")
        args.append("pti=on" if self.pti else "pti=off")
        return " ".join(args)


@dataclass
class LabGuest:
    """A running lab guest and the files that belong to it (``state.json``)."""

    name: str
    pid: int
    qmp: str
    ram: str
    console: str
    control: str
    release: str
    vmlinux: str
    config: dict[str, object]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_dir() -> Path:
    """Per-guest sockets and logs (short paths: unix sockets allow ~107 bytes)."""
    path = Path(os.environ.get("SGMONITOR_RUN_DIR", "/tmp/sgmonitor-lab"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ram_path(name: str) -> Path:
    return Path("/dev/shm") / f"sgmonitor-{name}.mem"


def start(name: str, config: MachineConfig, timeout: float | None = None) -> LabGuest:
    """Boot a guest and return once its /init has printed its ground truth."""
    if not _NAME.match(name):
        raise LabError(f"bad guest name {name!r} (letters, digits, . _ -; up to 32)")
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 missing: apt-get install qemu-system-x86")
    if _alive(name):
        raise LabError(f"lab guest {name!r} is already running; 'sgmonitor lab stop {name}'")
    _remove_files(name)
    kernel = fetch_kernel(config.flavor)
    home = run_dir() / name
    home.mkdir(parents=True, exist_ok=True)
    for old in ("console.log", "qemu.log"):  # a stale log would look ready at once
        (home / old).unlink(missing_ok=True)
    initrd = home / "initramfs.cpio"
    try:
        image = build_initramfs(kernel.fw_cfg_module, config.workload, files=config.files)
    except (OSError, ValueError) as exc:
        raise LabError(str(exc)) from None
    initrd.write_bytes(image)
    guest = LabGuest(
        name=name,
        pid=0,
        qmp=str(home / "qmp.sock"),
        ram=str(ram_path(name)),
        console=str(home / "console.log"),
        control=str(home / "control.sock"),
        release=kernel.release,
        vmlinux=str(kernel.vmlinux),
        config={
            **asdict(config),
            "workload": asdict(config.workload),
            "files": [list(f) for f in config.files],
        },
    )
    cpu = "max" if config.paging == 5 else "max,-la57"
    mem = f"{config.mem_mib}M"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-name",
        f"sgmonitor-{name}",
        "-m",
        mem,
        "-object",
        f"memory-backend-file,id=mem,size={mem},mem-path={guest.ram},share=on",
        "-machine",
        "q35,memory-backend=mem",
        "-cpu",
        cpu,
        "-smp",
        "1",
        "-kernel",
        str(kernel.vmlinuz),
        "-initrd",
        str(initrd),
        "-append",
        config.kernel_command_line(),
        "-display",
        "none",
        "-monitor",
        "none",
        "-vga",
        "none",
        "-nic",
        "none",
        "-serial",
        f"file:{guest.console}",
        "-serial",
        f"unix:{guest.control},server=on,wait=off",
        "-qmp",
        f"unix:{guest.qmp},server=on,wait=off",
        "-device",
        "vmcoreinfo",
        "-no-reboot",
    ]
    log = open(home / "qemu.log", "wb")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    guest.pid = proc.pid
    (home / "state.json").write_text(json.dumps(guest.as_dict(), indent=2))
    deadline = time.monotonic() + (timeout or 90 + 0.08 * config.workload.procs)
    try:
        while "SGM-READY" not in _read(guest.console):
            if proc.poll() is not None:
                raise LabError(f"QEMU exited with {proc.returncode} before the guest was ready")
            if time.monotonic() > deadline:
                raise LabError("the guest did not become ready in time")
            time.sleep(0.2)
    except (LabError, KeyboardInterrupt) as exc:
        tail = _read(guest.console)[-2000:] + _read(str(home / "qemu.log"))[-1000:]
        stop(name)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LabError(f"lab guest {name!r}: {exc}\n--- console tail ---\n{tail}") from None
    return guest


def load(name: str) -> LabGuest:
    """The state of a running guest, or a clear error if it is not running."""
    state = run_dir() / name / "state.json"
    if not state.exists() or not _alive(name):
        raise LabError(f"no running lab guest named {name!r}")
    return LabGuest(**json.loads(state.read_text()))


def running() -> list[LabGuest]:
    guests = []
    for state in sorted(run_dir().glob("*/state.json")):
        if _alive(state.parent.name):
            guests.append(LabGuest(**json.loads(state.read_text())))
    return guests


def stop(name: str) -> None:
    """Stop a guest (QMP ``quit``, then its PID) and remove its RAM file and sockets."""
    state = run_dir() / name / "state.json"
    pid = json.loads(state.read_text())["pid"] if state.exists() else 0
    if pid and _pid_is_qemu(pid):
        try:
            with Qmp(str(run_dir() / name / "qmp.sock")) as qmp:
                qmp.command("quit")
        except QmpError:
            pass
        if not _wait_gone(pid, 5.0):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
    _remove_files(name)


@dataclass(frozen=True)
class Truth:
    """One block of the guest's own view: processes and kallsyms addresses.

    A process is ``{"pid", "ppid", "uid", "state", "comm"}``: the ``status`` fields
    (``state`` is the letter of its ``State:`` line, ``comm`` its ``Name:``).
    """

    processes: list[dict[str, object]]
    symbols: dict[str, int]
    helper_pid: int


def truth(guest: LabGuest, fresh: bool = False, timeout: float = 180.0) -> Truth:
    """The guest's view of itself; ``fresh`` asks /init to print a new block now.

    The process that printed the block (``SGM-HELPER``) is left out: it has exited.
    """
    blocks = _truth_blocks(_read(guest.console))
    if fresh:
        wanted = len(blocks)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(guest.control)
            sock.sendall(b"truth\n")
            deadline = time.monotonic() + timeout
            while len(blocks := _truth_blocks(_read(guest.console))) <= wanted:
                if time.monotonic() > deadline:
                    raise LabError(f"guest {guest.name!r} printed no fresh truth in {timeout}s")
                time.sleep(0.1)
    if not blocks:
        raise LabError(f"guest {guest.name!r} has printed no ground truth")
    return blocks[-1]


def exec_in_guest(guest: LabGuest, argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
    """Run ``argv`` in the guest (as root, through ``sh``, stdin from /dev/null) and
    return its exit status and its stdout and stderr together.

    The guest kills the command after ``timeout`` seconds (status 143). Output beyond
    ``MAX_OUTPUT`` bytes is cut off. The words are quoted for the guest's shell, so run
    ``["sh", "-c", LINE]`` for a command line of your own.
    """
    if not argv:
        raise LabError("nothing to run in the guest")
    if timeout <= 0:
        raise LabError("the timeout must be positive")
    line = " ".join(shlex.quote(word) for word in argv)
    encoded = base64.b64encode(line.encode()).decode()
    if len(encoded) > MAX_COMMAND:
        raise LabError(f"command line too long for the guest ({len(line)} bytes)")
    ident = secrets.token_hex(8)
    seconds = math.ceil(timeout)
    exit_line = re.compile(rf"^SGM-EXIT {ident} (\d+) (\d+)\s*$", re.MULTILINE)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(guest.control)
        sock.sendall(f"exec {ident} {seconds} {encoded}\n".encode())
        # The guest's own timeout, then time for a slow (TCG) guest to print the output.
        deadline = time.monotonic() + seconds + 30 + MAX_OUTPUT / 4096
        while not (done := exit_line.search(console := _read(guest.console))):
            if time.monotonic() > deadline:
                raise LabError(f"guest {guest.name!r} did not answer the command in time")
            if not _alive(guest.name):
                raise LabError(f"guest {guest.name!r} stopped while running the command")
            time.sleep(0.05)
    prefix = f"SGM-OUT {ident} "
    chunks = [
        line.rstrip("\r").removeprefix(prefix)
        for line in console[: done.start()].splitlines()
        if line.startswith(prefix)
    ]
    try:
        output = base64.b64decode("".join(chunks), validate=True)
    except binascii.Error as exc:
        raise LabError(f"guest {guest.name!r} sent garbled output: {exc}") from None
    return int(done[1]), output.decode(errors="replace")


def _pid(process: dict[str, object]) -> int:
    return int(str(process["pid"]))


def _truth_blocks(console: str) -> list[Truth]:
    blocks: list[Truth] = []
    procs: list[dict[str, object]] = []
    symbols: dict[str, int] = {}
    helper = 0
    for line in console.splitlines():
        line = line.rstrip("\r")
        if m := _PROC.match(line):
            procs.append(
                {"pid": int(m[1]), "ppid": int(m[2]), "uid": int(m[3]), "state": m[4], "comm": m[5]}
            )
        elif m := _SYM.match(line):
            symbols[m[2]] = int(m[1], 16)
        elif m := _HELPER.match(line):
            helper = int(m[1])
        elif _END.match(line):
            live = sorted((p for p in procs if p["pid"] != helper), key=_pid)
            blocks.append(Truth(live, symbols, helper))
            procs, symbols, helper = [], {}, 0
    return blocks


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _alive(name: str) -> bool:
    state = run_dir() / name / "state.json"
    if not state.exists():
        return False
    try:
        return _pid_is_qemu(int(json.loads(state.read_text())["pid"]))
    except (ValueError, KeyError):
        return False


def _pid_is_qemu(pid: int) -> bool:
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _pid_is_qemu(pid):
        with contextlib.suppress(ChildProcessError):  # reap it if it is our own child
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _remove_files(name: str) -> None:
    ram_path(name).unlink(missing_ok=True)
    home = run_dir() / name
    for leftover in ("qmp.sock", "control.sock", "state.json"):
        (home / leftover).unlink(missing_ok=True)


__all__ = [
    "LabGuest",
    "MachineConfig",
    "Truth",
    "exec_in_guest",
    "load",
    "running",
    "start",
    "stop",
    "truth",
]
