"""`pipeline status`: what the store holds for a manifest, without changing anything."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.manifest import Manifest
from pipeline.store import FeatureStore
from stages.encoder import reader_spec
from stages.plan import plan_episodes


def status_report(m: Manifest) -> dict[str, Any]:
    """Counts of planned / committed / stale / failed views and episodes, bytes, failures with reasons."""
    store = FeatureStore(m.cache.path, reader_spec(m))
    report: dict[str, Any] = {"profile": m.profile, "fingerprint": store.digest, "store": store.url,
                              "store_exists": store.exists()}
    if store.exists():
        store.check()
    plans = plan_episodes(m, store)
    states = Counter(p.state for p in plans)
    failed = [p for p in plans if p.state == "failed"]
    report.update({
        "episodes": len(plans),
        "episodes_by_state": {k: states.get(k, 0) for k in ("done", "partial", "stale", "new", "failed")},
        "views_planned": sum(p.planned for p in plans),
        "views_committed": sum(p.committed for p in plans),
        "views_stale": sum(p.stale for p in plans),
        "views_failed": sum(p.planned for p in failed),
        "views_pending": sum(p.planned - p.committed for p in plans if p.needs_work),
        "episodes_failed": [{"episode": p.episode_id, "path": p.path, "reason": p.reason} for p in failed],
        "bytes_on_disk": store.bytes_on_disk(),
        "uncommitted_parts": store.uncommitted_parts() if store.exists() else [],
    })
    return report


def format_report(r: dict[str, Any]) -> str:
    """The report as a short human-readable block."""
    lines = [
        f"profile      {r['profile']}",
        f"store        {r['store']}{'' if r['store_exists'] else '  (not created yet)'}",
        f"fingerprint  {r['fingerprint']}",
        f"episodes     {r['episodes']}  " + "  ".join(f"{k} {v}" for k, v in r["episodes_by_state"].items()),
        f"views        planned {r['views_planned']}  committed {r['views_committed']}  "
        f"pending {r['views_pending']}  stale {r['views_stale']}  failed {r['views_failed']}",
        f"on disk      {human_bytes(r['bytes_on_disk'])}"
        + (f"  ({len(r['uncommitted_parts'])} uncommitted parts from killed runs)" if r["uncommitted_parts"] else ""),
    ]
    for f in r["episodes_failed"]:
        lines.append(f"failed       {f['episode']}: {f['reason']}")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
