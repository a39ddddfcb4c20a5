"""System-call entry: the code behind ``syscall`` branches only into entry code.

``entry_SYSCALL_64`` is where every 64-bit system call enters the kernel (the CPU jumps
to the address in MSR_LSTAR); it calls ``do_syscall_64``. A rootkit that rewrites that
call (or any jump in the entry code) sees every system call first. The kernel's own rule
for this code, which objtool enforces at build time, is that it stays in ``noinstr``
code: every direct branch from it must land in ``.entry.text`` or ``.noinstr.text``
(or core kernel text, on kernels without those markers). The code runs from
``entry_SYSCALL_64`` to ``entry_SYSRETQ_end`` (or, without that symbol, over the
``entry_SYSCALL_64*`` symbols). MSR_LSTAR itself is not readable here (QEMU's monitor
does not show it): a rootkit that points it elsewhere is not caught by this check.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.ids.code import KernelCode, branch_finding
from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.insn import branches

_MAX_ENTRY_CODE = 1 << 13
_SECTIONS = (
    ("__entry_text_start", "__entry_text_end"),
    ("__noinstr_text_start", "__noinstr_text_end"),
)


def _entry_code(symbols: object) -> tuple[int, int]:
    """[start, end) of the 64-bit syscall entry code."""
    start = symbols["entry_SYSCALL_64"]  # type: ignore[index]
    end = symbols.get("entry_SYSRETQ_end")  # type: ignore[attr-defined]
    if end is None:
        names, addresses = symbols.names, symbols.addresses  # type: ignore[attr-defined]
        i = addresses.index(start)
        while i < len(names) and names[i].startswith("entry_SYSCALL_64"):
            i += 1
        end = addresses[i] if i < len(addresses) else start
    if not 0 < end - start <= _MAX_ENTRY_CODE:
        raise ValidationError(f"the syscall entry code has an implausible size ({end - start})")
    return start, end


@check("syscall_entry", "entry_SYSCALL_64 branches only into entry and noinstr text")
def run(kernel: object) -> Iterator[Finding]:
    """The entry code decoded instruction by instruction (:mod:`sgmonitor.kernel.insn`)."""
    symbols = kernel.symbols  # type: ignore[attr-defined]
    code = KernelCode(kernel)
    allowed = [
        (symbols[lo], symbols[hi]) for lo, hi in _SECTIONS if lo in symbols and hi in symbols
    ] or [(code.stext, code.etext)]
    start, end = _entry_code(symbols)
    for branch in branches(kernel.memory.read(start, end - start), start):  # type: ignore[attr-defined]
        if any(lo <= branch.target < hi for lo, hi in allowed):
            continue
        where = code.describe(branch.address)
        yield branch_finding("syscall_entry", code, branch, where, "entry or noinstr kernel text")
