"""The feature store: one fingerprint's Zarr v3 store of cached features, its index of commits, checked reads
and writes. Stages use it through these names only; the modules behind them are the store's own business.

    store.py      FeatureStore: open and check, the index, checked reads, attempts and commits, claims, removal
    index.py      the committed views as columns (ViewTable), index snapshots (Parquet)
    records.py    commit and failure records: what they hold, how a broken one is told apart
    layout.py     the shard layout, and the geometry every reader holds an array to
    reader.py     windows read straight from shard files (positional reads, crc32c)
    writer.py     an attempt's arrays, whole shards written straight to their files
    settings.py   StoreSettings: how features are laid out (the manifest's cache section maps onto it)
    checksums.py  crc32c, and of a concatenation from its parts'
    durable.py    writes that survive a kill or a power cut

Names are looked up on first use (PEP 562), so that the manifest can import `settings` without loading
zarr or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "FeatureStore": "store", "FORMAT_VERSION": "store", "INDEX_DIR": "store", "find_view": "store",
    "fingerprint_digest": "store", "store_specs": "store", "context": "store",
    "StoreIndex": "index", "ViewTable": "index", "CommittedViews": "index",
    "CommitRecord": "records", "FailureRecord": "records", "RecordInfo": "records", "ViewRecord": "records",
    "attempt_time": "records", "canonical_json": "records", "new_attempt_id": "records", "view_id_for": "records",
    "STATE_DIM": "layout", "STORAGE_DTYPES": "layout", "ShardedRowReader": "reader",
    "PartWriter": "writer", "TORCH_DTYPES": "writer", "encode_features": "writer", "finite_rows": "writer",
    "StoreSettings": "settings", "crc32c": "checksums", "fsync_dir": "durable", "replace_durably": "durable",
}
__all__ = [
    "FORMAT_VERSION",
    "INDEX_DIR",
    "STATE_DIM",
    "STORAGE_DTYPES",
    "TORCH_DTYPES",
    "CommitRecord",
    "CommittedViews",
    "FailureRecord",
    "FeatureStore",
    "PartWriter",
    "RecordInfo",
    "ShardedRowReader",
    "StoreIndex",
    "StoreSettings",
    "ViewRecord",
    "ViewTable",
    "attempt_time",
    "canonical_json",
    "context",
    "crc32c",
    "encode_features",
    "find_view",
    "fingerprint_digest",
    "finite_rows",
    "fsync_dir",
    "new_attempt_id",
    "replace_durably",
    "store_specs",
    "view_id_for",
]

if TYPE_CHECKING:
    from pipeline.store.checksums import crc32c
    from pipeline.store.durable import fsync_dir, replace_durably
    from pipeline.store.index import CommittedViews, StoreIndex, ViewTable
    from pipeline.store.layout import STATE_DIM, STORAGE_DTYPES
    from pipeline.store.reader import ShardedRowReader
    from pipeline.store.records import (
        CommitRecord,
        FailureRecord,
        RecordInfo,
        ViewRecord,
        attempt_time,
        canonical_json,
        new_attempt_id,
        view_id_for,
    )
    from pipeline.store.settings import StoreSettings
    from pipeline.store.store import (
        FORMAT_VERSION,
        INDEX_DIR,
        FeatureStore,
        context,
        find_view,
        fingerprint_digest,
        store_specs,
    )
    from pipeline.store.writer import TORCH_DTYPES, PartWriter, encode_features, finite_rows


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pipeline.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.store.{_HOME[name]}"), name)
