"""Debian kernels for the lab: resolve the current ABI, download once, unpack.

The kernel is resolved at run time from Debian's meta package (never a pinned ABI:
security updates move it and old ones leave the mirror) and cached, so a second run
downloads nothing.
"""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sgmonitor.lab import FLAVORS, LabError

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20
_XZ_MAGIC = b"\xfd7zXZ\x00"


def cache_dir() -> Path:
    """Where downloads and built images live (``$SGMONITOR_CACHE`` or ~/.cache/sgmonitor)."""
    base = os.environ.get("SGMONITOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sgmonitor"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class KernelFiles:
    """One unpacked Debian kernel: the boot image, its vmlinux and the fw_cfg module."""

    release: str
    vmlinuz: Path
    vmlinux: Path
    config: Path
    fw_cfg_module: Path

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


def resolve_release(flavor: str) -> str:
    """Name the kernel release the ``linux-image-<flavor>`` meta package points at now."""
    if flavor not in FLAVORS:
        raise LabError(f"unknown kernel flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    meta = f"linux-image-{FLAVORS[flavor]}"
    proc = subprocess.run(
        ["apt-cache", "depends", meta], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep.removeprefix("linux-image-")
    raise LabError(
        f"apt-cache does not know {meta} ({proc.stderr.strip() or 'no Depends line'}); "
        "run 'apt-get update' first"
    )


def fetch_kernel(flavor: str = "cloud") -> KernelFiles:
    """Download (once) and unpack the current kernel of ``flavor``."""
    release = resolve_release(flavor)
    root = cache_dir() / "kernels" / release
    files = KernelFiles(
        release=release,
        vmlinuz=root / "vmlinuz",
        vmlinux=root / "vmlinux",
        config=root / "config",
        fw_cfg_module=root / "qemu_fw_cfg.ko",
    )
    if all(p.exists() for p in (files.vmlinuz, files.vmlinux, files.config, files.fw_cfg_module)):
        return files
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        deb = _download(f"linux-image-{release}-unsigned", Path(tmp))
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        shutil.copyfile(unpacked / "boot" / f"vmlinuz-{release}", files.vmlinuz)
        shutil.copyfile(unpacked / "boot" / f"config-{release}", files.config)
        modules = list((unpacked / "lib" / "modules").rglob("qemu_fw_cfg.ko*"))
        if not modules:
            raise LabError(f"{release} ships no qemu_fw_cfg module")
        shutil.copyfile(modules[0], files.fw_cfg_module)
    extracted = extract_vmlinux(files.vmlinuz.read_bytes())
    files.vmlinux.with_suffix(".tmp").write_bytes(extracted)
    files.vmlinux.with_suffix(".tmp").rename(files.vmlinux)
    return files


def _download(package: str, into: Path) -> Path:
    proc = subprocess.run(
        ["apt-get", "download", package], cwd=into, capture_output=True, text=True, check=False
    )
    debs = list(into.glob("*.deb"))
    if proc.returncode != 0 or not debs:
        raise LabError(f"apt-get download {package} failed: {proc.stderr.strip()[-500:]}")
    return debs[0]


def _lz4_legacy(payload: bytes) -> bytes:
    import lz4.block  # here: every sgmonitor command imports this module, few unpack

    blocks = []
    pos = 4
    # Blocks are [u32 size][data]; the kernel's build appends the plain size as a
    # final u32 trailer, and may repeat the magic between concatenated frames.
    while len(payload) - pos > 4:
        (size,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:
            continue
        if pos + size > len(payload):
            raise LabError("LZ4 block runs past the bzImage payload")
        try:
            blocks.append(
                lz4.block.decompress(payload[pos : pos + size], uncompressed_size=_LZ4_LEGACY_BLOCK)
            )
        except lz4.block.LZ4BlockError as exc:
            raise LabError(f"bzImage LZ4 payload is corrupt: {exc}") from exc
        pos += size
    return b"".join(blocks)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the ELF ``vmlinux`` from an x86 bzImage (LZ4 legacy or XZ payload)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise LabError("not an x86 bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if len(payload) != payload_length:
        raise LabError("bzImage payload is truncated")
    if payload.startswith(_XZ_MAGIC):
        # The build appends the plain size after the stream; the decompressor stops
        # at the stream's end and leaves it alone.
        try:
            vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        except lzma.LZMAError as exc:
            raise LabError(f"bzImage XZ payload is corrupt: {exc}") from exc
    elif payload.startswith(_LZ4_LEGACY_MAGIC.to_bytes(4, "little")):
        vmlinux = _lz4_legacy(payload)
    else:
        raise LabError(f"bzImage payload is neither LZ4 nor XZ ({payload[:6].hex()})")
    if vmlinux[:4] != b"\x7fELF":
        raise LabError("decompressed payload is not an ELF vmlinux")
    return vmlinux
