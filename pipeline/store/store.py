"""The feature cache on Zarr v3: layout, open + check, the index of commits and failures, checked reads.

Layout (format version 2)::

    <cache.path>/                          local folder or fsspec URL (s3://, gs://, ...)
      <fingerprint[:16]>/                  one store per fingerprint; caches are never mixed
        zarr.json                          root group; attributes: format_version, fingerprint {digest, spec}
        parts/<part_id>/<attempt>/         one Zarr group per task attempt, written once, never changed
          features     [F, tokens, D]      uint16 (bfloat16 bits) | float16 | float32, as the encoder
                                           produced them (before the layer norm); chunks (c, tokens, D) with a
                                           crc32c each, shards (S, tokens, D); fill value NaN; attr logical_dtype
          states       [F, 7]   float32    cartesian xyz + extrinsic-xyz Euler + gripper, per frame (crc32c)
          actions      [F, 7]   float32    row i: frame i -> i+1 of the same view; NaN on a view's last frame
          frame_index  [F]      int32      raw video frame index of each row
        commits/<part_id>.<attempt>.json   an attempt's index, written last (write-then-rename, or one PUT):
                                           its views, their rows, what they came from, crc32c digests
        claims/<part_id>.json              advisory: an extract run is working on this part now
        failures/<episode_key>.json        one per failed episode: reason, source identity, settings
        quarantine/<commit>.json           commit records moved aside by `verify --repair` (data kept)

Rules that make it safe for many writers, and for any of them to be killed at any moment (docs/store.md):
- every task attempt writes its arrays under a new path of its own, and its commit record names it;
  nothing ever overwrites or deletes arrays a commit record references (only `gc`, after a grace period,
  and `verify --repair`, which only moves records aside);
- the commit record is written last, atomically; readers and re-runs see only committed attempts, so a
  killed task leaves nothing that can be mistaken for data;
- a view is identified by its content (episode, camera, phase, stride, crop box); a view committed more
  than once (two runs, a retry of a slow task, a re-extracted episode) is read from one record, by one
  fixed rule: the newest `committed_at`, then the greatest record name;
- every read is checked: each chunk's crc32c inside its shard, each row's crc32c against the commit
  record; a missing chunk reads as NaN and fails the row check. Damage raises `DamagedDataError`
  naming the file, the view and the episode;
- a record that does not parse is named in one warning line and skipped (its views count as missing);
  claims only avoid duplicate work, correctness never depends on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.core.buffer.cpu import NDBuffer

from pipeline.errors import DamagedDataError, StoreError, UsageError, file_in_the_way
from pipeline.store.checksums import crc32c, row_crcs
from pipeline.store.durable import replace_durably
from pipeline.store.index import Columns, CommittedViews, StoreIndex, ViewTable
from pipeline.store.layout import expected_layout, geometry_problem
from pipeline.store.reader import ShardedRowReader, file_kind
from pipeline.store.records import (
    COMMIT_VERSION,
    CommitRecord,
    FailureRecord,
    RecordError,
    RecordInfo,
    ViewRecord,
    canonical_json,
    check_commit,
    episode_key,
    parse_failure,
)
from pipeline.store.settings import StoreSettings
from pipeline.store.writer import TORCH_DTYPES, PartWriter

FORMAT_VERSION = COMMIT_VERSION
INDEX_DIR = "index"  # index snapshots: every commit record at some moment, one Parquet file (`compact`)
COMPACT_RECORDS = 256  # records read one by one at open before a housekeeping command writes a snapshot
FETCH_THREADS = 8  # records read at once from a local disk
FETCH_CONNECTIONS = 64  # records read at once from S3 (the client's connection pool)
FETCH_BATCH = 1024  # records fetched before they are parsed (bounds the bytes held at once)
# What a read raises for bytes that are not what was written (zarr and its codecs: ValueError for a checksum or
# a shard index, RuntimeError for a codec, JSONDecodeError for metadata): damage. An OSError is the machine's.
DAMAGE = (ValueError, RuntimeError, KeyError, IndexError, TypeError)
log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # record paths already named in a warning by this process


def fingerprint_digest(spec: dict[str, Any]) -> str:
    """sha256 of everything that determines the bytes of a feature."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def store_specs(cache_path: str) -> dict[str, dict[str, Any]]:
    """url -> root attributes (format_version, fingerprint {digest, spec}) of every store under a cache path."""
    cache_path = cache_path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(cache_path)
    fs.invalidate_cache(root)
    out = {}
    for path in sorted(fs.glob(f"{root}/*/zarr.json")):
        url = f"{cache_path}/{path.rstrip('/').rsplit('/', 2)[-2]}"
        try:
            out[url] = zarr.open_group(store=url, mode="r").attrs.asdict()
        except Exception as err:  # a broken root of some other store must not stop this one
            _warn_once(url, f"{url}: not a readable store ({type(err).__name__}: {err})")
    return out


def _warn_once(path: str, message: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning(message)


class FeatureStore:
    """One fingerprint's store under a cache path: create/open with checks, the index, checked reads, writes."""

    def __init__(self, cache_path: str, spec: dict[str, Any]):
        self.spec = spec
        self.layout = expected_layout(spec)  # name -> (shape after the row axis, storage dtype), where the spec says
        self.digest = fingerprint_digest(spec)
        self.cache_path = cache_path.rstrip("/")
        self.url = f"{self.cache_path}/{self.digest[:16]}"
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **_client_options(self.url))
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._index: StoreIndex | None = None
        self._readers: dict[str, ShardedRowReader | None] = {}  # attempt location -> direct features reader
        self.bad_records: dict[str, str] = {}  # path -> what is wrong, for the records met so far

    # -- open / create -------------------------------------------------------------------------
    def exists(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(f"{self.root}/zarr.json")

    def check_path(self) -> FeatureStore:
        """Refuse a cache.path that is a file, or a local one below a file (every command that opens a store
        asks this first: a store there could never be created, and "not created yet" would mislead)."""
        path = fsspec.core.url_to_fs(self.cache_path)[1]
        if self.fs.isfile(path):
            raise StoreError(f"cache.path {self.cache_path} is a file, not a folder")
        file = file_in_the_way(path) if "://" not in self.cache_path else None  # object stores have no folders
        if file is not None:
            raise StoreError(f"cache.path {self.cache_path}: {file} is a file, not a folder")
        return self

    def create(self) -> FeatureStore:
        """Create the root group (once, by the driver, before any task runs) or check an existing one."""
        self.check_path()
        if self.exists():
            return self.check()
        group = zarr.open_group(store=self.url, mode="a")
        group.attrs.update({"format_version": FORMAT_VERSION,
                            "fingerprint": {"digest": self.digest, "spec": self.spec}})
        return self

    def check(self) -> FeatureStore:
        """Refuse a store of another format version or fingerprint (never mix caches)."""
        self.check_path()
        if not self.exists():
            raise StoreError(f"{self.url}: no feature store here (run `pipeline extract` first)")
        attrs = zarr.open_group(store=self.url, mode="r").attrs.asdict()
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.url}: store format version {version!r}, this code reads {FORMAT_VERSION}: "
                             "run `pipeline extract` to build a store of this version (the old one is left as "
                             "it is; `pipeline gc` lists it)")
        found = attrs.get("fingerprint", {}).get("digest")
        if found != self.digest:
            raise StoreError(f"{self.url}: fingerprint {found!r} does not match the manifest's {self.digest!r}")
        return self

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _glob(self, pattern: str) -> list[str]:
        """fs.glob without the object-store listing cache: other processes add records all the time."""
        self.fs.invalidate_cache(self.root)
        return self.fs.glob(pattern)

    # -- the index -----------------------------------------------------------------------------
    def index(self, refresh: bool = False) -> StoreIndex:
        """The commit records of the store, read once per process (`refresh`: read them again, e.g. after this
        process committed more). One listing of commits/ (and of index/), the newest readable index snapshot,
        then every record the snapshot does not hold, fetched concurrently; records that do not parse are named
        once and skipped."""
        if self._index is None or refresh:
            self._index = self._read_index()
        return self._index

    def _read_index(self) -> StoreIndex:
        listed = set(self._names("commits", ".json"))
        table, infos, snapshot = self._read_snapshot()
        covered = {r.name for r in infos} & listed
        if snapshot is not None:
            keep = np.flatnonzero(np.isin(table.codes["record"], [i for i, name in enumerate(
                table.categories["record"]) if name in covered]))
            table = table.take(keep)  # a record moved aside (verify --repair) or removed (gc) is gone from the listing
        rest = sorted(listed - covered)
        records = {r.name: r for r in infos if r.name in covered}
        columns = Columns()
        for lo in range(0, len(rest), FETCH_BATCH):  # in batches: the bytes of a batch are let go once read
            names = rest[lo : lo + FETCH_BATCH]
            for name, raw in zip(names, self._fetch([f"commits/{n}.json" for n in names]), strict=True):
                if (checked := self._check_commit(name, raw)) is not None:
                    records[name], views = checked
                    for v in views:
                        columns.add(name, records[name].committed_at, v)
        return StoreIndex(records, ViewTable.concat([table, columns.table()]), snapshot, len(rest))

    def _read_snapshot(self) -> tuple[ViewTable, list[RecordInfo], str | None]:
        """The newest index snapshot that reads whole (a damaged one is named and passed over), or nothing."""
        for name in sorted(self._names(INDEX_DIR, ".parquet"), reverse=True):
            path = f"{self.root}/{INDEX_DIR}/{name}.parquet"
            try:
                (raw,) = self._fetch([f"{INDEX_DIR}/{name}.parquet"])
                if isinstance(raw, BaseException):
                    raise raw
                table, infos = ViewTable.from_parquet(raw)
                return table, infos, name
            except (OSError, *DAMAGE) as err:  # pyarrow's errors are ValueErrors (ArrowInvalid, ArrowIOError: OSError)
                self._bad(path, f"index snapshot passed over, the records are read one by one: {_short(err)}")
        return ViewTable.empty(), [], None

    def compact(self, min_records: int = COMPACT_RECORDS) -> str | None:
        """Write an index snapshot of every commit record this process has read, where at least `min_records`
        of them had to be read one by one: the next open reads one file instead. A snapshot is a cache of
        immutable records, keyed by their names; the listing of commits/ stays the truth (a record moved aside
        or removed since is left out at open). Returns the snapshot's name, or None."""
        idx = self.index()
        if idx.read_one_by_one < max(min_records, 1):
            return None
        name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:10]}"
        self._write_bytes(f"{INDEX_DIR}/{name}.parquet", idx.views.to_parquet(idx.records.values()))
        self._index = StoreIndex(idx.records, idx.views, name, 0)
        return name

    def snapshots(self) -> list[str]:
        """Names of the index snapshots, oldest first (gc removes all but the newest once they are old)."""
        return sorted(self._names(INDEX_DIR, ".parquet"))

    def commits(self) -> list[CommitRecord]:
        """Every commit record that parses, oldest first (by the rule: committed_at, then name), each with its
        views as `ViewRecord`s (for commands that look at every record; training reads `committed_views`)."""
        idx = self.index()
        rows: dict[str, list[int]] = {name: [] for name in idx.records}
        for i, code in enumerate(idx.views.codes["record"].tolist()):
            rows[idx.views.categories["record"][code]].append(i)
        out = [CommitRecord(r.name, r.part, r.attempt, r.frames, r.committed_at,
                            [idx.views.record(i) for i in rows[r.name]], r.repaired_from) for r in idx.records.values()]
        return sorted(out, key=lambda r: (r.committed_at, r.name))

    def committed_views(self) -> CommittedViews:
        """view_id -> the one record readers use: the newest commit, then the greatest record name."""
        return CommittedViews(self.index().committed())

    def part_committed(self, part_id: str) -> bool:
        """True if some attempt of this part (its content, by its id) is committed already, by a record that
        parses (one that does not counts as missing): one listing of the part's own records (on an object
        store, of its prefix only), and a read of each."""
        names = self._names("commits", ".json", prefix=f"{part_id}.")
        return any(self._check_commit(name, raw) is not None
                   for name, raw in zip(names, self._fetch([f"commits/{n}.json" for n in names]), strict=True))

    def _check_commit(self, name: str, raw: bytes | BaseException) -> tuple[RecordInfo, list[dict[str, Any]]] | None:
        """A commit record's fields and checked views from its bytes (`check_commit`), or None (named in one
        warning) where it does not parse."""
        try:
            if isinstance(raw, BaseException):
                raise raw
            return check_commit(name, json.loads(raw.decode("utf-8")), self.digest)
        except (RecordError, ValueError, UnicodeDecodeError, OSError) as err:
            self._bad(f"{self.root}/commits/{name}.json", f"commit record skipped, its views count as missing: {err}")
            return None

    def failures(self) -> dict[str, FailureRecord]:
        """episode_id -> failure record (records that do not parse are named once and ignored)."""
        out = {}
        names = self._names("failures", ".json")
        for name, raw in zip(names, self._fetch([f"failures/{n}.json" for n in names]), strict=True):
            try:
                if isinstance(raw, BaseException):
                    raise raw
                rec = parse_failure(json.loads(raw.decode("utf-8")))
            except (RecordError, ValueError, UnicodeDecodeError, OSError) as err:
                self._bad(f"{self.root}/failures/{name}.json", f"failure record ignored, its episode will be "
                                                                f"retried: {err}")
                continue
            out[rec.episode_id] = rec
        return out

    def _names(self, folder: str, suffix: str, prefix: str = "") -> list[str]:
        """Names (without `suffix`) of the files of one flat folder of the store that start with `prefix`: one
        listing (an object store pages it, 1000 names a request), never cached (others write all the time)."""
        path = f"{self.root}/{folder}"
        if self.is_local:
            try:
                with os.scandir(path) as entries:
                    found = [e.name for e in entries]
            except FileNotFoundError:
                return []
        else:
            self.fs.invalidate_cache(path)
            try:
                found = [p.rsplit("/", 1)[-1] for p in self.fs.find(path, prefix=prefix)]
            except FileNotFoundError:
                return []
        return sorted(n[: -len(suffix)] for n in found if n.endswith(suffix) and n.startswith(prefix))

    def _fetch(self, rels: list[str]) -> list[bytes | BaseException]:
        """The bytes of these files of the store (or the error reading each), fetched concurrently."""
        if not rels:
            return []
        paths = [f"{self.root}/{rel}" for rel in rels]
        if self.is_local:
            with ThreadPoolExecutor(FETCH_THREADS) as pool:
                return list(pool.map(_read_local, paths))
        got = self.fs.cat(paths, on_error="return")
        return [got.get(p, FileNotFoundError(p)) for p in paths]

    def attempts(self) -> list[tuple[str, str]]:
        """(part, attempt) of every attempt folder, committed or not."""
        found = self._glob(f"{self.root}/parts/*/*/zarr.json")
        return sorted(tuple(p.rsplit("/", 3)[-3:-1]) for p in found)  # type: ignore[misc]

    def quarantined(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1][: -len(".json")] for p in self._glob(f"{self.root}/quarantine/*.json"))

    def stray_temp_files(self) -> list[str]:
        """Temp files of record writes that were killed before their rename (paths relative to the store)."""
        found = self._glob(f"{self.root}/*/*.tmp")
        return sorted(p[len(self.root) + 1 :] for p in found)

    def bytes_on_disk(self) -> int:
        return self.path_bytes("")

    def path_bytes(self, rel: str) -> int:
        """Bytes under a file or folder of the store (0 if it is gone). Other processes write and remove files
        all the time (a writer's temp file is renamed away between a listing and a stat): a file that is gone
        when it is looked at counts for nothing, it never fails the count."""
        path = f"{self.root}/{rel}".rstrip("/")
        if not self.is_local:
            return int(self.fs.du(path)) if self.fs.exists(path) else 0
        total = 0
        for folder, _, names in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [
                os.path.basename(path)])]:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(folder, name)).st_size
        return total

    def modified(self, rel: str) -> float:
        """Last modification time of a file of the store (seconds since the epoch)."""
        return self.fs.modified(f"{self.root}/{rel}").timestamp()

    def _bad(self, path: str, why: str) -> None:
        self.bad_records[path] = why
        _warn_once(path, f"{path}: {why}")

    # -- checked reads -------------------------------------------------------------------------
    def array(self, view: ViewRecord, name: str) -> zarr.Array:
        """A view's array `name`, opened once per attempt, its geometry checked: bytes a reader is asked to
        trust are only ever read through metadata that agrees with the fingerprint (and bounds the work)."""
        key = (view.location, name)
        if key not in self._arrays:
            where = self.where(view, name)
            try:
                if self.is_local:
                    self._regular(f"{self.root}/{view.location}/{name}/zarr.json", view)
                arr = zarr.open_array(store=f"{self.url}/{view.location}", path=name, mode="r")
            except DamagedDataError:
                raise
            except FileNotFoundError as err:
                raise DamagedDataError(where, f"array is missing ({_short(err)})") from None
            except DAMAGE as err:
                raise DamagedDataError(where, f"array cannot be opened ({_short(err)})") from err
            problem = geometry_problem(arr, self.layout.get(name), view.start + view.length)
            if problem:
                raise DamagedDataError(where, problem)
            self._arrays[key] = arr
        return self._arrays[key]

    @staticmethod
    def _regular(path: str, view: ViewRecord) -> None:
        """Refuse a local file of the store that is there but not a regular file (a FIFO would hang any reader
        that opens it); a missing one is left to the read, which names what it misses."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise DamagedDataError(f"{path} {context(view)}", f"is {file_kind(mode)}, not a file of the store")

    def read_features(self, view: ViewRecord, start: int, length: int, out: torch.Tensor | None = None,
                      whole_chunks: bool = False) -> torch.Tensor:
        """Rows start..start+length of a view's features, exactly as committed: [length, tokens, D].

        With `out` (a contiguous CPU tensor of the stored dtype) the rows are read straight into it. Every
        row's crc32c is compared with the commit record's: damage raises DamagedDataError, never returns; an
        error of the machine (EMFILE, EIO) is an OSError naming the file, never damage. The chunks around the
        rows are checked whole where zarr reads them and, on the direct path, with `whole_chunks` (verify);
        training's reads check the chunks they read whole, and the rows.
        """
        arr, out, target = self._target(view, start, length, out)
        rows = slice(view.start + start, view.start + start + length)
        fast = self._fast_reader(view, arr)
        want = view.digests["features"][start : start + length]
        try:
            if fast is not None:  # local, uncompressed: straight from the shard files
                bad = fast.read(rows.start, rows.stop, target, want, whole_chunks)  # checked in the same pass
            else:
                if self.is_local:
                    for path in self._shard_files(arr, view, rows):
                        self._regular(path, view)
                arr.get_basic_selection(rows, out=NDBuffer.from_numpy_array(target))
                bad = next((i for i, (got, w) in enumerate(zip(row_crcs(target), want, strict=True)) if got != w),
                           None)
        except DamagedDataError as err:
            raise DamagedDataError(f"{err.where} {context(view)}", err.what) from err
        except DAMAGE as err:  # a checksum, an index or a file that is not what was written
            raise DamagedDataError(self.where(view, "features", rows), _short(err)) from err
        if bad is not None:
            raise DamagedDataError(self.where(view, "features", slice(rows.start + bad, rows.start + bad + 1)),
                                   f"row {start + bad} of the view is not what was committed (crc32c)")
        return out

    def _target(self, view: ViewRecord, start: int, length: int, out: torch.Tensor | None
                ) -> tuple[zarr.Array, torch.Tensor, np.ndarray]:
        """The features array of a window, the tensor it is read into (`out`, checked, or a new one) and the
        numpy array over that tensor's bytes (bf16 is stored as its bits)."""
        if start < 0 or start + length > view.length:
            raise StoreError(f"window {start}+{length} outside view {view.view_id} of {view.length} frames")
        arr = self.array(view, "features")
        logical = arr.attrs.get("logical_dtype")
        if logical not in TORCH_DTYPES:
            raise DamagedDataError(self.where(view, "features"), f"logical_dtype {logical!r} in zarr.json")
        if out is None:
            out = torch.empty((length, *arr.shape[1:]), dtype=TORCH_DTYPES[logical])
        elif TORCH_DTYPES[logical] != out.dtype or tuple(arr.shape[1:]) != tuple(out.shape[1:]):
            raise StoreError(f"{view.location} holds {logical} {tuple(arr.shape[1:])} features, "
                             f"the buffer is {out.dtype} {tuple(out.shape[1:])}")
        return arr, out, _stored_bits(out)

    def read_windows(self, out: torch.Tensor, windows: Sequence[tuple[int, ViewRecord, int]],
                     length: int) -> list[DamagedDataError | None]:
        """Windows (row of `out`, view, start) of `length` rows each into out[row]: for each, None, or the
        `DamagedDataError` that `read_features` raised for it (then out[row] holds nothing usable). Any other
        error (an OSError of the machine) is raised: it says nothing about the view, so it must not cost one."""
        if not out.is_contiguous() or out.dim() < 2 or out.shape[1] != length:
            raise ValueError(f"read_windows reads {length}-row windows into a contiguous [rows, {length}, ...] "
                             f"tensor, not {tuple(out.shape)}")
        errors: list[DamagedDataError | None] = []
        for row, view, start in windows:
            try:
                self.read_features(view, start, length, out=out[row])
                errors.append(None)
            except DamagedDataError as err:
                errors.append(err)
        return errors

    def _fast_reader(self, view: ViewRecord, arr: zarr.Array) -> ShardedRowReader | None:
        """The direct shard reader of a view's features, where the layout and a local disk allow it."""
        if view.location not in self._readers:
            folder = f"{self.root}/{view.location}/features"
            self._readers[view.location] = ShardedRowReader.for_array(folder, arr) if self.is_local else None
        return self._readers[view.location]

    def _shard_files(self, arr: zarr.Array, view: ViewRecord, rows: slice) -> list[str]:
        """The local files holding `rows` of a view's array (its shards, or its chunks where unsharded)."""
        per = arr.shards[0] if arr.shards else arr.chunks[0]
        keys = (arr.metadata.encode_chunk_key((k, *[0] * (arr.ndim - 1)))
                for k in range(rows.start // per, max(rows.stop - 1, rows.start) // per + 1))
        return [f"{self.root}/{view.location}/{arr.path}/{key}" for key in keys]

    def read_rows(self, view: ViewRecord, name: str) -> np.ndarray:
        """A small per-frame array (states, actions, frame_index) of a whole view, checked against its digest."""
        arr = self.array(view, name)
        rows = slice(view.start, view.start + view.length)
        try:
            if self.is_local:
                for path in self._shard_files(arr, view, rows):
                    self._regular(path, view)
            data = arr[rows]
        except DamagedDataError:
            raise
        except DAMAGE as err:
            raise DamagedDataError(self.where(view, name), _short(err)) from err
        if crc32c(data) != view.digests.get(name):
            raise DamagedDataError(self.where(view, name), "rows are not what was committed (crc32c)")
        return data

    def where(self, view: ViewRecord, name: str, rows: slice | None = None) -> str:
        """Which file (the shard of `rows`, where given), view and episode a problem is in, for messages."""
        where = f"{self.url}/{view.location}/{name}"
        arr = self._arrays.get((view.location, name))
        if rows is not None and arr is not None:
            shard = arr.shards[0] if arr.shards else arr.chunks[0]
            where += "/" + arr.metadata.encode_chunk_key((rows.start // shard, *[0] * (arr.ndim - 1)))
        return f"{where} {context(view)}"

    # -- writing -------------------------------------------------------------------------------
    def part_writer(self, part_id: str, attempt: str, frames: int, tokens: int, dim: int,
                    cache: StoreSettings) -> PartWriter:
        where = f"parts/{part_id}/{attempt}"
        return PartWriter(f"{self.url}/{where}", frames, tokens, dim, cache,
                          local=f"{self.root}/{where}" if self.is_local else None)

    def missing_files(self, part_id: str, attempt: str, files: dict[str, int | None]) -> list[str]:
        """Which of an attempt's files (`PartWriter.files`) are not there, or not of their size: one listing.
        Housekeeping never removes an attempt a live claim covers, but a claim can expire under a slow part,
        and a user can delete anything: a writer asks this before it commits."""
        root = f"{self.root}/parts/{part_id}/{attempt}"
        self.fs.invalidate_cache(root)
        found = {path[len(root) + 1 :]: info.get("size") for path, info in self.fs.find(root, detail=True).items()}
        return sorted(rel for rel, size in files.items() if rel not in found or size not in (None, found[rel]))

    def commit(self, record: CommitRecord) -> None:
        """Write an attempt's commit record; until this file exists the attempt is not data."""
        self._write_json(f"commits/{record.name}.json", record.to_json(self.digest))
        self._index = None  # this process sees what it committed

    def write_failure(self, record: FailureRecord) -> None:
        self._write_json(f"failures/{episode_key(record.episode_id)}.json", record.to_json())

    def clear_failure(self, episode_id: str) -> None:
        self.remove(f"failures/{episode_key(episode_id)}.json")

    def quarantine(self, name: str, reason: str) -> None:
        """Move a commit record aside (its views count as missing; its arrays stay until gc)."""
        src = f"{self.root}/commits/{name}.json"
        with self.fs.open(src, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        self._write_json(f"quarantine/{name}.json", {"quarantined_at": time.time(), "reason": reason,
                                                     "record": text})
        self.remove(f"commits/{name}.json")
        self._index = None

    # -- claims (advisory) -----------------------------------------------------------------------
    def claim(self, part_id: str, run_id: str, attempt: str) -> None:
        self._write_json(f"claims/{part_id}.json", {"run_id": run_id, "attempt": attempt, "time": time.time(),
                                                    "host": socket.gethostname(), "pid": os.getpid()})

    def claim_holder(self, part_id: str, run_id: str, ttl_seconds: float) -> dict[str, Any] | None:
        """Another run's live claim on this part, or None (no claim, ours, expired, or its process is gone)."""
        path = f"{self.root}/claims/{part_id}.json"
        try:
            rec = self._read_json(path)
            if rec["run_id"] == run_id or time.time() - float(rec["time"]) > ttl_seconds:
                return None
            if rec["host"] == socket.gethostname() and not _pid_alive(int(rec["pid"])):
                return None
            return rec
        except (FileNotFoundError, KeyError, TypeError, ValueError, OSError):
            return None

    def live_claims(self, ttl_seconds: float) -> dict[str, dict[str, Any]]:
        """part -> the claim of a run still working on it (not expired, and its process alive where it is on
        this host): gc never removes what such a run may be writing."""
        parts = [p.rsplit("/", 1)[-1][: -len(".json")] for p in self._glob(f"{self.root}/claims/*.json")]
        return {part: holder for part in parts if (holder := self.claim_holder(part, "", ttl_seconds)) is not None}

    def release_claim(self, part_id: str, attempt: str) -> None:
        """Remove the part's claim if it is still this attempt's."""
        try:
            if self._read_json(f"{self.root}/claims/{part_id}.json").get("attempt") == attempt:
                self.remove(f"claims/{part_id}.json")
        except (FileNotFoundError, ValueError, OSError):
            pass

    # -- removing (gc, verify --repair only) -----------------------------------------------------
    def remove(self, rel: str) -> None:
        """Delete a file or folder of the store (gc's business: it decides what nothing references)."""
        path = f"{self.root}/{rel}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        if rel.startswith("commits/"):
            self._index = None

    def remove_attempt(self, part_id: str, attempt: str) -> None:
        """Delete an attempt's arrays, and its part's folder once no attempt is left in it."""
        self.remove(f"parts/{part_id}/{attempt}")
        folder = f"{self.root}/parts/{part_id}"
        if self.fs.exists(folder) and not self.fs.ls(folder):
            self.fs.rm(folder, recursive=True)

    # -- records on disk ------------------------------------------------------------------------
    def _read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    def _write_json(self, rel: str, obj: dict[str, Any]) -> None:
        self._write_bytes(rel, json.dumps(obj, indent=1).encode())

    def _write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: temp file + fsync + rename on a local disk; a single PUT (atomic) on object stores."""
        path = f"{self.root}/{rel}"
        if self.is_local:
            replace_durably(path, lambda f: f.write(data), f"{path}.{uuid.uuid4().hex[:8]}.tmp")
        else:
            self.fs.pipe_file(path, data)


def _client_options(url: str) -> dict[str, Any]:
    """fsspec options for the store's own client: on S3, a connection pool wide enough for the record reads
    at open (botocore's default of 10 connections would make them wait for each other's latency)."""
    if url.startswith(("s3://", "s3a://")):
        return {"config_kwargs": {"max_pool_connections": FETCH_CONNECTIONS}}
    return {}


def _read_local(path: str) -> bytes | BaseException:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        return err


def context(view: ViewRecord) -> str:
    """The view, episode and commit a file belongs to, for messages."""
    return f"(view {view.view_id} of episode {view.episode_id}, commit {view.commit})"


def find_view(views: Mapping[str, ViewRecord], prefix: str) -> ViewRecord:
    """The committed view (of `committed_views()`) whose id is `prefix` or starts with it, like git's short
    hashes: the one rule for every command that takes a view id (UsageError when none or several match)."""
    key = prefix.strip().lower()
    found = sorted(vid for vid in views if key and vid.startswith(key))
    if not found:
        raise UsageError(f"--view {prefix!r}: no committed view has an id starting with it ({len(views)} views "
                         f"are committed, e.g. {', '.join(sorted(views)[:3]) or 'none'})")
    if len(found) > 1:
        more = ", ..." if len(found) > 4 else ""
        raise UsageError(f"--view {prefix!r} is ambiguous: {len(found)} views start with it "
                         f"({', '.join(found[:4])}{more}); give more characters")
    return views[found[0]]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stored_bits(t: torch.Tensor) -> np.ndarray:
    """A numpy array over a CPU tensor's bytes as the store holds them (bf16 is stored as its bits)."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
