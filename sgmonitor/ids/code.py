"""Who owns a code address: core kernel text, a listed module, a hidden one, or nothing.

The checks of control flow (system calls, the IDT, ftrace, kprobes) all ask the same of
each pointer they find, as ``kernel_text_address()`` (kernel/extable.c) does: is it in
the kernel's own text, and if not, in which module? The answer goes into the finding's
evidence, so an operator reads ``sgm_rootkit+0x1a0 (hidden module)``, not an address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

from sgmonitor.errors import ValidationError
from sgmonitor.ids.registry import Finding
from sgmonitor.kernel.helpers.module import (
    for_each_mod_tree_module,
    for_each_module,
    module_address_regions,
    module_name,
)
from sgmonitor.kernel.insn import Branch

__all__ = ["NOT_IMPLEMENTED", "KernelCode", "branch_finding", "sys_call_table", "syscall_handler"]

# What unused system-call numbers point to (the name changed with the pt_regs wrappers).
NOT_IMPLEMENTED = ("sys_ni_syscall", "__x64_sys_ni_syscall")


def syscall_handler(name: str | None) -> TypeGuard[str]:
    """Whether ``name`` is a 64-bit system call's handler (or the not-implemented one)."""
    return name is not None and (name.startswith("__x64_sys_") or name in NOT_IMPLEMENTED)


_MAX_SYSCALLS = 4096


def sys_call_table(kernel: object) -> list[int]:
    """``sys_call_table[]`` read whole: one handler address per system call number. Its
    end is the next kallsyms symbol; zero slots there are alignment padding.

    :raises ValidationError: no sizeable table (kallsyms is needed to find its end)
    """
    symbols = kernel.symbols  # type: ignore[attr-defined]
    if not hasattr(symbols, "lookup_size_offset"):
        raise ValidationError("the symbol source cannot map addresses to names (kallsyms)")
    table = symbols["sys_call_table"]
    found = symbols.lookup_size_offset(table)
    count = found[1] // 8 if found is not None and found[2] == 0 else 0
    if not 0 < count <= _MAX_SYSCALLS:
        raise ValidationError(f"sys_call_table has an implausible size ({count} entries)")
    raw = kernel.memory.read(table, count * 8)  # type: ignore[attr-defined]
    entries = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
    while entries and entries[-1] == 0:  # alignment padding after the last entry
        entries.pop()
    return entries


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

    def _region_at(self, address: int) -> _Region | None:
        return next((r for r in self._regions if r.start <= address < r.end), None)

    def module_at(self, address: int) -> tuple[str, bool] | None:
        """(name, hidden) of the module whose memory holds ``address``, or None."""
        region = self._region_at(address)
        return None if region is None else (region.module, region.hidden)

    def function_at(self, address: int) -> str | None:
        """The name of the core-text function holding ``address`` (``kallsyms_lookup``),
        or None outside core text."""
        if not self.core_kernel_text(address):
            return None
        found = self.symbols.lookup(address)
        return found[0].name if found is not None else None

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
        region = self._region_at(address)
        if region is not None:
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
