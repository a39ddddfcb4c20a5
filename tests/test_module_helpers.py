"""rbtree, module and per-CPU helpers: on synthetic trees (good ones, and the corruptions a
hostile guest can make: a cycle, a wild pointer, a chain too deep), each corruption ending
in ValidationError, never a hang; then on a real lab guest, against what its /init did
(it loads qemu_fw_cfg) and its own process list."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from guests import MAIN, GuestUnderTest, only
from synthetic_memory import PageMemory, vendor_btf

from sgmonitor.errors import PageFault, ValidationError
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.kernel.helpers import module as module_helpers
from sgmonitor.kernel.helpers import percpu as percpu_helpers
from sgmonitor.kernel.helpers import rbtree as rbtree_helpers
from sgmonitor.kernel.helpers.module import (
    address_to_module,
    find_module,
    for_each_mod_tree_module,
    for_each_module,
    module_address_regions,
    module_name,
)
from sgmonitor.kernel.helpers.percpu import (
    cpu_curr,
    cpu_rq,
    for_each_online_cpu,
    for_each_runqueue_task,
    nr_cpu_ids,
    per_cpu_ptr,
)
from sgmonitor.kernel.helpers.rbtree import (
    latch_tree_for_each,
    rb_first,
    rb_next,
    rb_parent,
    rbtree_inorder_for_each,
    rbtree_inorder_for_each_entry,
)
from sgmonitor.kernel.kernel import Kernel
from sgmonitor.kernel.objects import Object, TypedMemory
from sgmonitor.lab import machine
from sgmonitor.traditional import open_guest_kernel

BASE = 0xFFFF888002000000
ROOT = BASE
UNMAPPED = 0xFFFF8880DEAD0000
STRIDE = 0x400  # one struct sched_entity (256 bytes) per entry
RB_RED = 0  # colour bits of __rb_parent_color (lib/rbtree.c): red 0, black 1
RB_BLACK = 1


class Trees:
    """Entries are ``struct sched_entity`` (real layout) linked through ``run_node``;
    entry ``i`` has ``vruntime == i``."""

    def __init__(self, memory: object | None = None) -> None:
        self.mem = PageMemory()
        self.tm = TypedMemory(vendor_btf(), memory or self.mem)
        self.pc_off, self.right_off, self.left_off = (
            self.tm.offsetof("struct rb_node", m)
            for m in ("__rb_parent_color", "rb_right", "rb_left")
        )
        self.run_node_off = self.tm.offsetof("struct sched_entity", "run_node")

    def entry(self, i: int) -> int:
        return BASE + (i + 1) * STRIDE

    def node(self, i: int) -> int:
        return self.entry(i) + self.run_node_off

    def set(self, node: int, parent: int, left: int, right: int, colour: int = RB_BLACK) -> None:
        self.mem.write(node + self.pc_off, struct.pack("<Q", parent | colour))
        self.mem.write(node + self.left_off, struct.pack("<Q", left))
        self.mem.write(node + self.right_off, struct.pack("<Q", right))

    def set_root(self, top: int, root: int = ROOT) -> Object:
        self.mem.write(root, struct.pack("<Q", top))
        return self.tm.value("struct rb_root *", root)

    def build(self, nodes: list[int], parent: int = 0, depth: int = 0) -> int:
        """A balanced tree over ``nodes`` (in order); colours alternate by depth, so the
        walk must mask them. Returns the subtree's top node, 0 for none."""
        if not nodes:
            return 0
        mid = len(nodes) // 2
        top = nodes[mid]
        left = self.build(nodes[:mid], top, depth + 1)
        right = self.build(nodes[mid + 1 :], top, depth + 1)
        self.set(top, parent, left, right, RB_RED if depth % 2 else RB_BLACK)
        return top

    def tree(self, count: int) -> Object:
        """A well-formed tree of ``count`` entries headed at ROOT."""
        vruntime = self.tm.offsetof("struct sched_entity", "vruntime")
        for i in range(count):
            self.mem.write(self.entry(i) + vruntime, struct.pack("<Q", i))
        return self.set_root(self.build([self.node(i) for i in range(count)]))


@pytest.fixture
def trees() -> Trees:
    return Trees()


@pytest.mark.parametrize("module", [rbtree_helpers, module_helpers, percpu_helpers])
def test_all_is_sorted(module: object) -> None:
    names = list(module.__all__)  # type: ignore[attr-defined]
    assert names == sorted(names)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 10, 31])
def test_inorder_walk(trees: Trees, count: int) -> None:
    root = trees.tree(count)
    expected = [trees.node(i) for i in range(count)]
    assert [int(n) for n in rbtree_inorder_for_each(root)] == expected
    entries = rbtree_inorder_for_each_entry("struct sched_entity", root, "run_node")
    assert [int(se.vruntime) for se in entries] == list(range(count))
    # rb_first/rb_next give the same order, one step at a time.
    stepped, node = [], rb_first(root)
    while node is not None:
        stepped.append(int(node))
        node = rb_next(node)
    assert stepped == expected
    top = expected[count // 2]  # build() puts the middle node on top
    assert int(rb_parent(trees.tm.value("struct rb_node *", top))) == 0
    for i in range(count):
        up = int(rb_parent(trees.tm.value("struct rb_node *", expected[i])))
        assert up == 0 if expected[i] == top else up in expected
    # The root may also be given as the struct rb_root object itself.
    assert len(list(rbtree_inorder_for_each(trees.tm.object("struct rb_root", ROOT)))) == count


def test_empty_tree(trees: Trees) -> None:
    root = trees.tree(0)
    assert list(rbtree_inorder_for_each(root)) == []
    assert rb_first(root) is None


def test_empty_node_has_no_next(trees: Trees) -> None:
    node = trees.node(0)
    trees.mem.write(node + trees.pc_off, struct.pack("<Q", node))  # RB_CLEAR_NODE
    assert rb_next(trees.tm.value("struct rb_node *", node)) is None


def test_limit(trees: Trees) -> None:
    root = trees.tree(15)
    assert len(list(rbtree_inorder_for_each(root, limit=15))) == 15
    with pytest.raises(ValidationError, match="more than 14 nodes"):
        list(rbtree_inorder_for_each(root, limit=14))


def test_cycle_back_to_the_root(trees: Trees) -> None:
    root = trees.tree(7)  # node 3 on top; node 6 is the last leaf
    trees.set(trees.node(6), trees.node(5), 0, trees.node(3))
    with pytest.raises(ValidationError, match="broken link") as info:
        list(rbtree_inorder_for_each(root))
    assert f"{trees.node(3):#x}" in str(info.value)
    with pytest.raises(ValidationError, match="broken link"):
        rb_next(trees.tm.value("struct rb_node *", trees.node(6)))


def test_child_that_does_not_name_its_parent(trees: Trees) -> None:
    root = trees.tree(7)
    trees.set(trees.node(4), trees.node(1), 0, 0)  # its parent is node 5
    with pytest.raises(ValidationError, match="broken link"):
        list(rbtree_inorder_for_each(root))


def test_same_child_twice(trees: Trees) -> None:
    root = trees.tree(3)
    trees.set(trees.node(1), 0, trees.node(0), trees.node(0))
    with pytest.raises(ValidationError, match="both children"):
        list(rbtree_inorder_for_each(root))


def test_root_with_a_parent(trees: Trees) -> None:
    root = trees.tree(3)
    trees.set(trees.node(1), trees.node(0), trees.node(0), trees.node(2))
    with pytest.raises(ValidationError, match="expected NULL"):
        list(rbtree_inorder_for_each(root))


def test_cycle_with_consistent_parents_ends_by_depth() -> None:
    """A guest that rewrites every parent link to agree with the walk (simulated by a
    lying memory): no visited set, yet the depth bound ends it."""

    class Lying:
        last = 0

        def read(self, address: int, size: int) -> bytes:
            data = bytearray(lying.mem.read(address, size))
            if size == 24 and address in (lying.node(0), lying.node(1)):
                data[lying.pc_off : lying.pc_off + 8] = struct.pack("<Q", Lying.last)
                Lying.last = address
            return bytes(data)

    lying = Trees(Lying())
    lying.set(lying.node(0), 0, 0, lying.node(1))
    lying.set(lying.node(1), lying.node(0), 0, lying.node(0))  # and back
    root = lying.set_root(lying.node(0))
    seen = []
    with pytest.raises(ValidationError, match="deeper than 41"):
        seen.extend(rbtree_inorder_for_each(root))
    assert len(seen) < 50


def test_wild_pointer(trees: Trees) -> None:
    root = trees.tree(3)
    trees.set(trees.node(2), trees.node(1), UNMAPPED, 0)
    nodes = []
    with pytest.raises(ValidationError, match=f"{UNMAPPED:#x}") as info:
        nodes.extend(int(n) for n in rbtree_inorder_for_each(root))
    assert isinstance(info.value.__cause__, PageFault)
    assert nodes == [trees.node(0), trees.node(1)]  # yielded before the bad link
    with pytest.raises(ValidationError, match="unreadable"):
        list(rbtree_inorder_for_each(trees.tm.value("struct rb_root *", UNMAPPED)))
    trees.set_root(UNMAPPED)
    with pytest.raises(ValidationError, match="unreadable"):
        rb_first(root)


def test_too_deep_chain(trees: Trees) -> None:
    """A well-linked chain of right children: a list, not a red-black tree."""
    count = 100
    for i in range(count):
        parent = trees.node(i - 1) if i else 0
        trees.set(trees.node(i), parent, 0, trees.node(i + 1) if i + 1 < count else 0)
    root = trees.set_root(trees.node(0))
    with pytest.raises(ValidationError, match="deeper than 41"):
        list(rbtree_inorder_for_each(root))
    with pytest.raises(ValidationError, match="deeper than 11"):
        list(rbtree_inorder_for_each(root, limit=63))
    # A chain of left children stops rb_first too.
    for i in range(count):
        parent = trees.node(i - 1) if i else 0
        trees.set(trees.node(i), parent, trees.node(i + 1) if i + 1 < count else 0, 0)
    with pytest.raises(ValidationError, match="deeper than"):
        rb_first(root)


def test_latch_tree(trees: Trees) -> None:
    """Both copies hold the same nodes in different shapes; the reader's copy is
    ``seq & 1``."""
    tm = trees.tm
    node_off = tm.offsetof("struct latch_tree_node", "node")
    rb_size = tm.sizeof("struct rb_node")
    latches = [BASE + 0x100000 + i * 0x100 for i in range(6)]
    root_addr = BASE + 0x200000
    tree_off = tm.offsetof("struct latch_tree_root", "tree")
    trees.set_root(trees.build([n + node_off for n in latches]), root_addr + tree_off)
    chain = [n + node_off + rb_size for n in latches]  # copy 1: a chain of left children
    trees.set(chain[0], chain[1], 0, 0)
    for i in range(1, 5):
        trees.set(chain[i], chain[i + 1], chain[i - 1], 0)
    trees.set(chain[5], 0, chain[4], 0)
    trees.set_root(chain[5], root_addr + tree_off + tm.sizeof("struct rb_root"))
    seq_off = tm.offsetof("struct latch_tree_root", "seq")
    root = tm.value("struct latch_tree_root *", root_addr)
    assert [int(n) for n in latch_tree_for_each(root, 0)] == latches
    assert [int(n) for n in latch_tree_for_each(root, 1, limit=6)] == latches
    with pytest.raises(ValidationError, match="deeper than 3"):
        list(latch_tree_for_each(root, 1, limit=3))  # 5 deep: not for 3 nodes
    trees.mem.write(root_addr + seq_off, struct.pack("<I", 2))
    assert [int(n) for n in latch_tree_for_each(root, limit=6)] == latches  # copy 0
    trees.mem.write(root_addr + seq_off, struct.pack("<I", 3))
    with pytest.raises(ValidationError, match="deeper than 3"):
        list(latch_tree_for_each(root, limit=3))  # copy 1
    with pytest.raises(ValueError):
        list(latch_tree_for_each(root, 2))


class Runqueues(Trees):
    """One synthetic CPU 0 (of ``nr_cpu_ids`` 3, CPUs 0 and 2 online): its ``struct rq``,
    tasks with ``pid`` i, and a task group entity whose own queue holds more tasks."""

    RQ = BASE + 0x400000
    TASKS = BASE + 0x800000
    GLOBALS = BASE + 0x300000
    PERCPU_RUNQUEUES = 0x2C000  # the symbol's per-CPU offset, as kallsyms gives it

    def __init__(self) -> None:
        super().__init__()
        tm = self.tm
        self.task_stride = (tm.sizeof("struct task_struct") + 0xFFF) & ~0xFFF
        symbols = {
            "nr_cpu_ids": self.GLOBALS,
            "__cpu_online_mask": self.GLOBALS + 0x100,
            "__per_cpu_offset": self.GLOBALS + 0x200,
            "runqueues": self.PERCPU_RUNQUEUES,
        }
        self.kernel = Kernel(self.mem, tm.btf, symbols)
        self.mem.write(self.GLOBALS, struct.pack("<I", 3))
        self.mem.write(self.GLOBALS + 0x100, struct.pack("<Q", 0b101))
        offset = self.RQ - self.PERCPU_RUNQUEUES
        self.mem.write(self.GLOBALS + 0x200, struct.pack("<QQQ", offset, 0, 0))
        self.mem.map(self.RQ, tm.sizeof("struct rq"))

    def task(self, pid: int) -> int:
        address = self.TASKS + pid * self.task_stride
        self.mem.write(
            address + self.tm.offsetof("struct task_struct", "pid"), struct.pack("<i", pid)
        )
        return address

    def run_node(self, se: int) -> int:
        return se + self.run_node_off

    def task_se(self, pid: int) -> int:
        return self.task(pid) + self.tm.offsetof("struct task_struct", "se")

    def queue(self, cfs_rq: int, entities: list[int]) -> None:
        """Queue ``entities`` (``struct sched_entity`` addresses) on ``cfs_rq`` in order."""
        root = cfs_rq + self.tm.offsetof("struct cfs_rq", "tasks_timeline")
        self.set_root(self.build([self.run_node(se) for se in entities]), root)

    def group(self, se: int, my_q: int) -> int:
        self.mem.write(
            se + self.tm.offsetof("struct sched_entity", "my_q"), struct.pack("<Q", my_q)
        )
        return se

    def rq_member(self, member: str) -> int:
        return self.RQ + self.tm.offsetof("struct rq", member)


def test_runqueue_tasks_through_a_group() -> None:
    rqs = Runqueues()
    rqs.mem.write(rqs.rq_member("curr"), struct.pack("<Q", rqs.task(7)))
    group_q = BASE + 0x600000
    group_se = rqs.group(BASE + 0x700000, group_q)
    rqs.queue(rqs.rq_member("cfs"), [rqs.task_se(1), group_se, rqs.task_se(2)])
    rqs.queue(group_q, [rqs.task_se(3), rqs.task_se(4), rqs.task_se(5)])
    k = rqs.kernel
    assert nr_cpu_ids(k) == 3 and list(for_each_online_cpu(k)) == [0, 2]
    assert int(cpu_rq(k, 0)) == rqs.RQ
    assert int(per_cpu_ptr(k, Runqueues.PERCPU_RUNQUEUES, 0)) == rqs.RQ
    assert int(cpu_curr(k, 0).pid) == 7
    assert [int(t.pid) for t in for_each_runqueue_task(k, 0)] == [7, 1, 3, 4, 5, 2]
    with pytest.raises(ValueError):
        cpu_rq(k, 3)
    # A group whose queue is its own parent's: a cycle through my_q.
    rqs.group(group_se, rqs.rq_member("cfs"))
    with pytest.raises(ValidationError, match="nest deeper"):
        list(for_each_runqueue_task(k, 0))
    # A hostile CPU count bounds nothing: it is refused.
    rqs.mem.write(Runqueues.GLOBALS, struct.pack("<I", 0))
    with pytest.raises(ValidationError, match="nr_cpu_ids"):
        list(for_each_online_cpu(k))


# -- on a real guest -------------------------------------------------------------------

FW_CFG = "qemu_fw_cfg"  # the module the lab's /init loads (sgmonitor/lab/initramfs.py)


@pytest.fixture(scope="module")
def kernel(guest: GuestUnderTest) -> Iterator[tuple[Kernel, machine.Truth]]:
    """The guest's kernel read in this process, held paused for the module's tests, and a
    truth block printed just before."""
    truth = machine.truth(guest.info, fresh=True)
    with QemuGuest(guest.info.qmp) as physical, physical.paused():
        yield open_guest_kernel(physical), truth


@pytest.mark.guest
@only(MAIN)
def test_modules_list_and_lookup(kernel: tuple[Kernel, machine.Truth]) -> None:
    k, _ = kernel
    names = [module_name(mod) for mod in for_each_module(k)]
    assert FW_CFG in names
    assert len(names) == len(set(names))
    mod = find_module(k, FW_CFG)
    assert mod is not None and module_name(mod) == FW_CFG
    assert find_module(k, "no_such_module") is None
    regions = module_address_regions(mod)
    assert regions and all(size > 0 for _, size in regions)
    base, size = regions[0]
    assert int(mod.core_layout.base) == base  # Debian 6.1: core_layout, then init_layout
    for address in (base, base + size // 2, base + size - 1):
        found = address_to_module(k, address)
        assert found is not None and int(found) == int(mod)
    beyond = address_to_module(k, base + size)
    assert beyond is None or int(beyond) != int(mod)
    assert address_to_module(k, k.symbols["schedule"]) is None
    assert address_to_module(k, k.symbols["init_task"]) is None


@pytest.mark.guest
@only(MAIN)
def test_mod_tree_holds_the_same_modules(kernel: tuple[Kernel, machine.Truth]) -> None:
    k, _ = kernel
    listed = {int(mod) for mod in for_each_module(k)}
    in_tree = [int(mod) for mod in for_each_mod_tree_module(k)]
    assert len(in_tree) == len(set(in_tree))
    assert set(in_tree) == listed
    root = k.object("mod_tree", "struct mod_tree_root").root
    copies = [[int(n) for n in latch_tree_for_each(root, i)] for i in (0, 1)]
    assert copies[0] and copies[0] == copies[1]


@pytest.mark.guest
@only(MAIN)
def test_cpus_and_runqueue(kernel: tuple[Kernel, machine.Truth]) -> None:
    k, truth = kernel
    assert nr_cpu_ids(k) >= 1
    assert list(for_each_online_cpu(k)) == [0]  # the lab's guest has one vCPU
    rq = cpu_rq(k, 0)
    assert int(rq.cpu) == 0
    assert int(per_cpu_ptr(k, k.symbols["runqueues"], 0)) == int(rq)
    curr = cpu_curr(k, 0)
    pids = {int(p["pid"]) for p in truth.processes} | {0}  # 0: the idle task, swapper/0
    assert int(curr.pid) in pids
    assert int(rq.idle.pid) == 0 and rq.idle.comm.string_() == "swapper/0"
    tasks = list(for_each_runqueue_task(k, 0))
    assert int(tasks[0]) == int(curr)
    assert all(int(t.pid) in pids for t in tasks)
    assert len({int(t) for t in tasks}) == len(tasks)
    with pytest.raises(ValueError):
        cpu_rq(k, nr_cpu_ids(k))
