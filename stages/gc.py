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
- temp files of killed record writes (older than an hour: a live write keeps one for milliseconds);
- other stores under cache.path (other fingerprints or format versions): listed always, removed only
  with --other-stores as well, since another manifest or profile may still use them.

Never anything a live commit record references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import fsspec

from pipeline.manifest import Manifest
from pipeline.records import attempt_time
from pipeline.report import human_bytes
from pipeline.store import FeatureStore, store_specs
from stages.fingerprint import reader_spec

TEMP_FILE_AGE = 3600.0  # seconds: a temp file older than this belongs to a killed write


@dataclass
class Garbage:
    """One thing gc found: what it is, where (relative to the store, or a URL for other stores), its size."""

    kind: str  # unreferenced-attempt | superseded-commit | quarantined-commit | temp-file | other-store
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
    commits = store.commits()
    winners = store.committed_views()
    winner_time = {v.view_id: v.committed_at for v in winners.values()}
    live: set[tuple[str, str]] = set()
    for c in commits:
        if any(winners[v.view_id].commit == c.name for v in c.views):
            live.add((c.part, c.attempt))
            continue
        since = max(winner_time[v.view_id] for v in c.views)
        old = now - since > grace
        found.append(Garbage("superseded-commit", f"commits/{c.name}.json", store.path_bytes(
            f"commits/{c.name}.json"), old, "" if old else "superseded less than the grace period ago"))
        if not old:
            live.add((c.part, c.attempt))
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
    for rel in store.stray_temp_files():
        old = now - store.modified(rel) > TEMP_FILE_AGE
        found.append(Garbage("temp-file", rel, store.path_bytes(rel), old, "" if old else "being written"))
    return found


def _size(url: str) -> int:
    fs, root = fsspec.core.url_to_fs(url)
    return int(fs.du(root))


def _remove(store: FeatureStore, found: list[Garbage]) -> None:
    """Records first (readers stop seeing them), then data; other stores last."""
    order = ("superseded-commit", "quarantined-commit", "temp-file", "unreferenced-attempt", "other-store")
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
