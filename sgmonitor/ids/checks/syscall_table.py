"""System-call table: every ``sys_call_table`` entry must be a system call's own handler.

Each entry must point exactly at a ``__x64_sys_*`` function (or ``sys_ni_syscall``) in
core kernel text (``_stext`` .. ``_etext``), and no handler may serve two numbers (a
hook that reuses another call's handler). Debian's 6.1 kernels dispatch through
``x64_sys_call()`` (a 2024 hardening backport), so a table hook may be inert there, yet it
is still a sign of compromise (Volatility's ``check_syscall`` looks at the table only).
The table's end is the next kallsyms symbol; zero slots there are alignment padding.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.ids.code import NOT_IMPLEMENTED, KernelCode, sys_call_table, syscall_handler
from sgmonitor.ids.registry import Finding, check


@check("syscall_table", "sys_call_table entries point to their own handlers in kernel text")
def run(kernel: object) -> Iterator[Finding]:
    """``sys_call_t sys_call_table[]`` read whole, each entry resolved with kallsyms."""
    entries = sys_call_table(kernel)
    code = KernelCode(kernel)
    owner: dict[str, int] = {}
    for nr, target in enumerate(entries):
        name = code.symbol_at(target)
        if not syscall_handler(name):
            yield Finding(
                "syscall_table",
                "critical",
                f"system call {nr} points to {code.describe(target)}",
                symbol=f"sys_call_table[{nr}]",
                address=target,
                expected="a __x64_sys_* handler in core kernel text",
                found=code.describe(target),
            )
        elif name not in NOT_IMPLEMENTED:
            if name in owner:
                yield Finding(
                    "syscall_table",
                    "critical",
                    f"system call {nr} points to the handler of system call {owner[name]}",
                    symbol=f"sys_call_table[{nr}]",
                    address=target,
                    expected=f"its own handler, not {name}",
                    found=name,
                )
            else:
                owner[name] = nr
