"""crc32c of arrays, and the crc32c of a concatenation from the crc32c of its parts.

Every cached feature row has a crc32c in its commit record, and every inner chunk of a shard (a few
rows) has one inside the shard. Both cover the same bytes, so the loader reads each byte through
crc32c once, a chunk's rows in one call, and compares the result with the chunk's crc32c and with the
one its rows' recorded crc32c give together (`Concat`: a linear map, no second pass): a window is
checked against both at the cost of one pass (~20% of a checked read of ViT-g windows from the page
cache, `pipeline bench`).
"""

from __future__ import annotations

import numpy as np
from fastcrc import crc32 as _crc32

POLY = 0x82F63B78  # crc32c (Castagnoli), reflected


def crc32c(array: np.ndarray) -> int:
    """crc32c of an array's bytes in memory order (little-endian on every machine we run on).

    `fastcrc` (Rust, carry-less multiply folding; MIT): it releases the GIL, so loader threads check rows
    in parallel, and its folding outruns a loop of hardware crc32c instructions on the large rows here.
    """
    return int(_crc32.iscsi(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def row_crcs(rows: np.ndarray) -> list[int]:
    """crc32c of each row of [F, ...] (one feature frame per row)."""
    return [crc32c(r) for r in rows]


def _apply(matrix: list[int], vector: int) -> int:
    """A 32x32 matrix over GF(2) (its columns as ints) times a 32-bit vector."""
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector, i = vector >> 1, i + 1
    return out


def _zeros_operator(nbytes: int) -> list[int]:
    """The map a crc register undergoes over `nbytes` zero bytes (x^(8 nbytes) mod P), by squaring."""
    op = [POLY] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit
    for _ in range(3):  # 2, 4, 8 bits: one zero byte
        op = [_apply(op, column) for column in op]
    result = [1 << n for n in range(32)]  # identity
    while nbytes:
        if nbytes & 1:
            result = [_apply(op, column) for column in result]
        op = [_apply(op, column) for column in op]
        nbytes >>= 1
    return result


class Concat:
    """crc32c(A + B) from crc32c(A) and crc32c(B), for every B of `nbytes` bytes (a feature row).

    crc(A + B) = Z(crc(A)) ^ crc(B), where Z shifts a register over len(B) zero bytes (the pre- and
    post-inversion of crc32c cancel); Z is linear, so it is kept as four 256-entry byte tables.
    """

    def __init__(self, nbytes: int):
        z = _zeros_operator(nbytes)
        self.tables = [[_apply(z, b << (8 * k)) for b in range(256)] for k in range(4)]

    def __call__(self, crc_a: int, crc_b: int) -> int:
        t0, t1, t2, t3 = self.tables
        return t0[crc_a & 0xFF] ^ t1[(crc_a >> 8) & 0xFF] ^ t2[(crc_a >> 16) & 0xFF] ^ t3[crc_a >> 24] ^ crc_b

    def fold(self, crcs: list[int]) -> int:
        """crc32c of the concatenation of equal-length parts, from theirs."""
        out = crcs[0]
        for c in crcs[1:]:
            out = self(out, c)
        return out
