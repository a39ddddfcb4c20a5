"""Who owns a code address: core kernel text, a listed module, a hidden one, or nothing.

The checks of control flow (system calls, the IDT, ftrace, kprobes) all ask the same of
each pointer they find, as ``kernel_text_address()`` (kernel/extable.c) does: is it in
the kernel's own text, and if not, in which module? The answer goes into the finding's
evidence, so an operator reads ``sgm_rootkit+0x1a0 (hidden module)``, not an address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

from sgmonitor.ids.registry import Finding
from sgmonitor.kernel.helpers.module import (
    for_each_mod_tree_module,
    for_each_module,
    module_address_regions,
    module_name,
)
from sgmonitor.kernel.insn import Branch

__all__ = ["NOT_IMPLEMENTED", "KernelCode", "branch_finding", "syscall_handler"]

# What unused system-call numbers point to (the name changed with the pt_regs wrappers).
NOT_IMPLEMENTED = ("sys_ni_syscall", "__x64_sys_ni_syscall")


def syscall_handler(name: str | None) -> TypeGuard[str]:
    """Whether ``name`` is a 64-bit system call's handler (or the not-implemented one)."""
    return name is not None and (name.startswith("__x64_sys_") or name in NOT_IMPLEMENTED)


@dataclass(frozen=True, order=True)
class _Region:
    start: int
    end: int
    module: str
    hidden: bool


class KernelCode:
    """Core kernel text (``_stext`` .. ``_etext``) and every module's memory, from the
    ``modules`` list and from ``mod_tree`` (a module only there is hidden), read once."""

    def __init__(self, kernel: object) -> None:
        symbols = kernel.symbols  # type: ignore[attr-defined]
        self.symbols = symbols
        self.stext, self.etext = symbols["_stext"], symbols["_etext"]
        listed = {int(m): m for m in for_each_module(kernel)}  # type: ignore[arg-type]
        in_tree = {int(m): m for m in for_each_mod_tree_module(kernel)}  # type: ignore[arg-type]
        self._regions = sorted(
            (_Region(start, start + size, module_name(mod), address not in listed))
            for address, mod in {**in_tree, **listed}.items()
            for start, size in module_address_regions(mod)
        )

    def core_kernel_text(self, address: int) -> bool:
        """Whether ``address`` is in the kernel image's text (``core_kernel_text()``)."""
        return bool(self.stext <= address < self.etext)

    def module_at(self, address: int) -> tuple[str, bool] | None:
        """(name, hidden) of the module whose memory holds ``address``, or None."""
        for region in self._regions:
            if region.start <= address < region.end:
                return region.module, region.hidden
        return None

    def symbol_at(self, address: int) -> str | None:
        """The name of the core-text function that starts exactly at ``address``."""
        if not self.core_kernel_text(address):
            return None
        found = self.symbols.lookup(address)
        return found[0].name if found is not None and found[1] == 0 else None

    def describe(self, address: int) -> str:
        """``symbol+offset`` in core text, ``module+offset (module)`` in a module's
        memory (``hidden module`` when only ``mod_tree`` has it), else the bare address."""
        if self.core_kernel_text(address):
            found = self.symbols.lookup(address)
            if found is not None:
                symbol, offset = found
                return symbol.name if offset == 0 else f"{symbol.name}+{offset:#x}"
        for region in self._regions:
            if region.start <= address < region.end:
                kind = "hidden module" if region.hidden else "module"
                return f"{region.module}+{address - region.start:#x} ({kind})"
        return f"{address:#x} (no kernel or module code)"


def branch_finding(
    check: str, code: KernelCode, branch: Branch, where: str, expected: str, more: str = ""
) -> Finding:
    """A finding for a branch at ``where`` that goes somewhere it must not."""
    goes = code.describe(branch.target)
    return Finding(
        check,
        "critical",
        f"{where}: {branch.kind} to {goes}{more}",
        symbol=where,
        address=branch.target,
        expected=expected,
        found=goes,
    )
