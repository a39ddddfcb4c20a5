"""Module memory: code the module loader allocated that no module owns any more.

``hidden_modules`` compares the places that list modules; a rootkit that takes itself
out of all of them (the ``modules`` list, ``mod_tree``, the ``module`` kset) leaves its
code behind in the memory ``load_module()`` allocated for it, which it must keep to
keep running. Every vmalloc area (``vmap_area_list``, mm/vmalloc.c) records its
allocator in ``vm->caller``: an area allocated where the loader allocates module
memory (the caller of the areas that hold the known modules, or a function named as the
loader's) must hold a module from one of those lists. BPF programs, ftrace trampolines
and kprobe slots come from other callers and are not module memory.
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.ids.code import KernelCode
from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.list import list_for_each_entry

# Where module memory is allocated: load_module() (move_module() inlined) up to 6.3,
# module_memory_alloc() since (called by move_module()).
_LOADER = ("load_module", "move_module", "module_memory_alloc", "layout_and_allocate")


@check("module_memory", "module-loader memory that no listed or tree module owns")
def run(kernel: object) -> Iterator[Finding]:
    """``struct vmap_area`` on ``vmap_area_list``, each with its ``vm->caller``."""
    if "vmap_area_list" not in kernel.symbols:  # type: ignore[attr-defined]
        return  # 6.9+ keeps vmap areas per node (vmap_nodes): not read here yet
    code = KernelCode(kernel)
    head = kernel.object("vmap_area_list", "struct list_head")  # type: ignore[attr-defined]
    areas = []
    for va in list_for_each_entry("struct vmap_area", head, "list"):
        vm = va.vm.read_()
        if int(vm):
            areas.append((int(va.va_start), int(va.va_end), int(vm.caller)))
    loader = {caller for start, _, caller in areas if code.module_at(start) is not None}
    for start, end, caller in areas:
        if caller not in loader and code.function_at(caller) not in _LOADER:
            continue
        if code.module_at(start) is not None:
            continue
        yield Finding(
            "module_memory",
            "critical",
            f"{(end - start) // 1024} KiB of module memory at {start:#x} "
            f"(allocated by {code.describe(caller)}) belong to no module",
            address=start,
            expected="the memory of a module on the module list or in mod_tree",
            found=f"{start:#x}..{end:#x}, no module",
        )
