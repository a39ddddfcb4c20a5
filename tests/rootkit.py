"""Build the test rootkit (tests/rootkit/) for a lab kernel, once per test session.

``build_rootkit(release)`` compiles ``sgm_rootkit.ko`` against Debian's
``linux-headers-<release>`` (scripts/bootstrap installs them for the cloud kernel);
``build_syscall_tool()`` compiles ``sgm_syscall``, a static user-space program that makes
one system call with the rootkit's magic argument and prints what it returned.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "rootkit"
# A hooked syscall called with this first argument returns the hook's marker.
MAGIC = 0x53474D00
MARK_TABLE = 0x53474D01
MARK_PATCH = 0x53474D02
MARK_FTRACE = 0x53474D03


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="sgm-rootkit-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def headers(release: str) -> Path:
    path = Path("/usr/src") / f"linux-headers-{release}"
    if not (path / "Makefile").exists():
        raise RuntimeError(f"{path} missing: apt-get install linux-headers-{release} (bootstrap)")
    return path


@functools.cache
def build_rootkit(release: str) -> Path:
    """``sgm_rootkit.ko`` for the kernel ``release`` (a copy of the sources is built)."""
    build = _workdir() / release
    shutil.copytree(SOURCE, build, ignore=shutil.ignore_patterns("sgm_syscall*"))
    proc = subprocess.run(
        ["make", "-C", str(headers(release)), f"M={build}", "modules"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    module = build / "sgm_rootkit.ko"
    if proc.returncode != 0 or not module.exists():
        raise RuntimeError(f"building the rootkit failed:\n{proc.stdout[-3000:]}{proc.stderr}")
    return module


@functools.cache
def build_syscall_tool() -> Path:
    """``sgm_syscall NR [ARG]``: a static, libc-free program for the guest."""
    out = _workdir() / "sgm_syscall"
    subprocess.run(
        [
            "gcc",
            "-static",
            "-nostdlib",
            "-O2",
            "-fno-stack-protector",
            "-o",
            str(out),
            str(SOURCE / "sgm_syscall.c"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out
