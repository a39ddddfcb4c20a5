"""Kernel text integrity: the core kernel's code against a reference, byte for byte.

The reference is the vendor's image when one is given (``--vmlinux``: its BTF must be
the guest's, so it is this very build), or else the text as this check first read it
from this kernel: the baseline taken at attach (``Kernel.text_baseline``), which the
enclave keeps for the session and whose digest goes to the monitor with every report.

Bytes the kernel itself rewrites are not tampering: the boot-time sites the image's own
tables list (alternatives, paravirt, retpoline and return thunks, lock prefixes, ENDBR
seals, ``__fentry__`` calls), the KASLR relocations (a word that differs by exactly the
slide), and the sites that change at run time (jump labels, static calls, ftrace's call
sites, kprobes). Those sites must still hold what the kernel puts there: an ftrace site
a NOP or a call into kernel text or an ftrace trampoline, a jump label a NOP or a jump
to its own target. Everything else that differs is reported by the function it is in.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.ids.code import KernelCode
from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.text_patching import (
    FTRACE_SITE,
    boot_patch_sites,
    ftrace_record_ips,
    ftrace_trampolines,
    image_reader,
    jump_label_entries,
    kaslr_slide,
    runtime_patch_sites,
)

_MAX_TEXT = 256 << 20
_BLOCK = 64
_NOP5 = b"\x0f\x1f\x44\x00\x00"
_NOPS = (_NOP5, b"\x66\x90")  # x86_nops[5], x86_nops[2]
_SHOWN = 16  # bytes of expected/found evidence


def _mask(masked: bytearray, base: int, sites: list[tuple[int, int]]) -> None:
    size = len(masked)
    for address, length in sites:
        start = max(address - base, 0)
        end = min(address - base + length, size)
        if start < end:
            masked[start:end] = b"\x01" * (end - start)


def _relocated(now: bytes, ref: bytes, p: int, slide: int) -> range | None:
    """The 8- or 4-byte word around ``p`` that differs by exactly the KASLR slide (a
    64-bit or a sign-extended/inverse 32-bit relocation), if any."""
    if not slide:
        return None
    for width, deltas in ((8, (slide % 2**64,)), (4, (slide % 2**32, -slide % 2**32))):
        for q in range(max(p - width + 1, 0), p + 1):
            if q + width > len(now):
                break
            delta = int.from_bytes(now[q : q + width], "little") - int.from_bytes(
                ref[q : q + width], "little"
            )
            if delta % 2 ** (8 * width) in deltas:
                return range(q, q + width)
    return None


def _changed(now: bytes, ref: bytes, masked: bytearray, slide: int) -> list[int]:
    """Offsets of the bytes that differ and nothing explains."""
    explained = bytearray(len(now))
    out = []
    for block in range(0, len(now), _BLOCK):
        if now[block : block + _BLOCK] == ref[block : block + _BLOCK]:
            continue
        for p in range(block, min(block + _BLOCK, len(now))):
            if now[p] == ref[p] or masked[p] or explained[p]:
                continue
            word = _relocated(now, ref, p, slide)
            if word is not None:
                explained[word.start : word.stop] = b"\x01" * len(word)
            else:
                out.append(p)
    return out


def _site_problems(
    kernel: object,
    code: KernelCode,
    text: bytes,
    base: int,
    jump_labels: list[tuple[int, int]],
    ftrace_ips: list[int],
) -> Iterator[Finding]:
    """Runtime sites that hold something the kernel would not put there."""
    trampolines = ftrace_trampolines(kernel)  # type: ignore[arg-type]

    def ftrace_target(target: int) -> bool:
        return code.core_kernel_text(target) or any(
            lo <= target < lo + size for lo, size in trampolines
        )

    checks: list[tuple[int, int | None]] = [(ip, None) for ip in ftrace_ips]
    checks += jump_labels
    for site, target in checks:
        at = site - base
        if not 0 <= at <= len(text) - FTRACE_SITE:
            continue
        insn = text[at : at + FTRACE_SITE]
        if insn.startswith(_NOPS) or (target is None and insn == _NOP5):
            continue
        if insn[0] in (0xE8, 0xE9):
            goes = (site + 5 + struct.unpack_from("<i", insn, 1)[0]) % 2**64
            if (target is None and insn[0] == 0xE8 and ftrace_target(goes)) or goes == target:
                continue
        elif insn[0] == 0xEB and site + 2 + (insn[1] ^ 0x80) - 0x80 == target:
            continue
        what = "an ftrace call site" if target is None else "a jump label"
        where = code.describe(site)
        yield Finding(
            "kernel_text",
            "critical",
            f"{where}: {what} holds {insn.hex()}",
            symbol=where,
            address=site,
            expected="a NOP, or a call into kernel text or an ftrace trampoline"
            if target is None
            else f"a NOP, or a jump to {code.describe(target)}",
            found=insn.hex(),
        )


@check("kernel_text", "core kernel text against the vendor image or the attach baseline")
def run(kernel: object) -> Iterator[Finding]:
    """``_stext`` .. ``_etext`` read whole and compared with the reference."""
    symbols = kernel.symbols  # type: ignore[attr-defined]
    base, end = symbols["_stext"], symbols["_etext"]
    if not 0 < end - base <= _MAX_TEXT:
        raise ValidationError(f"core kernel text has an implausible size ({end - base})")
    text = kernel.memory.read(base, end - base)  # type: ignore[attr-defined]
    code = KernelCode(kernel)
    jump_labels = list(jump_label_entries(kernel, kernel.memory.read))  # type: ignore[arg-type, attr-defined]
    ftrace_ips = ftrace_record_ips(kernel)  # type: ignore[arg-type]
    yield from _site_problems(kernel, code, text, base, jump_labels, ftrace_ips)
    masked = bytearray(len(text))
    _mask(masked, base, runtime_patch_sites(kernel, jump_labels, ftrace_ips))  # type: ignore[arg-type]
    if kernel.vendor_image is not None:  # type: ignore[attr-defined]
        read = image_reader(kernel)  # type: ignore[arg-type]
        reference, what = read(base, end - base), "the vendor image"
        _mask(masked, base, boot_patch_sites(kernel, read))  # type: ignore[arg-type]
        slide = kaslr_slide(kernel)  # type: ignore[arg-type]
    else:
        if kernel.text_baseline is None:  # type: ignore[attr-defined]
            kernel.text_baseline = text  # type: ignore[attr-defined]
        reference, what, slide = kernel.text_baseline, "the baseline taken at attach", 0  # type: ignore[attr-defined]
        if len(reference) != len(text):
            raise ValidationError("core kernel text changed size since the baseline")
    changed: dict[str, list[int]] = {}
    for p in _changed(text, reference, masked, slide):
        changed.setdefault(code.function_at(base + p) or f"{base + p:#x}", []).append(p)
    for function, offsets in changed.items():
        first = offsets[0]
        yield Finding(
            "kernel_text",
            "critical",
            f"{function} differs from {what}: {len(offsets)} bytes from "
            f"{code.describe(base + first)}",
            symbol=function,
            address=base + first,
            expected=reference[first : first + _SHOWN].hex(),
            found=text[first : first + _SHOWN].hex(),
        )
