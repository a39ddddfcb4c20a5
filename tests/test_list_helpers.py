"""list.h helpers on synthetic lists: good ones, and the corruptions a hostile guest can
make (a cycle that skips the head, a broken prev link, a wild pointer, an endless list).
Each corruption must end in ValidationError, never a hang."""

from __future__ import annotations

import struct

import pytest
from synthetic_memory import PageMemory, vendor_btf

from sgmonitor.errors import GuestDataError, PageFault, ValidationError
from sgmonitor.kernel.helpers.list import (
    __all__ as list_all,
)
from sgmonitor.kernel.helpers.list import (
    hlist_empty,
    hlist_for_each,
    hlist_for_each_entry,
    list_empty,
    list_first_entry,
    list_first_entry_or_null,
    list_for_each,
    list_for_each_entry,
)
from sgmonitor.kernel.objects import Object, TypedMemory

BASE = 0xFFFF888001000000
UNMAPPED = 0xFFFF8880DEAD0000


class Lists:
    """Entries are ``struct task_struct`` (real layout) linked through ``tasks``."""

    def __init__(self) -> None:
        self.mem = PageMemory()
        self.tm = TypedMemory(vendor_btf(), self.mem)
        self.next_off = self.tm.offsetof("struct list_head", "next")
        self.prev_off = self.tm.offsetof("struct list_head", "prev")
        self.tasks_off = self.tm.offsetof("struct task_struct", "tasks")
        self.stride = (self.tm.sizeof("struct task_struct") + 0xFFF) & ~0xFFF

    def entry(self, i: int) -> int:
        return BASE + (i + 1) * self.stride

    def node(self, i: int) -> int:
        return self.entry(i) + self.tasks_off

    def set(self, node: int, nxt: int, prev: int) -> None:
        self.mem.write(node + self.next_off, struct.pack("<Q", nxt))
        self.mem.write(node + self.prev_off, struct.pack("<Q", prev))

    def ring(self, count: int) -> Object:
        """A well-formed list of ``count`` tasks (pid = index) headed at BASE."""
        nodes = [BASE] + [self.node(i) for i in range(count)]
        for i, node in enumerate(nodes):
            self.set(node, nodes[(i + 1) % len(nodes)], nodes[i - 1])
        pid_off = self.tm.offsetof("struct task_struct", "pid")
        for i in range(count):
            self.mem.write(self.entry(i) + pid_off, struct.pack("<i", i))
        return self.tm.value("struct list_head *", BASE)


@pytest.fixture
def lists() -> Lists:
    return Lists()


def test_all_is_sorted() -> None:
    assert list(list_all) == sorted(list_all)


def test_good_list(lists: Lists) -> None:
    head = lists.ring(5)
    assert [int(n) for n in list_for_each(head)] == [lists.node(i) for i in range(5)]
    pids = [int(t.pid) for t in list_for_each_entry("struct task_struct", head, "tasks")]
    assert pids == [0, 1, 2, 3, 4]
    assert not list_empty(head)
    assert list_first_entry(head, "struct task_struct", "tasks").pid == 0
    # The head may also be given as the struct list_head object itself.
    head_obj = lists.tm.object("struct list_head", BASE)
    assert len(list(list_for_each(head_obj))) == 5


def test_empty_list(lists: Lists) -> None:
    head = lists.ring(0)
    assert list(list_for_each(head)) == []
    assert list_empty(head)
    assert list_first_entry_or_null(head, "struct task_struct", "tasks") is None
    with pytest.raises(ValueError):
        list_first_entry(head, "struct task_struct", "tasks")


def test_cycle_that_skips_the_head(lists: Lists) -> None:
    head = lists.ring(4)
    # node 3 points back to node 1, and node 1's prev is made to agree: only the
    # visited set can stop this walk.
    lists.set(lists.node(3), lists.node(1), lists.node(2))
    lists.set(lists.node(1), lists.node(2), lists.node(3))
    with pytest.raises(ValidationError, match=r"broken link|seen twice") as info:
        list(list_for_each(head))
    assert f"{lists.node(1):#x}" in str(info.value)


def test_cycle_with_consistent_links_is_seen_twice(lists: Lists) -> None:
    """A guest that rewrites prev between reads: simulated by a lying memory."""
    lists.ring(3)
    mem = lists.mem
    real_read = mem.read
    target = lists.node(1)

    def racing_read(address: int, size: int) -> bytes:
        data = bytearray(real_read(address, size))
        if address == lists.node(2):  # node 2 -> node 1 again
            data[lists.next_off : lists.next_off + 8] = struct.pack("<Q", target)
        if address == target:  # and node 1 always claims the last node as prev
            data[lists.prev_off : lists.prev_off + 8] = struct.pack("<Q", racing.prev)
        return bytes(data)

    class Racing:
        prev = BASE

        def read(self, address: int, size: int) -> bytes:
            return racing_read(address, size)

    racing = Racing()
    tm = TypedMemory(vendor_btf(), racing)
    walk = list_for_each(tm.value("struct list_head *", BASE))
    with pytest.raises(ValidationError, match="seen twice"):
        for node in walk:
            racing.prev = int(node)


def test_broken_prev_link(lists: Lists) -> None:
    head = lists.ring(3)
    lists.set(lists.node(2), BASE, lists.node(0))  # should be node 1
    with pytest.raises(ValidationError, match="broken link") as info:
        list(list_for_each(head))
    assert f"{lists.node(2):#x}" in str(info.value)
    lists.set(lists.node(0), lists.node(1), BASE + 8)  # first link wrong
    with pytest.raises(ValidationError):
        list_empty(head)


def test_head_prev_checked_at_the_end(lists: Lists) -> None:
    head = lists.ring(3)
    lists.set(BASE, lists.node(0), lists.node(1))  # head->prev should be the last node
    with pytest.raises(ValidationError, match="broken link"):
        list(list_for_each(head))


def test_wild_pointer(lists: Lists) -> None:
    head = lists.ring(3)
    lists.set(lists.node(1), UNMAPPED, lists.node(0))
    nodes = []
    with pytest.raises(ValidationError, match=f"{UNMAPPED:#x}") as info:
        nodes.extend(int(n) for n in list_for_each(head))
    assert isinstance(info.value.__cause__, PageFault)
    assert nodes == [lists.node(0), lists.node(1)]  # yielded before the bad link
    with pytest.raises(ValidationError):
        list(list_for_each(lists.tm.value("struct list_head *", UNMAPPED)))


def test_overlong_list_vs_limit(lists: Lists) -> None:
    head = lists.ring(50)
    assert len(list(list_for_each(head, limit=50))) == 50
    with pytest.raises(ValidationError, match="more than 49 nodes"):
        list(list_for_each(head, limit=49))
    with pytest.raises(ValidationError, match="more than 10 nodes"):
        list(list_for_each_entry("struct task_struct", head, "tasks", limit=10))


def test_self_loop_ends(lists: Lists) -> None:
    head = lists.ring(1)
    lists.set(lists.node(0), lists.node(0), lists.node(0))
    with pytest.raises(ValidationError):
        list(list_for_each(head))
    assert issubclass(ValidationError, GuestDataError)


def test_hlist(lists: Lists) -> None:
    tm = lists.tm
    next_off = tm.offsetof("struct hlist_node", "next")
    pprev_off = tm.offsetof("struct hlist_node", "pprev")
    first_off = tm.offsetof("struct hlist_head", "first")
    node_off = tm.offsetof("struct task_struct", "pid_links")
    head_addr = BASE + 0x100
    nodes = [lists.entry(i) + node_off for i in range(3)]

    def link(i: int, nxt: int, pprev: int) -> None:
        lists.mem.write(nodes[i] + next_off, struct.pack("<Q", nxt))
        lists.mem.write(nodes[i] + pprev_off, struct.pack("<Q", pprev))

    lists.mem.write(head_addr + first_off, struct.pack("<Q", nodes[0]))
    link(0, nodes[1], head_addr + first_off)
    link(1, nodes[2], nodes[0] + next_off)
    link(2, 0, nodes[1] + next_off)
    lists.ring(3)  # pids
    head = tm.value("struct hlist_head *", head_addr)
    assert [int(n) for n in hlist_for_each(head)] == nodes
    entries = hlist_for_each_entry("struct task_struct", head, "pid_links")
    assert [int(t.pid) for t in entries] == [0, 1, 2]
    assert not hlist_empty(head)
    with pytest.raises(ValidationError, match="more than 2"):
        list(hlist_for_each(head, limit=2))
    link(2, nodes[0], nodes[1] + next_off)  # cycle back to the first node
    with pytest.raises(ValidationError, match=r"pprev|seen twice"):
        list(hlist_for_each(head))
    link(2, UNMAPPED, nodes[1] + next_off)
    with pytest.raises(ValidationError, match="unreadable"):
        list(hlist_for_each(head))
    link(1, nodes[2], head_addr)  # wrong pprev
    with pytest.raises(ValidationError, match="pprev"):
        list(hlist_for_each(head))
    empty = tm.value("struct hlist_head *", BASE + 0x200)
    lists.mem.write(BASE + 0x200, bytes(8))
    assert hlist_empty(empty) and list(hlist_for_each(empty)) == []
