"""crc32c of arrays, and the crc32c of a concatenation derived from its parts' (one pass per read)."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest

from pipeline.store.checksums import Concat, crc32c, row_crcs


def test_crc32c_is_the_one_zarr_writes() -> None:
    data = np.random.default_rng(0).integers(0, 256, 100_003, np.uint8)
    assert crc32c(data) == google_crc32c.value(data.tobytes())  # the codec inside every shard
    assert crc32c(data.view(np.uint8)[:0]) == 0


@pytest.mark.parametrize("row_bytes", [1, 3, 16, 4096, 720_896])
def test_concat_gives_the_crc32c_of_the_whole(row_bytes: int) -> None:
    rows = np.random.default_rng(row_bytes).integers(0, 256, (5, row_bytes), np.uint8)
    concat = Concat(row_bytes)
    crcs = row_crcs(rows)
    for n in range(1, 6):
        assert concat.fold(crcs[:n]) == crc32c(rows[:n]), n


def test_concat_notices_any_changed_part() -> None:
    rows = np.random.default_rng(1).integers(0, 256, (4, 64), np.uint8)
    concat, crcs = Concat(64), row_crcs(rows)
    whole = concat.fold(crcs)
    for i in range(4):
        changed = rows.copy()
        changed[i, 7] ^= 1
        assert concat.fold(row_crcs(changed)) != whole
    assert concat.fold(crcs[::-1]) != whole  # the order of the parts matters
