"""`pipeline demo`: the whole job on built-in data -- synthetic DROID episodes (once), extract, train.

What a new user runs first, so it must show every stage working on a CPU in minutes, re-run cheaply
(each stage skips what is done) and end with where everything is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest
from stages.demo.synthetic import Exploration, write_synthetic_dataset
from stages.extract.driver import ExtractSummary, extract
from stages.train.evaluate import format_eval
from stages.train.loop import TrainSummary, train


@dataclass
class DemoSummary:
    """What the demo did: its extract and train summaries, and the last evaluation of the run."""

    data_root: str
    extract: ExtractSummary
    train: TrainSummary
    last_eval: dict[str, Any] | None

    @property
    def failed(self) -> bool:
        return self.extract.incomplete

    def format(self) -> str:
        lines = [self.train.format()]
        if self.train.end_step == self.train.start_step and self.last_eval:  # nothing trained now
            lines.append(format_eval(self.last_eval))
        lines.append(f"\nResults: episodes {self.data_root}, feature store {self.extract.store}, run "
                     f"{self.train.run_dir} ({', '.join(self.train.outputs)})")
        return "\n".join(lines)


def run_demo(m: Manifest, episodes: int | None = None, echo: Callable[[str], None] = print) -> DemoSummary:
    """Write the manifest's synthetic episodes (`episodes` of them, when given) under data.root if it has none,
    then extract and train."""
    root, syn = Path(m.data.root), m.synthetic
    if not (root / "episodes.txt").exists():
        count = syn.episodes if episodes is None else episodes
        explore = f", {syn.explore:.0%} of behaviours exploring" if syn.explore else ""
        echo(f"Writing {count} synthetic DROID-format episodes to {root}{explore} ...")
        write_synthetic_dataset(root, count, seed=syn.seed, width=syn.width, height=syn.height,
                                min_seconds=syn.min_seconds, max_seconds=syn.max_seconds, progress=True,
                                scenes=syn.scenes, explore=Exploration(syn.explore, syn.explore_step))
    s = extract(m, echo=echo)
    if s.views_done:
        echo(f"extract: {s.views_done} views, {s.frames} frames in {s.seconds:.1f} s "
             f"({s.frames_per_second:.1f} frames/s end to end); {s.views_skipped} views already cached\n")
    t = train(m, echo=echo)
    eval_file = Path(t.run_dir) / "eval.json"
    last_eval = json.loads(eval_file.read_text()) if eval_file.exists() else None
    return DemoSummary(str(root), s, t, last_eval)
