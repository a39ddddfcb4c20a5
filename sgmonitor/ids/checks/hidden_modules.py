"""Hidden modules: a cross-view of the module list, ``mod_tree`` and sysfs's kobjects.

A loadable-module rootkit's first trick is ``list_del(&THIS_MODULE->list)``: ``lsmod``
and ``/proc/modules`` (which walk the list) no longer show it, while ``mod_tree`` (the
kernel's address lookup for module code) and the ``module`` kset (``/sys/module``) still
hold it. A module present in one view and missing from another is a finding
(Volatility's ``hidden_modules`` and ``check_modules``, without its symbol files).
"""

from __future__ import annotations

from collections.abc import Iterator

from sgmonitor.ids.registry import Finding, check
from sgmonitor.kernel.helpers.list import list_for_each_entry
from sgmonitor.kernel.helpers.module import (
    for_each_mod_tree_module,
    for_each_module,
    module_name,
)
from sgmonitor.kernel.objects import Object


def _kset_modules(kernel: object) -> dict[int, Object]:
    """``struct module *`` of each ``struct module_kobject`` on ``module_kset->list``
    that belongs to a loaded module (built-in parameters' kobjects have ``mod`` NULL)."""
    kset = kernel.object("module_kset", "struct kset *")  # type: ignore[attr-defined]
    out: dict[int, Object] = {}
    for kobj in list_for_each_entry("struct kobject", kset.list, "entry"):
        mk = kobj.memory_.container_of(kobj, "struct module_kobject", "kobj")
        if int(mk.mod):
            out[int(mk.mod)] = mk.mod
    return out


@check("hidden_modules", "cross-view of the module list, mod_tree and the module kset")
def run(kernel: object) -> Iterator[Finding]:
    """``struct module *`` from each view, compared by address."""
    listed = {int(m): m for m in for_each_module(kernel)}  # type: ignore[arg-type]
    views = {
        "mod_tree": {int(m): m for m in for_each_mod_tree_module(kernel)},  # type: ignore[arg-type]
        "module kset (/sys/module)": _kset_modules(kernel),
    }
    for view, modules in views.items():
        for address, mod in modules.items():
            if address not in listed:
                name = module_name(mod)
                yield Finding(
                    "hidden_modules",
                    "critical",
                    f"module {name} is in {view} but not on the module list",
                    module=name,
                    address=address,
                    expected="on the modules list (lsmod, /proc/modules)",
                    found=f"only in {view}",
                )
