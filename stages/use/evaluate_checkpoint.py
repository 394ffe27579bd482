"""`pipeline eval`: any predictor checkpoint on the manifest's feature cache, per horizon against copying the
last frame, with the spread over windows.

Why a module of its own, apart from training: a checkpoint outlives its run -- it is compared with the
released `vjepa2-ac-vitg.pt`, with other runs, on other splits -- so evaluating one needs nothing of the run
but the file (read by `stages/predictor_file.py`, either format). The windows follow training's rule
(`eval_windows` over the split that train.heldout_fraction and train.split_salt define, of the views the
manifest trains on), so on the held-out split `pipeline eval` of a run's checkpoint gives the numbers
`pipeline train` logged for it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.distributed import local_device
from pipeline.errors import UsageError
from pipeline.manifest import Manifest
from pipeline.store import ViewTable
from stages.cache.fingerprint import predictor_config, reader_spec
from stages.train.checkpoints import resolve_checkpoint
from stages.train.evaluate import evaluate_windows, format_ratio
from stages.train.loader import CachedSource
from stages.train.loop import autocast_for
from stages.train.plots import plot_horizons
from stages.train.windows import SPLITS, BadViews, Window, eval_windows, open_training_store, split_index
from stages.use.predictor_file import check_architecture, predictor_from_file, read_predictor_file

log = logging.getLogger(__name__)
CELL = 38  # characters of a table cell: "0.7784 (0.0124; 0.7677 0.7754 0.7922)"


def split_windows(m: Manifest, views: ViewTable, split: str) -> tuple[list[Window], int]:
    """The evaluation windows of `split` among a store's committed views, chosen as `pipeline train` chooses
    them (its views, split rule and window choice), and the split's episode count."""
    cfg, T = m.train, m.data.frames_per_clip
    if split not in SPLITS:
        raise UsageError(f"--split {split}: must be one of {', '.join(SPLITS)}")
    index = split_index(m.data, m.train, views, split)
    if not index.episodes:
        if split == "heldout":
            raise UsageError(f"no held-out episodes with a window of {T} frames (train.heldout_fraction "
                             f"{cfg.heldout_fraction}, train.split_salt {cfg.split_salt!r}): evaluate with --split all")
        raise UsageError(f"no {split} episodes with a window of {T} frames (data.frames_per_clip) in the store")
    return eval_windows(index, T, cfg.eval_windows, cfg.seed), len(index.episodes)


@dataclass
class EvalReport:
    """What `pipeline eval` measured, on what, and where it wrote it."""

    checkpoint: str
    kind: str
    step: int | None
    split: str
    split_episodes: int  # episodes of the split (windows come from up to train.eval_windows of them)
    episodes: int  # episodes the windows come from
    frames_per_clip: int
    architecture_from: str
    predictor_config: dict[str, Any]
    store_fingerprint: str
    notes: list[str]
    result: dict[str, Any]  # evaluate()'s: windows, tf_loss, rollout_loss, horizons
    json_path: str = ""
    plot_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "result"}
        return {**out, **{k: v for k, v in self.result.items() if k != "step"}}

    def format(self) -> str:
        r, c = self.result, self.predictor_config
        made = f"a `pipeline train` checkpoint, step {self.step}" if self.kind == "run" else \
            "release format" + (f", from step {self.step}" if self.step is not None else "")
        lines = [f"checkpoint  {self.checkpoint} ({made})",
                 f"split       {self.split}: {r['windows']} windows of {self.frames_per_clip} frames from "
                 f"{self.episodes} of {self.split_episodes} episode(s)",
                 f"predictor   width {c['predictor_embed_dim']}, depth {c['depth']}, {c['num_heads']} head(s); takes "
                 f"{(c['img_size'] // c['patch_size']) ** 2} tokens x {c['embed_dim']} per frame (architecture from "
                 f"the {self.architecture_from})"]
        lines += [f"note        {n}" for n in self.notes]
        lines.append(f"losses      teacher-forcing L1 {r['tf_loss']:.4f}, rollout L1 {r['rollout_loss']:.4f}")
        lines += format_horizons(r["horizons"])
        if self.json_path:
            lines.append(f"wrote       {self.json_path}, {self.plot_path}")
        return "\n".join(lines)


def format_horizons(rows: list[dict[str, Any]]) -> list[str]:
    """Per horizon: mean L1 (std; p10 p50 p90 over windows) of the predictor and of the copy baseline, their
    ratio, and the share of windows the predictor beats the copy on."""
    lines = [f"horizon   {'predictor L1 (std; p10 p50 p90)':{CELL}}   {'copy-last-frame L1 (std; p10 p50 p90)':{CELL}}"
             "   ratio  better"]
    for h in rows:
        lines.append(f"{h['horizon']:7d}   {_cell(h, 'model_l1')}   {_cell(h, 'copy_l1')}   "
                     f"{h['model_l1'] / max(h['copy_l1'], 1e-12):5.3f}  {100 * h['model_better']:5.1f}%")
    if rows and "shuffled_l1" in rows[0]:
        lines.append("actions   horizon   true L1   shuffled (another window's) L1   zero L1   shuffled/true "
                     "(1.0: actions ignored)")
        lines += [f"{'':9s} {h['horizon']:7d}   {h['model_l1']:7.4f}   {h['shuffled_l1']:30.4f}   "
                  f"{h['zero_l1']:7.4f}   {format_ratio(h['action_ratio']):>13s}" for h in rows]
    return lines


def _cell(h: dict[str, Any], key: str) -> str:
    if h.get(f"{key}_std") is None:
        return f"{h[key]:<{CELL}.4f}"
    return (f"{h[key]:.4f} ({h[f'{key}_std']:.4f}; {h[f'{key}_p10']:.4f} {h[f'{key}_p50']:.4f} "
            f"{h[f'{key}_p90']:.4f})").ljust(CELL)


def output_paths(checkpoint: Path, out: Path | None) -> tuple[Path, Path]:
    """(JSON, PNG): --out and the plot beside it, or `<checkpoint stem>.eval.json / .eval.png` beside the file."""
    if out is None:
        return tuple(checkpoint.with_name(f"{checkpoint.stem}.eval.{ext}") for ext in ("json", "png"))
    if out.suffix == ".png" or out.is_dir():
        raise UsageError(f"--out {out}: name the JSON file to write (the plot goes beside it as .png)")
    return out, out.with_suffix(".png")


def evaluate_checkpoint(m: Manifest, checkpoint: Path, split: str = "heldout", out: Path | None = None,
                        write: bool = True) -> EvalReport:
    """Evaluate the predictor of `checkpoint` (a file, or a run folder's latest) on `split` of the manifest's
    feature store; write the JSON and the plot (unless `write` is False)."""
    path, loaded = resolve_checkpoint(checkpoint)
    json_path, png_path = output_paths(path, out)
    pf = read_predictor_file(path, predictor_config(m), loaded)
    notes = check_architecture(pf, predictor_config(m))
    store = open_training_store(m.cache.path, reader_spec(m), pf.config.tokens_per_frame, pf.config.embed_dim)
    if pf.data_fingerprint not in (None, store.digest):
        notes.append(f"the run trained on other features (store {pf.data_fingerprint[:16]}; this manifest's store "
                     f"is {store.digest[:16]})")
    windows, split_episodes = split_windows(m, store.index().committed(), split)
    device = local_device(m.train.device, "train.device")
    model = predictor_from_file(pf, device)
    T = m.data.frames_per_clip
    source, bad = CachedSource(store, T, windows[0].view), BadViews(m.train.on_bad_data, warn=log.warning)
    result = evaluate_windows(model, source, windows, device, bad, T, m.train.auto_steps, m.train.eval_horizons,
                              autocast_for(m.train.precision, device), pf.step)
    report = EvalReport(str(path), pf.kind, pf.step, split, split_episodes,
                        len({w.view.episode_id for w in windows}), T, pf.config_from, pf.config.to_dict(),
                        store.digest, notes + [f"skipped damaged view {v}" for v in sorted(bad.found)], result)
    if write:
        _write(report, json_path, png_path)
    return report


def _write(report: EvalReport, json_path: Path, png_path: Path) -> None:
    """The JSON and the plot; a folder that cannot be written (a released file's) is one line asking for --out."""
    report.json_path, report.plot_path = str(json_path), str(png_path)
    step = "released weights" if report.step is None else f"step {report.step}"
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=1))
        plot_horizons(report.result, png_path, split=report.split,
                      title=f"{report.split} rollout, {Path(report.checkpoint).name} ({step})")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise  # the CLI names a full disk itself (exit 1)
        raise UsageError(f"cannot write {err.filename or json_path} ({err.strerror}): pass --out FILE") from None
