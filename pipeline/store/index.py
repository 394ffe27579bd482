"""The store's views as columns: what a command holds in memory of every committed view, and its snapshot file.

Why columns: a store of all of DROID holds ~740k views (92k episodes x cameras x phases), each with one crc32c
per stored frame. As one Python object per view that is ~5 KB each -- gigabytes per training rank, and
minutes to build. As columns it is the digests (4 bytes a frame) plus a few numbers per view: string fields
are dictionary-encoded (an int32 code per view into a sorted list of distinct values, so codes order as
the strings do), numbers are numpy arrays, and the per-row feature digests are one flat uint32 array with
offsets. A `ViewRecord` is made only for the views a caller asks for (a training batch, one command's view).

The same columns are what a store's index snapshot holds on disk (`to_parquet` / `from_parquet`: Parquet,
zstd, page checksums written and verified), so opening a large store reads one file instead of one commit
record per part.
"""

from __future__ import annotations

import io
import json
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.store.records import CommitRecord, RecordInfo, ViewRecord, canonical_json

STRINGS = ("record", "view_id", "episode_id", "episode_path", "camera", "serial", "source", "part", "attempt")
INTS = ("phase", "stride", "start", "length", "frame_h", "frame_w", "box_top", "box_left", "box_height",
        "box_width", "digest_states", "digest_actions", "digest_frame_index")  # digests: -1 where a record has none
FLOATS = ("video_fps", "capture_fps", "committed_at")  # capture_fps: NaN where not recorded
SMALL_DIGESTS = ("states", "actions", "frame_index")


class ViewTable:
    """Views as columns (see the module's docstring); row i is one view of one commit record."""

    def __init__(self, codes: dict[str, np.ndarray], categories: dict[str, list[str]], numbers: dict[str, np.ndarray],
                 crcs: np.ndarray, digest_at: np.ndarray, digest_len: np.ndarray) -> None:
        self.codes = codes  # name -> [n] int32 into categories[name] (sorted)
        self.categories = categories
        self.numbers = numbers  # name -> [n] int64 / float64
        self.crcs = crcs  # [digests] uint32: feature row digests, shared by the tables `take` makes of this one
        self.digest_at, self.digest_len = digest_at, digest_len  # [n] int64: view i's are crcs[at:at + len]

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[CommitRecord]) -> ViewTable:
        """Every view of the records, in their order (each view's `commit` is its record's name)."""
        return cls.from_views((rec.name, rec.committed_at, v) for rec in records for v in rec.views)

    @classmethod
    def from_views(cls, views: Iterable[tuple[str, float, ViewRecord]]) -> ViewTable:
        """A table of (record name, commit time, view) triples, in their order."""
        columns = Columns()
        for record, committed_at, v in views:
            columns.add(record, committed_at, vars(v))
        return columns.table()

    @classmethod
    def empty(cls) -> ViewTable:
        return cls.from_records([])

    @classmethod
    def concat(cls, tables: Sequence[ViewTable]) -> ViewTable:
        """The rows of the tables one after another (categories merged)."""
        tables = [t for t in tables if len(t)] or [cls.empty()]
        if len(tables) == 1:
            return tables[0]
        codes, categories = {}, {}
        for key in STRINGS:
            merged = sorted(set().union(*(t.categories[key] for t in tables)))
            where = {c: i for i, c in enumerate(merged)}
            codes[key] = np.concatenate([np.array([where[c] for c in t.categories[key]], np.int32)[t.codes[key]]
                                         if len(t.categories[key]) else t.codes[key] for t in tables])
            categories[key] = merged
        numbers = {k: np.concatenate([t.numbers[k] for t in tables]) for k in INTS + FLOATS}
        shift = np.cumsum([0] + [len(t.crcs) for t in tables[:-1]])  # where each table's digests land
        return cls(codes, categories, numbers, np.concatenate([t.crcs for t in tables]),
                   np.concatenate([t.digest_at + k for t, k in zip(tables, shift, strict=True)]),
                   np.concatenate([t.digest_len for t in tables]))

    def take(self, rows: np.ndarray | Sequence[int]) -> ViewTable:
        """These rows, in this order (categories and the digests' array shared, not copied)."""
        rows = np.asarray(rows, np.int64)
        return ViewTable({k: c[rows] for k, c in self.codes.items()}, self.categories,
                         {k: x[rows] for k, x in self.numbers.items()}, self.crcs, self.digest_at[rows],
                         self.digest_len[rows])

    # -- reading -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.digest_at)

    @property
    def nbytes(self) -> int:
        """Memory the table holds: its arrays (the digests' whole, shared one included), its distinct strings."""
        arrays = sum(a.nbytes for a in (*self.codes.values(), *self.numbers.values(), self.crcs, self.digest_at,
                                        self.digest_len))
        return arrays + sum(sys.getsizeof(c) for values in self.categories.values() for c in values)

    def digests(self, i: int) -> np.ndarray:
        """[length] uint32: the feature row digests of view i."""
        return self.crcs[self.digest_at[i] : self.digest_at[i] + self.digest_len[i]]

    def strings(self, key: str) -> np.ndarray:
        """[n] object array of a string column's values."""
        return np.asarray(self.categories[key], dtype=object)[self.codes[key]] if len(self) else np.array([], object)

    def value(self, key: str, i: int) -> str:
        return self.categories[key][self.codes[key][i]]

    def record(self, i: int) -> ViewRecord:
        """Row i as a `ViewRecord`, as its commit record holds it."""
        n = self.numbers
        digests: dict[str, Any] = {"features": self.digests(i).tolist()}
        for name in SMALL_DIGESTS:
            if (d := int(n[f"digest_{name}"][i])) >= 0:
                digests[name] = d
        capture = float(n["capture_fps"][i])
        return ViewRecord(
            self.value("view_id", i), self.value("episode_id", i), self.value("episode_path", i),
            self.value("camera", i), self.value("serial", i), int(n["phase"][i]), int(n["stride"][i]),
            float(n["video_fps"][i]), [int(n["frame_h"][i]), int(n["frame_w"][i])],
            [int(n[f"box_{k}"][i]) for k in ("top", "left", "height", "width")], json.loads(self.value("source", i)),
            self.value("part", i), self.value("attempt", i), int(n["start"][i]), int(n["length"][i]), digests,
            None if np.isnan(capture) else capture, float(n["committed_at"][i]), self.value("record", i))

    def records(self) -> Iterator[ViewRecord]:
        return (self.record(i) for i in range(len(self)))

    def winners(self) -> np.ndarray:
        """[k] rows: for each view id, the row readers use -- the newest `committed_at`, then the greatest
        record name (the store's one rule for a view committed more than once), in view-id order."""
        if not len(self):
            return np.zeros(0, np.int64)
        order = np.lexsort((self.codes["record"], self.numbers["committed_at"], self.codes["view_id"]))
        ids = self.codes["view_id"][order]
        last = np.append(ids[1:] != ids[:-1], True)  # the last of each view id in the sorted order
        return order[last]

    # -- the snapshot file ---------------------------------------------------------------------------
    def to_parquet(self, records: Iterable[RecordInfo]) -> bytes:
        """This table and the records it covers as one Parquet file (zstd, page checksums)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {k: pa.DictionaryArray.from_arrays(pa.array(self.codes[k], pa.int32()),
                                                     pa.array(self.categories[k], pa.string()))
                   for k in STRINGS}
        columns |= {k: pa.array(self.numbers[k]) for k in INTS + FLOATS}
        offsets = np.concatenate([[0], np.cumsum(self.digest_len)]).astype(np.int64)
        if np.array_equal(self.digest_at, offsets[:-1]):  # the rows' digests lie one after another already
            crcs = self.crcs[: offsets[-1]]
        else:
            crcs = np.concatenate([self.crcs[:0], *(self.digests(i) for i in range(len(self)))])
        columns["features"] = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(crcs, pa.uint32()))
        meta = {"records": json.dumps([[r.name, r.part, r.attempt, r.frames, r.committed_at, r.repaired_from]
                                       for r in records])}
        table = pa.table(columns).replace_schema_metadata(meta)
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd", write_page_checksum=True, row_group_size=max(1, len(self)))
        return out.getvalue()

    @classmethod
    def from_parquet(cls, data: bytes) -> tuple[ViewTable, list[RecordInfo]]:
        """A table and its records from `to_parquet`'s bytes; damage (a page checksum, a missing column) raises."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        codes, categories = {}, {}
        for key in STRINGS:
            col = table.column(key).combine_chunks()
            if not pa.types.is_dictionary(col.type):
                col = col.dictionary_encode()
            codes[key], categories[key] = _sorted_codes(col.indices.to_numpy(zero_copy_only=False),
                                                        col.dictionary.to_pylist())
        numbers = {k: np.asarray(table.column(k).to_numpy(), np.int64 if k in INTS else np.float64)
                   for k in INTS + FLOATS}
        features = table.column("features").combine_chunks()
        crcs = np.asarray(features.values.to_numpy(zero_copy_only=False), np.uint32)
        offsets = np.asarray(features.offsets.to_numpy(), np.int64)
        records = [RecordInfo(*r) for r in json.loads(table.schema.metadata[b"records"])]
        return cls(codes, categories, numbers, crcs, offsets[:-1] - offsets[0], np.diff(offsets)), records


def _sorted_codes(codes: np.ndarray, categories: list[str]) -> tuple[np.ndarray, list[str]]:
    """Codes into sorted categories (a file written by another writer may hold them in any order)."""
    order = sorted(range(len(categories)), key=categories.__getitem__)
    if order == list(range(len(categories))):
        return codes.astype(np.int32), categories
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[codes], [categories[k] for k in order]


class Columns:
    """A `ViewTable` being built, one view at a time, from the checked fields of commit records (`add` takes
    a view as a dict: a reader of many records makes no object per view)."""

    def __init__(self) -> None:
        self.strings: dict[str, list[str]] = {k: [] for k in STRINGS}
        self.numbers: dict[str, list[float]] = {k: [] for k in INTS + FLOATS}
        self.crcs = array("I")  # 4 bytes a digest, not a Python int's 28
        self.lengths: list[int] = []
        self._source: tuple[Any, str] = (None, "")  # the last source seen and its canonical JSON (views of an
        # episode follow one another and share it)

    def add(self, record: str, committed_at: float, v: Mapping[str, Any]) -> None:
        """One view (`ViewRecord`'s fields) of a commit record."""
        s, n = self.strings, self.numbers
        for key in ("view_id", "episode_id", "episode_path", "camera", "serial", "part", "attempt"):
            s[key].append(v[key])
        s["record"].append(record)
        if v["source"] != self._source[0]:
            self._source = (v["source"], canonical_json(v["source"]))
        s["source"].append(self._source[1])
        for key in ("phase", "stride", "start", "length"):
            n[key].append(v[key])
        (h, w), (top, left, height, width) = v["frame_hw"], v["box"]
        for key, value in (("frame_h", h), ("frame_w", w), ("box_top", top), ("box_left", left),
                           ("box_height", height), ("box_width", width)):
            n[key].append(value)
        digests = v["digests"]
        for name in SMALL_DIGESTS:
            n[f"digest_{name}"].append(int(digests.get(name, -1)))
        capture = v.get("capture_fps")
        n["video_fps"].append(v["video_fps"])
        n["capture_fps"].append(np.nan if capture is None else capture)
        n["committed_at"].append(committed_at)
        features = digests.get("features", ())
        self.crcs.extend(features)
        self.lengths.append(len(features))

    def table(self) -> ViewTable:
        codes, categories = {}, {}
        for key, values in self.strings.items():
            where: dict[str, int] = {}
            raw = np.fromiter((where.setdefault(x, len(where)) for x in values), np.int32, len(values))
            codes[key], categories[key] = _sorted_codes(raw, list(where))
        numbers = {k: np.asarray(self.numbers[k], np.int64 if k in INTS else np.float64).reshape(-1)
                   for k in INTS + FLOATS}
        lengths = np.asarray(self.lengths, np.int64)
        return ViewTable(codes, categories, numbers, np.frombuffer(self.crcs, np.uint32).copy(),
                         np.cumsum(lengths) - lengths, lengths)


class CommittedViews(Mapping[str, ViewRecord]):
    """view id -> the `ViewRecord` readers use (one per view id, `ViewTable.winners`): a read-only mapping over
    the table's columns (`table` holds just those rows) that makes a record only for a view asked for, once
    (the same object on every access, as a dict would give)."""

    def __init__(self, table: ViewTable) -> None:
        self.table = table
        self._rows: dict[str, int] | None = None
        self._made: dict[str, ViewRecord] = {}

    def _lookup(self) -> dict[str, int]:
        if self._rows is None:
            self._rows = {vid: i for i, vid in enumerate(self.table.strings("view_id").tolist())}
        return self._rows

    def __getitem__(self, view_id: str) -> ViewRecord:
        made = self._made.get(view_id)
        if made is None:
            made = self._made[view_id] = self.table.record(self._lookup()[view_id])
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.strings("view_id").tolist())

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, view_id: object) -> bool:
        return view_id in self._lookup()


@dataclass
class StoreIndex:
    """What a process knows of a store's commit records (`FeatureStore.index`): read once, at its start."""

    records: dict[str, RecordInfo]  # every listed commit record that parses, by name
    views: ViewTable  # every view of those records (a view committed twice is two rows)
    snapshot: str | None  # the index snapshot the records came from, where one was read
    read_one_by_one: int  # records not in the snapshot, read from their own files
    _committed: ViewTable | None = None

    def committed(self) -> ViewTable:
        """The rows readers use: one per view id (`ViewTable.winners`)."""
        if self._committed is None:
            self._committed = self.views.take(self.views.winners())
        return self._committed
