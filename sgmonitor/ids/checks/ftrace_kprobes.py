"""Ftrace and kprobes: callbacks that run at kernel functions, from outside the kernel.

Registering an ftrace op (``register_ftrace_function``) or a kprobe is the clean way to
hook any kernel function, with no text to patch by hand: rootkits such as Reptile and
Diamorphine's descendants hook system calls this way (an ftrace op with IPMODIFY
redirects the call). The kernel's own users (function tracing, kprobe events, BPF,
livepatch) have their callbacks in core kernel text; a callback anywhere else, in a
module, is a hook a module placed, and in a hidden module or in no module at all, a
rootkit's. Each finding names the functions the hook is attached to.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.ids.code import KernelCode
from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.ftrace import (
    for_each_ftrace_op,
    for_each_kprobe,
    ftrace_hash_ips,
    kprobe_handlers,
)


def _severity(code: KernelCode, address: int) -> str:
    owner = code.module_at(address)
    return "high" if owner is not None and not owner[1] else "critical"


@check("ftrace_kprobes", "ftrace ops and kprobes whose handlers lie outside core kernel text")
def run(kernel: object) -> Iterator[Finding]:
    """``struct ftrace_ops`` on ``ftrace_ops_list`` and ``struct kprobe`` on
    ``kprobe_table``; each handler resolved to its owner."""
    code = KernelCode(kernel)
    for op in for_each_ftrace_op(kernel):  # type: ignore[arg-type]
        callbacks = {int(op.func), int(op.saved_func)} - {0}
        foreign = sorted(a for a in callbacks if not code.core_kernel_text(a))
        if not foreign:
            continue
        ips = ftrace_hash_ips(op.func_hash.filter_hash) if int(op.func_hash) else []
        targets = ", ".join(code.describe(ip) for ip in sorted(ips)) or "every function"
        for callback in foreign:
            yield Finding(
                "ftrace_kprobes",
                _severity(code, callback),
                f"ftrace op {int(op):#x} runs {code.describe(callback)} at {targets}",
                symbol=targets,
                address=callback,
                expected="an ftrace callback in core kernel text",
                found=code.describe(callback),
            )
    for probe in for_each_kprobe(kernel):  # type: ignore[arg-type]
        where = code.describe(int(probe.addr))
        for name, handler in kprobe_handlers(kernel, probe).items():  # type: ignore[arg-type]
            if code.core_kernel_text(handler):
                continue
            yield Finding(
                "ftrace_kprobes",
                _severity(code, handler),
                f"kprobe at {where} runs {code.describe(handler)} ({name})",
                symbol=where,
                address=handler,
                expected=f"a kprobe {name} in core kernel text",
                found=code.describe(handler),
            )
