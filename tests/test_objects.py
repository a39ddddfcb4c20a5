"""Typed objects over a synthetic address space laid out with the vendor kernel's BTF.

The memory is a dict of 4 KiB pages written by the test; the types are the real
``task_struct``, ``cred`` and ``list_head`` of the Debian cloud kernel.
"""

from __future__ import annotations

import struct

import pytest
from synthetic_memory import PageMemory, vendor_btf

from sgmonitor.errors import GuestDataError, PageFault
from sgmonitor.kernel.objects import Object, TypedMemory, TypeKind

BASE = 0xFFFF888000100000


class FakeKernel:
    """Tasks and creds written at BTF offsets, linked on ``tasks`` like the kernel's list."""

    def __init__(self, count: int = 3) -> None:
        self.mem = PageMemory()
        self.tm = TypedMemory(vendor_btf(), self.mem)
        tm = self.tm
        self.task_size = tm.sizeof("struct task_struct")
        self.stride = (self.task_size + 0xFFF) & ~0xFFF
        self.tasks = [BASE + i * self.stride for i in range(count)]
        self.creds = [BASE + 0x1000000 + i * 0x100 for i in range(count)]
        for i, (task, cred) in enumerate(zip(self.tasks, self.creds, strict=True)):
            self.mem.map(task, self.task_size)
            self.put(task, "pid", struct.pack("<i", i * 10))
            self.put(task, "tgid", struct.pack("<i", i * 10))
            self.put(task, "comm", f"task{i}".encode() + b"\0junk")
            self.put(task, "real_parent", struct.pack("<Q", self.tasks[max(i - 1, 0)]))
            self.put(task, "cred", struct.pack("<Q", cred))
            self.mem.write(cred + tm.offsetof("struct cred", "uid"), struct.pack("<I", 1000 + i))
        tasks_off = tm.offsetof("struct task_struct", "tasks")
        nodes = [t + tasks_off for t in self.tasks]
        for i, node in enumerate(nodes):
            self.link(node, nodes[(i + 1) % count], nodes[i - 1])

    def put(self, task: int, member: str, data: bytes) -> None:
        self.mem.write(task + self.tm.offsetof("struct task_struct", member), data)

    def link(self, node: int, nxt: int, prev: int) -> None:
        tm = self.tm
        self.mem.write(node + tm.offsetof("struct list_head", "next"), struct.pack("<Q", nxt))
        self.mem.write(node + tm.offsetof("struct list_head", "prev"), struct.pack("<Q", prev))

    def task(self, i: int) -> Object:
        return self.tm.object("struct task_struct", self.tasks[i])


@pytest.fixture
def k() -> FakeKernel:
    return FakeKernel()


def test_walk_fake_tasks(k: FakeKernel) -> None:
    init = k.task(0)
    seen = []
    node = init.tasks.next
    while node != init.tasks.address_of_():
        task = k.tm.container_of(node, "struct task_struct", "tasks")
        seen.append((int(task.pid), task.comm.string_(), int(task.real_parent.pid)))
        node = node.next
    assert seen == [(10, "task1", 0), (20, "task2", 10)]
    assert str(k.task(2).real_parent.real_parent.comm) == "task0"
    assert k.task(2).cred.uid.val == 1002
    assert k.task(1).tgid == 10 and k.task(1).pid != 11


def test_member_read_reads_only_its_bytes(k: FakeKernel) -> None:
    task = k.task(1)
    k.mem.reads.clear()
    assert int(task.pid) == 10
    assert k.mem.reads == [(k.tasks[1] + k.tm.offsetof("struct task_struct", "pid"), 4)]
    copy = task.read_()
    k.mem.reads.clear()
    assert int(copy.pid) == 10 and copy.comm.string_() == "task1" and copy.real_parent == k.tasks[0]
    assert k.mem.reads == []


def test_dunder_named_member(k: FakeKernel) -> None:
    k.put(k.tasks[0], "__state", struct.pack("<I", 0x402))
    assert k.task(0).__state.value_() == 0x402


def test_pointers(k: FakeKernel) -> None:
    tm = k.tm
    p = k.task(1).address_of_()
    assert p.type_.name == "struct task_struct *" and p.address_ is None
    assert p == k.tasks[1] and p != k.tasks[0] and p == k.task(1).address_of_()
    assert p.pid == 10 and p.deref_().pid == 10 and p[0].pid == 10
    assert p[1].address_ == k.tasks[1] + k.task_size
    assert int(p + 1) == k.tasks[1] + k.task_size and int(p - 1) == k.tasks[1] - k.task_size
    assert (p + 1) - p == 1
    null = tm.value("struct task_struct *", 0)
    assert not null and bool(p) and null == 0
    with pytest.raises(PageFault):
        int(null.pid)
    with pytest.raises(TypeError):
        tm.value("void *", 5).deref_()


def test_arrays_and_strings(k: FakeKernel) -> None:
    comm = k.task(2).comm
    assert comm.type_.kind == TypeKind.ARRAY and len(comm) == 16
    assert comm[0] == ord("t") and [int(c) for c in comm][:5] == list(b"task2")
    assert comm.string_(limit=3) == "tas"
    with pytest.raises(IndexError):
        comm[16]
    assert comm.value_()[:5] == list(b"task2")
    # char * across a page boundary, bounded and NUL-terminated; bad UTF-8 replaced.
    text_at = BASE + 0x2000000 - 5
    k.mem.write(text_at, b"hello\xffworld\0rest")
    s = k.tm.value("char *", text_at)
    assert s.string_() == "hello\ufffdworld" and str(s) == "hello\ufffdworld"
    assert s.string_(limit=4) == "hell"
    k.mem.write(BASE + 0x3000000 - 3, b"abc")  # no NUL before an unmapped page
    with pytest.raises(PageFault):
        k.tm.value("char *", BASE + 0x3000000 - 3).string_()
    assert k.tm.value("char *", BASE + 0x3000000 - 3).string_(limit=3) == "abc"


def test_casts_and_helpers(k: FakeKernel) -> None:
    tm = k.tm
    assert tm.cast("unsigned long", -1).value_() == (1 << 64) - 1
    assert tm.cast("int", 0xFFFFFFFF).value_() == -1
    assert tm.cast("unsigned char", 0x1FF).value_() == 0xFF
    assert tm.cast("_Bool", 7).value_() is True
    task = tm.cast("struct task_struct *", k.tasks[2])
    assert task.comm.string_() == "task2"
    assert int(task.cast_("unsigned long")) == k.tasks[2]
    raw = tm.cast("char [16]", k.task(2).comm)
    assert raw.string_() == "task2"
    comm_off = tm.offsetof("struct task_struct", "comm")
    assert tm.cast("unsigned int", k.task(2).pid) == 20
    assert tm.container_of(k.tasks[2] + comm_off, "struct task_struct", "comm") == k.tasks[2]
    run = tm.offsetof("struct task_struct", "se.run_node")
    assert run == tm.offsetof("struct task_struct", "se") + tm.offsetof(
        "struct sched_entity", "run_node"
    )
    assert tm.container_of(k.tasks[0] + run, "struct task_struct", "se.run_node") == k.tasks[0]
    assert tm.sizeof("struct list_head") == 16 == tm.sizeof("struct list_head *") * 2


def test_bitfields_and_enums(k: FakeKernel) -> None:
    tm = k.tm
    btf = vendor_btf()
    member = btf.member(btf.find("task_struct").id, "in_execve")
    assert member.bitfield_size == 1
    byte = k.tasks[0] + member.bit_offset // 8
    k.mem.write(byte, bytes([1 << (member.bit_offset % 8)]))
    assert k.task(0).in_execve.value_() == 1 and int(k.task(1).in_execve) == 0
    with pytest.raises(ValueError):
        k.task(0).in_execve.address_of_()
    at = BASE + 0x4000000
    k.mem.write(at, struct.pack("<I", 1))
    pid_type = tm.object("enum pid_type", at)
    assert pid_type.value_() == 1 and pid_type.enumerator_() == "PIDTYPE_TGID"
    assert tm.value("enum pid_type", 99).enumerator_() is None


def test_type_names() -> None:
    tm = TypedMemory(vendor_btf(), PageMemory())
    cases = {
        "struct task_struct *": ("struct task_struct *", 8),
        "unsigned long": ("long unsigned int", 8),
        "long unsigned int": ("long unsigned int", 8),
        "unsigned": ("unsigned int", 4),
        "short": ("short int", 2),
        "unsigned short int": ("short unsigned int", 2),
        "long long": ("long long int", 8),
        "unsigned long long": ("long long unsigned int", 8),
        "signed char": ("signed char", 1),
        "char [16]": ("char [16]", 16),
        "int [2][3]": ("int [2][3]", 24),
        "char *[4]": ("char * [4]", 32),
        "const char *": ("char *", 8),
        "struct list_head **": ("struct list_head **", 8),
        "pid_t": ("pid_t", 4),
        "u32": ("u32", 4),
        "void *": ("void *", 8),
        "enum pid_type": ("enum pid_type", 4),
    }
    for spec, (name, size) in cases.items():
        ctype = tm.type(spec)
        assert (ctype.name, tm.sizeof(ctype)) == (name, size), spec
    assert tm.type("int [2][3]").target.name == "int [3]"
    for bad in ("struct", "unsigned signed", "int (*)(void)", "long long long", "char int"):
        with pytest.raises(ValueError):
            tm.type(bad)
    for missing in ("struct no_such_struct", "no_such_typedef"):
        with pytest.raises(LookupError):
            tm.type(missing)
    with pytest.raises(AttributeError):
        tm.object("struct list_head", 0).no_such_member  # noqa: B018
    with pytest.raises(TypeError):
        tm.sizeof("void")


def test_hostile_sizes_are_bounded(k: FakeKernel) -> None:
    big = k.tm.object("char [100000000]", k.tasks[0])
    with pytest.raises(GuestDataError):
        big.value_()
    with pytest.raises(GuestDataError):
        k.tm.object("struct task_struct", 0xDEAD0000).pid.value_()


def test_scan_reads_only_the_members_it_uses() -> None:
    """~300 tasks x 6 members: each member access is one read of that member's bytes
    (the cost model the warm scan relies on; its speed is in docs/benchmarks.md)."""
    fk = FakeKernel(count=300)
    tm = fk.tm
    head = fk.task(0).tasks.address_of_()

    def scan() -> int:
        total = 0
        node = head.next
        while node != head:
            task = tm.container_of(node, "struct task_struct", "tasks")
            total += int(task.pid) + int(task.tgid) + int(task.real_parent.pid)
            total += int(task.cred.uid.val) + int(task.__state) + len(task.comm.string_())
            node = node.next
        return total

    expected = scan()
    fk.mem.reads.clear()
    assert scan() == expected
    assert max(size for _, size in fk.mem.reads) <= 16  # comm, never a whole task
    assert len(fk.mem.reads) <= 300 * 12


def test_a_layout_reads_what_the_typed_objects_read(k: FakeKernel) -> None:
    """The compiled layout gives, member for member, what the typed reads give, with one
    read per cluster of nearby members; it refuses what has no plain value."""
    tm = k.tm
    members = ("pid", "tgid", "comm", "real_parent", "cred", "flags")
    layout = tm.layout("struct task_struct", members)
    assert tm.layout("struct task_struct", members) is layout  # compiled once
    for i, address in enumerate(k.tasks):
        task = k.task(i)
        expected = (
            int(task.pid),
            int(task.tgid),
            task.comm.string_(),
            int(task.real_parent),
            int(task.cred),
            int(task.flags),
        )
        k.mem.reads.clear()
        assert layout.read(address) == expected
        assert k.mem.reads == [(address + start, size) for start, size in layout.spans]
    # flags lies near the struct's start, pid .. comm about 1.5 KiB further: read apart,
    # fewer bytes than the span from the first member to the last
    assert len(layout.spans) > 1
    assert sum(size for _, size in layout.spans) < layout.end - layout.start
    uid = tm.layout("struct cred", ("uid.val",))
    assert [uid.read(cred)[0] for cred in k.creds] == [1000, 1001, 1002]
    k.put(k.tasks[0], "pid", struct.pack("<i", -5))
    assert layout.read(k.tasks[0])[0] == -5  # pid_t is signed, as int(task.pid) reads it
    for bad in (("tasks",), ("thread",), ()):
        with pytest.raises((TypeError, ValueError)):
            tm.layout("struct task_struct", bad)
    with pytest.raises(AttributeError):
        tm.layout("struct task_struct", ("no_such_member",))
