"""xarray.h / idr / pid helpers, for_each_thread, the walk guard, member designators and
BTF constants: on synthetic structures laid out with the vendor kernel's BTF (good ones,
and a cycle, a wild node, bad shifts and back links, which must end in ValidationError),
then on the real guest against its own view."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from guests import MAIN, GuestUnderTest, only
from synthetic_memory import PageMemory, vendor_btf

from sgmonitor.errors import GuestDataError, PageFault, ValidationError
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.guest.qmp import held_still
from sgmonitor.kernel.helpers import pid as pid_helpers
from sgmonitor.kernel.helpers import xarray as xarray_helpers
from sgmonitor.kernel.helpers.list import WalkGuard
from sgmonitor.kernel.helpers.pid import find_pid, find_task, for_each_pid, pid_task
from sgmonitor.kernel.helpers.sched import for_each_process, for_each_thread
from sgmonitor.kernel.helpers.xarray import (
    XA_RETRY_ENTRY,
    XA_ZERO_ENTRY,
    idr_find,
    idr_for_each,
    xa_for_each,
    xa_load,
)
from sgmonitor.kernel.kernel import Kernel
from sgmonitor.kernel.objects import DesignatorIndexError, Object, TypedMemory
from sgmonitor.lab import machine
from sgmonitor.traditional import open_guest_kernel

BASE = 0xFFFF888002000000
XA = BASE  # a struct idr, whose idr_rt (struct xarray) is at offset 0
NODES = BASE + 0x10000
UNMAPPED = 0xFFFF8880DEAD0000


def entry(i: int) -> int:
    """A plausible object pointer (aligned: not internal, not a value)."""
    return 0xFFFF888077000000 + i * 0x40


def mk_node(address: int) -> int:
    return address | 2  # xa_mk_node()


def mk_internal(v: int) -> int:
    return (v << 2) | 2


def mk_value(v: int) -> int:
    return (v << 1) | 1


class Synthetic:
    """Guest memory plus writers for the few structures the tests lay out."""

    def __init__(self) -> None:
        self.mem = PageMemory()
        self.tm = TypedMemory(vendor_btf(), self.mem)

    def off(self, spec: str, member: str) -> int:
        return self.tm.offsetof(spec, member)

    def put(self, address: int, fmt: str, value: int) -> None:
        self.mem.write(address, struct.pack("<" + fmt, value))

    def ptr(self, address: int, value: int) -> None:
        self.put(address, "Q", value)

    def node(
        self,
        i: int,
        shift: int,
        parent: int,
        offset: int,
        slots: dict[int, int],
        array: int = XA,
    ) -> int:
        """A ``struct xa_node`` at ``NODES + i pages``; returns its address."""
        address = NODES + i * 0x1000
        spec = "struct xa_node"
        self.mem.map(address, self.tm.sizeof(spec))
        self.put(address + self.off(spec, "shift"), "B", shift)
        self.put(address + self.off(spec, "offset"), "B", offset)
        self.ptr(address + self.off(spec, "parent"), parent)
        self.ptr(address + self.off(spec, "array"), array)
        for slot, value in slots.items():
            self.ptr(address + self.off(spec, f"slots[{slot}]"), value)
        return address

    def head(self, value: int, xa: int = XA) -> Object:
        self.ptr(xa + self.off("struct xarray", "xa_head"), value)
        return self.tm.value("struct xarray *", xa)


@pytest.fixture
def syn() -> Synthetic:
    return Synthetic()


def tree(syn: Synthetic) -> Object:
    """Root (shift 6): slot 0 and 2 are leaf nodes, slot 3 a value entry for 192..255.
    Node 1 holds 1, 5, a two-slot entry at 6..7 and a zero entry at 8; node 2 holds 191."""
    root = NODES
    syn.node(0, 6, 0, 0, {0: mk_node(NODES + 0x1000), 2: mk_node(NODES + 0x2000), 3: mk_value(7)})
    leaf = {1: entry(1), 5: entry(5), 6: entry(6), 7: mk_internal(6), 8: XA_ZERO_ENTRY}
    syn.node(1, 0, root, 0, leaf)
    syn.node(2, 0, root, 2, {63: entry(63)})
    return syn.head(mk_node(root))


TREE = [(1, entry(1)), (5, entry(5)), (6, entry(6)), (191, entry(63)), (192, mk_value(7))]


def pairs(walk: Iterator[tuple[int, Object]]) -> list[tuple[int, int]]:
    return [(index, int(value)) for index, value in walk]


# -- the walk guard ----------------------------------------------------------------


def test_walk_guard_finds_a_long_cycle_soon_in_constant_memory() -> None:
    lead, loop = 1000, 300
    guard = WalkGuard("test walk", limit=1 << 20)
    with pytest.raises(ValidationError, match="seen twice") as info:
        for step in range(10 * (lead + loop)):
            guard.step(step if step < lead else lead + (step - lead) % loop)
    assert guard.count <= lead + 3 * loop
    assert "test walk" in str(info.value) and "cycle" in str(info.value)


def test_walk_guard_bounds_a_walk() -> None:
    guard = WalkGuard("bounded", limit=3)
    for pos in (10, 20, 30):
        guard.step(pos)
    with pytest.raises(ValidationError, match="more than 3 nodes"):
        guard.step(40)


# -- xarray / idr ------------------------------------------------------------------


def test_all_is_sorted() -> None:
    for names in (xarray_helpers.__all__, pid_helpers.__all__):
        assert list(names) == sorted(names)


def test_xarray_entry_at_the_head_and_empty(syn: Synthetic) -> None:
    xa = syn.head(entry(9))
    assert int(xa_load(xa, 0)) == entry(9) and int(xa_load(xa, 1)) == 0
    assert pairs(xa_for_each(xa)) == [(0, entry(9))]
    xa = syn.head(0)
    assert int(xa_load(xa, 0)) == 0 and pairs(xa_for_each(xa)) == []
    xa = syn.head(XA_ZERO_ENTRY)  # reserved: reads as NULL, not listed
    assert int(xa_load(xa, 0)) == 0 and pairs(xa_for_each(xa)) == []


def test_xarray_tree(syn: Synthetic) -> None:
    xa = tree(syn)
    assert pairs(xa_for_each(xa)) == TREE
    expected = {1: entry(1), 5: entry(5), 6: entry(6), 7: entry(6), 191: entry(63)}
    expected |= {200: mk_value(7), 255: mk_value(7)}
    expected |= {0: 0, 2: 0, 8: 0, 64: 0, 256: 0, 4096: 0, (1 << 64) - 1: 0}
    for index, value in expected.items():
        assert int(xa_load(xa, index)) == value, index
    assert xa_load(xa, 1).type_.name == "void *"
    assert pairs(xa_for_each(syn.tm.object("struct xarray", XA))) == TREE  # the struct itself


def test_idr(syn: Synthetic) -> None:
    tree(syn)
    idr = syn.tm.value("struct idr *", XA)
    assert pairs(idr_for_each(idr)) == TREE
    syn.put(XA + syn.off("struct idr", "idr_base"), "I", 1)
    assert pairs(idr_for_each(idr)) == [(i + 1, e) for i, e in TREE]
    assert int(idr_find(idr, 2)) == entry(1) and int(idr_find(idr, 1)) == 0
    assert int(idr_find(idr, 0)) == 0  # below idr_base


def test_deepest_tree(syn: Synthetic) -> None:
    """Shift 60 down to 0: eleven nodes, the most 64-bit indices need."""
    index = (1 << 64) - 1
    parent, parent_offset = 0, 0
    for level, shift in enumerate(range(60, -1, -6)):
        offset = (index >> shift) & 63
        leaf = shift == 0
        child = entry(1) if leaf else mk_node(NODES + (level + 1) * 0x1000)
        parent = syn.node(level, shift, parent, parent_offset, {offset: child})
        parent_offset = offset
    xa = syn.head(mk_node(NODES))
    assert int(xa_load(xa, index)) == entry(1)
    assert pairs(xa_for_each(xa)) == [(index, entry(1))]


def test_cycle_back_to_the_root(syn: Synthetic) -> None:
    xa = tree(syn)
    syn.ptr(NODES + syn.off("struct xa_node", "slots[1]"), mk_node(NODES))
    with pytest.raises(ValidationError, match=r"seen twice|shift 6 under a node of shift 6"):
        list(xa_for_each(xa))
    with pytest.raises(ValidationError, match=r"seen twice|shift 6 under a node of shift 6"):
        xa_load(xa, 64)
    tree(syn)
    syn.ptr(NODES + 0x1000 + syn.off("struct xa_node", "slots[2]"), mk_node(NODES))
    with pytest.raises(ValidationError, match="internal entry"):
        list(xa_for_each(xa))  # a node pointer in a leaf node's slot


def test_wild_node_pointer(syn: Synthetic) -> None:
    xa = tree(syn)
    syn.ptr(NODES + syn.off("struct xa_node", "slots[4]"), mk_node(UNMAPPED))
    seen: list[int] = []
    with pytest.raises(ValidationError, match=f"{UNMAPPED:#x} is unreadable") as info:
        seen.extend(index for index, _ in xa_for_each(xa))
    assert isinstance(info.value.__cause__, PageFault)
    assert seen == [index for index, _ in TREE]  # yielded before the bad node
    with pytest.raises(ValidationError, match="unreadable"):
        xa_load(xa, 4 * 64)
    with pytest.raises(ValidationError, match="unreadable"):
        list(xa_for_each(syn.tm.value("struct xarray *", UNMAPPED)))


@pytest.mark.parametrize("shift", [72, 66, 7, 3])
def test_root_shift_must_be_a_chunk_multiple_below_64(syn: Synthetic, shift: int) -> None:
    xa = tree(syn)
    syn.put(NODES + syn.off("struct xa_node", "shift"), "B", shift)
    with pytest.raises(ValidationError, match=f"shift {shift}"):
        list(xa_for_each(xa))
    with pytest.raises(ValidationError, match=f"shift {shift}"):
        xa_load(xa, 1)


def test_too_deep_a_tree_is_refused(syn: Synthetic) -> None:
    """A child that does not go one level down (the tree would never end)."""
    xa = tree(syn)
    syn.put(NODES + 0x2000 + syn.off("struct xa_node", "shift"), "B", 6)
    with pytest.raises(ValidationError, match="shift 6 under a node of shift 6"):
        list(xa_for_each(xa))


@pytest.mark.parametrize(
    ("member", "fmt", "value", "message"),
    [
        ("parent", "Q", NODES + 0x1000, "parent"),
        ("offset", "B", 5, "offset 5, is in slot 2"),
        ("array", "Q", XA + 0x40, "belongs to the xarray"),
    ],
)
def test_back_links_are_checked(
    syn: Synthetic, member: str, fmt: str, value: int, message: str
) -> None:
    xa = tree(syn)
    syn.put(NODES + 0x2000 + syn.off("struct xa_node", member), fmt, value)
    with pytest.raises(ValidationError, match=message):
        list(xa_for_each(xa))
    with pytest.raises(ValidationError, match=message):
        xa_load(xa, 191)
    assert int(xa_load(xa, 1)) == entry(1)  # another branch is still fine for a lookup


def test_root_with_a_parent_is_refused(syn: Synthetic) -> None:
    xa = tree(syn)
    syn.ptr(NODES + syn.off("struct xa_node", "parent"), NODES + 0x1000)
    with pytest.raises(ValidationError, match="parent"):
        xa_load(xa, 1)


def test_internal_entries(syn: Synthetic) -> None:
    xa = tree(syn)
    slot = NODES + 0x1000 + syn.off("struct xa_node", "slots[9]")
    syn.ptr(slot, XA_RETRY_ENTRY)
    with pytest.raises(ValidationError, match="retry"):
        list(xa_for_each(xa))
    syn.ptr(slot, mk_internal(12))  # a sibling pointing forward: would loop
    with pytest.raises(ValidationError, match="sibling"):
        list(xa_for_each(xa))
    with pytest.raises(ValidationError, match="sibling"):
        xa_load(xa, 9)


def test_node_limit(syn: Synthetic) -> None:
    xa = tree(syn)
    assert len(list(xa_for_each(xa, limit=3))) == len(TREE)
    with pytest.raises(ValidationError, match="more than 2 nodes"):
        list(xa_for_each(xa, limit=2))


# -- pids and threads --------------------------------------------------------------

NS = BASE + 0x100000
PIDS = BASE + 0x200000
TASKS = BASE + 0x300000
SIGNALS = BASE + 0x400000
PROCESSES = {1: (1, "init"), 5: (5, "worker"), 6: (5, "worker")}  # pid: (tgid, comm)


class Pids(Synthetic):
    """init_pid_ns with pids 1, 5 and 6 (a thread of 5), their tasks and signals."""

    def __init__(self) -> None:
        super().__init__()
        self.put(NS + self.off("struct pid_namespace", "level"), "I", 0)
        root = self.node(0, 0, 0, 0, {nr: self.pid(nr) for nr in PROCESSES}, array=NS)
        self.head(mk_node(root), xa=NS)
        for nr, (tgid, comm) in PROCESSES.items():
            task = self.task(nr)
            self.put(task + self.off("struct task_struct", "pid"), "i", nr)
            self.put(task + self.off("struct task_struct", "tgid"), "i", tgid)
            self.mem.write(task + self.off("struct task_struct", "comm"), comm.encode() + b"\0")
            self.ptr(task + self.off("struct task_struct", "signal"), self.signal(tgid))
            self.attach(nr, nr, 0)
        for tgid in (1, 5):
            self.attach(tgid, tgid, 1)  # leaders are on their pid's PIDTYPE_TGID list
        self.ring(self.signal(1), [self.task(1)])
        self.ring(self.signal(5), [self.task(5), self.task(6)])
        self.kernel = Kernel(self.mem, self.tm.btf, {"init_pid_ns": NS})

    def pid(self, nr: int) -> int:
        address = PIDS + nr * 0x100
        self.mem.map(address, 0x100)
        self.put(address + self.off("struct pid", "level"), "I", 0)
        self.put(address + self.off("struct pid", "numbers[0].nr"), "i", nr)
        self.ptr(address + self.off("struct pid", "numbers[0].ns"), NS)
        return address

    def task(self, nr: int) -> int:
        return TASKS + nr * 0x3000

    def signal(self, tgid: int) -> int:
        return SIGNALS + tgid * 0x1000

    def attach(self, nr: int, pid_nr: int, type: int) -> None:
        """``task(nr)->pid_links[type]`` as the only node of ``pid(pid_nr)->tasks[type]``."""
        first = self.pid(pid_nr) + self.off("struct pid", f"tasks[{type}].first")
        node = self.task(nr) + self.off("struct task_struct", f"pid_links[{type}]")
        self.ptr(first, node)
        self.ptr(node + self.off("struct hlist_node", "next"), 0)
        self.ptr(node + self.off("struct hlist_node", "pprev"), first)

    def ring(self, signal: int, tasks: list[int]) -> None:
        head = signal + self.off("struct signal_struct", "thread_head")
        nodes = [head] + [t + self.off("struct task_struct", "thread_node") for t in tasks]
        for i, node in enumerate(nodes):
            self.ptr(node, nodes[(i + 1) % len(nodes)])
            self.ptr(node + 8, nodes[i - 1])


@pytest.fixture
def pids() -> Pids:
    return Pids()


def test_pids(pids: Pids) -> None:
    ns = pids.tm.value("struct pid_namespace *", NS)
    assert [int(p) for p in for_each_pid(ns)] == [pids.pid(nr) for nr in PROCESSES]
    assert [int(p) for p in for_each_pid(pids.kernel)] == [pids.pid(nr) for nr in PROCESSES]
    pid5 = find_pid(pids.kernel, 5)
    assert pid5 is not None and int(pid5) == pids.pid(5) and pid5.type_.name == "struct pid *"
    assert find_pid(ns, 2) is None and find_pid(ns, 4096) is None
    for nr, (tgid, comm) in PROCESSES.items():
        task = find_task(pids.kernel, nr)
        assert task is not None and int(task) == pids.task(nr)
        assert (int(task.pid), int(task.tgid), task.comm.string_()) == (nr, tgid, comm)
    assert find_task(pids.kernel, 3) is None
    leader = pid_task(pid5, "PIDTYPE_TGID")
    assert leader is not None and int(leader) == pids.task(5)
    assert pid_task(find_pid(ns, 6), pids.kernel.constant("PIDTYPE_TGID")) is None
    assert pid_task(None, 0) is None
    with pytest.raises(DesignatorIndexError):
        pid_task(pid5, "PIDTYPE_MAX")


def test_threads(pids: Pids) -> None:
    for nr, threads in ((1, [1]), (5, [5, 6]), (6, [5, 6])):
        task = pids.tm.value("struct task_struct *", pids.task(nr))
        assert [int(t.pid) for t in for_each_thread(task)] == threads
    pids.ptr(pids.task(6) + pids.off("struct task_struct", "thread_node") + 8, pids.task(1))
    with pytest.raises(ValidationError, match="broken link"):
        list(for_each_thread(pids.tm.value("struct task_struct *", pids.task(5))))


def test_a_pid_under_another_number_is_refused(pids: Pids) -> None:
    pids.put(pids.pid(5) + pids.off("struct pid", "numbers[0].nr"), "i", 7)
    with pytest.raises(ValidationError, match="is 7 in namespace"):
        find_pid(pids.kernel, 5)
    with pytest.raises(ValidationError, match="found as 5"):
        list(for_each_pid(pids.kernel))
    pids.put(pids.pid(5) + pids.off("struct pid", "numbers[0].nr"), "i", 5)
    pids.ptr(pids.pid(5) + pids.off("struct pid", "numbers[0].ns"), NS + 8)
    with pytest.raises(ValidationError, match="namespace"):
        find_pid(pids.kernel, 5)
    pids.put(pids.pid(1) + pids.off("struct pid", "level"), "I", 1000)
    with pytest.raises(ValidationError, match="level 1000"):
        find_pid(pids.kernel, 1)


def test_a_task_that_is_not_its_pid_is_refused(pids: Pids) -> None:
    pids.put(pids.task(5) + pids.off("struct task_struct", "pid"), "i", 9)
    with pytest.raises(ValidationError, match="of pid 9"):
        find_task(pids.kernel, 5)
    node = pids.task(1) + pids.off("struct task_struct", "pid_links[0].pprev")
    pids.ptr(node, NS)
    with pytest.raises(ValidationError, match="pprev"):
        find_task(pids.kernel, 1)


def test_wild_pid_idr(pids: Pids) -> None:
    pids.ptr(NS + pids.off("struct xarray", "xa_head"), mk_node(UNMAPPED))
    with pytest.raises(ValidationError, match="unreadable"):
        find_task(pids.kernel, 1)
    with pytest.raises(GuestDataError):
        list(for_each_pid(pids.kernel))


# -- designators and constants -------------------------------------------------------


def test_member_designators(syn: Synthetic) -> None:
    tm = syn.tm
    links = tm.offsetof("struct task_struct", "pid_links")
    node = tm.sizeof("struct hlist_node")
    assert tm.offsetof("struct task_struct", "pid_links[1]") == links + node
    pprev = tm.offsetof("struct hlist_node", "pprev")
    assert tm.offsetof("struct task_struct", "pid_links[3].pprev") == links + 3 * node + pprev
    task = tm.value("struct task_struct *", BASE)
    assert task.member_("pid_links[2]").address_ == BASE + links + 2 * node
    assert task.member_("pid_links[2].next").type_.name == "struct hlist_node *"
    container = tm.container_of(BASE + links + node, "struct task_struct", "pid_links[1]")
    assert int(container) == BASE
    flexible = tm.object("struct pid", BASE).member_("numbers[5].ns")  # struct upid []
    assert flexible.address_ == BASE + tm.offsetof("struct pid", "numbers[5].ns")
    with pytest.raises(DesignatorIndexError) as info:
        task.member_("pid_links[4]")
    assert isinstance(info.value, GuestDataError) and isinstance(info.value, IndexError)
    with pytest.raises(DesignatorIndexError):
        tm.offsetof("struct task_struct", "pid_links[4]")
    for bad in ("pid_links[", "pid_links[-1]", "[1]", ".pid", "pid..x", "a" * 300):
        with pytest.raises(ValueError):
            tm.offsetof("struct task_struct", bad)
    with pytest.raises(TypeError):
        task.member_("pid[0]")
    with pytest.raises(AttributeError):
        task.member_("pid_links[0].nope")


def test_constants(syn: Synthetic) -> None:
    kernel = Kernel(syn.mem, syn.tm.btf, {})
    names = ("PIDTYPE_PID", "PIDTYPE_TGID", "PIDTYPE_PGID", "PIDTYPE_SID", "PIDTYPE_MAX")
    assert [kernel.constant(name) for name in names] == [0, 1, 2, 3, 4]
    for missing in ("PIDTYPE", "task_struct", "NO_SUCH_ENUMERATOR", ""):
        with pytest.raises(LookupError, match="enumerator"):
            kernel.constant(missing)


# -- the real guest ------------------------------------------------------------------


@contextmanager
def paused_kernel(guest: GuestUnderTest) -> Iterator[Kernel]:
    with held_still(guest.info.qmp), QemuGuest(guest.info.qmp) as live:
        yield open_guest_kernel(live)


@pytest.mark.guest
@only(MAIN)
def test_find_task_and_for_each_pid_agree_with_the_guest(guest: GuestUnderTest) -> None:
    truth = machine.truth(guest.info, fresh=True)
    theirs = {p["pid"]: str(p["comm"]) for p in truth.processes}
    helper = {truth.helper_pid}  # it printed the view and exited: maybe not yet reaped
    with paused_kernel(guest) as kernel:
        for nr, comm in theirs.items():
            task = find_task(kernel, int(nr))  # type: ignore[call-overload]
            assert task is not None, nr
            assert int(task.pid) == nr and int(task.tgid) == nr
            if not comm.startswith("kworker/"):  # their name carries the work they ran
                assert task.comm.string_() == comm[:15], nr
        pid_type = kernel.constant("PIDTYPE_PID")
        ids: dict[int, int | None] = {}  # the number, and its PIDTYPE_PID task's pid
        for pid in for_each_pid(kernel):
            task = pid_task(pid, pid_type)
            ids[int(pid.numbers[0].nr)] = int(task.pid) if task is not None else None
        processes = {int(t.pid) for t in for_each_process(kernel)}
        threads = {int(t.pid) for p in for_each_process(kernel) for t in for_each_thread(p)}
    # The guest lists /proc (thread-group leaders); the IDR has every thread's id too,
    # and ids still in use only as a process group or session (their task gone).
    assert set(theirs) <= set(ids) and set(theirs) == processes - helper
    with_task = {nr for nr, task_pid in ids.items() if task_pid is not None}
    assert with_task - helper == threads - helper and processes <= threads
    assert all(task_pid in (nr, None) for nr, task_pid in ids.items())


@pytest.mark.guest
@only(MAIN)
def test_init_has_one_thread_and_pid_types_come_from_btf(guest: GuestUnderTest) -> None:
    with paused_kernel(guest) as kernel:
        assert kernel.constant("PIDTYPE_PID") == 0
        assert kernel.constant("PIDTYPE_TGID") == 1
        init = find_task(kernel, 1)
        assert init is not None and int(init.tgid) == 1
        assert [int(t.pid) for t in for_each_thread(init)] == [1]
        pid = find_pid(kernel, 1)
        assert pid is not None and int(init.thread_pid) == int(pid)
        leader = pid_task(pid, "PIDTYPE_TGID")
        assert leader is not None and int(leader) == int(init)
        assert find_task(kernel, (1 << 22) + 1) is None  # above pid_max's ceiling
