"""Where the kernel rewrites its own text, as arch/x86/kernel/alternative.c,
jump_label.c, static_call.c, ftrace.c and kprobes do: the sites a text-integrity check
must not mistake for tampering.

Two kinds. *Boot sites* are patched once, while the kernel starts, from tables in init
memory that is freed afterwards (alternatives, paravirt calls, retpoline and return
thunks, SMP lock prefixes, ENDBR sealing, the ``__fentry__`` calls that ftrace turns
into NOPs): only the vendor image still has those tables. *Runtime sites* may change at
any time (jump labels, static calls and their trampolines, ftrace call sites and its
caller's patched calls, kprobes) and are read from the running kernel.

Each table is read with ``read(address, size)`` at run-time addresses: guest memory, or
the vendor image through :func:`image_reader`. Tables of a layout this kernel does not
have (BTF says) are skipped, since such a kernel has no such sites.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence

from sgmonitor.errors import GuestDataError, ValidationError
from sgmonitor.kernel.helpers.ftrace import for_each_ftrace_op, for_each_kprobe
from sgmonitor.kernel.helpers.list import WalkGuard
from sgmonitor.kernel.insn import insn_length
from sgmonitor.kernel.kernel import Kernel

__all__ = [
    "FTRACE_SITE",
    "JUMP_LABEL_SITE",
    "Reader",
    "boot_patch_sites",
    "ftrace_record_ips",
    "ftrace_trampolines",
    "image_reader",
    "jump_label_entries",
    "kaslr_slide",
    "runtime_patch_sites",
]

Reader = Callable[[int, int], bytes]
Site = tuple[int, int]  # (address, length)

JUMP_LABEL_SITE = 5  # JUMP_LABEL_NOP_SIZE: a 5-byte NOP or jmp (or a 2-byte one)
FTRACE_SITE = 5  # MCOUNT_INSN_SIZE: call __fentry__, or a 5-byte NOP
_MAX_TABLE = 64 << 20
_MAX_FTRACE_PAGES = 1 << 16
# Labels inside ftrace's own trampolines whose call ftrace rewrites to the current tracer.
_FTRACE_CALL_LABELS = ("ftrace_call", "ftrace_regs_call", "ftrace_graph_call")


def kaslr_slide(kernel: Kernel) -> int:
    """How far the running kernel's image lies from its link addresses (VMCOREINFO's
    ``KERNELOFFSET``; 0 without KASLR)."""
    return (kernel.vmcoreinfo.kernel_offset if kernel.vmcoreinfo else 0) or 0


def image_reader(kernel: Kernel) -> Reader:
    """Read the vendor image (``kernel.vendor_image``) at run-time addresses: its link
    addresses plus the guest's KASLR slide."""
    image = kernel.vendor_image
    if image is None:
        raise ValueError("no vendor image was given")
    slide = kaslr_slide(kernel)
    return lambda address, size: image.read(address - slide, size)


def _table(kernel: Kernel, read: Reader, start: str, stop: str) -> tuple[int, bytes]:
    symbols = kernel.symbols
    if start not in symbols or stop not in symbols:  # type: ignore[operator]
        return 0, b""
    lo, hi = symbols[start], symbols[stop]
    if not 0 <= hi - lo <= _MAX_TABLE:
        raise ValidationError(f"{start}..{stop}: an implausible table ({hi - lo} bytes)")
    return lo, read(lo, hi - lo)


def _self_relative(raw: bytes, i: int, address: int) -> int:
    """Where the ``s32`` at ``raw[i]``, itself at guest ``address``, points: the tables'
    fields hold offsets from their own address (position-independent since v4.x)."""
    offset: int = struct.unpack_from("<i", raw, i)[0]
    return (address + offset) % 2**64


def _relative(kernel: Kernel, read: Reader, start: str, stop: str) -> Iterator[int]:
    """The sites of an ``s32`` table of self-relative offsets (``.retpoline_sites`` &c.)."""
    base, raw = _table(kernel, read, start, stop)
    for i in range(0, len(raw) - 3, 4):
        yield _self_relative(raw, i, base + i)


def _entries(
    kernel: Kernel, read: Reader, type_name: str, start: str, stop: str
) -> Iterator[tuple[bytes, int, int]]:
    """(table bytes, offset, guest address) of each entry of a table of ``type_name``;
    nothing if this kernel has no such type (BTF), and so no such table."""
    size = _sized(kernel, type_name)
    if size is None:
        return
    base, raw = _table(kernel, read, start, stop)
    for i in range(0, len(raw) - size + 1, size):
        yield raw, i, base + i


def _sized(kernel: Kernel, type_name: str) -> int | None:
    try:
        return kernel.types.sizeof(type_name)
    except (KeyError, LookupError):
        return None


def jump_label_entries(kernel: Kernel, read: Reader) -> Iterator[tuple[int, int]]:
    """(code, target) of every ``struct jump_entry`` in ``__jump_table`` (both fields
    are offsets relative to themselves since v5.3)."""
    if _sized(kernel, "struct jump_entry") is None:
        return
    code_at = kernel.types.offsetof("struct jump_entry", "code")
    target_at = kernel.types.offsetof("struct jump_entry", "target")
    table = ("struct jump_entry", "__start___jump_table", "__stop___jump_table")
    for raw, i, entry in _entries(kernel, read, *table):
        code = _self_relative(raw, i + code_at, entry + code_at)
        yield code, _self_relative(raw, i + target_at, entry + target_at)


def _static_call_sites(kernel: Kernel, read: Reader) -> Iterator[Site]:
    if _sized(kernel, "struct static_call_site") is None:
        return
    at = kernel.types.offsetof("struct static_call_site", "addr")
    table = ("struct static_call_site", "__start_static_call_sites", "__stop_static_call_sites")
    for raw, i, entry in _entries(kernel, read, *table):
        yield _self_relative(raw, i + at, entry + at), 5


def ftrace_record_ips(kernel: Kernel) -> list[int]:
    """The call sites ftrace manages, ``rec->ip`` of each ``struct dyn_ftrace`` on the
    ``ftrace_pages_start`` list (``do_for_each_ftrace_rec()``)."""
    if "ftrace_pages_start" not in kernel.symbols:  # type: ignore[operator]
        return []
    page = kernel.object("ftrace_pages_start", "struct ftrace_page *").read_()
    guard = WalkGuard("ftrace_pages", _MAX_FTRACE_PAGES)
    record_size = kernel.types.sizeof("struct dyn_ftrace")
    ips: list[int] = []
    while int(page):
        guard.step(int(page))
        count, records = int(page.index), int(page.records)
        if not 0 <= count <= (4096 << 10) // record_size:
            raise ValidationError(f"ftrace_page {int(page):#x}: {count} records")
        raw = kernel.memory.read(records, count * record_size)
        ips.extend(struct.unpack_from("<Q", raw, i * record_size)[0] for i in range(count))
        page = page.next.read_()
    return ips


def ftrace_trampolines(kernel: Kernel) -> list[tuple[int, int]]:
    """(start, size) of the trampolines ftrace built for its registered ops."""
    return [
        (int(op.trampoline), int(op.trampoline_size))
        for op in for_each_ftrace_op(kernel)
        if int(op.trampoline)
    ]


def runtime_patch_sites(
    kernel: Kernel, jump_labels: Sequence[tuple[int, int]], ftrace_ips: Sequence[int]
) -> list[Site]:
    """Sites of the running kernel's core text that may change at any time, given its
    jump labels (:func:`jump_label_entries`) and ftrace sites (:func:`ftrace_record_ips`),
    which a caller that also checks what those sites hold has read already."""
    symbols = kernel.symbols
    sites: list[Site] = [(code, JUMP_LABEL_SITE) for code, _ in jump_labels]
    sites += _static_call_sites(kernel, kernel.memory.read)
    sites += [(ip, FTRACE_SITE) for ip in ftrace_ips]
    sites += [(int(probe.addr), 5) for probe in for_each_kprobe(kernel)]  # int3 or jmp
    sites += [(symbols[name], 5) for name in _FTRACE_CALL_LABELS if name in symbols]  # type: ignore[operator]
    lo, hi = symbols.get("__static_call_text_start"), symbols.get("__static_call_text_end")  # type: ignore[attr-defined]
    if lo is not None and hi is not None:
        sites.append((lo, hi - lo))  # the static-call trampolines, retargeted at run time
    return sites


def boot_patch_sites(kernel: Kernel, read: Reader) -> list[Site]:
    """Sites patched once at boot, from the vendor image's tables (``read``, which also
    gives the image's unpatched code, to size the instructions at retpoline and return
    sites). ``__fentry__`` calls (``__mcount_loc``) are included."""
    sites: list[Site] = []
    for start, stop in (
        ("__retpoline_sites", "__retpoline_sites_end"),
        ("__return_sites", "__return_sites_end"),
        ("__call_sites", "__call_sites_end"),
    ):
        for site in _relative(kernel, read, start, stop):
            try:
                sites.append((site, insn_length(read(site, 15))))
            except GuestDataError:  # InsnError, or a site at the end of other text
                sites.append((site, 6))  # the longest call/jmp/jcc rel32
    sites += [(site, 1) for site in _relative(kernel, read, "__smp_locks", "__smp_locks_end")]
    sites += [
        (site, 4) for site in _relative(kernel, read, "__ibt_endbr_seal", "__ibt_endbr_seal_end")
    ]
    alts = ("struct alt_instr", "__alt_instructions", "__alt_instructions_end")
    for raw, i, entry in _entries(kernel, read, *alts):
        at = kernel.types.offsetof("struct alt_instr", "instr_offset")
        length = raw[i + kernel.types.offsetof("struct alt_instr", "instrlen")]
        sites.append((_self_relative(raw, i + at, entry + at), length))
    slide = kaslr_slide(kernel)
    paravirt = ("struct paravirt_patch_site", "__parainstructions", "__parainstructions_end")
    for raw, i, _ in _entries(kernel, read, *paravirt):
        at = kernel.types.offsetof("struct paravirt_patch_site", "instr")
        length = raw[i + kernel.types.offsetof("struct paravirt_patch_site", "len")]
        sites.append((struct.unpack_from("<Q", raw, i + at)[0] + slide, length))  # link-time
    _, raw = _table(kernel, read, "__start_mcount_loc", "__stop_mcount_loc")
    fentry = struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8])
    sites += [(ip + slide, FTRACE_SITE) for (ip,) in fentry]
    return sites
