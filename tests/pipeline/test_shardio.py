"""The native half of the direct shard reader (pipeline/_shardio.c): its crc32c kernels against an
independent crc32c, and its read plans against their contract, byte for byte and error for error."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from pipeline import shard_reader

try:
    from pipeline import _shardio
except ImportError:  # built without a C compiler
    _shardio = None
KERNEL = _shardio.kernel if _shardio else ""
KERNELS = {"pclmul": ["pclmul"], "vpclmul256": ["pclmul", "vpclmul256"],
           "vpclmul-crc32": ["pclmul", "vpclmul256", "vpclmul", "vpclmul-crc32"]}.get(KERNEL, [])
native = pytest.mark.skipif(not KERNEL, reason="no native reader here (not built, or no crc32c kernel for this "
                                               "CPU): the Python executor runs")

# Lengths around every boundary the kernels branch on (8-byte words, 64-byte xmm blocks, 128 and 512 minimums,
# 256-byte ymm and zmm blocks, the hybrid's 25,600-byte blocks), a feature row, and a whole ViT-g chunk with its
# crc32c.
HYBRID_BLOCK = 256 * 64 + 3 * 48 * 64
LENGTHS = [*range(0, 300), 511, 512, 513, 1023, 1024, 1025, 4095, 4096, 4097, 65_536 + 7, 720_896, 4 * 720_896 + 4,
           *(k * HYBRID_BLOCK + d for k in (1, 2, 3) for d in (-257, -1, 0, 1, 8, 255, 256))]


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_computes_crc32c(kernel: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, max(LENGTHS) + 64, np.uint8)
    for n in LENGTHS:
        for skew in (0, 1, 7, 33):  # not only 64-byte aligned starts
            part = data[skew : skew + n]
            assert _shardio.crc32c(part, 0, kernel) == google_crc32c.value(part.tobytes()), (n, skew)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k in ("pclmul", "vpclmul256", "vpclmul")])
def test_every_copy_kernel_copies_and_computes_crc32c(kernel: str) -> None:
    """The one-pass copy and crc32c kernels (what the loader reads out of maps with), at every length around
    their branch points, unaligned source and destination: the bytes arrive, the crc32c is google-crc32c's,
    nothing past the end is written."""
    data = np.random.default_rng(3).integers(0, 256, max(LENGTHS) + 64, np.uint8)
    for n in LENGTHS:
        for skew in (0, 1, 7, 33):
            part, out = data[skew : skew + n], np.full(n + 9, 0xAB, np.uint8)
            assert _shardio.copy_crc32c(out[1 + skew % 5 :], part, 0, kernel) == google_crc32c.value(part.tobytes())
            assert bytes(out[1 + skew % 5 : 1 + skew % 5 + n]) == part.tobytes(), (n, skew)
            assert set(out[: 1 + skew % 5].tolist()) <= {0xAB} and set(out[1 + skew % 5 + n :].tolist()) <= {0xAB}
    assert _shardio.copy_crc32c(np.zeros(10, np.uint8), data[5:10], _shardio.crc32c(data[:5]), kernel) == \
        google_crc32c.value(data[:10].tobytes())  # continues from a register like crc32c


@native
def test_the_copy_kernel_refuses_a_short_destination_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="smaller"):
        _shardio.copy_crc32c(np.zeros(3, np.uint8), b"abcd")
    with pytest.raises(ValueError, match="not available"):
        _shardio.copy_crc32c(np.zeros(4, np.uint8), b"abcd", 0, "sse-nope")


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_crc32c_continues_across_calls(kernel: str) -> None:
    data = np.random.default_rng(1).integers(0, 256, 300_001, np.uint8)
    whole = google_crc32c.value(data.tobytes())
    for cut in (1, 63, 64, 255, 256, 1000, 262_144, 300_000):
        assert _shardio.crc32c(data[cut:], _shardio.crc32c(data[:cut], 0, kernel), kernel) == whole, cut


@native
def test_an_unknown_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        _shardio.crc32c(b"x", 0, "sse-nope")


@contextlib.contextmanager
def _shard(tmp_path: Path, n: int) -> Iterator[tuple[int, np.ndarray]]:
    """A file of n random bytes, open for reading: (fd, its bytes)."""
    data = np.random.default_rng(n).integers(0, 256, n, np.uint8)
    path = tmp_path / "shard"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, data
    finally:
        os.close(fd)


@native
@pytest.mark.parametrize("piece", [64, 1000, 256 * 1024])
def test_a_plan_reads_checksums_and_returns_the_trailers(tmp_path: Path, piece: int) -> None:
    """Rows land at their places, each with the crc32c of its bytes and (trailer 1) the uint32 after them;
    both executors agree, for pieces smaller and larger than the rows."""
    with _shard(tmp_path, 10_000) as (fd, data):
        plan = np.array([[fd, 0, 5000, 100, 1], [fd, 6000, 3996, 5200, 1], [fd, 9000, 1000, 9200, 0]], np.int64)
        for run in (_shardio.read_plan, shard_reader._read_plan):
            out = np.zeros(10_200, np.uint8)
            crcs, stored = np.zeros(3, np.uint32), np.zeros(3, np.uint32)
            assert run(out, plan, crcs, stored, piece) == 3
            for (_, offset, n, at, trailer), crc, tail in zip(plan.tolist(), crcs, stored, strict=True):
                assert bytes(out[at : at + n]) == bytes(data[offset : offset + n])
                assert crc == google_crc32c.value(data[offset : offset + n].tobytes())
                assert tail == (int(data[offset + n : offset + n + 4].view("<u4")[0]) if trailer else 0)


@native
def test_a_plan_says_which_row_a_file_ended_inside(tmp_path: Path) -> None:
    with _shard(tmp_path, 1000) as (fd, _):
        for rows, short in (([[fd, 0, 500, 0, 0], [fd, 500, 500, 500, 0]], 2),  # all there
                            ([[fd, 0, 500, 0, 0], [fd, 600, 500, 500, 0]], 1),  # the data ends early
                            ([[fd, 0, 996, 0, 1]], 1),  # the data and its trailer end exactly at the end
                            ([[fd, 0, 997, 0, 1]], 0)):  # the trailer is cut
            for run in (_shardio.read_plan, shard_reader._read_plan):
                out, crcs, stored = np.zeros(1000, np.uint8), np.zeros(2, np.uint32), np.zeros(2, np.uint32)
                assert run(out, np.array(rows, np.int64), crcs, stored, 256) == short, (rows, run)


@native
def test_a_failed_read_is_an_oserror_and_a_bad_plan_a_valueerror(tmp_path: Path) -> None:
    with _shard(tmp_path, 100) as (fd, _):
        pass  # closed now: EBADF
    out, crcs, stored = np.zeros(100, np.uint8), np.zeros(1, np.uint32), np.zeros(1, np.uint32)
    with pytest.raises(OSError, match="Bad file descriptor"):
        _shardio.read_plan(out, np.array([[fd, 0, 10, 0, 0]], np.int64), crcs, stored, 256)
    with pytest.raises(ValueError, match="outside"):
        _shardio.read_plan(out, np.array([[fd, 0, 10, 95, 0]], np.int64), crcs, stored, 256)
    with pytest.raises(ValueError, match=r"int64 \[n, 5\]"):
        _shardio.read_plan(out, np.zeros(4, np.int64), crcs, stored, 256)
    with pytest.raises(TypeError):
        _shardio.read_plan(bytes(100), np.array([[fd, 0, 10, 0, 0]], np.int64), crcs, stored, 256)  # read-only


@native
def test_the_reader_uses_the_native_executor_where_it_is_built() -> None:
    assert _shardio is not None and _shardio.kernel == shard_reader.KERNEL
    assert (os.environ.get("PIPELINE_NATIVE_READS", "1") != "0") == shard_reader.NATIVE


def test_ci_builds_the_native_reader() -> None:
    """Where the suite is run with PIPELINE_REQUIRE_NATIVE=1 (.ci/run), a missing build is a failure, not a
    silent fall back to the slower executor."""
    if os.environ.get("PIPELINE_REQUIRE_NATIVE") != "1":
        pytest.skip("PIPELINE_REQUIRE_NATIVE is not set")
    assert _shardio is not None, "pipeline._shardio was not built (see the install's log for the compiler's error)"
    assert shard_reader.KERNEL, f"pipeline._shardio has no crc32c kernel for this CPU ({os.uname().machine})"
