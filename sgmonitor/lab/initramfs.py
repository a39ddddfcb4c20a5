"""The lab guest's initramfs: busybox-static, qemu_fw_cfg.ko and an /init that prints
the guest's own view of itself (the ground truth tests compare against).

Console protocol written by /init (one record a line):

``SGM-PROC <pid> <ppid> <uid> <state> <comm>``
                                        every /proc process, from its ``status``
                                        (state: the letter of its ``State:`` line)
``SGM-SYM <address> <name>``            kallsyms addresses of a few symbols
``SGM-HELPER <pid>``                    the transient process that printed the block
``SGM-END <n>``                         end of truth block number n
``SGM-READY``                           after the first block: the guest is ready

Commands, one a line, on the guest's second serial port (a socket):

``exec <id> <seconds> <base64>``        run the decoded shell command line with stdin
                                        from /dev/null, killed after <seconds>; answers
``SGM-OUT <id> <base64>``               its stdout and stderr (first MAX_OUTPUT bytes)
``SGM-EXIT <id> <status> <size>``       its exit status (143: timed out) and full size
anything else                           a fresh truth block
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
TRUTH_SYMBOLS = (
    "init_task",
    "linux_banner",
    "sys_call_table",
    "schedule",
    "page_offset_base",
    "__start_BTF",
    "__stop_BTF",
)

# Every 4th workload process runs as this uid so ps has more than root to report.
WORKLOAD_UID = 1000
# What an exec command may print back (the rest is counted, not sent).
MAX_OUTPUT = 65536
# An exec command line, base64-encoded, must fit a canonical tty line (4095 bytes).
MAX_COMMAND = 3000
# Long enough to outlive any lab run, small enough for busybox's sleep.
_FOREVER = 2147483647

_PASSWD = f"root:x:0:0::/:/bin/sh\nworker:x:{WORKLOAD_UID}:{WORKLOAD_UID}::/:/bin/sh\n"
_GROUP = f"root:x:0:\nworker:x:{WORKLOAD_UID}:\n"

_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
insmod /lib/modules/qemu_fw_cfg.ko || echo "SGM-WARN qemu_fw_cfg did not load"
i=0
while [ $i -lt @PROCS@ ]; do
  if [ $((i % 4)) -eq 3 ]; then
    su -s /bin/sh worker -c 'exec sleep @FOREVER@' &
  else
    sleep @FOREVER@ &
  fi
  i=$((i + 1))
done
if [ @BUSY@ = 1 ]; then (while :; do :; done) & fi
truth() {
  awk 'FNR == 1 { name = state = pid = ppid = "" }
       /^Name:/ { sub(/^Name:\t/, ""); name = $0 } /^State:/ { state = $2 }
       /^Pid:/ { pid = $2 } /^PPid:/ { ppid = $2 }
       /^Uid:/ { print "SGM-PROC", pid, ppid, $2, state, name }' /proc/[0-9]*/status &
  helper=$!
  wait $helper
  echo "SGM-HELPER $helper"
  for s in @SYMBOLS@; do
    awk -v s="$s" '$3 == s { print "SGM-SYM", $1, $3; exit }' /proc/kallsyms
  done
  echo "SGM-END $1"
}
truth 0
run() {
  case "$1$2" in *[!0-9a-f]*|'') echo "SGM-WARN bad exec request"; return;; esac
  echo "$3" | base64 -d > /tmp/.sgm-cmd 2>/dev/null
  timeout "$2" sh /tmp/.sgm-cmd > /tmp/.sgm-out 2>&1 < /dev/null
  st=$?
  size=$(wc -c < /tmp/.sgm-out)
  head -c @MAXOUT@ /tmp/.sgm-out | base64 | sed "s/^/SGM-OUT $1 /"
  echo "SGM-EXIT $1 $st $size"
  rm -f /tmp/.sgm-cmd /tmp/.sgm-out
}
n=1
# The command port is opened before the guest says it is ready: a serial port nobody
# holds open drops what arrives, so a request sent right after SGM-READY (the bench asks
# for a fresh listing at once) would be lost while a busy guest reached the loop.
exec 3< /dev/ttyS1
stty -F /dev/ttyS1 -echo 2>/dev/null
echo SGM-READY
while read -r kind a b c; do
  if [ "$kind" = exec ]; then
    run "$a" "$b" "$c"
  else
    truth $n
    n=$((n + 1))
  fi
done <&3 &
wait
while :; do sleep @FOREVER@; done
"""


@dataclass(frozen=True)
class Workload:
    """What the guest runs besides its kernel threads."""

    procs: int = 0
    busy: bool = False


def init_script(workload: Workload) -> str:
    if workload.procs < 0:
        raise ValueError("procs must be >= 0")
    return (
        _INIT.replace("@PROCS@", str(workload.procs))
        .replace("@BUSY@", "1" if workload.busy else "0")
        .replace("@FOREVER@", str(_FOREVER))
        .replace("@SYMBOLS@", " ".join(TRUTH_SYMBOLS))
        .replace("@MAXOUT@", str(MAX_OUTPUT))
    )


def guest_path(path: str) -> str:
    """An absolute, normalised guest path for an added file, or ValueError."""
    parts = path.split("/")
    if not path.startswith("/") or any(p in ("", ".", "..") for p in parts[1:]):
        raise ValueError(f"bad guest path {path!r} (absolute, no . or .. or //)")
    return path


def build_initramfs(
    fw_cfg_module: Path,
    workload: Workload,
    busybox: Path = BUSYBOX,
    files: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Return a cpio (newc) archive holding busybox, the fw_cfg module and /init, and
    each ``(host file, guest path)`` of ``files`` (executable if the host file is)."""
    if not busybox.exists():
        raise FileNotFoundError(f"{busybox} missing: apt-get install busybox-static")
    added = []
    for host, guest in files:
        source = Path(host)
        if not source.is_file():
            raise FileNotFoundError(f"{host}: no such file to add to the guest")
        added.append((guest_path(guest).lstrip("/"), source))
    archive = CpioWriter()
    dirs = ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "root"]
    for name, _ in added:
        parents = name.split("/")[:-1]
        dirs += ["/".join(parents[: i + 1]) for i in range(len(parents))]
    for d in dict.fromkeys(dirs):
        archive.add_dir(d)
    archive.add_device("dev/console", major=5, minor=1)
    archive.add_file("bin/busybox", busybox.read_bytes(), mode=0o755)
    archive.add_file("lib/modules/qemu_fw_cfg.ko", fw_cfg_module.read_bytes(), mode=0o644)
    archive.add_dir("etc")
    archive.add_file("etc/passwd", _PASSWD.encode(), mode=0o644)
    archive.add_file("etc/group", _GROUP.encode(), mode=0o644)
    archive.add_file("init", init_script(workload).encode(), mode=0o755)
    for name, source in added:
        mode = 0o755 if os.access(source, os.X_OK) else 0o644
        archive.add_file(name, source.read_bytes(), mode=mode)
    return archive.finish()


class CpioWriter:
    """A minimal writer for the SVR4 "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add_dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return b"".join(self._parts)

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._parts.append(_pad4(header + encoded))
        self._parts.append(_pad4(data))


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
