"""BTF reader: hand-built blobs with known answers, must-fail vectors, and the vendor
kernel's BTF checked against ``pahole`` (Debian's ``dwarves``), which reads the same
section independently."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import struct
import subprocess
from functools import cache
from pathlib import Path

import pytest

from sgmonitor.errors import GuestDataError
from sgmonitor.kernel.btf import Btf, BtfError, Kind


class BtfBuilder:
    """Writes BTF blobs the way the kernel documents them (Documentation/bpf/btf.rst)."""

    def __init__(self, order: str = "<") -> None:
        self.order = order
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        at = self.strings.find(name.encode() + b"\0")
        if at <= 0 or self.strings[at - 1] != 0:
            at = len(self.strings)
            self.strings += name.encode() + b"\0"
        return at

    def add(
        self, kind: int, name: str, vlen: int, size_or_type: int, *extra: int, flag: bool = False
    ) -> int:
        info = (int(flag) << 31) | (kind << 24) | vlen
        words = (self.s(name), info, size_or_type, *extra)
        self.types.append(
            struct.pack(f"{self.order}{len(words)}I", *(w & 0xFFFFFFFF for w in words))
        )
        return len(self.types)

    def int_(
        self, name: str, size: int, signed: bool = False, bits: int | None = None, offset: int = 0
    ) -> int:
        enc = (int(signed) << 24) | (offset << 16) | (size * 8 if bits is None else bits)
        return self.add(Kind.INT, name, 0, size, enc)

    def ptr(self, target: int) -> int:
        return self.add(Kind.PTR, "", 0, target)

    def array(self, elem: int, index: int, n: int) -> int:
        return self.add(Kind.ARRAY, "", 0, 0, elem, index, n)

    def struct(
        self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False
    ) -> int:
        flag = any(bits for *_, bits in members)
        extra: list[int] = []
        for mname, mtype, bit_off, bits in members:
            extra += [self.s(mname), mtype, (bits << 24 | bit_off) if flag else bit_off]
        kind = Kind.UNION if union else Kind.STRUCT
        return self.add(kind, name, len(members), size, *extra, flag=flag)

    def enum(
        self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False
    ) -> int:
        extra = [w for n, v in values for w in (self.s(n), v)]
        return self.add(Kind.ENUM, name, len(values), size, *extra, flag=signed)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = [w for n, v in values for w in (self.s(n), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF)]
        return self.add(Kind.ENUM64, name, len(values), 8, *extra, flag=signed)

    def ref(self, kind: Kind, name: str, target: int) -> int:
        return self.add(kind, name, 0, target)

    def build(self, **override: int) -> bytes:
        types = b"".join(self.types)
        hdr = {"magic": 0xEB9F, "version": 1, "flags": 0, "hdr_len": 24, "type_off": 0}
        hdr |= {"type_len": len(types), "str_off": len(types), "str_len": len(self.strings)}
        hdr |= override
        header = struct.pack(f"{self.order}HBBIIIII", *hdr.values())
        return header + types + bytes(self.strings)


def sample() -> tuple[BtfBuilder, dict[str, int]]:
    """One of each kind, with a struct that has bitfields and an anonymous union."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    ids["int"] = b.int_("int", 4, signed=True)
    ids["ulong"] = b.int_("long unsigned int", 8)
    ids["char"] = b.int_("char", 1, signed=True)
    ids["ptr_int"] = b.ptr(ids["int"])
    ids["arr"] = b.array(ids["char"], ids["int"], 16)
    ids["anon"] = b.struct("", 8, [("a", ids["int"], 0, 0), ("b", ids["ulong"], 0, 0)], union=True)
    ids["node"] = b.struct(
        "node",
        48,
        [
            ("next", 0, 0, 0),  # patched below to struct node *
            ("flag_a", ids["int"], 64, 1),
            ("flag_b", ids["int"], 65, 3),
            ("", ids["anon"], 128, 0),
            ("name", ids["arr"], 192, 0),
            ("count", ids["int"], 320, 0),
        ],
    )
    ids["node_ptr"] = b.ptr(ids["node"])
    # Patch member "next" (first member, third word) to point at node_ptr.
    raw = bytearray(b.types[ids["node"] - 1])
    raw[16:20] = struct.pack("<I", ids["node_ptr"])
    b.types[ids["node"] - 1] = bytes(raw)
    ids["color"] = b.enum("color", 4, [("RED", 0), ("BLUE", -2 & 0xFFFFFFFF)], signed=True)
    ids["big"] = b.enum64("big", [("HUGE", 1 << 40), ("NEG", -1)], signed=True)
    ids["fwd"] = b.add(Kind.FWD, "opaque", 0, 0, flag=True)
    ids["typedef"] = b.ref(Kind.TYPEDEF, "node_t", ids["node"])
    ids["volatile"] = b.ref(Kind.VOLATILE, "", ids["typedef"])
    ids["const"] = b.ref(Kind.CONST, "", ids["volatile"])
    ids["restrict"] = b.ref(Kind.RESTRICT, "", ids["ptr_int"])
    ids["proto"] = b.add(
        Kind.FUNC_PROTO, "", 2, ids["int"], b.s("x"), ids["int"], 0, ids["ptr_int"]
    )
    ids["func"] = b.add(Kind.FUNC, "do_it", 1, ids["proto"])
    ids["var"] = b.add(Kind.VAR, "counter", 0, ids["int"], 1)
    ids["datasec"] = b.add(Kind.DATASEC, ".data", 1, 4, ids["var"], 0, 4)
    ids["float"] = b.add(Kind.FLOAT, "double", 0, 8)
    ids["decl_tag"] = b.add(Kind.DECL_TAG, "tag", 0, ids["node"], 2)
    ids["type_tag"] = b.ref(Kind.TYPE_TAG, "user", ids["int"])
    ids["legacy"] = b.int_("legacy_bits", 4, bits=5, offset=3)
    ids["old"] = b.struct("old", 4, [("x", ids["legacy"], 8, 0)])
    return b, ids


def test_known_answers() -> None:
    b, ids = sample()
    btf = Btf(b.build())
    assert len(btf) == len(b.types) + 1
    assert btf.type(0).kind == Kind.UNKN
    node = btf.find("node", Kind.STRUCT)
    assert node.id == ids["node"] and node.size == 48 and node.vlen == 6
    assert btf.sizeof(ids["const"]) == 48
    assert btf.resolve(ids["const"]).id == ids["node"]
    assert btf.strip_qualifiers(ids["const"]).id == ids["typedef"]
    assert btf.sizeof(ids["arr"]) == 16 and btf.sizeof(ids["ptr_int"]) == 8
    members = btf.members(ids["typedef"])
    assert members["next"].offset == 0 and btf.type_name(members["next"].type) == "struct node *"
    assert (members["flag_a"].bit_offset, members["flag_a"].bitfield_size) == (64, 1)
    assert (members["flag_b"].bit_offset, members["flag_b"].bitfield_size) == (65, 3)
    assert members["a"].offset == 16 and members["b"].offset == 16  # anonymous union
    assert members["name"].offset == 24 and members["count"].offset == 40
    assert "" not in members
    assert btf.member(ids["old"], "x").bit_offset == 11  # legacy: 8 + INT offset 3
    assert btf.member(ids["old"], "x").bitfield_size == 5
    with pytest.raises(BtfError, match="no member"):
        btf.member(ids["node"], "missing")
    color = btf.type(ids["color"])
    assert [(e.name, e.value) for e in color.enumerators] == [("RED", 0), ("BLUE", -2)]
    big = btf.type(ids["big"])
    assert [(e.name, e.value) for e in big.enumerators] == [("HUGE", 1 << 40), ("NEG", -1)]
    assert btf.type_name(ids["arr"]) == "char [16]"
    assert btf.type_name(ids["const"]) == "const volatile node_t"
    assert btf.type_name(ids["fwd"]) == "union opaque"
    proto = btf.type(ids["proto"])
    assert [(p.name, p.type) for p in proto.params] == [("x", ids["int"]), ("", ids["ptr_int"])]
    assert btf.type(ids["func"]).type == ids["proto"]
    assert btf.type(ids["datasec"]).datasec[0].type == ids["var"]
    assert btf.variable_type("counter") == ids["int"]
    assert btf.type(ids["decl_tag"]).component_idx == 2
    assert btf.resolve(ids["type_tag"]).id == ids["int"]
    assert btf.type(ids["float"]).size == 8
    assert btf.type(ids["int"]).is_signed and not btf.type(ids["ulong"]).is_signed
    assert btf.sha256 == hashlib.sha256(b.build()).hexdigest()
    for kind in (Kind.INT, Kind.PTR, Kind.VAR):
        assert any(btf.type(i).kind == kind for i in range(1, len(btf)))


def test_find_by_name_and_kind() -> None:
    b = BtfBuilder()
    st = b.struct("thing", 4, [])
    td = b.ref(Kind.TYPEDEF, "thing", st)
    b.struct("my_thing", 4, [])
    btf = Btf(b.build())
    assert btf.find_all("thing") == [st, td]
    assert btf.find("thing", Kind.TYPEDEF).id == td
    assert btf.find("thing").id == st
    with pytest.raises(BtfError):
        btf.find("thing", Kind.UNION)
    assert btf.find_all("hing") == []


def test_big_endian_blob() -> None:
    b = BtfBuilder(order=">")
    i = b.int_("int", 4, signed=True)
    s = b.struct("pair", 8, [("x", i, 0, 0), ("y", i, 32, 0)])
    btf = Btf(b.build())
    assert btf.byteorder == "big"
    assert btf.member(s, "y").offset == 4 and btf.sizeof(s) == 8


def test_bitfield_offsets_need_no_kind_flag_on_plain_members() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4)
    s = b.struct("plain", 8, [("x", i, 0, 0), ("y", i, 32, 0)])
    assert Btf(b.build()).member(s, "y").bitfield_size == 0


# -- must-fail vectors -------------------------------------------------------------


def test_error_family() -> None:
    assert issubclass(BtfError, GuestDataError)


def test_every_truncation_fails() -> None:
    blob = sample()[0].build()
    for n in range(len(blob)):
        with pytest.raises(BtfError):
            Btf(blob[:n])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"magic": 0x1234}, "magic"),
        ({"version": 2}, "version"),
        ({"hdr_len": 10}, "header length"),
        ({"hdr_len": 1 << 30}, "header length"),
        ({"type_len": 1 << 20}, "overrun"),
        ({"str_len": 1 << 20}, "overrun"),
        ({"str_off": 1 << 31}, "overrun"),
        ({"type_off": 2}, "aligned"),
        ({"str_off": 0}, "overlap"),
    ],
)
def test_lying_header(override: dict[str, int], message: str) -> None:
    with pytest.raises(BtfError, match=message):
        Btf(sample()[0].build(**override))


def test_vlen_that_lies_is_caught_at_load() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4)
    b.add(Kind.STRUCT, "s", 50, 4, b.s("x"), i, 0)  # claims 50 members, has 1
    with pytest.raises(BtfError, match=r"truncated|past the end"):
        Btf(b.build())


@pytest.mark.parametrize("kind", [0, 20, 31])
def test_invalid_kind(kind: int) -> None:
    b = BtfBuilder()
    b.add(kind, "x", 0, 0)
    with pytest.raises(BtfError, match="invalid kind"):
        Btf(b.build())


def test_string_offsets_out_of_range() -> None:
    b = BtfBuilder()
    b.int_("int", 4)
    b.types.append(struct.pack("<4I", 1 << 20, Kind.INT << 24, 4, 32))
    btf = Btf(b.build())
    btf.type(1)
    with pytest.raises(BtfError, match="string offset"):
        btf.type(2)


def test_string_section_must_end_in_nul() -> None:
    b = BtfBuilder()
    b.int_("int", 4)
    b.strings += b"tail"
    with pytest.raises(BtfError, match="NUL"):
        Btf(b.build())


def test_type_ids_out_of_range() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4)
    p = b.ptr(99)
    s = b.struct("s", 4, [("x", 1234, 0, 0)])
    a = b.array(i, 77, 3)
    btf = Btf(b.build())
    for bad in (p, s, a):
        with pytest.raises(BtfError, match="out of range"):
            btf.type(bad)
    for bad in (-1, len(btf), 1 << 40):
        with pytest.raises(BtfError, match="out of range"):
            btf.type(bad)


def test_cycles_are_errors() -> None:
    b = BtfBuilder()
    t1 = b.ref(Kind.TYPEDEF, "a", 2)
    b.ref(Kind.TYPEDEF, "b", t1)
    self_const = b.ref(Kind.CONST, "", 3)
    self_ptr = b.ref(Kind.PTR, "", 4)
    self_array = b.array(5, 5, 2)
    anon_loop = b.struct("loop", 8, [("", 6, 0, 0)])
    btf = Btf(b.build())
    for bad in (t1, self_const):
        with pytest.raises(BtfError, match="cyclic"):
            btf.resolve(bad)
        with pytest.raises(BtfError, match="cyclic"):
            btf.sizeof(bad)
    with pytest.raises(BtfError, match="deep"):
        btf.type_name(self_ptr)
    with pytest.raises(BtfError, match="cyclic"):
        btf.sizeof(self_array)
    with pytest.raises(BtfError, match="nest too deep"):
        btf.members(anon_loop)


def test_exponential_anonymous_members_are_bounded() -> None:
    b = BtfBuilder()
    prev = b.struct("leaf", 4, [("x", 0, 0, 0)])
    for level in range(40):  # each level has two anonymous copies of the previous
        prev = b.struct(f"s{level}", 4, [("", prev, 0, 0), ("", prev, 0, 0)])
    btf = Btf(b.build())
    with pytest.raises(BtfError, match="more than"):  # the cap, not 2**40 members
        btf.members(prev)


def test_random_corruption_only_raises_btf_error() -> None:
    """Flip bytes of a valid blob: every outcome is success or BtfError."""
    blob = sample()[0].build()
    rng = random.Random(1234)
    for _ in range(400):
        bad = bytearray(blob)
        for _ in range(rng.randint(1, 6)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            btf = Btf(bytes(bad))
            for type_id in range(len(btf)):
                btf.type(type_id)
                btf.type_name(type_id)
                try:
                    btf.sizeof(type_id)
                    btf.members(type_id)
                except BtfError:
                    pass
            btf.find_all("node")
        except BtfError:
            pass


# -- the vendor kernel's BTF against pahole ----------------------------------------


@cache
def vendor_vmlinux() -> Path:
    """The lab's cloud kernel (downloaded once, as the lab does to boot it): a LabError
    here is a failure, never a skip."""
    from sgmonitor.lab.kernel import fetch_kernel

    return fetch_kernel("cloud").vmlinux


@cache
def vendor_btf() -> Btf:
    return Btf.from_vmlinux(vendor_vmlinux())


def pahole(name: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """(size, {member: (bit offset, bitfield width)}) from ``pahole -C name vmlinux``.

    Members of anonymous structs and unions are listed too, at their offset in ``name``
    (as pahole prints them), and so are the members of a member whose type is an
    unnamed struct (``struct { ... } lru_gen;``), which ours does not flatten.
    """
    assert shutil.which("pahole"), "pahole missing: scripts/bootstrap installs dwarves"
    out = subprocess.run(
        ["pahole", "-C", name, str(vendor_vmlinux())], capture_output=True, text=True, check=True
    ).stdout
    size = int(re.search(r"/\* size: (\d+),", out).group(1))  # type: ignore[union-attr]
    members: dict[str, tuple[int, int]] = {}
    # "type name;", "type name[N][M];", "type name[];", "type name:bits;",
    # "type (*name)(args);" and "type name __attribute__((...));", each followed by
    # "/* offset size */" or "/* offset:bit size */".
    line_re = re.compile(
        r"[\s*(](\w+)\)?(?:\([^;]*\))?(?:\[\d*\])*(?::(\d+))?(?:\s+__attribute__\(\(.*\)\))?;"
        r"\s*/\*\s*(\d+)(?::\s*(\d+))?\s+\d+\s*\*/"
    )
    for line in out.splitlines():
        m = line_re.search(line)
        if m and m.group(1) not in members:
            width, byte, bit = m.group(2), int(m.group(3)), int(m.group(4) or 0)
            members[m.group(1)] = (byte * 8 + bit, int(width or 0))
    return size, members


STRUCTS = {
    "task_struct": ["pid", "tgid", "comm", "tasks", "real_parent", "cred", "__state", "in_execve"],
    "list_head": ["next", "prev"],
    "hlist_node": ["next", "pprev"],
    "cred": ["uid", "gid", "euid", "cap_effective"],
    "mm_struct": ["pgd", "mmap_base", "task_size", "mmlist"],
    "module": ["list", "name"],
}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_vendor_struct_layout_matches_pahole(name: str) -> None:
    btf = vendor_btf()
    size, expected = pahole(name)
    st = btf.find(name, Kind.STRUCT)
    assert btf.sizeof(st.id) == size
    ours = btf.members(st.id)
    for member in STRUCTS[name]:
        got = ours[member]
        assert (got.bit_offset, got.bitfield_size) == expected[member], member
    # Every member, not just the ones listed, is in pahole's view and agrees with it.
    assert set(ours) <= set(expected), sorted(set(ours) - set(expected))
    for member, got in ours.items():
        assert (got.bit_offset, got.bitfield_size) == expected[member], member


def test_vendor_btf_loads_and_hashes() -> None:
    btf = Btf.from_vmlinux(vendor_vmlinux())
    assert len(btf) > 50_000
    assert btf.sha256 == hashlib.sha256(btf.raw).hexdigest()
    assert (
        btf.type_name(btf.member(btf.find("task_struct", Kind.STRUCT).id, "comm").type)
        == "char [16]"
    )
