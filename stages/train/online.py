"""`pipeline train --online`: the released way -- decode, crop and encode every clip in the training step.

The baseline the cache is measured against, and a way to train on episodes not yet extracted. Views
come from extraction's own `episode_jobs`, windows from the same sampler, states and actions
rounded exactly as the store keeps them, and the encoder's output is rounded to `cache.dtype` before
the predictor sees it: a cached run and an online run with the same seed see the same windows and log
the same losses (within float noise of other batch compositions; tested on an fp32 config).

    reader threads   decord (one VideoReader per clip, as the release) -> crop -> resize + normalise (CPU)
    training step    pixels to the device -> frozen encoder (no grad) -> storage dtype -> predictor loss
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import DamagedDataError
from pipeline.manifest import Manifest
from pipeline.store import TORCH_DTYPES, ViewRecord
from stages.cache.fingerprint import vit_config
from stages.extract.augment import CropBox, crop_frames, preprocess
from stages.extract.droid import Episode, EpisodeError, decode_frames, episode_id_for
from stages.extract.episodes import list_episodes
from stages.extract.part import episode_jobs
from stages.extract.worklist import EpisodeTask
from stages.train.buffer_pool import Allocator
from stages.train.loader import Batch, _Buffers, fill_each
from stages.train.windows import Window

log = logging.getLogger(__name__)


@dataclass
class _ViewData:
    """What a window of one view needs besides its pixels: the episode, raw frame indices, rows."""

    episode: Episode
    indices: np.ndarray  # [F] raw frame indices
    states: np.ndarray  # [F, 7] float32, as the store keeps them
    actions: np.ndarray  # [F, 7] float32, NaN on the last row


def online_views(m: Manifest) -> tuple[list[ViewRecord], dict[str, _ViewData]]:
    """The manifest's views, drawn from the episodes by the same `episode_jobs` extraction uses (so the
    same views, rows and rounding); episodes that cannot be read are named in a warning and left out."""
    root = Path(m.data.root)
    records, data = [], {}
    for folder in list_episodes(m.data):
        try:
            jobs = episode_jobs(EpisodeTask(episode_id_for(folder, root), str(folder), {}), m.data, m.views, m.crop)
        except EpisodeError as err:
            log.warning(f"episode left out of online training: {err}")
            continue
        for job in jobs:
            job.record.part = "online"
            records.append(job.record)
            data[job.record.view_id] = _ViewData(job.episode, job.indices, job.states.astype(np.float32),
                                                 job.actions.astype(np.float32))
    return records, data


class OnlineSource:
    """Windows decoded from the videos: normalised pixels [T, 3, S, S] per window (a WindowSource)."""

    def __init__(self, m: Manifest, data: dict[str, _ViewData]):
        self.data, self.crop, self.T = data, m.crop, m.data.frames_per_clip
        self.decode_threads = m.extract.decode_threads

    def empty(self, batch: int, alloc: Allocator) -> _Buffers:
        S = self.crop.size
        return _Buffers.empty(batch, self.T, (3, S, S), torch.float32, alloc, pixels=True)

    def fill_many(self, buffers: _Buffers, slots: Sequence[tuple[int, Window]]) -> list[DamagedDataError | None]:
        """Each window decoded in turn (a reader thread): decoding, not the call, is what a window costs."""
        return fill_each(self.fill, buffers, slots)

    def fill(self, buffers: _Buffers, i: int, window: Window) -> None:
        """Decode, crop and preprocess one window into row i."""
        d, s = self.data[window.view.view_id], window.start
        frames = decode_frames(d.episode, d.indices[s : s + self.T], self.decode_threads)  # [T, H, W, 3]
        crops = np.ascontiguousarray(crop_frames(frames, CropBox(*window.view.box)))  # [T, h, w, 3]
        buffers.data[i] = preprocess(torch.from_numpy(crops), self.crop.size, self.crop.mean, self.crop.std)
        buffers.put_rows(i, d.actions[s : s + self.T - 1], d.states[s : s + self.T])


class OnlineEncoder:
    """The frozen encoder on the training device, turning a batch's pixels into its features in the step."""

    def __init__(self, m: Manifest, device: torch.device):
        from stages.extract.encoder import build_runtime  # the encoder runtime: only online training needs it

        self.encoder = build_runtime(vit_config(m), m.encoder, device)
        self.dtype = TORCH_DTYPES[m.cache.dtype]

    def __call__(self, batch: Batch) -> Batch:
        """Encode every frame on its own (as extraction does), rounded to the cache's dtype."""
        if batch.pixels is None:
            raise ValueError("an online batch needs pixels")
        pixels = batch.pixels  # [B, T, 3, S, S]
        feats = self.encoder.encode_pixels(pixels.flatten(0, 1))  # [B*T, tokens, D]
        feats = feats.to(self.dtype).unflatten(0, pixels.shape[:2])  # [B, T, tokens, D], as a cache holds them
        if feats.is_inference():  # same dtype: still the encoder's inference-mode tensor; autograd needs a real one
            feats = feats.clone()
        return Batch(feats, batch.actions, batch.states, batch.batch_number, batch.wait_seconds, batch.windows)
