"""The x86-64 decoder against the GNU assembler and objdump: lengths and branch targets
of assembled instructions, hostile bytes refused, and a real kernel's code decoded to
the very instruction boundaries objdump finds."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest
from guests import MAIN, GuestUnderTest, only

from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.kernel.insn import InsnError, branches, insn_length
from sgmonitor.traditional import open_guest_kernel

# A spread of encodings: prefixes, REX, ModRM/SIB/displacement forms, every immediate
# size, the two- and three-byte maps, and each kind of direct branch.
ASSEMBLY = """
    nop
    endbr64
    push %rbp
    mov %rsp, %rbp
    movabs $0x1122334455667788, %rax
    mov $0x12345678, %ecx
    mov $0x1234, %cx
    add $1, %al
    add $0x1000, %eax
    addq $0x7f, 0x10(%rsp)
    addl $0x12345678, 0x12345678(%rbx,%rcx,4)
    lea 0x0(%rip), %rdi
    mov %gs:0x1234, %rax
    lock cmpxchg %rdx, (%rdi)
    testb $1, 0x20(%rdi)
    testl $0x100, (%rsi)
    imul $0x40, %rax, %rax
    imul $0x4000, %rax, %rax
    movzbl (%rax,%rbx,1), %ecx
    cmove %rdx, %rax
    sete %al
    bt $3, %eax
    shld $4, %rax, %rdx
    rdmsr
    wrmsr
    swapgs
    mov %cr3, %rax
    clac
    pause
    rep movsb
    in $0x60, %al
    outsb
    crc32q %rax, %rbx
    pshufd $0x1b, %xmm0, %xmm1
    ud2
    int3
    int $0x80
    enter $16, $0
    ret $8
    call target
    jmp target
    jmp near
    je target
    jne near
    jrcxz near
near:
    ret
    .fill 300, 1, 0x90
target:
    ret
"""


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[tuple[int, str]]]:
    """The code as bytes, and objdump's (offset, text) of every instruction in it."""
    work = tmp_path_factory.mktemp("insn")
    source, obj = work / "a.s", work / "a.o"
    source.write_text(".text\n" + ASSEMBLY)
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    raw = work / "a.bin"
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    return raw.read_bytes(), _objdump(raw)


def _objdump(path: Path, vma: int = 0) -> list[tuple[int, str]]:
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-mi386:x86-64", f"--adjust-vma={vma:#x}", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = (re.match(r"^\s*([0-9a-f]+):\t[0-9a-f ]+\t(.*)$", line) for line in out.splitlines())
    return [(int(m[1], 16), m[2]) for m in found if m]


def test_lengths_match_the_assembler(assembled: tuple[bytes, list[tuple[int, str]]]) -> None:
    code, listing = assembled
    starts = [offset for offset, _ in listing]
    decoded, pos = [], 0
    while pos < len(code):
        decoded.append(pos)
        pos += insn_length(code, pos)
    assert decoded == starts
    assert len(starts) > 340  # the assembly and the nop fill, all of it decoded


def test_branches_and_their_targets_match_objdump(
    assembled: tuple[bytes, list[tuple[int, str]]],
) -> None:
    code, listing = assembled
    base = 0xFFFF_FFFF_8100_0000
    expected = []
    for offset, text in listing:
        m = re.match(r"(call|jmp|j[a-z]+)\s+(?:0x)?([0-9a-f]+)$", text.strip())
        if m and not m[1].startswith("jrcxz"):
            kind = m[1] if m[1] in ("call", "jmp") else "jcc"
            expected.append((base + offset, kind, base + int(m[2], 16)))
    found = [(b.address, b.kind, b.target) for b in branches(code, base)]
    jrcxz = next(o for o, t in listing if t.startswith("jrcxz"))
    assert [f for f in found if f[0] != base + jrcxz] == expected
    assert {b[1] for b in expected} == {"call", "jmp", "jcc"}


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (b"\xe8\x00\x00", "ends inside"),  # a call cut short
        (b"\x66" * 15 + b"\x90", "prefixes"),
        (b"\xc5\xf8\x77", "c5"),  # VEX (vzeroupper)
        (b"\x0f\x0f\xc1\x9e", "0f 0f"),  # 3DNow!
        (b"\x62\xf1\x7c\x48\x28\xc1", "62"),  # EVEX
        (b"", "ends inside"),
    ],
)
def test_bytes_that_are_no_instruction_are_refused(code: bytes, why: str) -> None:
    with pytest.raises(InsnError, match=why):
        insn_length(code)
    if code:
        with pytest.raises(InsnError, match=why):
            list(branches(code, 0x1000))


@pytest.mark.guest
@only(MAIN)
def test_kernel_code_decodes_as_objdump_does(guest: GuestUnderTest, tmp_path: Path) -> None:
    """Every function in the first 2 MiB of the guest's text, plus x64_sys_call and the
    syscall entry, decoded to objdump's instruction boundaries."""
    with QemuGuest(guest.info.qmp) as live, live.paused():
        kernel = open_guest_kernel(live)
        symbols = kernel.symbols
        stext = symbols["_stext"]  # type: ignore[index]
        text = kernel.memory.read(stext, 2 << 20)
    image = tmp_path / "text.bin"
    image.write_bytes(text)
    boundaries = {offset for offset, _ in _objdump(image, stext)}
    starts = sorted({a for a in symbols.addresses if stext <= a < stext + len(text)})  # type: ignore[attr-defined]
    checked = refused = 0
    for start, end in itertools.pairwise(starts):
        if start not in boundaries:
            continue  # objdump's own sweep is out of step here (data before the symbol)
        pos, body = 0, text[start - stext : end - stext]
        try:
            while pos < len(body):
                assert start + pos in boundaries, (symbols.lookup(start), pos)  # type: ignore[attr-defined]
                pos += insn_length(body, pos)
        except InsnError:
            refused += 1
            continue
        checked += 1
    assert checked > 3000 and refused < checked / 100, (checked, refused)
