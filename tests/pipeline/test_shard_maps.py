"""Reads out of kept maps of shard files (pipeline/shard_maps.py, `read_mapped` of pipeline/_shardio.c): the
read plans' contract out of a map, the SIGBUS guard (a file cut short under its map is an error of that
read, not a dead process, and any other SIGBUS still ends the process), and a map's reuse only while its
file is the one that was mapped."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch

from pipeline import shard_reader
from pipeline.shard_maps import ShardMaps

try:
    from pipeline import _shardio
except ImportError:  # built without a C compiler
    _shardio = None
# Lengths around every boundary of the copy kernel (its 512-byte minimum, 256-byte blocks, the 64-byte and
# 8-byte steps of the tail) and a whole ViT-g chunk with its crc32c.
LENGTHS = [*range(0, 300), 511, 512, 513, 767, 768, 769, 1023, 1024, 1025, 4097, 65_536 + 7, 4 * 720_896 + 4]
native = pytest.mark.skipif(not shard_reader.KERNEL, reason="no native reader here (not built, or no crc32c kernel)")


def _file(tmp_path: Path, n: int, name: str = "shard") -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(n).integers(0, 256, n, np.uint8)
    path = tmp_path / name
    path.write_bytes(data.tobytes())
    return path, data


def _mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


@native
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("piece", [64, 1000, 256 * 1024])
def test_a_plan_out_of_maps_reads_what_read_calls_read(tmp_path: Path, piece: int, fused: bool) -> None:
    """Rows of two files out of their maps land where read calls put them, with the same crc32c and trailers,
    copied and checksummed in one pass or each piece after its memcpy."""
    (a, data_a), (b, data_b) = _file(tmp_path, 10_000, "a"), _file(tmp_path, 7_000, "b")
    rows = [[0, 0, 5000, 100, 1], [1, 6000, 996, 5200, 1], [0, 9000, 1000, 6300, 0], [1, 0, 3000, 7300, 0]]
    plan = np.array(rows, np.int64)
    out, crcs, stored = np.zeros(10_400, np.uint8), np.zeros(4, np.uint32), np.zeros(4, np.uint32)
    assert _shardio.read_mapped(out, [_mapped(a), _mapped(b)], plan, crcs, stored, piece, fused) == 4
    for (f, offset, n, at, trailer), crc, tail in zip(rows, crcs, stored, strict=True):
        data = (data_a, data_b)[f]
        assert bytes(out[at : at + n]) == bytes(data[offset : offset + n])
        assert crc == google_crc32c.value(data[offset : offset + n].tobytes())
        assert tail == (int(data[offset + n : offset + n + 4].view("<u4")[0]) if trailer else 0)


@native
@pytest.mark.skipif(not (_shardio and _shardio.copy_kernel), reason="no copy-and-crc32c kernel for this CPU")
def test_the_copy_kernel_copies_and_computes_crc32c_at_every_length() -> None:
    """The one-pass copy and crc32c, at lengths around each of its branch points and at unaligned source
    and destination offsets: the bytes arrive, and the crc32c is google-crc32c's."""
    data = np.random.default_rng(2).integers(0, 256, max(LENGTHS) + 64, np.uint8).tobytes()
    for n in LENGTHS:
        for skew in (0, 1, 7, 33):
            plan = np.array([[0, skew, n, 5 + skew % 3, 0]], np.int64)
            out, crcs, stored = np.zeros(n + 8, np.uint8), np.zeros(1, np.uint32), np.zeros(1, np.uint32)
            assert _shardio.read_mapped(out, [data], plan, crcs, stored, 1 << 30, True) == 1
            assert bytes(out[5 + skew % 3 : 5 + skew % 3 + n]) == data[skew : skew + n], (n, skew)
            assert crcs[0] == google_crc32c.value(data[skew : skew + n]), (n, skew)


@native
def test_a_plan_out_of_maps_says_which_row_a_map_ended_inside(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 1000)
    for rows, short in (([[0, 0, 500, 0, 0], [0, 500, 500, 500, 0]], 2),  # all there
                        ([[0, 0, 500, 0, 0], [0, 600, 500, 500, 0]], 1),  # the data ends early
                        ([[0, 0, 996, 0, 1]], 1), ([[0, 0, 997, 0, 1]], 0),  # the trailer ends at the end / is cut
                        ([[0, 2000, 1, 0, 0]], 0)):  # past the end
        out, crcs, stored = np.zeros(1000, np.uint8), np.zeros(2, np.uint32), np.zeros(2, np.uint32)
        assert _shardio.read_mapped(out, [_mapped(path)], np.array(rows, np.int64), crcs, stored, 256) == short, rows


@native
def test_a_bad_mapped_plan_is_a_valueerror(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 100)
    out, crcs, stored = np.zeros(100, np.uint8), np.zeros(1, np.uint32), np.zeros(1, np.uint32)
    with pytest.raises(ValueError, match="names map 1 of 1"):
        _shardio.read_mapped(out, [_mapped(path)], np.array([[1, 0, 10, 0, 0]], np.int64), crcs, stored, 256)
    with pytest.raises(ValueError, match="outside"):
        _shardio.read_mapped(out, [_mapped(path)], np.array([[0, 0, 10, 95, 0]], np.int64), crcs, stored, 256)
    with pytest.raises(TypeError):
        _shardio.read_mapped(out, 5, np.array([[0, 0, 10, 0, 0]], np.int64), crcs, stored, 256)


@native
def test_a_file_cut_short_under_its_map_is_an_oserror_of_that_read(tmp_path: Path) -> None:
    """The kernel answers an access past the end of a file cut after it was mapped with SIGBUS: the guarded
    copy turns it into an OSError naming the plan row, and the process (and later reads) go on."""
    path, data = _file(tmp_path, 1 << 20)
    mapped = _mapped(path)
    plan = np.array([[0, 0, 4096, 0, 0], [0, 600_000, 300_000, 4096, 1]], np.int64)
    out, crcs, stored = np.zeros(304_096, np.uint8), np.zeros(2, np.uint32), np.zeros(2, np.uint32)
    os.truncate(path, 8192)
    for _ in range(2):  # the guard is set again for every call
        with pytest.raises(OSError, match=r"SIGBUS.*row 1.*cut short"):
            _shardio.read_mapped(out, [mapped], plan, crcs, stored, 65536)
    assert _shardio.read_mapped(out, [mapped], plan[:1], crcs, stored, 65536) == 1  # what is still there reads
    assert bytes(out[:4096]) == bytes(data[:4096])


SIGBUS_OUTSIDE_A_READ = """
import faulthandler, mmap, os, sys
import numpy as np
from pipeline import _shardio
if sys.argv[2] == "faulthandler":
    faulthandler.enable()
path = sys.argv[1]
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
plan = np.array([[0, 0, 10, 0, 0]], np.int64)
_shardio.read_mapped(np.zeros(10, np.uint8), [m], plan, np.zeros(1, np.uint32), np.zeros(1, np.uint32), 64)
os.truncate(path, 0)
print(np.frombuffer(m, np.uint8)[500_000], flush=True)  # not a guarded copy: must not be swallowed
print("survived")
"""


@native
@pytest.mark.parametrize("before", ["default", "faulthandler"])
def test_a_sigbus_outside_a_guarded_read_still_ends_the_process(tmp_path: Path, before: str) -> None:
    """The guard only catches its own copies: any other SIGBUS goes to the handler installed before it
    (faulthandler prints its traceback) or the default action, and the process ends with SIGBUS."""
    path, _ = _file(tmp_path, 1 << 20)
    run = subprocess.run([sys.executable, "-c", SIGBUS_OUTSIDE_A_READ, str(path), before], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == -signal.SIGBUS and "survived" not in run.stdout, (run.returncode, run.stderr)
    assert ("Bus error" in run.stderr) == (before == "faulthandler")


def test_a_map_is_kept_while_its_file_is_the_one_mapped(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 5000)
    maps = ShardMaps()
    first = maps.get(str(path))
    assert maps.get(str(path)) is first and bytes(first[:10]) == bytes(data[:10])
    with open(path, "r+b") as f:  # changed in place (same file, same size): the map shows it
        f.write(b"\xff" * 10)
    assert bytes(maps.get(str(path))[:10]) == b"\xff" * 10
    replacement = tmp_path / "new"
    replacement.write_bytes(b"\x01" * 5000)
    os.replace(replacement, path)  # another file under the name: mapped again
    again = maps.get(str(path))
    assert again is not first and bytes(again[:4]) == b"\x01" * 4
    os.truncate(path, 3000)  # cut: mapped again, at its new size
    assert len(maps.get(str(path))) == 3000
    path.unlink()
    with pytest.raises(FileNotFoundError):
        maps.get(str(path))
    path.write_bytes(b"")
    with pytest.raises(ValueError):  # nothing to map: the caller reads it with read calls, which name it
        maps.get(str(path))


def test_the_cache_keeps_the_most_recently_used_maps(tmp_path: Path) -> None:
    paths = [str(_file(tmp_path, 100 + k, f"s{k}")[0]) for k in range(4)]
    maps = ShardMaps(limit=2)
    held = maps.get(paths[0])
    maps.get(paths[1])
    maps.get(paths[0])  # used again: paths[1] is now the oldest
    maps.get(paths[2])
    assert len(maps) == 2 and maps.get(paths[0]) is held
    assert bytes(held[:4]) == bytes(Path(paths[0]).read_bytes()[:4])  # a dropped map a reader holds stays valid
    maps.forget([paths[0]])
    assert maps.get(paths[0]) is not held


@native
def test_a_sigbus_in_the_loaders_reads_ends_as_the_damage_named(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a map that went stale under read_windows (its file cut after it was mapped, and the
    identity check did not see it: a race, or a disk error) does not end the process: the map is dropped,
    the windows are read again alone, and the damage is named as a read call names it."""
    from pipeline.errors import DamagedDataError
    from pipeline.store import FeatureStore
    from tests.pipeline.test_store import _all_windows, _shard_file, _two_attempts

    monkeypatch.setattr(shard_reader, "NATIVE", True)
    monkeypatch.setattr(shard_reader, "MAPPED", True)
    _, views = _two_attempts(str(tmp_path))
    store = FeatureStore(str(tmp_path), {"x": 1})
    windows = [w for w in _all_windows(views, 3) if w[1].view_id == "v" and w[2] == 0]
    out = torch.empty(len(_all_windows(views, 3)), 3, 2, 4, dtype=torch.bfloat16)
    assert store.read_windows(out, windows, 3) == [None]  # clean; the shard's index is read and kept
    path = str(_shard_file(store, views["v"], "features", 0))
    stale, get, forgotten = shard_reader.MAPS.get(path), shard_reader.MAPS.get, []
    monkeypatch.setattr(shard_reader.MAPS, "get", lambda p: stale if p == path else get(p))
    monkeypatch.setattr(shard_reader.MAPS, "forget", forgotten.extend)
    os.truncate(path, 0)  # every page of the map is past the end of the file now: an access is SIGBUS
    (error,) = store.read_windows(out, windows, 3)
    assert forgotten == [path]  # the guarded copy met SIGBUS and the read plan failed
    assert isinstance(error, DamagedDataError) and path in str(error) and "cut short" in str(error), error
