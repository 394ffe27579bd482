"""`pipeline inspect`: pictures of the feature cache, so a user sees what the data is before spending GPU
weeks on it.

One PNG per view, always FIGURE_PX = 1600 x 1000 pixels (16 x 10 inches at 100 dpi):

    title   view id, episode, camera, phase / stride, crop box, commit
    row 1   SHOWN_FRAMES raw frames spread over the view, decoded from the raw episode, crop box drawn
    row 2   the encoder's input at those frames: the crop resized to crop.size (normalisation undone)
    row 3   the cached features of those frames: tokens -> 3 principal components as RGB on the h x w
            token grid; one PCA fitted over all frames of the view, so colours compare across frames
    row 4   states (xyz, Euler angles, gripper) and actions over the view's time, the shown frames marked

Cached data is read only through the store's checked reads (crc32c per chunk and per row): a picture is
never drawn from damaged bytes. The raw episode is looked up at data.root / episode id; when it is gone,
or its files differ from those the view was extracted from (the record's `source`), rows 1-2 say so, one
warning line does too, and the cached rows are drawn anyway. Nothing else is read: no encoder, no run.
`--html DIR` writes DIR/index.html, a table of each view's facts, plus one PNG per view.
"""

from __future__ import annotations

import dataclasses
import html as html_text
import logging
import os
import random
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
import torch
from matplotlib.gridspec import GridSpec, SubplotSpec
from matplotlib.patches import Rectangle

from pipeline.errors import UsageError
from pipeline.manifest import CropSection, DataSection, Manifest
from pipeline.store import FeatureStore, ViewRecord, find_view
from stages.cache.fingerprint import reader_spec, vit_config
from stages.extract.augment import CropBox, crop_frames, preprocess
from stages.extract.droid import EpisodeError, decode_frames
from stages.extract.episodes import open_episode, source_identity
from stages.train.plots import save_png

FIGURE_INCHES = (16.0, 10.0)
FIGURE_DPI = 100
FIGURE_PX = (1600, 1000)  # width x height of every PNG = FIGURE_INCHES x FIGURE_DPI (tests check it)
SHOWN_FRAMES = 6  # frames per picture, spread over the view
READ_ROWS = 64  # feature rows per checked read while fitting the PCA (46 MB at ViT-g size in 16 bits)
PCA_SIGMAS = 2.0  # +-2 std of a component over the view spans its colour channel
STATE_PANELS = (("position (m)", slice(0, 3), ("x", "y", "z")),
                ("orientation, extrinsic xyz Euler (rad)", slice(3, 6), ("roll", "pitch", "yaw")),
                ("gripper (0 open .. 1 closed)", slice(6, 7), ("gripper",)))
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "dgripper")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PictureSettings:
    """The few manifest settings a picture depends on."""

    data: DataSection  # raw episodes are at data.root / episode id, in data.format
    crop: CropSection  # size, mean, std: what the encoder was given
    grid: tuple[int, int]  # token grid h x w of one frame: crop.size / patch
    video_fps: float | None = None  # data.video_fps when set: the rate frame times come from (else the video's)


@dataclass
class RawFrames:
    """The raw episode's frames at the shown rows of a view, or why there are none."""

    frames: np.ndarray | None  # [K, H, W, 3] uint8; None when the episode is gone, changed or unreadable
    problem: str = ""  # "raw frames unavailable: ..." / "raw frames stale: ..."; empty when frames are there


@dataclass
class ViewPicture:
    """One written PNG and the facts of its view (the --html table row)."""

    view_id: str
    png: str
    problem: str = ""
    facts: dict[str, str] = field(default_factory=dict)


@dataclass
class InspectSummary:
    """What `pipeline inspect` wrote."""

    store: str
    seed: int | None  # the seed of the random draw of views; None when --view named the view
    pictures: list[ViewPicture] = field(default_factory=list)
    page: str | None = None  # index.html, with --html
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        w, h = FIGURE_PX
        lines = []
        for p in self.pictures:
            lines.append(f"wrote    {p.png}  ({w}x{h} px: view {p.view_id}, episode {p.facts['episode']})")
            lines += [f"         {p.problem}"] if p.problem else []
        lines += [f"page     {self.page}"] if self.page else []
        drawn = "" if self.seed is None else f" (drawn with --seed {self.seed})"
        lines.append(f"inspected {len(self.pictures)} view(s){drawn} of {self.store} in {self.seconds:.1f} s")
        return "\n".join(lines)


def inspect_cache(m: Manifest, view: str | None = None, out: Path | None = None, html: Path | None = None,
                  views: int = 6, seed: int | None = None) -> InspectSummary:
    """Picture one view (`view`: an id or a unique prefix; else a random committed one), or with `html`
    a page of `views` random views; random draws use `seed` (a new one when None, reported)."""
    _check_arguments(out, html, views)
    t0 = time.perf_counter()
    store = FeatureStore(m.cache.path, reader_spec(m)).check()
    committed = store.committed_views()
    if not committed:
        raise UsageError(f"{store.url}: no committed views yet (run `pipeline extract` first)")
    if view is None and seed is None:
        seed = random.randrange(1 << 31)
    count = views if html is not None else 1
    chosen = [find_view(committed, view)] if view is not None else pick_views(committed, count, seed)
    cfg = vit_config(m)
    side = cfg.img_size // cfg.patch_size
    settings = PictureSettings(m.data, m.crop, (side, side), m.data.fps_override())
    summary = InspectSummary(store.url, None if view is not None else seed)
    paths = [html / png_name(v) if html is not None else out or Path(png_name(v)) for v in chosen]
    for path in paths:
        _check_writable(path)
    for v, path in zip(chosen, paths, strict=True):
        summary.pictures.append(draw_view(store, v, settings, path))
    if html is not None:
        summary.page = str(write_page(html, store.url, summary.pictures))
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_arguments(out: Path | None, html: Path | None, views: int) -> None:
    if out is not None and html is not None:
        raise UsageError("--out and --html do not go together: --out names one view's PNG, --html a folder "
                         "of them with index.html")
    if views < 1:
        raise UsageError(f"--views {views}: must be at least 1")
    if out is not None and (out.is_dir() or out.suffix.lower() != ".png"):
        raise UsageError(f"--out {out}: give a file name ending in .png")
    if html is not None and html.exists() and not html.is_dir():
        raise UsageError(f"--html {html} is a file, not a folder")


def _check_writable(path: Path) -> None:
    """Make the folder of an output; a place that cannot be written is a usage error, found before drawing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from err
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"cannot write {path}: its folder is not writable")


def png_name(view: ViewRecord) -> str:
    return f"inspect_{view.view_id}.png"


def pick_views(committed: Mapping[str, ViewRecord], count: int, seed: int | None) -> list[ViewRecord]:
    """`count` distinct committed views drawn with `seed`, from the sorted ids (so the draw does not depend
    on the order in which records were listed)."""
    ids = sorted(committed)
    return [committed[v] for v in random.Random(seed).sample(ids, min(count, len(ids)))]


def shown_rows(length: int, count: int = SHOWN_FRAMES) -> np.ndarray:
    """`count` rows spread evenly over a view, first and last included (all rows of a shorter view)."""
    return np.unique(np.linspace(0, length - 1, min(count, length)).round().astype(np.int64))  # [K]


def draw_view(store: FeatureStore, view: ViewRecord, settings: PictureSettings, path: Path) -> ViewPicture:
    """Read what the picture of one view needs (checked) and write it as a FIGURE_PX PNG at `path`."""
    rows = shown_rows(view.length)  # [K]
    index = store.read_rows(view, "frame_index").astype(np.int64)  # [F] raw frame of each row
    states = store.read_rows(view, "states")  # [F, 7]
    actions = store.read_rows(view, "actions")  # [F, 7], NaN on the last row
    pca = feature_pca(store, view, rows, settings.grid)  # [K, h, w, 3]
    raw = read_raw_frames(view, settings.data, index[rows])
    if raw.problem:
        log.warning(f"view {view.view_id} of episode {view.episode_id}: {raw.problem}; drawing the cached data only")
    inputs = None if raw.frames is None else encoder_inputs(raw.frames, view.box, settings.crop)  # [K, S, S, 3]
    seconds = index / (settings.video_fps or view.video_fps)  # [F] time of each row in the episode
    fig = plot_view(view, rows, index, seconds, states, actions, raw, inputs, pca)
    save_png(fig, path, FIGURE_DPI)
    return ViewPicture(view.view_id, str(path), raw.problem, view_facts(view, raw.problem))


# -- what the picture shows ----------------------------------------------------------------------------


def read_raw_frames(view: ViewRecord, data: DataSection, indices: np.ndarray) -> RawFrames:
    """The raw frames at `indices` [K], decoded from the view's episode -- only while its files are still
    the ones the view was extracted from: otherwise box and features would not belong to these pixels."""
    folder = Path(data.root) / view.episode_id
    now = source_identity(data, folder, view.camera)
    if not now:
        return RawFrames(None, f"raw frames unavailable: episode {folder} is gone")
    changed = sorted(name for name in view.source.keys() | now.keys() if view.source.get(name) != now.get(name))
    if changed:
        return RawFrames(None, f"raw frames stale: {', '.join(changed)} changed or gone since the view was extracted")
    try:
        return RawFrames(decode_frames(open_episode(data, folder, view.camera), indices))  # [K, H, W, 3]
    except (EpisodeError, ValueError) as err:
        return RawFrames(None, f"raw frames unavailable: {err}")


def encoder_inputs(frames: np.ndarray, box: list[int], crop: CropSection) -> np.ndarray:
    """What the encoder saw: the crop, resized by extraction's own `preprocess`, shown as an image (the
    normalisation undone): [K, S, S, 3] uint8."""
    crops = torch.from_numpy(np.ascontiguousarray(crop_frames(frames, CropBox(*box))))  # [K, h, w, 3]
    pixels = preprocess(crops, crop.size, crop.mean, crop.std)  # [K, 3, S, S]
    mean = torch.tensor(crop.mean).view(1, 3, 1, 1) * 255.0  # [1, 3, 1, 1]
    std = torch.tensor(crop.std).view(1, 3, 1, 1) * 255.0  # [1, 3, 1, 1]
    image = (pixels * std + mean).round().clamp(0, 255).to(torch.uint8)  # [K, 3, S, S]
    return image.permute(0, 2, 3, 1).numpy()  # [K, S, S, 3]


def feature_pca(store: FeatureStore, view: ViewRecord, rows: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The cached features of `rows` as RGB in 0..1 on the token grid: [K, h, w, 3].

    One PCA over every token of every frame of the view (read in blocks, each checked), so a colour means
    the same feature direction in every frame of the picture.
    """
    moments = _Moments()
    shown: dict[int, np.ndarray] = {}
    for start in range(0, view.length, READ_ROWS):
        block = store.read_features(view, start, min(READ_ROWS, view.length - start)).float().numpy()  # [R, N, D]
        moments.add(block.reshape(-1, block.shape[-1]))  # [R*N, D]
        shown.update({int(r): block[r - start] for r in rows if start <= r < start + len(block)})
    mean, components, sigma = moments.principal(3)  # [D], [3, D], [3]
    tokens = np.stack([shown[int(r)] for r in rows])  # [K, N, D]
    if tokens.shape[1] != grid[0] * grid[1]:
        raise UsageError(f"view {view.view_id}: {tokens.shape[1]} tokens per frame, not the {grid[0]} x {grid[1]} "
                         "grid of crop.size / patch size")
    rgb = 0.5 + (tokens - mean) @ components.T / (2 * PCA_SIGMAS * sigma)  # [K, N, 3]
    return np.clip(rgb, 0.0, 1.0).reshape(len(rows), *grid, 3)  # [K, h, w, 3]


class _Moments:
    """Running mean and covariance of rows [n, D] in float64, taken around the first block's mean, which
    keeps the covariance free of cancellation when the features' mean is large against their spread."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None  # [D]
        self.s1: np.ndarray | None = None  # [D]
        self.s2: np.ndarray | None = None  # [D, D]

    def add(self, x: np.ndarray) -> None:
        if self.shift is None:
            self.shift = x.mean(axis=0, dtype=np.float64)  # [D]
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((len(self.shift), len(self.shift)))
        y = (x - self.shift).astype(np.float32)  # [n, D]; float32 products: 2x faster, summed in float64
        self.n += len(y)
        self.s1 += y.sum(axis=0, dtype=np.float64)  # [D]
        self.s2 += y.T @ y  # [D, D]

    def principal(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean [D], the top k components [k, D] (each with a fixed sign: deterministic colours), their std [k]."""
        m = self.s1 / self.n  # [D]
        cov = self.s2 / self.n - np.outer(m, m)  # [D, D]
        values, vectors = scipy.linalg.eigh(cov, subset_by_index=(len(m) - k, len(m) - 1))  # [k], [D, k] ascending
        top = vectors[:, ::-1].T.copy()  # [k, D], the largest first
        top *= np.sign(top[np.arange(k), np.abs(top).argmax(axis=1)])[:, None]  # largest loading > 0
        return self.shift + m, top, np.sqrt(np.clip(values[::-1], 1e-12, None))


# -- drawing ---------------------------------------------------------------------------------------------


def plot_view(view: ViewRecord, rows: np.ndarray, index: np.ndarray, seconds: np.ndarray, states: np.ndarray,
              actions: np.ndarray, raw: RawFrames, inputs: np.ndarray | None, pca: np.ndarray) -> plt.Figure:
    """The figure: raw frames with the box, encoder inputs, feature PCA, states and actions (module doc)."""
    fig = plt.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    fig.suptitle(title(view), fontsize=11)
    grid = fig.add_gridspec(4, len(rows), height_ratios=(1, 1, 1, 1.2), left=0.035, right=0.99, top=0.9,
                            bottom=0.055, hspace=0.35, wspace=0.06)
    labels = [f"row {r}, frame {index[r]}, {seconds[r]:.1f} s" for r in rows]
    if raw.frames is None:
        _note(fig.add_subplot(grid[0:2, :]), raw.problem)
    else:
        for ax in _image_row(fig, grid, 0, raw.frames, labels, "raw frame\n+ crop box"):
            top, left, height, width = view.box
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor="yellow",
                                   linewidth=1.5))
        _image_row(fig, grid, 1, inputs, labels, f"encoder input\n{inputs.shape[1]} x {inputs.shape[2]} px")
    _image_row(fig, grid, 2, pca, labels, f"features, PCA -> RGB\n({pca.shape[1]} x {pca.shape[2]} tokens)")
    _series(fig, grid[3, :], seconds, states, actions, seconds[rows])
    return fig


def title(view: ViewRecord) -> str:
    top, left, height, width = view.box
    return (f"view {view.view_id}    episode {view.episode_id}    camera {camera_name(view)}\n"
            f"phase {view.phase} / stride {view.stride} at {view.video_fps:g} fps    crop box top {top}, left "
            f"{left}, {height} x {width} of {view.frame_hw[0]} x {view.frame_hw[1]}    commit {view.commit}")


def camera_name(view: ViewRecord) -> str:
    """The camera's key and, where it differs (DROID's metadata keys name a serial), its serial."""
    return view.camera if view.serial == view.camera else f"{view.camera} ({view.serial})"


def _image_row(fig: plt.Figure, grid: GridSpec, row: int, images: np.ndarray, labels: list[str],
               name: str) -> list[plt.Axes]:
    axes = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        ax = fig.add_subplot(grid[row, i])
        ax.imshow(image, interpolation="nearest" if image.shape[0] < 64 else "antialiased")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        axes.append(ax)
    axes[0].set_ylabel(name, fontsize=9)
    return axes


def _note(ax: plt.Axes, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, textwrap.fill(text, 100), ha="center", va="center", fontsize=13, color="firebrick",
            transform=ax.transAxes)


def _series(fig: plt.Figure, cell: SubplotSpec, seconds: np.ndarray, states: np.ndarray, actions: np.ndarray,
            marks: np.ndarray) -> None:
    cells = cell.subgridspec(1, len(STATE_PANELS) + 1, wspace=0.22)
    for i, (name, cols, names) in enumerate(STATE_PANELS):
        _lines(fig.add_subplot(cells[0, i]), seconds, states[:, cols], names, name, marks)
    _lines(fig.add_subplot(cells[0, -1]), seconds, actions, ACTION_NAMES, "action: frame at t -> next frame", marks)


def _lines(ax: plt.Axes, x: np.ndarray, y: np.ndarray, names: tuple[str, ...], name: str, marks: np.ndarray) -> None:
    for j, label in enumerate(names):
        ax.plot(x, y[:, j], linewidth=1, label=label)
    for t in marks:  # the frames shown above
        ax.axvline(t, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("time in the episode (s)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


# -- the page --------------------------------------------------------------------------------------------


def view_facts(view: ViewRecord, problem: str) -> dict[str, str]:
    """A view's facts as the page's table shows them."""
    return {"view": view.view_id, "episode": view.episode_id, "camera": camera_name(view),
            "phase / stride": f"{view.phase} / {view.stride}", "crop box [top, left, h, w]": str(view.box),
            "frame [h, w]": str(view.frame_hw), "frames": str(view.length), "video fps": f"{view.video_fps:g}",
            "commit": view.commit,
            "committed": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(view.committed_at)),
            "raw frames": problem or "ok"}


def write_page(folder: Path, store_url: str, pictures: list[ViewPicture]) -> Path:
    """folder/index.html: a table of the views' facts, each linking its PNG, then the PNGs themselves."""
    esc = html_text.escape
    head = "".join(f"<th>{esc(k)}</th>" for k in pictures[0].facts) + "<th>picture</th>"
    body = "\n".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in p.facts.values())
                     + f'<td><a href="#{esc(p.view_id)}">{esc(Path(p.png).name)}</a></td></tr>' for p in pictures)
    images = "\n".join(f'<h2 id="{esc(p.view_id)}">{esc(p.view_id)}</h2>\n<img src="{esc(Path(p.png).name)}" '
                       f'width="{FIGURE_PX[0]}" height="{FIGURE_PX[1]}" alt="view {esc(p.view_id)}">'
                       for p in pictures)
    page = (f"<!doctype html>\n<meta charset=\"utf-8\">\n<title>feature cache: {esc(store_url)}</title>\n"
            "<style>body{font-family:sans-serif} table{border-collapse:collapse} "
            "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px}</style>\n"
            f"<h1>feature cache</h1>\n<p>{esc(store_url)}: {len(pictures)} view(s)</p>\n"
            f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n{images}\n")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
