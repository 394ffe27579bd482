"""`pipeline export`: a run's checkpoint as a file in the release's format, for the release's own tools.

Why: what users do with a trained predictor -- plan with it (`torch.hub.load(..., "vjepa2_ac_vit_giant")` and
the energy-landscape notebook), or continue training it with the released code -- reads the released
`vjepa2-ac-vitg.pt` format: the frozen encoder and the predictor in one file. Our checkpoints hold the
predictor only (the encoder is frozen and its features are cached), so export adds the encoder the run's
features came from: the manifest's encoder.checkpoint entry, or, without one, the seeded random encoder the
project builds for its demos (said in the summary and in the file's `encoder_source`). The keys and their
prefixes are `stages/models/release_weights.release_file`'s, which says why each is there.

Before writing anything the export checks that the manifest's encoder is the run's: the same architecture
and crop size (so the predictor takes its features), and the same kind of weights as the run's saved config.
"""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UsageError
from pipeline.manifest import Manifest
from stages.cache.fingerprint import predictor_config, vit_config
from stages.models.release_weights import release_file
from stages.models.vit import build_encoder
from stages.train.checkpoints import resolve_checkpoint, run_changes, save_checkpoint
from stages.use.predictor_file import check_architecture, predictor_from_file, read_predictor_file

# Settings of a run's config that decide its encoder's features (besides which weights: see _encoder_changes).
ENCODER_KEYS = ("encoder.preset", "encoder.embed_dim", "encoder.depth", "encoder.num_heads", "encoder.mlp_ratio",
                "crop.size")


@dataclass
class ExportSummary:
    """What `pipeline export` wrote."""

    path: str
    source: str
    step: int | None
    encoder_source: str
    encoder_parameters: int
    predictor_parameters: int
    bytes: int
    keys: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [f"exported  {self.source} (step {self.step}) -> {self.path} ({self.bytes / 1e6:.1f} MB)",
                 f"format    the release's vjepa2-ac-vitg.pt: {', '.join(self.keys)}; model keys prefixed 'module.'",
                 f"predictor {self.predictor_parameters / 1e6:.2f} M parameters",
                 f"encoder   {self.encoder_parameters / 1e6:.2f} M parameters from {self.encoder_source}"]
        lines += [f"note      {n}" for n in self.notes]
        lines.append("load      encoder, predictor = the release's hub loader on this file, or "
                     "`pipeline eval` it (same numbers as the run's checkpoint)")
        return "\n".join(lines)


def export_release(m: Manifest, run: Path, to: Path, which: str = "latest") -> ExportSummary:
    """Write `run`'s checkpoint (`which`: latest, step_N or a path) with the manifest's encoder to `to`."""
    source, loaded = resolve_checkpoint(run, which)
    if to.is_dir():
        raise UsageError(f"--to {to} is a folder: name the .pt file to write")
    if to.exists() and to.resolve() == source.resolve():
        raise UsageError(f"--to {to} is the checkpoint being exported: write to another file")
    pf = read_predictor_file(source, predictor_config(m), loaded)
    if pf.kind != "run":
        raise UsageError(f"{source} is in the release's format already: export takes checkpoints of `pipeline train`")
    notes = check_architecture(pf, predictor_config(m)) + _encoder_changes(pf.run_config or {}, m)
    predictor = predictor_from_file(pf, torch.device("cpu"))  # strict: the file written is complete
    enc = m.encoder
    encoder = build_encoder(vit_config(m), enc.checkpoint, enc.checkpoint_key, enc.seed)
    encoder_source = f"{enc.checkpoint}[{enc.checkpoint_key!r}]" if enc.checkpoint else (
        f"a random init (encoder.seed {enc.seed}; the manifest has no encoder.checkpoint): the project's own demo "
        "encoder, built by stages/models/vit.py, not a released one")
    extras = {"predictor_config": pf.config.to_dict(), "encoder_config": vit_config(m).to_dict(), "step": pf.step,
              "exported_from": str(source), "encoder_source": encoder_source}
    payload = release_file(encoder.state_dict(), predictor.state_dict(), extras)
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(to, payload)  # temp file + fsync + rename: a killed export leaves no torn file
    except OSError as err:  # read-only mount, permissions, a file where a folder should be
        if err.errno == errno.ENOSPC:
            raise  # the CLI names a full disk itself (exit 1)
        raise UsageError(f"--to {to}: cannot write there ({err.strerror})") from None
    return ExportSummary(str(to), str(source), pf.step, encoder_source, _count(encoder), _count(predictor),
                         to.stat().st_size, list(payload), notes)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _encoder_changes(saved: dict[str, Any], m: Manifest) -> list[str]:
    """Refuse a manifest whose encoder is not the one the run's features came from; note a moved file.

    Compared with the run's saved config: the architecture and crop size, random init vs a file, and the
    seed (random) or the checkpoint entry (file). A different file path is only noted: paths differ between
    machines (they are `where`, not `what`, for resuming too)."""
    if not saved:
        return ["the checkpoint holds no config: the manifest's encoder could not be checked against the run's"]
    then, now = (saved.get("encoder") or {}).get("checkpoint"), m.encoder.checkpoint
    weights = "encoder.seed" if now is None else "encoder.checkpoint_key"
    changes = [c for c in run_changes(saved, m.to_dict()) if c.split(":")[0] in (*ENCODER_KEYS, weights)]
    if (then is None) != (now is None):
        changes.append(f"encoder.checkpoint: {then!r} -> {now!r}")
    if changes:
        raise UsageError("the manifest's encoder is not the one the run was trained on: " + "; ".join(changes)
                         + ". Export with the run's manifest and profile")
    return [f"the run's config names encoder.checkpoint {then}; the encoder is written from {now}"] \
        if then is not None and Path(then).resolve() != Path(now).resolve() else []
