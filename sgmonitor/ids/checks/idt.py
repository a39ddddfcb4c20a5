"""Interrupt descriptor table: every gate leads to the kernel's own entry code.

``idt_table`` (256 ``gate_desc`` of 16 bytes, arch/x86/include/asm/desc_defs.h) is what
the CPU uses for exceptions, interrupts and ``int N``; Volatility's ``check_idt`` reads
it too. A present gate must be a kernel code-segment interrupt gate whose handler is an
entry stub in core kernel text: an ``asm_*`` function, or one of the per-vector stubs of
``irq_entries_start``/``spurious_entries_start`` (both in ``.irqentry.text``). Vectors
the kernel never set after boot keep their early handler, ``early_idt_handler_array``
plus 9 bytes a vector (in freed init text: harmless, since nothing raises them), which is
accepted as such. User space may raise only the vectors Linux opens to it (3: int3,
4: into, 0x80: int $0x80 emulation); another gate with DPL 3 is a backdoor.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator

from sgmonitor.ids.code import KernelCode
from sgmonitor.ids.registry import Finding, check

_GATE = struct.Struct("<HHHHII")  # offset_low, segment, bits, offset_middle, offset_high
_VECTORS = 256
_EARLY_IDT_HANDLER_SIZE = 9
_INTERRUPT_GATE = 0xE
_USER_VECTORS = (3, 4, 0x80)


def _entry_stub(kernel: object, code: KernelCode, target: int, vector: int) -> bool:
    symbols = kernel.symbols  # type: ignore[attr-defined]
    name = code.symbol_at(target)
    if name is not None and name.startswith("asm_"):
        return True
    lo, hi = symbols.get("__irqentry_text_start"), symbols.get("__irqentry_text_end")
    if lo is not None and hi is not None and lo <= target < hi and (target - lo) % 8 == 0:
        return True
    early = symbols.get("early_idt_handler_array")
    return early is not None and target == early + _EARLY_IDT_HANDLER_SIZE * vector


@check("idt", "IDT gates lead to the kernel's entry stubs")
def run(kernel: object) -> Iterator[Finding]:
    """``gate_desc idt_table[256]`` read whole, each gate's handler resolved."""
    code = KernelCode(kernel)
    raw = kernel.memory.read(kernel.symbols["idt_table"], _VECTORS * _GATE.size)  # type: ignore[attr-defined]
    gates = [_GATE.unpack_from(raw, vector * _GATE.size) for vector in range(_VECTORS)]
    # __KERNEL_CS is a #define (BTF does not keep it): the segment most gates use.
    segments = Counter(gate[1] for gate in gates if gate[2] & 0x8000)
    kernel_cs = max(segments, key=segments.__getitem__) if segments else 0
    for vector, (low, segment, bits, middle, high, _) in enumerate(gates):
        if not bits & 0x8000:  # not present
            continue
        target = low | middle << 16 | high << 32
        gate_type, dpl = (bits >> 8) & 0x1F, (bits >> 13) & 3
        problems = []
        if segment != kernel_cs or gate_type != _INTERRUPT_GATE:
            problems.append(f"segment {segment:#x} type {gate_type:#x}")
        if not _entry_stub(kernel, code, target, vector):
            problems.append(f"handler {code.describe(target)}")
        if dpl == 3 and vector not in _USER_VECTORS:
            problems.append("open to user space (DPL 3)")
        if problems:
            yield Finding(
                "idt",
                "critical",
                f"IDT vector {vector}: {', '.join(problems)}",
                symbol=f"idt_table[{vector}]",
                address=target,
                expected=f"a kernel interrupt gate (segment {kernel_cs:#x}) to an entry stub",
                found=code.describe(target),
            )
