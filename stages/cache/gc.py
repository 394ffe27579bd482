"""`pipeline gc`: the store's housekeeping -- find what no reader needs any more, list it, free it on --yes.

Only this module (and `verify --repair`, which only moves records aside) removes anything from a store;
every other command only adds. What gc may remove, and why it is safe:

- attempts no commit record references, older than the grace period (a younger one may be an extract
  that is still writing: attempts are named by their start time), and never one of a part that a running
  extract has claimed, whatever the grace period: attempts are listed first, then the claims, then the
  commit records, so an attempt seen here was either still being written when the claims were read
  (kept), or committed before the records were read (referenced), or abandoned;
- commit records all of whose views were committed again later (superseded), once the newer commit is
  older than the grace period (a training run started before it may still read the old one), with
  their attempts;
- quarantined commit records (moved aside by `verify --repair`), and then their attempts;
- index snapshots but the newest (older than the grace period: a command may be reading one); with --yes, gc
  first writes a new snapshot where many commit records had to be read one by one;
- temp files of killed record writes (older than an hour: a live write keeps one for milliseconds);
- other stores under cache.path (other fingerprints or format versions): listed always, removed only
  with --other-stores as well, since another manifest or profile may still use them.

Never anything a live commit record references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import fsspec
import numpy as np

from pipeline.manifest import Manifest
from pipeline.report import human_bytes
from pipeline.store import INDEX_DIR, FeatureStore, RecordInfo, StoreIndex, attempt_time, store_specs
from stages.cache.fingerprint import reader_spec

TEMP_FILE_AGE = 3600.0  # seconds: a temp file older than this belongs to a killed write


@dataclass
class Garbage:
    """One thing gc found: what it is, where (relative to the store, or a URL for other stores), its size."""

    kind: str  # unreferenced-attempt, superseded-commit, quarantined-commit, index-snapshot, temp-file, other-store
    path: str
    bytes: int
    removable: bool  # False: listed only (too young, or another store without --other-stores)
    note: str = ""


@dataclass
class GcSummary:
    """What `pipeline gc` found, and what it removed."""

    store: str
    deleted: bool  # --yes
    found: list[Garbage] = field(default_factory=list)

    def bytes_of(self, removable: bool = True) -> int:
        return sum(g.bytes for g in self.found if g.removable == removable)

    def format(self) -> str:
        verb = "removed" if self.deleted else "would remove"
        lines = [f"{verb if g.removable else 'keeping':12s} {g.kind:19s} {human_bytes(g.bytes):>10s}  {g.path}"
                 + (f"  ({g.note})" if g.note else "") for g in self.found]
        removable = [g for g in self.found if g.removable]
        lines.append(f"{len(removable)} item(s), {human_bytes(self.bytes_of())} "
                     f"{'freed' if self.deleted else 'to free (run with --yes to remove them)'} in {self.store}")
        kept = [g for g in self.found if not g.removable]
        if kept:
            lines.append(f"{len(kept)} item(s), {human_bytes(self.bytes_of(False))} kept (see notes)")
        return "\n".join(lines)


def collect_garbage(m: Manifest, yes: bool = False, grace_hours: float = 24.0,
                    other_stores: bool = False) -> GcSummary:
    """List (and with `yes` remove) what nothing in the manifest's store needs any more, and the other stores
    under cache.path (also where the manifest's own store was never created)."""
    store = FeatureStore(m.cache.path, reader_spec(m)).check_path()
    summary = GcSummary(store.url, yes)
    if store.exists():
        if yes:  # where many commit records had to be read one by one, the next open reads one snapshot instead
            store.check().compact()
        summary.found += _in_store(store.check(), time.time(), 3600.0 * grace_hours, 60.0 * m.extract.claim_minutes)
    for url, attrs in store_specs(m.cache.path).items():
        if url != store.url:
            version = attrs.get("format_version")
            note = f"format version {version}" + ("" if other_stores else "; remove with --yes --other-stores")
            summary.found.append(Garbage("other-store", url, _size(url), other_stores, note))
    if yes:
        _remove(store, summary.found)
    return summary


def _in_store(store: FeatureStore, now: float, grace: float, claim_ttl: float) -> list[Garbage]:
    """What the store itself holds that no reader needs (removable once older than `grace` seconds; never an
    attempt of a part another run holds a live claim on)."""
    found = []
    attempts = store.attempts()  # first: see the module's docstring for why this order
    claimed = store.live_claims(claim_ttl)
    index = store.index(refresh=True)
    superseded = _superseded(index)
    live = {(r.part, r.attempt) for r in index.records.values() if r not in superseded}
    for record, since in superseded.items():
        old = now - since > grace
        found.append(Garbage("superseded-commit", f"commits/{record.name}.json", store.path_bytes(
            f"commits/{record.name}.json"), old, "" if old else "superseded less than the grace period ago"))
        if not old:
            live.add((record.part, record.attempt))
    for name in store.quarantined():
        found.append(Garbage("quarantined-commit", f"quarantine/{name}.json",
                             store.path_bytes(f"quarantine/{name}.json"), True))
    for part, attempt in attempts:
        if (part, attempt) in live:
            continue
        started = attempt_time(attempt)
        old = started is not None and now - started > grace and part not in claimed
        note = ("" if old else f"its part is claimed by a running extract ({claimed[part]['host']} pid "
                f"{claimed[part]['pid']})" if part in claimed else
                "younger than the grace period: an extract may still be writing it")
        found.append(Garbage("unreferenced-attempt", f"parts/{part}/{attempt}",
                             store.path_bytes(f"parts/{part}/{attempt}"), old, note))
    for name in store.snapshots()[:-1]:  # every index snapshot but the newest
        made = attempt_time(name)
        old = made is not None and now - made > grace
        found.append(Garbage("index-snapshot", f"{INDEX_DIR}/{name}.parquet",
                             store.path_bytes(f"{INDEX_DIR}/{name}.parquet"), old,
                             "" if old else "younger than the grace period: a command may be reading it"))
    for rel in store.stray_temp_files():
        try:
            old = now - store.modified(rel) > TEMP_FILE_AGE
        except FileNotFoundError:  # renamed into place, or removed, since the listing: a write that finished
            continue
        found.append(Garbage("temp-file", rel, store.path_bytes(rel), old, "" if old else "being written"))
    return found


def _superseded(index: StoreIndex) -> dict[RecordInfo, float]:
    """The commit records none of whose views readers use (each was committed again later), with the time the
    last of them was: readers that started before then may still read the record's attempt. A record with no
    views at all holds nothing a reader needs (since its own commit)."""
    t = index.views
    win = t.winners()
    views, records = t.codes["view_id"], t.codes["record"]
    winner_time = np.zeros(len(t.categories["view_id"]))
    winner_time[views[win]] = t.numbers["committed_at"][win]
    latest = np.full(len(t.categories["record"]), -np.inf)
    np.maximum.at(latest, records, winner_time[views])  # per record: when its views were last committed
    winning = set(records[win].tolist())
    code = {name: i for i, name in enumerate(t.categories["record"])}
    out = {}
    for r in index.records.values():
        c = code.get(r.name)
        if c is None or c not in winning:
            out[r] = r.committed_at if c is None or latest[c] == -np.inf else float(latest[c])
    return out


def _size(url: str) -> int:
    fs, root = fsspec.core.url_to_fs(url)
    return int(fs.du(root))


def _remove(store: FeatureStore, found: list[Garbage]) -> None:
    """Records first (readers stop seeing them), then data; other stores last."""
    order = ("superseded-commit", "quarantined-commit", "index-snapshot", "temp-file", "unreferenced-attempt",
             "other-store")
    for kind in order:
        for g in found:
            if g.kind == kind and g.removable:
                if kind == "other-store":
                    fs, root = fsspec.core.url_to_fs(g.path)
                    fs.rm(root, recursive=True)
                elif kind == "unreferenced-attempt":
                    store.remove_attempt(*g.path.split("/")[1:3])
                else:
                    store.remove(g.path)
