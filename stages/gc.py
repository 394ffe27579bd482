"""`pipeline gc`: the store's housekeeping -- find what no reader needs any more and free its space.

Only this module (and `verify --repair`) removes anything from a store; everything else only adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.manifest import Manifest
from pipeline.report import human_bytes
from pipeline.store import FeatureStore
from stages.fingerprint import reader_spec


@dataclass
class GcSummary:
    """What `pipeline gc` removed (or, with dry_run, would remove)."""

    store: str
    dry_run: bool
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # (part, why, bytes)

    @property
    def bytes_freed(self) -> int:
        return sum(b for _, _, b in self.removed)

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {why} part {part} ({human_bytes(size)})" for part, why, size in self.removed]
        lines.append(f"{len(self.removed)} parts, {human_bytes(self.bytes_freed)} "
                     f"{'to free' if self.dry_run else 'freed'} in {self.store}")
        return "\n".join(lines)


def collect_garbage(m: Manifest, dry_run: bool = False) -> GcSummary:
    """Remove uncommitted parts (left by killed runs) and parts whose views were all re-extracted since."""
    store = FeatureStore(m.cache.path, reader_spec(m)).check()
    summary = GcSummary(store.url, dry_run)
    doomed = [(p, "uncommitted") for p in store.uncommitted_parts()]
    doomed += [(p, "superseded") for p in store.superseded_parts()]
    for part, why in doomed:
        summary.removed.append((part, why, store.part_bytes(part)))
        if not dry_run:
            store.drop_part(part)
    return summary
