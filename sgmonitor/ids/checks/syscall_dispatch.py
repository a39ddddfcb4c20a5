"""System-call dispatch: every call and jump in ``x64_sys_call()`` goes to a handler.

Debian's 6.1 kernels (and mainline since 6.9) dispatch system calls through
``x64_sys_call()``, a ``switch`` on the number that the compiler turns into a tree of
compares ending in direct calls or tail jumps to ``__x64_sys_*``. A table hook is inert
there (see ``syscall_table``); a rootkit that wants its hook to run rewrites one of those
rel32 branches instead. So every branch that leaves the function must land exactly on a
system-call handler in core kernel text, and every handler of ``sys_call_table`` must
still be reached: the handlers no branch reaches any more name the hooked system calls.
Kernels without ``x64_sys_call`` dispatch through the table and have nothing to check here.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.errors import ValidationError
from sgmonitor.ids.code import (
    NOT_IMPLEMENTED,
    KernelCode,
    branch_finding,
    sys_call_table,
    syscall_handler,
)
from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.insn import branches

_MAX_FUNCTION = 1 << 16


def _table_handlers(kernel: object, code: KernelCode) -> dict[str, int]:
    """handler name -> the first system call number whose table entry holds it."""
    handlers: dict[str, int] = {}
    for nr, target in enumerate(sys_call_table(kernel)):
        name = code.symbol_at(target)
        if syscall_handler(name) and name not in NOT_IMPLEMENTED:
            handlers.setdefault(name, nr)
    return handlers


@check("syscall_dispatch", "x64_sys_call's calls and jumps go to system-call handlers")
def run(kernel: object) -> Iterator[Finding]:
    """``x64_sys_call`` decoded instruction by instruction (:mod:`sgmonitor.kernel.insn`)."""
    symbols = kernel.symbols  # type: ignore[attr-defined]
    start = symbols.get("x64_sys_call")
    if start is None:
        return
    found = symbols.lookup_size_offset(start)
    if found is None or not 0 < found[1] <= _MAX_FUNCTION:
        raise ValidationError("x64_sys_call has no plausible size in kallsyms")
    size = found[1]
    code = KernelCode(kernel)
    reached: set[str] = set()
    foreign = []
    body = kernel.memory.read(start, size)  # type: ignore[attr-defined]
    for branch in branches(body, start):
        if start <= branch.target < start + size:
            continue
        name = code.symbol_at(branch.target)
        if branch.kind != "jcc" and syscall_handler(name):
            reached.add(name)
        else:
            foreign.append(branch)
    missing = [
        f"{name.removeprefix('__x64_sys_')} ({nr})"
        for name, nr in sorted(_table_handlers(kernel, code).items(), key=lambda item: item[1])
        if name not in reached
    ]
    unreached = f"; not dispatched any more: {', '.join(missing)}" if missing else ""
    for branch in foreign:
        where = f"x64_sys_call+{branch.address - start:#x}"
        expected = "a __x64_sys_* handler in core kernel text"
        yield branch_finding("syscall_dispatch", code, branch, where, expected, unreached)
    if missing and not foreign:
        yield Finding(
            "syscall_dispatch",
            "high",
            f"x64_sys_call reaches no handler for {', '.join(missing)}",
            symbol="x64_sys_call",
            expected="a branch to every handler in sys_call_table",
            found=f"none to {', '.join(missing)}",
        )
