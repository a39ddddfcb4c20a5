"""The guest kernel as IDS code sees it: symbols, types and typed objects.

Built from the guest alone (vmcoreinfo -> KASLR slide -> in-memory kallsyms -> BTF
between ``__start_BTF`` and ``__stop_BTF``), so a QMP socket is all an operator needs.
A careful operator can add the vendor ``vmlinux`` (its BTF must equal the guest's) or
pin the BTF's SHA-256, so a compromised guest cannot feed false types.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from sgmonitor.errors import GuestDataError
from sgmonitor.kernel.address_space import AddressSpace
from sgmonitor.kernel.btf import Btf, BtfError
from sgmonitor.kernel.kallsyms import VmlinuxFile, genuine_vmcoreinfo
from sgmonitor.kernel.objects import Object, TypedMemory
from sgmonitor.kernel.vmcoreinfo import Vmcoreinfo, VmcoreinfoNote, parse_vmcoreinfo_note

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
    """Name -> address for the running kernel (KASLR already applied); KeyError if none."""

    def __getitem__(self, name: str) -> int: ...


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
        vendor_image: AddressSpace | None = None,
    ) -> None:
        self.memory = memory
        self.btf = btf
        self.symbols = symbols
        self.vmcoreinfo = vmcoreinfo
        self.types = TypedMemory(btf, memory)
        # The vendor's vmlinux at its link addresses (its BTF is the guest's), if given.
        self.vendor_image = vendor_image
        # Core kernel text as the kernel_text check first read it from this kernel: the
        # baseline it compares with when there is no vendor image.
        self.text_baseline: bytes | None = None

    def object(self, name: str, type_name: str | None = None) -> Object:
        """The global ``name`` as a typed object (a reference: nothing read yet)."""
        spelled = type_name or GLOBAL_TYPES.get(name) or self._btf_var_type(name)
        return self.types.object(spelled, self._address(name))

    def _address(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise LookupError(f"the guest kernel has no symbol {name!r}") from None

    def _btf_var_type(self, name: str) -> int:
        try:
            return self.btf.variable_type(name)
        except BtfError:
            raise LookupError(
                f"no type known for {name!r}: name it, e.g. object({name!r}, 'unsigned long')"
            ) from None

    def constant(self, name: str) -> int:
        """The value of the enumerator ``name`` from BTF (``constant("PIDTYPE_TGID")``).

        Enumerators are the one kind of kernel constant BTF keeps (``#define``s are lost);
        LookupError when ``name`` is no enumerator of this kernel.
        """
        try:
            return self.btf.enumerator_value(name)
        except KeyError:
            raise LookupError(f"the guest kernel's BTF has no enumerator {name!r}") from None

    def cast(self, type_name: str, value: Object | int) -> Object:
        return self.types.cast(type_name, value)

    def container_of(self, ptr: Object | int, type_name: str, member: str) -> Object:
        return self.types.container_of(ptr, type_name, member)


def btf_from_guest(memory: AddressSpace, symbols: SymbolTable) -> bytes:
    """The raw BTF blob between ``__start_BTF`` and ``__stop_BTF`` in guest memory."""
    start, stop = symbols["__start_BTF"], symbols["__stop_BTF"]
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


class SystemMap:
    """Symbols from a ``System.map`` file, moved by the guest's KASLR slide."""

    def __init__(self, text: str, slide: int) -> None:
        self._addresses: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if len(fields) < 3:
                continue
            try:
                address = int(fields[0], 16)
            except ValueError:
                raise ValueError(f"System.map line {number} is not 'ADDRESS TYPE NAME'") from None
            self._addresses.setdefault(fields[2], address + slide)
        if not self._addresses:
            raise ValueError("System.map names no symbols (Debian's packaged one is a dummy)")

    def __getitem__(self, name: str) -> int:
        return self._addresses[name]


def open_kernel(
    memory: AddressSpace,
    vmcoreinfo_notes: Iterable[bytes],
    *,
    vendor_vmlinux: Path | None = None,
    system_map: Path | None = None,
    btf_sha256: str | None = None,
) -> Kernel:
    """Bootstrap a :class:`Kernel` from the guest alone.

    ``vmcoreinfo_notes`` are the VMCOREINFO ELF notes found in guest RAM (a hostile
    guest can plant fakes: the one the kernel's own ``vmcoreinfo_note`` points at wins,
    see :func:`genuine_vmcoreinfo`); its KASLR slide and SYMBOLs lead to the in-memory
    kallsyms, which give ``__start_BTF``/``__stop_BTF``. Optional: a vendor ``vmlinux``
    whose BTF the guest's must equal, a BTF hash to pin, a ``System.map`` whose
    symbols must agree with kallsyms on the vmcoreinfo symbols and are then used.
    """
    chosen, kallsyms = genuine_vmcoreinfo(_candidates(vmcoreinfo_notes), memory)
    symbols: SymbolTable = kallsyms
    if system_map is not None:
        symbols = _checked_system_map(system_map, chosen.info, kallsyms)
    raw = btf_from_guest(memory, symbols)
    check_btf(raw, vendor_vmlinux=vendor_vmlinux, pinned_sha256=btf_sha256)
    image = VmlinuxFile(str(vendor_vmlinux)) if vendor_vmlinux is not None else None
    return Kernel(memory, Btf(raw), symbols, chosen.info, image)


def _candidates(notes: Iterable[bytes]) -> Iterator[VmcoreinfoNote]:
    """The notes that parse, as they come (a malformed candidate is just not it)."""
    for note in notes:
        with contextlib.suppress(GuestDataError):
            yield VmcoreinfoNote(0, note, parse_vmcoreinfo_note(note))


def _checked_system_map(path: Path, info: Vmcoreinfo, kallsyms: SymbolTable) -> SystemMap:
    system_map = SystemMap(path.read_text(), info.kernel_offset or 0)
    for name in ("_stext", "init_task", "__start_BTF", "__stop_BTF", "linux_banner"):
        try:
            theirs = kallsyms[name]
        except KeyError:
            continue
        if system_map[name] != theirs:
            raise GuestDataError(
                f"{path} puts {name} at {system_map[name]:#x}, the guest at {theirs:#x}: "
                "not this kernel's System.map"
            )
    return system_map
