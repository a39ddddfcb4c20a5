"""The guest kernel as IDS code sees it: symbols, types and typed objects.

Built from the guest alone (vmcoreinfo -> KASLR slide -> in-memory kallsyms -> BTF
between ``__start_BTF`` and ``__stop_BTF``), so a QMP socket is all an operator needs.
A careful operator can add the vendor ``vmlinux`` (its BTF must equal the guest's) or
pin the BTF's SHA-256, so a compromised guest cannot feed false types.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from sgmonitor.errors import GuestDataError
from sgmonitor.kernel.address_space import AddressSpace
from sgmonitor.kernel.btf import Btf, BtfError
from sgmonitor.kernel.objects import Object, TypedMemory
from sgmonitor.kernel.vmcoreinfo import Vmcoreinfo

# The C declarations of globals an IDS commonly starts from (BTF has no VAR records
# for ordinary globals, only per-CPU ones), as the kernel headers declare them.
GLOBAL_TYPES = {
    "init_task": "struct task_struct",  # include/linux/sched/task.h
    "init_uts_ns": "struct uts_namespace",  # include/linux/utsname.h
    "init_pid_ns": "struct pid_namespace",  # include/linux/pid_namespace.h
    "modules": "struct list_head",  # kernel/module/internal.h
    "init_mm": "struct mm_struct",  # include/linux/mm_types.h
}

# The in-memory BTF of a distribution kernel is a few MB; refuse absurd claims.
MAX_BTF_BYTES = 64 << 20


class SymbolTable(Protocol):
    """Name -> address for the running kernel (KASLR already applied)."""

    def lookup(self, name: str) -> int: ...


class BtfMismatch(GuestDataError):
    """The guest's BTF differs from the vendor's: refuse to trust its types."""


class Kernel:
    """Typed access to one running guest kernel.

    ``kernel.object("init_task")`` is a ``struct task_struct`` object;
    ``kernel.object("jiffies", "unsigned long")`` names the type where BTF can't.
    """

    def __init__(
        self,
        memory: AddressSpace,
        btf: Btf,
        symbols: SymbolTable,
        vmcoreinfo: Vmcoreinfo | None = None,
    ) -> None:
        self.memory = memory
        self.btf = btf
        self.symbols = symbols
        self.vmcoreinfo = vmcoreinfo
        self.types = TypedMemory(btf, memory)

    def object(self, name: str, type_name: str | None = None) -> Object:
        """The global ``name`` as a typed object (a reference: nothing read yet)."""
        spelled = type_name or GLOBAL_TYPES.get(name) or self._btf_var_type(name)
        return self.types.object(spelled, self.symbols.lookup(name))

    symbol_object = object

    def _btf_var_type(self, name: str) -> int:
        try:
            return self.btf.variable_type(name)
        except BtfError:
            raise LookupError(
                f"no type known for {name!r}: name it, e.g. object({name!r}, 'unsigned long')"
            ) from None

    def cast(self, type_name: str, value: Object | int) -> Object:
        return self.types.cast(type_name, value)

    def container_of(self, ptr: Object | int, type_name: str, member: str) -> Object:
        return self.types.container_of(ptr, type_name, member)


def btf_from_guest(memory: AddressSpace, symbols: SymbolTable) -> bytes:
    """The raw BTF blob between ``__start_BTF`` and ``__stop_BTF`` in guest memory."""
    start, stop = symbols.lookup("__start_BTF"), symbols.lookup("__stop_BTF")
    if not 0 < stop - start <= MAX_BTF_BYTES:
        raise GuestDataError(f"implausible BTF bounds {start:#x}..{stop:#x}")
    return memory.read(start, stop - start)


def check_btf(
    raw: bytes, *, vendor_vmlinux: Path | None = None, pinned_sha256: str | None = None
) -> None:
    """Refuse guest BTF that differs from the vendor's or from a pinned hash."""
    digest = hashlib.sha256(raw).hexdigest()
    if pinned_sha256 is not None and digest != pinned_sha256.lower():
        raise BtfMismatch(f"guest BTF sha256 {digest} is not the pinned {pinned_sha256}")
    if vendor_vmlinux is not None:
        vendor = Btf.from_vmlinux(vendor_vmlinux).raw
        if vendor != raw:
            raise BtfMismatch(
                f"guest BTF (sha256 {digest}) differs from {vendor_vmlinux} "
                f"(sha256 {hashlib.sha256(vendor).hexdigest()}): refusing its types"
            )
