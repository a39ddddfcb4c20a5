"""x86-64 instruction lengths and direct branches, for checking kernel code by its calls.

A check that asks "where does this code call?" must walk it instruction by instruction:
searching the bytes for ``E8``/``E9`` would also match inside immediates and
displacements. This decoder mirrors what ``arch/x86/lib/insn.c`` (``insn_decode()``)
does for the kernel's own users (kprobes, alternatives): legacy and REX prefixes, the
one-, two- and three-byte opcode maps, ModRM, SIB, displacement and immediate. It knows
the length of every instruction a kernel built for x86-64 emits outside the FPU/SIMD
code (VEX, EVEX and 3DNow! encodings, which ``kernel_fpu_begin()`` sections use, raise
:class:`InsnError`), and it yields only what a check needs: the direct branches.

Guest bytes are hostile: every length is bounded (15 bytes, the architectural limit),
and bytes that are no instruction raise :class:`InsnError`, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sgmonitor.errors import GuestDataError

__all__ = ["Branch", "InsnError", "branches", "insn_length"]

MAX_INSN_LENGTH = 15

_LEGACY_PREFIXES = frozenset(b"\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65\x66\x67")

# One-byte map: opcodes with a ModRM byte, and their immediates.
_ALU = (0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38)  # add, or, adc, sbb, and, sub, xor, cmp
_MODRM_1 = frozenset(
    (
        *(op + i for op in _ALU for i in range(4)),
        *(0x63, 0x69, 0x6B, *range(0x80, 0x90), 0xC0, 0xC1, 0xC6, 0xC7),
        *(*range(0xD0, 0xD4), *range(0xD8, 0xE0), 0xF6, 0xF7, 0xFE, 0xFF),
    )
)
_IMM8_1 = frozenset(
    (
        *(op + 4 for op in _ALU),
        *(0x6A, 0x6B, 0x80, 0x83, 0xA8, *range(0xB0, 0xB8), 0xC0, 0xC1, 0xC6, 0xCD),
        *range(0xE4, 0xE8),
    )
)
_IMMZ_1 = frozenset((*(op + 5 for op in _ALU), 0x68, 0x69, 0x81, 0xA9, 0xC7))
_REL8_1 = frozenset((*range(0x70, 0x80), *range(0xE0, 0xE4), 0xEB))
_PLAIN_1 = frozenset(
    (
        *(*range(0x50, 0x60), *range(0x6C, 0x70), *range(0x90, 0xA0), *range(0xA4, 0xA8)),
        *(*range(0xAA, 0xB0), 0xC3, 0xC9, 0xCB, 0xCC, 0xCF, *range(0xEC, 0xF0)),
        *(0xF1, 0xF4, 0xF5, *range(0xF8, 0xFE)),
    )
)
# Invalid in 64-bit mode, or VEX/EVEX/XOP escapes this decoder does not read.
_UNSUPPORTED_1 = frozenset(
    (
        *(0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60, 0x61),
        *(0x62, 0x82, 0x9A, 0xC4, 0xC5, 0xD4, 0xD5, 0xD6, 0xEA),
    )
)

# Two-byte map (0F xx): most take a ModRM; these do not.
_PLAIN_2 = frozenset(
    (
        *(0x05, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x0E, *range(0x30, 0x38), 0x77),
        *(0xA0, 0xA1, 0xA2, 0xA8, 0xA9, 0xAA, *range(0xC8, 0xD0)),
    )
)
_IMM8_2 = frozenset((0x70, 0x71, 0x72, 0x73, 0xA4, 0xAC, 0xBA, 0xC2, 0xC4, 0xC5, 0xC6))
_REL32_2 = frozenset(range(0x80, 0x90))
_UNSUPPORTED_2 = frozenset((0x04, 0x0A, 0x0C, 0x0F, 0x24, 0x25, 0x26, 0x27, 0x36, 0x39))


class InsnError(GuestDataError):
    """Bytes that are not an instruction this decoder knows (or run past the code)."""


@dataclass(frozen=True)
class Branch:
    """A direct ``call``, ``jmp`` or conditional jump, and where it goes."""

    address: int
    kind: str  # "call", "jmp" or "jcc"
    target: int
    length: int


def _modrm_length(code: bytes, pos: int, address_size: int) -> int:
    """The bytes of ModRM, SIB and displacement starting at ``code[pos]``."""
    modrm = code[pos]
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 1
    if address_size == 2:  # 16-bit addressing: no SIB
        return 1 + (2 if (mod == 0 and rm == 6) or mod == 2 else mod)
    length = 1
    if rm == 4:
        length += 1
        if mod == 0 and code[pos + 1] & 7 == 5:
            return length + 4
    if mod == 0:
        return length + (4 if rm == 5 else 0)
    return length + (1 if mod == 1 else 4)


def _decode(code: bytes, pos: int) -> tuple[int, str | None, int]:
    """(length, branch kind or None, the branch's displacement) of the instruction at
    ``code[pos]``. ``code`` must hold at least 15 bytes from ``pos`` or end there."""
    start = pos
    operand16 = address32 = rex_w = False
    while code[pos] in _LEGACY_PREFIXES:
        operand16 |= code[pos] == 0x66
        address32 |= code[pos] == 0x67
        pos += 1
        if pos - start >= MAX_INSN_LENGTH:
            raise InsnError("more prefixes than an instruction may have")
    if 0x40 <= code[pos] <= 0x4F:
        rex_w = bool(code[pos] & 8)
        pos += 1
    address_size = 4 if address32 else 8
    immz = 2 if operand16 else 4
    opcode = code[pos]
    pos += 1
    kind: str | None = None
    displacement = 0
    if opcode == 0x0F:
        opcode = code[pos]
        pos += 1
        if opcode in (0x38, 0x3A):  # three-byte maps: all take a ModRM, 0F 3A an imm8
            pos += 1
            pos += _modrm_length(code, pos, address_size) + (opcode == 0x3A)
        elif opcode in _UNSUPPORTED_2:
            raise InsnError(f"0f {opcode:02x} is not an instruction this decoder reads")
        elif opcode in _REL32_2:
            kind, displacement = "jcc", int.from_bytes(code[pos : pos + 4], "little", signed=True)
            pos += 4
        elif opcode not in _PLAIN_2:
            pos += _modrm_length(code, pos, address_size) + (opcode in _IMM8_2)
    elif opcode in _UNSUPPORTED_1:
        raise InsnError(f"{opcode:02x} is not an instruction this decoder reads")
    elif opcode in (0xE8, 0xE9):
        kind = "call" if opcode == 0xE8 else "jmp"
        displacement = int.from_bytes(code[pos : pos + 4], "little", signed=True)
        pos += 4
    elif opcode in _REL8_1:
        kind = "jmp" if opcode == 0xEB else "jcc"
        displacement = int.from_bytes(code[pos : pos + 1], "little", signed=True)
        pos += 1
    elif opcode in _MODRM_1:
        modrm_at = pos
        pos += _modrm_length(code, pos, address_size)
        if opcode in (0xF6, 0xF7) and (code[modrm_at] >> 3) & 7 in (0, 1):  # test r/m, imm
            pos += 1 if opcode == 0xF6 else immz
        else:
            pos += (opcode in _IMM8_1) + (immz if opcode in _IMMZ_1 else 0)
    elif 0xB8 <= opcode <= 0xBF:  # mov reg, imm64 with REX.W
        pos += 8 if rex_w else immz
    elif 0xA0 <= opcode <= 0xA3:  # mov with a moffs
        pos += address_size
    elif opcode in (0xC2, 0xCA):
        pos += 2
    elif opcode == 0xC8:
        pos += 3
    elif opcode in _IMM8_1 or opcode in _IMMZ_1:
        pos += (opcode in _IMM8_1) + (immz if opcode in _IMMZ_1 else 0)
    elif opcode not in _PLAIN_1:
        raise InsnError(f"{opcode:02x} is not an instruction this decoder reads")
    length = pos - start
    if length > MAX_INSN_LENGTH:
        raise InsnError(f"a {length}-byte instruction (15 at most)")
    return length, kind, displacement


def insn_length(code: bytes, offset: int = 0) -> int:
    """The length of the instruction at ``code[offset]``.

    :raises InsnError: not an instruction this decoder reads, or cut short by the end
    """
    return _decode_at(code, offset, f"+{offset:#x}")[0]


def _decode_at(code: bytes, offset: int, where: str) -> tuple[int, str | None, int]:
    """:func:`_decode` of the instruction at ``code[offset]`` (``where`` names it in the
    error), refusing one that the end of ``code`` cuts short."""
    window = code[offset : offset + MAX_INSN_LENGTH]
    try:
        decoded = _decode(window, 0)
    except IndexError:
        decoded = (MAX_INSN_LENGTH + 1, None, 0)
    if decoded[0] > len(window):
        raise InsnError(f"the code ends inside an instruction at {where}")
    return decoded


def branches(code: bytes, address: int) -> Iterator[Branch]:
    """Every direct branch in ``code`` (which starts at guest address ``address``), from
    a linear sweep: ``code`` must be whole instructions, like one function's body.

    :raises InsnError: bytes that are no instruction, or one cut by the end of ``code``
    """
    pos = 0
    while pos < len(code):
        length, kind, displacement = _decode_at(code, pos, f"{address + pos:#x}")
        if kind is not None:
            end = address + pos + length
            target = (end + displacement) & 0xFFFF_FFFF_FFFF_FFFF
            yield Branch(address + pos, kind, target, length)
        pos += length
