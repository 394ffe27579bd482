"""data_manifest.yaml -> typed, validated config.

The manifest is the single source of truth for what the pipeline does: which episodes, which camera,
how views are drawn, which encoder, where the cache lives and how extraction is scheduled. It holds
named profiles and a `default_profile`; every command picks one (`--profile`) and may override keys
(`--set dotted.key=value`). Everything is checked before any work starts: an unknown key or a bad
value is an error that names the key and the value, because a typo in a manifest would otherwise
silently produce (and cache) the wrong features.

Relative paths in a manifest are resolved against the manifest's own folder, so a manifest and its
data can move together; `--set` values are resolved against the current directory, like any other
command-line path. URLs (`s3://...`, `gs://...`) are left as they are.

Naming: a section of the manifest is an `XSection` (`DataSection`, `TrainSection`, ...); a model
architecture derived from it is an `XConfig` (`ViTConfig`, `PredictorConfig` in `stages/models/`).
"""

from __future__ import annotations

import dataclasses
import signal
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UsageError
from pipeline.store.settings import MAX_SHARD_FRAMES, ZSTD_LEVELS, StoreSettings

PRESETS = ("vit_large", "vit_huge", "vit_giant")
_SIGNALS = [s.name for s in signal.Signals if s.name not in ("SIGKILL", "SIGSTOP", "SIGINT", "SIGTERM")]


class ManifestError(UsageError):
    """A manifest that cannot be used; the message names the key and the bad value."""


@dataclass
class LeRobotSection:
    """Where a LeRobot dataset keeps the end-effector pose and the gripper (the defaults: the DROID port's
    feature names), and which of its episodes to use. Each is a feature name with an optional slice."""

    position: str = "observation.state.cartesian_position[0:3]"  # end-effector xyz (m)
    orientation: str = "observation.state.cartesian_position[3:6]"  # its orientation
    # extrinsic-xyz Euler angles (rad; the release's convention), or a quaternion turned into them
    orientation_format: Literal["euler_xyz", "quaternion_xyzw", "quaternion_wxyz"] = "euler_xyz"
    gripper: str = "observation.state.gripper_position[0]"  # gripper state, 0 = open .. 1 = closed
    task: str | None = None  # keep only episodes whose task holds this text (any case); null: all


@dataclass
class DataSection:
    """Where the episodes are, in which format, and how they are sampled in time."""

    root: str  # folder the episode list is relative to (lerobot: the dataset's root, or a Hub cache snapshot)
    # droid: a text file (one episode folder per line, the release's format) or a glob under root;
    # lerobot: all, episode indices and ranges (0-99,120), or a text file of them
    episodes: str
    format: Literal["droid", "lerobot"] = "droid"  # DROID raw folders, or a LeRobot dataset (v3.0, v2.1)
    lerobot: LeRobotSection = field(default_factory=LeRobotSection)  # where a LeRobot dataset's states are
    # the cameras to store views of: DROID metadata keys, or a LeRobot dataset's video features. V-JEPA 2-AC
    # uses the left exterior one. With several, training draws one camera per window uniformly.
    cameras: list[str] | None = None  # null: the left exterior camera, or [camera] when `camera` is set
    camera: str | None = None  # one camera, the older spelling: when set, it means cameras: [camera]
    fps: float = 4.0  # target frame rate; stride = ceil(video_fps / fps) raw frames
    # the video's frame rate for the stride: auto = what decord reports (the release's behaviour), or a
    # number that overrides it (DROID MP4s may report another rate than the capture's; docs/training.md)
    video_fps: float | Literal["auto"] = "auto"
    frames_per_clip: int = 16  # T of a training clip (paper 16); shorter episodes are failures

    def __post_init__(self) -> None:
        """The alias is resolved once, so the rest of the code sees `cameras` only; both set is a mistake
        (an older manifest's `camera` would silently override a `--set data.cameras=[...]`)."""
        if self.camera is not None and self.cameras is not None and self.cameras != [self.camera]:
            raise ManifestError(f"data.camera {self.camera!r} and data.cameras {self.cameras!r} are both set: "
                                "keep one (data.cameras: [...] for several cameras)")
        default = "left_mp4_path" if self.format == "droid" else "observation.images.exterior_1_left"
        self.cameras = [self.camera] if self.camera is not None else (
            self.cameras if self.cameras is not None else [default])
        self.camera = None

    def validate(self) -> None:
        _require(self.fps > 0, "data.fps", self.fps, "must be > 0")
        _require(self.video_fps == "auto" or self.video_fps > 0, "data.video_fps", self.video_fps,
                 "must be auto or a frame rate > 0")
        _require(self.frames_per_clip >= 2, "data.frames_per_clip", self.frames_per_clip, "must be >= 2")
        _require(len(self.cameras) >= 1, "data.cameras", self.cameras, "must name at least one camera")
        _require(len(set(self.cameras)) == len(self.cameras), "data.cameras", self.cameras, "lists a camera twice")
        for cam in self.cameras:
            if self.format == "droid":
                _require(cam.endswith("_mp4_path"), "data.cameras", cam,
                         "must be metadata keys ending in _mp4_path, e.g. left_mp4_path (data.format: droid)")
            else:
                _require(cam.startswith("observation."), "data.cameras", cam,
                         "must be video features of the dataset, e.g. observation.images.front (data.format: lerobot)")

    def fps_override(self) -> float | None:
        """data.video_fps as a number, or None for auto (use the rate the video reports)."""
        return None if self.video_fps == "auto" else float(self.video_fps)

    def video_rate(self, reported_fps: float) -> float:
        """The frame rate strides and times come from: data.video_fps, or the rate the video reports."""
        return self.fps_override() or reported_fps


@dataclass
class ViewsSection:
    """How many views (phase + crop box) are drawn per episode, reproducibly."""

    per_episode: int = 1  # views per episode; identical draws are stored once
    seed: int = 0  # draws of view k of episode e come from (seed, e, k)
    # temporal phase of the frame grid: drawn per view, always 0, or every phase (the release's sampling:
    # a view per phase of each crop draw, so stride x the views; docs/training.md, "Sampling as the release")
    phase: Literal["random", "first", "all"] = "random"

    def validate(self) -> None:
        _require(self.per_episode >= 1, "views.per_episode", self.per_episode, "must be >= 1")


@dataclass
class CropSection:
    """Random-resize-crop and normalisation (docs/release.md, "One training sample"); the defaults are the release's."""

    size: int = 256  # output side in pixels (the encoder's img_size)
    scale: tuple[float, float] = (1.777, 1.777)  # area fraction range of the crop
    ratio: tuple[float, float] = (0.75, 1.35)  # aspect (w/h) range of the crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet mean on the 0..1 scale
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet std on the 0..1 scale

    def validate(self) -> None:
        _require(self.size > 0 and self.size % 16 == 0, "crop.size", self.size, "must be a multiple of 16")
        _require(0 < self.scale[0] <= self.scale[1], "crop.scale", self.scale, "must be 0 < lo <= hi")
        _require(0 < self.ratio[0] <= self.ratio[1], "crop.ratio", self.ratio, "must be 0 < lo <= hi")
        _require(all(s > 0 for s in self.std), "crop.std", self.std, "must be > 0")


@dataclass
class EncoderSection:
    """The frozen V-JEPA 2 encoder: a preset or an explicit small config of the same code."""

    checkpoint: str | None = None  # released vitg.pt etc.; null = random init with `seed` (demos, tests)
    checkpoint_key: str = "target_encoder"  # entry of the checkpoint dict holding the encoder
    preset: str | None = "vit_giant"  # vit_large | vit_huge | vit_giant; null = the explicit fields below
    embed_dim: int | None = None  # width, when preset is null
    depth: int | None = None  # blocks, when preset is null
    num_heads: int | None = None  # heads, when preset is null
    mlp_ratio: float | None = None  # MLP hidden / width, when preset is null
    seed: int = 0  # random-init seed when checkpoint is null
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype of the forward pass (part of the fingerprint)
    batch_size: int = 64  # frames per encoder forward
    device: str = "auto"  # auto (cuda if present), cpu, cuda

    def validate(self) -> None:
        if self.preset is None:
            for name in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
                _require(getattr(self, name) is not None, f"encoder.{name}", None,
                         "must be set when encoder.preset is null")
        else:
            _require(self.preset in PRESETS, "encoder.preset", self.preset, f"must be one of {PRESETS} or null")
        _require(self.batch_size >= 1, "encoder.batch_size", self.batch_size, "must be >= 1")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 "encoder.device", self.device, "must be auto, cpu, cuda or cuda:N")


@dataclass
class CacheSection:
    """The feature store: where it is, and how it lays out what it writes (`StoreSettings`)."""

    path: str  # local folder or fsspec URL; one sub-store per fingerprint lives under it
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # stored feature dtype
    chunk_frames: int = 4  # frames per inner chunk (4 reads fastest for 16-frame windows)
    shard_frames: int = 64  # frames per shard file (multiple of chunk_frames)
    compressor: Literal["none", "zstd"] = "none"  # features barely compress (docs/store.md)
    compression_level: int = 1  # zstd level when compressor is zstd

    def validate(self) -> None:
        _require(self.chunk_frames >= 1, "cache.chunk_frames", self.chunk_frames, "must be >= 1")
        _require(self.shard_frames >= self.chunk_frames and self.shard_frames % self.chunk_frames == 0,
                 "cache.shard_frames", self.shard_frames, "must be a multiple of cache.chunk_frames")
        _require(self.shard_frames <= MAX_SHARD_FRAMES, "cache.shard_frames", self.shard_frames,
                 f"must be at most {MAX_SHARD_FRAMES}")
        _require(ZSTD_LEVELS[0] <= self.compression_level <= ZSTD_LEVELS[1], "cache.compression_level",
                 self.compression_level, f"must be a zstd level in [{ZSTD_LEVELS[0]}, {ZSTD_LEVELS[1]}] (0: zstd's "
                 "default, negative: faster)")

    def settings(self) -> StoreSettings:
        """What the store writes by (everything but the path)."""
        return StoreSettings(self.dtype, self.chunk_frames, self.shard_frames, self.compressor, self.compression_level)


@dataclass
class ExtractSection:
    """How stage one is scheduled."""

    episodes_per_part: int = 8  # episodes per part = per task = per commit
    scheduler: str = "local"  # local (a dask LocalCluster), inline (this process), or a dask scheduler address
    workers: int = 1  # local cluster worker processes (one per GPU)
    threads: int = 0  # torch threads per worker on CPU; 0 = cores / workers
    decode_workers: int = 1  # episodes decoded at once per worker (raise on GPU workers: 720p decode is slow)
    decode_threads: int = 2  # decord (ffmpeg) threads per video reader
    on_error: Literal["record", "raise"] = "record"  # a bad episode: record it and go on, or stop the run
    retry_failed: bool = False  # re-try episodes whose failure is recorded and whose files did not change
    claim_minutes: float = 30.0  # another run's claim on a part is honoured this long (it only saves work)
    task_retries: int = 2  # a part whose dask worker died is retried this many times (local cluster)
    scheduler_timeout: float = 20.0  # seconds to wait for a dask scheduler address before giving up

    def validate(self) -> None:
        _require(self.episodes_per_part >= 1, "extract.episodes_per_part", self.episodes_per_part, "must be >= 1")
        _require(self.workers >= 1, "extract.workers", self.workers, "must be >= 1")
        _require(self.threads >= 0, "extract.threads", self.threads, "must be >= 0")
        _require(self.decode_workers >= 1, "extract.decode_workers", self.decode_workers, "must be >= 1")
        _require(self.decode_threads >= 0, "extract.decode_threads", self.decode_threads, "must be >= 0")
        _require(self.claim_minutes >= 0, "extract.claim_minutes", self.claim_minutes, "must be >= 0")
        _require(self.task_retries >= 0, "extract.task_retries", self.task_retries, "must be >= 0")
        _require(self.scheduler_timeout > 0, "extract.scheduler_timeout", self.scheduler_timeout, "must be > 0")


@dataclass
class PredictorSection:
    """The action-conditioned predictor (docs/release.md, "The predictor"); defaults are the released size (~300 M)."""

    embed_dim: int = 1024  # predictor width
    depth: int = 24  # blocks
    num_heads: int = 16  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden / width
    checkpoint: str | None = None  # vjepa2-ac-vitg.pt to fine-tune from; null = init from scratch
    checkpoint_key: str = "predictor"  # entry of the checkpoint holding the predictor
    seed: int = 0  # init seed when checkpoint is null

    def validate(self) -> None:
        _require(self.embed_dim % self.num_heads == 0, "predictor.embed_dim", self.embed_dim,
                 f"must divide by predictor.num_heads {self.num_heads}")
        _require(self.depth >= 1, "predictor.depth", self.depth, "must be >= 1")


@dataclass
class TrainSection:
    """Stage two: optimisation (docs/release.md, "Optimisation"), windows, evaluation, checkpoints."""

    out: str = "runs/default"  # run folder: config, metrics, plots, checkpoints
    global_batch_size: int = 256  # clips per optimizer step over all ranks (8 x 32 GPUs in the release)
    warmup_steps: int = 4500  # linear warmup start_lr -> lr
    constant_steps: int = 85500  # then constant lr
    decay_steps: int = 4500  # then linear decay to final_lr
    start_lr: float = 7.5e-5  # lr at the start of warmup
    lr: float = 4.25e-4  # peak lr
    final_lr: float = 0.0  # lr at the end of the decay
    weight_decay: float = 0.04  # on weights with ndim > 1; 0 on biases and 1-D parameters
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8  # AdamW
    auto_steps: int = 2  # rollout steps of the loss
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast on GPU (fp16 adds a grad scaler); CPU: fp32
    grad_clip: float | None = None  # max gradient norm; null = no clipping (the release does not clip)
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    micro_batch_size: int = 0  # clips per forward/backward on a rank (gradient accumulation); 0 = the rank's batch
    attention: Literal["auto", "dense", "flex"] = "auto"  # auto: FlexAttention on CUDA, dense mask (release) on CPU
    compile: bool = False  # torch.compile the predictor's loss (GPU; minutes of compile time, then faster steps)
    heldout_fraction: float = 0.05  # episodes held out for evaluation, by a stable hash of the episode id
    split_salt: str = ""  # changes which episodes are held out
    seed: int = 0  # window sampling seed
    log_every: int = 10  # steps between metric rows
    eval_every: int = 1000  # steps between evaluations (and plots); 0 = only at the end
    eval_windows: int = 64  # held-out windows per evaluation
    eval_horizons: int = 4  # rollout horizons 1..k evaluated (at most frames_per_clip - 1 are used)
    checkpoint_every: int = 5000  # steps between kept checkpoints (latest is written at every eval too)
    checkpoint_minutes: float = 30.0  # also write latest.pt when this long has passed since the last save; 0 = off
    keep_checkpoints: int = 0  # kept step_N.pt files to keep (the newest); 0 = all
    warning_signal: str | None = "SIGUSR1"  # a batch system's warning (Slurm --signal=USR1@120): checkpoint, stop
    threads: int = 0  # torch CPU threads; 0 = torch's default
    loader_threads: int = 4  # threads reading windows
    prefetch_batches: int = 2  # batches read ahead
    device: str = "auto"  # auto (the rank's GPU if present), cpu, cuda
    on_bad_data: Literal["raise", "skip"] = "raise"  # damaged cached data: stop and say so, or skip the view
    # last window start: "release" = one stored frame must follow the window (the release's bound, start <=
    # num_frames - 1 - T * stride); "full" = every window that fits (one more start per view)
    window_range: Literal["release", "full"] = "release"
    tensorboard: bool = False  # also write TensorBoard event files to <out>/tensorboard

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.constant_steps + self.decay_steps

    def validate(self) -> None:
        _require(self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, "must be >= 1")
        for name in ("warmup_steps", "constant_steps", "decay_steps"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _require(self.total_steps >= 1, "train.decay_steps", self.decay_steps, "total steps must be >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        for name in ("start_lr", "final_lr", "weight_decay"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), "train.betas", self.betas, "must both be in [0, 1)")
        _require(self.eps > 0, "train.eps", self.eps, "must be > 0")
        _require(self.auto_steps >= 1, "train.auto_steps", self.auto_steps, "must be >= 1")
        _require(0 <= self.heldout_fraction < 1, "train.heldout_fraction", self.heldout_fraction, "must be in [0, 1)")
        _require(self.eval_horizons >= 1, "train.eval_horizons", self.eval_horizons, "must be >= 1")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "must be >= 1")
        _require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", self.grad_clip, "must be > 0")
        _require(0 <= self.micro_batch_size <= self.global_batch_size, "train.micro_batch_size", self.micro_batch_size,
                 f"must be in [0, train.global_batch_size {self.global_batch_size}]")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")
        _require(self.eval_windows >= 1, "train.eval_windows", self.eval_windows, "must be >= 1")
        _require(self.loader_threads >= 1, "train.loader_threads", self.loader_threads, "must be >= 1")
        _require(self.prefetch_batches >= 0, "train.prefetch_batches", self.prefetch_batches, "must be >= 0")
        _require(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", self.checkpoint_minutes, "must be >= 0")
        _require(self.keep_checkpoints >= 0, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 0")
        _require(self.threads >= 0, "train.threads", self.threads, "must be >= 0")
        _require(self.warning_signal is None or self.warning_signal in _SIGNALS, "train.warning_signal",
                 self.warning_signal, f"must be null or a signal name such as SIGUSR1 ({', '.join(_SIGNALS[:6])}...)")


@dataclass
class PlanSection:
    """Goal-conditioned planning with a trained predictor (`pipeline plan`): the cross-entropy method as the
    released V-JEPA 2-AC runs it -- the defaults are the release's (`WorldModel.mpc_args` of its
    notebooks/utils/world_model_wrapper.py, gripper momenta and clips of `cem` in notebooks/utils/mpc_utils.py)
    -- and the closed-loop benchmark on the built-in synthetic scene (`pipeline plan --closed-loop N`)."""

    samples: int = 400  # action sequences drawn per CEM iteration
    iterations: int = 10  # CEM iterations per plan (the release's cem_steps)
    topk: int = 10  # lowest-energy sequences (elites) the mean and std are refitted to
    horizon: int = 2  # actions per planned sequence, rolled out by the predictor (the release's rollout)
    momentum_mean: float = 0.15  # share of the old xyz mean kept at each refit
    momentum_std: float = 0.15  # share of the old xyz std kept at each refit
    momentum_mean_gripper: float = 0.15  # share of the old gripper mean kept at each refit
    momentum_std_gripper: float = 0.15  # share of the old gripper std kept at each refit
    max_norm: float = 0.05  # xyz deltas are clipped to [-max_norm, max_norm] per axis (metres per step)
    gripper_clip: float = 0.75  # sampled gripper deltas are clipped to [-gripper_clip, gripper_clip]
    gripper_round: float = 0.25  # planned gripper deltas smaller than this in size become 0
    seed: int = 0  # seed of the samples: the same inputs give the same plan
    device: str = "auto"  # auto (cuda if present), cpu, cuda: where the predictor and encoder run
    steps: int = 10  # closed loop: actions executed per episode, each after a new plan
    goal_seconds: float = 1.0  # closed loop: the goal is where a held-out scripted episode is this much later
    goal_orientation: Literal["start", "episode"] = "start"  # closed loop: the planner only translates, so the
    # goal keeps the start's orientation (start), or takes the episode's (episode: partly out of reach)

    def validate(self) -> None:
        for name in ("samples", "iterations", "horizon", "steps"):
            _require(getattr(self, name) >= 1, f"plan.{name}", getattr(self, name), "must be >= 1")
        _require(2 <= self.topk <= self.samples, "plan.topk", self.topk, f"must be in [2, plan.samples {self.samples}]")
        for name in ("momentum_mean", "momentum_std", "momentum_mean_gripper", "momentum_std_gripper"):
            _require(0 <= getattr(self, name) <= 1, f"plan.{name}", getattr(self, name), "must be in [0, 1]")
        _require(self.max_norm > 0, "plan.max_norm", self.max_norm, "must be > 0")
        _require(self.gripper_clip >= 0, "plan.gripper_clip", self.gripper_clip, "must be >= 0")
        _require(self.gripper_round >= 0, "plan.gripper_round", self.gripper_round, "must be >= 0")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 "plan.device", self.device, "must be auto, cpu, cuda or cuda:N")
        _require(self.goal_seconds > 0, "plan.goal_seconds", self.goal_seconds, "must be > 0")


@dataclass
class SyntheticSection:
    """The built-in synthetic episodes: what `pipeline demo` writes into data.root when it holds none, and the
    scene the closed-loop benchmark (`pipeline plan --closed-loop`) renders -- the same seed, scenes and size,
    so that the benchmark films the scene the model was trained on."""

    episodes: int = 16  # episodes to write (`pipeline demo --episodes` overrides)
    seed: int = 0
    scenes: int = 1  # shared scenes (camera placement, table, block colour), as one lab set-up; 0: one each
    width: int = 320
    height: int = 180
    min_seconds: float = 10.0
    max_seconds: float = 20.0
    explore: float = 0.0  # share of behaviours that are runs of exploring moves (0: scripted reaches and pushes)
    explore_step: float = 0.05  # m per exploring move and axis at most (match plan.max_norm)

    def validate(self) -> None:
        _require(self.episodes >= 1, "synthetic.episodes", self.episodes, "must be >= 1")
        _require(self.scenes >= 0, "synthetic.scenes", self.scenes, "must be >= 0")
        for name in ("width", "height"):
            value = getattr(self, name)
            _require(value >= 16 and value % 2 == 0, f"synthetic.{name}", value, "must be even and >= 16")
        _require(1.0 <= self.min_seconds <= self.max_seconds, "synthetic.min_seconds", self.min_seconds,
                 f"must be in [1, synthetic.max_seconds {self.max_seconds}]")
        _require(0.0 <= self.explore <= 1.0, "synthetic.explore", self.explore, "must be in [0, 1]")
        _require(self.explore_step > 0, "synthetic.explore_step", self.explore_step, "must be > 0")


@dataclass
class Manifest:
    """One resolved profile of data_manifest.yaml."""

    data: DataSection
    cache: CacheSection
    encoder: EncoderSection = field(default_factory=EncoderSection)
    views: ViewsSection = field(default_factory=ViewsSection)
    crop: CropSection = field(default_factory=CropSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    predictor: PredictorSection = field(default_factory=PredictorSection)
    train: TrainSection = field(default_factory=TrainSection)
    plan: PlanSection = field(default_factory=PlanSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    profile: str = "default"  # the profile's name (set by the loader)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate()
        _require(self.train.auto_steps < self.data.frames_per_clip, "train.auto_steps", self.train.auto_steps,
                 f"must be < data.frames_per_clip {self.data.frames_per_clip}")


    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ManifestError(f"{key}: {value!r} {why}")


# Keys holding paths; data.episodes is not one of them: it is relative to data.root.
PATH_KEYS = ("data.root", "cache.path", "encoder.checkpoint", "predictor.checkpoint", "train.out")


def load_manifest(path: str | Path, profile: str | None = None, overrides: list[str] | None = None) -> Manifest:
    """Read `path`, pick `profile` (or the file's default_profile), apply `key=value` overrides, validate."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or "profiles" not in raw:
        raise ManifestError(f"manifest {path}: expected a mapping with `profiles` and `default_profile`")
    _check_keys(raw, {"profiles", "default_profile"}, "")
    profiles = raw["profiles"]
    if not isinstance(profiles, dict):
        raise ManifestError(f"manifest {path}: profiles: expected a mapping of profile names, got {profiles!r}")
    name, names = profile or raw.get("default_profile"), sorted(map(str, profiles))
    if not isinstance(name, str | None):
        raise ManifestError(f"manifest {path}: default_profile: {name!r} must be a profile's name; profiles: {names}")
    if name is None:
        raise ManifestError(f"manifest {path}: no default_profile, and no --profile given; profiles: {names}")
    if name not in profiles:
        raise ManifestError(f"manifest {path}: profile {name!r} not found; profiles: {names}")
    tree = profiles[name] or {}
    if not isinstance(tree, dict):
        raise ManifestError(f"manifest {path}: profile {name!r}: expected a mapping of sections, got {tree!r}")
    if "profile" in tree:  # the profile's name is the loader's to set, never a key
        raise ManifestError(f"manifest {path}: profile {name!r}: unknown key 'profile' (pick a profile with --profile)")
    tree = _resolve_paths(dict(tree), path.parent.resolve())
    for item in overrides or []:
        _apply_override(tree, item)
    manifest = _build(Manifest, {**tree, "profile": name}, "")
    manifest.validate()
    return manifest


def _read_yaml(path: Path) -> Any:
    """The manifest file parsed, or a ManifestError that says why it cannot be."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {path} is not UTF-8 text (byte {err.start}): is it the right file?") from None
    except OSError as err:
        raise ManifestError(f"manifest {path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"manifest {path} is not valid YAML: {err}") from None


def _resolve_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the manifest's relative path values absolute against the manifest's folder."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        sub = tree.get(section)
        if isinstance(sub, dict) and isinstance(sub.get(name), str):
            sub[name] = resolve_path(sub[name], base)
    return tree


def resolve_path(value: str, base: Path) -> str:
    """`value` made absolute against `base`, unless it is already absolute or a URL."""
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (so 8, 1e-4, null, [1, 2] work)."""
    if "=" not in item:
        raise ManifestError(f"--set {item!r}: expected dotted.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if parts == ["profile"]:
        raise ManifestError(f"--set {item!r}: the profile is chosen with --profile, not set")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if key.strip() in PATH_KEYS and isinstance(value, str):
        value = resolve_path(value, Path.cwd())
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ManifestError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _check_keys(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ManifestError(f"unknown key '{where}{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Turn a dict into dataclass `cls`, checking every key and value against the type hints."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where.rstrip('.') or 'profile'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(raw, set(fields), where)
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(raw[name], hints[name], f"{where}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"missing key {where}{name}")
    return cls(**values)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against type `hint` (the subset of types the config uses) and coerce int -> float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return _convert(value, inner, key)
            except ManifestError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else ManifestError(
            f"{key}: {value!r} is not valid: " + "; or ".join(str(e).split(": ", 1)[-1] for e in errors))
    if origin is Literal:
        if value not in args:
            raise ManifestError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ManifestError(f"{key}: {value!r} must be a list of {len(args)} numbers")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string; 48/11 a fraction
        try:
            return float(value) if "/" not in value else float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    if typing.get_origin(hint) is list or hint is list:
        if not isinstance(value, list):
            raise ManifestError(f"{key}: {value!r} must be a list")
        inner = (typing.get_args(hint) or (Any,))[0]
        return value if inner is Any else [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ManifestError(f"{key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")
