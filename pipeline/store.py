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

Rules that make it safe for many writers, and for any of them to be killed at any moment (DESIGN 2):
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

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.core.buffer.cpu import NDBuffer

from pipeline.checksums import crc32c, row_crcs
from pipeline.durable import replace_durably
from pipeline.errors import DamagedDataError, StoreError, UsageError, file_in_the_way
from pipeline.manifest import CacheSection
from pipeline.part_writer import TORCH_DTYPES, PartWriter
from pipeline.records import (
    COMMIT_VERSION,
    CommitRecord,
    FailureRecord,
    RecordError,
    ViewRecord,
    canonical_json,
    episode_key,
    parse_commit,
    parse_failure,
)
from pipeline.shard_reader import Request, ShardedRowReader, read_many

FORMAT_VERSION = COMMIT_VERSION
log = logging.getLogger("pipeline.store")
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

    def __init__(self, cache_path: str, spec: dict[str, Any], native_reads: bool | None = None,
                 mapped_reads: bool | None = None):
        self.spec, self.native_reads = spec, native_reads  # None: the direct reader's default (shard_reader.NATIVE)
        self.mapped_reads = mapped_reads  # None: the default (shard_reader.MAPPED); the bench compares the two
        self.digest = fingerprint_digest(spec)
        self.cache_path = cache_path.rstrip("/")
        self.url = f"{self.cache_path}/{self.digest[:16]}"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._readers: dict[str, ShardedRowReader | None] = {}  # attempt location -> fast features reader
        self._direct_readers: dict[tuple[str, torch.dtype, tuple[int, ...]], ShardedRowReader | None] = {}
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
    def commits(self, part_id: str = "*") -> list[CommitRecord]:
        """Every commit record (of one part, or of all) that parses, oldest first; the others are named once
        and skipped."""
        records = []
        pattern = "*.json" if part_id == "*" else f"{part_id}.*.json"
        for path in self._glob(f"{self.root}/commits/{pattern}"):
            name = path.rsplit("/", 1)[-1][: -len(".json")]
            try:
                records.append(parse_commit(name, self._read_json(path), self.digest))
            except (RecordError, ValueError, UnicodeDecodeError, OSError) as err:
                self._bad(path, f"commit record skipped, its views count as missing: {err}")
        for rec in records:
            for v in rec.views:
                v.commit = rec.name
        return sorted(records, key=lambda r: (r.committed_at, r.name))

    def committed_views(self, commits: list[CommitRecord] | None = None) -> dict[str, ViewRecord]:
        """view_id -> the one record readers use: the newest commit, then the greatest record name (of
        `commits`, as `commits()` returned them, where the caller has read them already)."""
        views: dict[str, ViewRecord] = {}
        for record in self.commits() if commits is None else commits:  # sorted by the rule: the last one wins
            for v in record.views:
                views[v.view_id] = v
        return views

    def part_committed(self, part_id: str) -> bool:
        """True if some attempt of this part (its content, by its id) is committed already."""
        return bool(self.commits(part_id))

    def failures(self) -> dict[str, FailureRecord]:
        """episode_id -> failure record (records that do not parse are named once and ignored)."""
        out = {}
        for path in self._glob(f"{self.root}/failures/*.json"):
            try:
                rec = parse_failure(self._read_json(path))
            except (RecordError, ValueError, UnicodeDecodeError, OSError) as err:
                self._bad(path, f"failure record ignored, its episode will be retried: {err}")
                continue
            out[rec.episode_id] = rec
        return out

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
        return int(self.fs.du(self.root)) if self.fs.exists(self.root) else 0

    def path_bytes(self, rel: str) -> int:
        path = f"{self.root}/{rel}"
        return int(self.fs.du(path)) if self.fs.exists(path) else 0

    def modified(self, rel: str) -> float:
        """Last modification time of a file of the store (seconds since the epoch)."""
        return self.fs.modified(f"{self.root}/{rel}").timestamp()

    def _bad(self, path: str, why: str) -> None:
        self.bad_records[path] = why
        _warn_once(path, f"{path}: {why}")

    # -- checked reads -------------------------------------------------------------------------
    def array(self, view: ViewRecord, name: str) -> zarr.Array:
        key = (view.location, name)
        if key not in self._arrays:
            try:
                self._arrays[key] = zarr.open_array(store=f"{self.url}/{view.location}", path=name, mode="r")
            except Exception as err:
                raise DamagedDataError(self.where(view, name), f"array cannot be opened ({_short(err)})") from err
        return self._arrays[key]

    def read_features(self, view: ViewRecord, start: int, length: int, out: torch.Tensor | None = None,
                      whole_chunks: bool = False) -> torch.Tensor:
        """Rows start..start+length of a view's features, exactly as committed: [length, tokens, D].

        With `out` (a contiguous CPU tensor of the stored dtype) zarr decodes straight into it: no
        temporary array, which is ~40% of the read time of a ViT-g window (11.5 MB). Every row's crc32c
        is compared with the commit record's: damage raises DamagedDataError, never returns. The chunks
        around the rows are checked whole where zarr reads them and, on the direct path, with
        `whole_chunks` (verify); training's reads check the chunks they read whole, and the rows.
        """
        arr, out, target = self._target(view, start, length, out)
        rows = slice(view.start + start, view.start + start + length)
        fast = self._fast_reader(view, arr)
        want = view.digests["features"][start : start + length]
        try:
            if fast is not None:  # local, uncompressed: straight from the shard files (GIL released)
                bad = fast.read(rows.start, rows.stop, target, want, whole_chunks)  # checked in the same pass
            else:
                arr.get_basic_selection(rows, out=NDBuffer.from_numpy_array(target))
                bad = next((i for i, (got, w) in enumerate(zip(row_crcs(target), want, strict=True)) if got != w),
                           None)
        except DamagedDataError as err:
            raise DamagedDataError(f"{err.where} {context(view)}", err.what) from err
        except Exception as err:  # a checksum, an index or a file that is not what was written
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
        """Windows (row of `out`, view, start) of `length` rows each into out[row]: for each, what
        `read_features` gives, or the `DamagedDataError` it raises (then out[row] holds nothing usable).

        `out` is a contiguous CPU tensor [rows, length, tokens, D] of the stored dtype (a batch buffer).
        The windows on the direct path are read together, in one read plan (`shard_reader.read_many`: the
        loader's reads cost ~10% less so); any other window, and any that is not read clean, goes through
        `read_features` alone, so that its damage is named exactly as there.
        """
        if not out.is_contiguous() or out.dim() < 2 or out.shape[1] != length:
            raise ValueError(f"read_windows reads {length}-row windows into a contiguous [rows, {length}, ...] "
                             f"tensor, not {tuple(out.shape)}")
        flat = _stored_bits(out).reshape(-1).view(np.uint8)
        window_bytes = flat.nbytes // max(len(out), 1)
        requests, together = [], []
        for k, (row, view, start) in enumerate(windows):
            fast = self._direct(view, out)
            if fast is not None and 0 <= start <= view.length - length and 0 <= row < len(out):
                a = view.start + start
                requests.append(Request(fast, a, a + length, row * window_bytes,
                                        view.digests["features"][start : start + length]))
                together.append(k)
        try:
            done = read_many(flat, requests)
        except Exception:  # an I/O error, say: each window read alone below raises it, named
            done = [False] * len(requests)
        clean = {k for k, d in zip(together, done, strict=True) if d}
        errors: list[DamagedDataError | None] = [None] * len(windows)
        for k, (row, view, start) in enumerate(windows):
            if k not in clean:
                try:
                    self.read_features(view, start, length, out=out[row])
                except DamagedDataError as err:
                    errors[k] = err
        return errors

    def _direct(self, view: ViewRecord, out: torch.Tensor) -> ShardedRowReader | None:
        """The direct reader of a view's features where they can be read into `out`'s rows as they are, else
        None (then `read_features` reads them, or says why not). Looked up once per attempt and buffer
        layout: these checks ran for every window before, and cost more than its reading's own Python."""
        key = (view.location, out.dtype, tuple(out.shape[2:]))
        if key not in self._direct_readers:
            try:
                arr, _, _ = self._target(view, 0, 0, out[0])
                self._direct_readers[key] = self._fast_reader(view, arr)
            except (DamagedDataError, StoreError):
                self._direct_readers[key] = None
        return self._direct_readers[key]

    def _fast_reader(self, view: ViewRecord, arr: zarr.Array) -> ShardedRowReader | None:
        """The direct shard reader of a view's features, where the layout and a local disk allow it."""
        if view.location not in self._readers:
            folder = f"{self.root}/{view.location}/features"
            reader = ShardedRowReader.for_array(folder, arr) if self.is_local else None
            if reader is not None and self.native_reads is not None:
                reader.use_native(self.native_reads)
            if reader is not None and self.mapped_reads is not None:
                reader.use_maps(self.mapped_reads)
            self._readers[view.location] = reader
        return self._readers[view.location]

    def read_rows(self, view: ViewRecord, name: str) -> np.ndarray:
        """A small per-frame array (states, actions, frame_index) of a whole view, checked against its digest."""
        arr = self.array(view, name)
        try:
            rows = arr[view.start : view.start + view.length]
        except Exception as err:
            raise DamagedDataError(self.where(view, name), _short(err)) from err
        if crc32c(rows) != view.digests.get(name):
            raise DamagedDataError(self.where(view, name), "rows are not what was committed (crc32c)")
        return rows

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
                    cache: CacheSection) -> PartWriter:
        where = f"parts/{part_id}/{attempt}"
        return PartWriter(f"{self.url}/{where}", frames, tokens, dim, cache,
                          local=f"{self.root}/{where}" if self.is_local else None)

    def commit(self, record: CommitRecord) -> None:
        """Write an attempt's commit record; until this file exists the attempt is not data."""
        self._write_json(f"commits/{record.name}.json", record.to_json(self.digest))

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
        """Atomic write: temp file + fsync + rename on a local disk; a single PUT (atomic) on object stores."""
        path = f"{self.root}/{rel}"
        data = json.dumps(obj, indent=1).encode()
        if self.is_local:
            replace_durably(path, lambda f: f.write(data), f"{path}.{uuid.uuid4().hex[:8]}.tmp")
        else:
            self.fs.pipe_file(path, data)


def context(view: ViewRecord) -> str:
    """The view, episode and commit a file belongs to, for messages."""
    return f"(view {view.view_id} of episode {view.episode_id}, commit {view.commit})"


def find_view(views: dict[str, ViewRecord], prefix: str) -> ViewRecord:
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
