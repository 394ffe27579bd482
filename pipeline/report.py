"""How summaries read on a terminal: one formatter per kind of number, shared by every command."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (binary units, as `du -h` prints them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
