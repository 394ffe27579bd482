"""Stage two: train the action-conditioned predictor from the feature cache.

`train()` reads top to bottom: set-up (ranks, store, windows, model, optimizer, resume) -> for each
step: next batch -> loss -> optimizer step -> log -> eval -> checkpoint -> summary. The frozen encoder
never runs here: its features come from the store (as written, before the layer norm, which the loss
applies), so a step costs only the predictor's forward and backward.

Resuming is exact: the window sampler is a function of (seed, rank, batch number) and the learning
rate a function of the step, so N steps + kill + resume + M steps equals N+M steps uninterrupted.
Committed parts added to the store since the last start are picked up when a run (re)starts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pipeline.distributed import DistInfo, all_mean, any_rank, barrier, init_distributed, params_in_sync, shutdown
from pipeline.errors import Interrupted, UsageError
from pipeline.manifest import Manifest, PredictorSection, TrainSection
from pipeline.signals import StopRequest
from pipeline.store import ViewRecord, ViewTable, fingerprint_digest
from stages.cache.fingerprint import fingerprint_spec, predictor_config, reader_spec
from stages.cache.sampling import manifest_views
from stages.models.predictor import ACPredictor, PredictorConfig, ac_loss, build_predictor
from stages.train.checkpoints import (
    RankRNG,
    Stateful,
    checkpoint_payload,
    remove_temp_files,
    restore,
    resume_checkpoint,
    run_changes,
    write_checkpoints,
)
from stages.train.evaluate import evaluate_windows, format_eval
from stages.train.loader import Batch, CachedSource, WindowLoader, WindowSource
from stages.train.optim import build_optimizer, set_schedule
from stages.train.plots import plot_horizons, plot_losses
from stages.train.run_dir import append_jsonl, read_jsonl, truncate_jsonl
from stages.train.tb_events import TensorBoardLog
from stages.train.windows import BadViews, eval_windows, open_training_store, split_index

# what a run folder may hold, in the order its summary lists them (eval files only with held-out episodes)
RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "eval.json", "eval.png", "checkpoints/latest.pt", "tensorboard")


@dataclass
class TrainSummary:
    """What a run of `pipeline train` did."""

    run_dir: str
    start_step: int
    end_step: int
    world_size: int
    train_episodes: int
    heldout_episodes: int
    train_views: int
    seconds: float = 0.0
    clips_per_second: float = 0.0
    data_wait_share: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    ranks_in_sync: bool = True
    eval: dict[str, Any] = field(default_factory=dict)
    skipped_views: list[str] = field(default_factory=list)  # damaged views left out (train.on_bad_data: skip)
    online: bool = False  # features computed in the step from the videos (--online)
    outputs: list[str] = field(default_factory=list)  # what the run folder holds (no eval files without held-out)
    rank: int = 0  # of the process that made this summary (only rank 0 prints it)

    def format(self) -> str:
        if self.end_step == self.start_step:
            return f"Nothing to do: the run in {self.run_dir} is already at step {self.end_step}."
        lines = [f"trained   steps {self.start_step + 1}..{self.end_step} in {self.seconds:.1f} s, "
                 f"{self.clips_per_second:.1f} clips/s, data wait {100 * self.data_wait_share:.1f}% of step time, "
                 f"{self.world_size} rank(s){'' if self.ranks_in_sync else ', RANKS OUT OF SYNC'}"]
        if self.first_loss is not None:
            lines.append(f"loss      {self.first_loss:.4f} -> {self.last_loss:.4f}")
        if self.skipped_views:
            lines.append(f"skipped   {len(self.skipped_views)} damaged view(s), never trained on: run "
                         "`pipeline verify --repair`, then `pipeline extract` to redo them")
        lines.append(f"results   {self.run_dir}: {', '.join(self.outputs)}")
        return "\n".join(lines)


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 / fp16 autocast on a GPU as train.precision says; fp32 on the CPU (no fast fp16 path there)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(m: Manifest, out: Path | None = None, steps: int | None = None, resume: bool = True,
          show_progress: bool = True, echo=print, online: bool = False) -> TrainSummary:
    """Run (or continue) training into `out`; stops after optimizer step `steps` (default: the schedule's end).

    `online`: compute each clip's features in the step from the videos, the released way (the baseline
    the cache is measured against; `stages/online.py`), instead of reading them from the store."""
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be >= 1 (the optimizer step to stop after)")
    info = init_distributed(m.train.device)
    cfg, T = m.train, m.data.frames_per_clip
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(out or cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"train.out {run_dir} is a file, not a run folder")
    if cfg.global_batch_size % info.world_size:
        raise UsageError(f"train.global_batch_size {cfg.global_batch_size} must divide by the world size "
                         f"{info.world_size}")

    # -- data: committed views of the store that matches the fingerprint (or, online, the episodes) -------
    pcfg = predictor_config(m)
    data = online_data(m, info) if online else cached_data(m, pcfg)
    train_idx, held_idx = (split_index(m.data, cfg, data.views, split) for split in ("train", "heldout"))
    if not train_idx.episodes:
        other = len(data.views) - len(manifest_views(data.views, m.data))
        raise UsageError(f"no training windows of {T} frames (data.frames_per_clip) in {data.where}: "
                         f"{train_idx.dropped_views} views are too short, {other} of {len(data.views)} committed views "
                         f"are of other cameras or another stride than data.cameras {m.data.cameras} at data.fps "
                         f"{m.data.fps:g} (data.video_fps {m.data.video_fps}) ask for: run `pipeline extract` with "
                         "this manifest")
    source, featurize = data.source(train_idx.views_of(train_idx.episodes[0])[0]), data.featurize

    # -- model, optimizer, loader, resume --------------------------------------------------------------
    model, optimizer, scaler, loss_fn = build_training(cfg, m.predictor, pcfg, info.device)
    bad = BadViews(cfg.on_bad_data, warn=tqdm.write)
    loader = WindowLoader(source, train_idx, cfg.global_batch_size // info.world_size, T, cfg.seed, info.rank,
                          threads=cfg.loader_threads, prefetch=cfg.prefetch_batches, device=info.device, bad=bad)
    states: dict[str, Stateful] = {"predictor": model, "optimizer": optimizer, "scaler": scaler, "loader": loader,
                                   "rng": RankRNG(info)}
    step = _resume(run_dir, m, states, data.fingerprint, info, echo) if resume else 0
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # DDP around the (compiled) loss: Dynamo compiles on the first call, inside DDP's forward, where it sees
    # the active DDP module and splits the graph at DDP's gradient buckets (DDPOptimizer), so all-reduces
    # still overlap the backward -- as with torch.compile(DDP(model)), the order PyTorch documents.
    ddp = DistributedDataParallel(loss_fn, device_ids=device_ids) if info.enabled else loss_fn
    autocast = autocast_for(cfg.precision, info.device)
    if info.is_main:
        _start_run_dir(run_dir, m, step)
        if not held_idx.episodes:
            echo(f"No held-out episodes (train.heldout_fraction {cfg.heldout_fraction}, {len(train_idx.episodes)} "
                 "episodes): evaluation is skipped in this run.")
    last = min(steps or cfg.total_steps, cfg.total_steps)
    held = eval_windows(held_idx, T, cfg.eval_windows, cfg.seed) if held_idx.episodes else []
    summary = TrainSummary(str(run_dir), step, step, info.world_size, len(train_idx.episodes),
                           len(held_idx.episodes), train_idx.num_views, online=online, rank=info.rank)
    if info.is_main and step < last:
        echo(f"Training {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M-parameter predictor on "
             f"{summary.train_episodes} episodes ({summary.train_views} views), {summary.heldout_episodes} held out; "
             f"steps {step + 1}..{last} of {cfg.total_steps}, global batch {cfg.global_batch_size} on "
             f"{info.world_size} x {info.device.type}; run folder {run_dir}")

    # -- the loop -----------------------------------------------------------------------------------------
    tb = TensorBoardLog(run_dir, cfg.tensorboard and info.is_main, step)
    if held and step == 0 < last:  # every eval curve starts from the untrained model
        tb.evaluation(_evaluate_and_plot(cfg, T, model, source, featurize, held, autocast, 0, run_dir, info, bad))
    interactive = show_progress and info.is_main and sys.stderr.isatty()  # batch jobs get plain log lines
    bar = tqdm(total=last, initial=step, unit="step", disable=not interactive or step >= last, dynamic_ncols=True,
               desc="train")
    meter = MetricsAccumulator(info.device)
    micro = cfg.micro_batch_size or cfg.global_batch_size // info.world_size
    stopper, last_save = StopRequest(cfg.warning_signal), time.monotonic()
    t_start = time.perf_counter()
    try:
        with stopper:
            while step < last:
                step += 1
                batch = featurize(next(loader))  # online: the frozen encoder runs here, in the step
                lr = set_schedule(optimizer, step, cfg)
                tf_loss, roll_loss, grad_norm = train_step(ddp, model, optimizer, scaler, batch, micro, autocast,
                                                           cfg.grad_clip)
                meter.add(tf_loss, roll_loss, grad_norm, batch.wait_seconds)  # device tensors: nothing read here

                if step % cfg.log_every == 0 or step == last:
                    row = meter.row(step, lr, cfg.global_batch_size, info)  # the one host read per log interval
                    summary.first_loss = summary.first_loss if summary.first_loss is not None else row["loss"]
                    summary.last_loss = row["loss"]
                    if info.is_main:
                        append_jsonl(run_dir / "metrics.jsonl", row)
                        tb.train_row(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{row['clips_per_s']:.1f}",
                                        wait=f"{100 * row['data_wait_share']:.0f}%")
                        if show_progress and not interactive:
                            echo(_log_line(row, last, time.perf_counter() - t_start, step - summary.start_step))
                bar.update(1)

                # evaluation (where there are held-out windows) and the plots; loss.png is drawn without them too
                at_eval = bool(cfg.eval_every and step % cfg.eval_every == 0) or step == last
                if at_eval:
                    summary.eval = _evaluate_and_plot(cfg, T, model, source, featurize, held, autocast, step, run_dir,
                                                      info, bad)
                    tb.evaluation(summary.eval)
                due = cfg.checkpoint_minutes > 0 and time.monotonic() - last_save > 60 * cfg.checkpoint_minutes
                stop, due = any_rank([stopper.received, int(due)], info)  # every rank decides alike
                if at_eval or step == last or step % cfg.checkpoint_every == 0 or due or stop:
                    latest = _checkpoint(run_dir, m, states, step, data.fingerprint, info,
                                         keep=step % cfg.checkpoint_every == 0)
                    last_save = time.monotonic()
                if stop:
                    raise Interrupted(stop, f"stopped after step {step}; {latest} saved")
                if meter.steps == 0:
                    meter.restart_clock()  # evaluation and checkpoint time stay out of the step figures
    finally:
        bar.close()
        loader.close()
        tb.close()
    summary.end_step = step
    summary.seconds = time.perf_counter() - t_start
    totals = meter.totals
    summary.clips_per_second = totals["steps"] * cfg.global_batch_size / max(totals["time"], 1e-9)
    summary.data_wait_share = totals["wait"] / max(totals["time"], 1e-9)
    summary.ranks_in_sync = params_in_sync(model, info)
    summary.skipped_views = sorted(bad.found)
    summary.outputs = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    shutdown(info)
    return summary


def build_training(cfg: TrainSection, start: PredictorSection, pcfg: PredictorConfig, device: torch.device
                   ) -> tuple[ACPredictor, torch.optim.Optimizer, torch.amp.GradScaler, torch.nn.Module]:
    """The predictor (`start`: the released init or a checkpoint) on `device` with the run's attention path,
    activation checkpointing and compilation, its AdamW (fused on CUDA), grad scaler (fp16 only) and loss."""
    model = build_predictor(pcfg, start.checkpoint, start.checkpoint_key, start.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.attention = "flex" if cfg.attention == "flex" or (cfg.attention == "auto" and device.type == "cuda") \
        else "dense"
    model.extrinsics_encoder.requires_grad_(pcfg.use_extrinsics)  # in checkpoints, unused by default
    model.to(device).train()
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "fp16")
    loss_fn: torch.nn.Module = _LossModule(model, cfg.auto_steps)
    if cfg.compile:
        loss_fn = torch.compile(loss_fn)  # the predictor's weights stay those of `model` (checkpoint key names)
    return model, optimizer, scaler, loss_fn


Featurize = Callable[[Batch], Batch]  # a loader's batch -> a batch with features (online: encode the pixels)


@dataclass
class TrainingData:
    """Where stage two's windows come from: their views, a source of their rows, and what turns a loaded
    batch into features (nothing for the cache; the frozen encoder online)."""

    views: ViewTable  # every view it may draw from (`split_index` keeps the manifest's)
    where: str  # for messages
    source: Callable[[ViewRecord], WindowSource]  # given one view (for the feature layout)
    featurize: Featurize
    fingerprint: str  # of the features (the store's digest): a resumed run must train on the same ones


def cached_data(m: Manifest, pcfg: PredictorConfig) -> TrainingData:
    """The committed views of the store that matches the manifest's fingerprint (`split_index` keeps those of
    the manifest's cameras and stride)."""
    store = open_training_store(m.cache.path, reader_spec(m), pcfg.tokens_per_frame, pcfg.embed_dim)
    T = m.data.frames_per_clip
    return TrainingData(store.index().committed(), store.url,
                         lambda view: CachedSource(store, T, view), lambda batch: batch, store.digest)


def online_data(m: Manifest, info: DistInfo) -> TrainingData:
    """The episodes' views drawn as extraction draws them, decoded per clip, encoded in the step."""
    from stages.train.online import OnlineEncoder, OnlineSource, online_views

    views, rows = online_views(m)
    source = OnlineSource(m, rows)
    return TrainingData(ViewTable.from_views(("", 0.0, v) for v in views), f"the episodes of {m.data.episodes}",
                        lambda _: source, OnlineEncoder(m, info.device), fingerprint_digest(fingerprint_spec(m)))


class _LossModule(torch.nn.Module):
    """The whole loss as one module, so DDP sees one forward per step (the loss calls the predictor
    1 + auto_steps - 1 times; DDP does not allow several forwards of the wrapped module per backward)."""

    def __init__(self, predictor: ACPredictor, auto_steps: int) -> None:
        super().__init__()
        self.predictor, self.auto_steps = predictor, auto_steps

    def forward(self, features: torch.Tensor, actions: torch.Tensor, states: torch.Tensor) -> tuple:
        return ac_loss(self.predictor, features, actions, states, self.auto_steps)


def train_step(loss_fn: torch.nn.Module, model: ACPredictor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, batch: Batch, micro: int, autocast: AbstractContextManager,
               max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step: forward + backward per micro-batch (gradients accumulate; DDP all-reduces once,
    on the last), then the gradient norm (before clipping), clipping if asked, the update.

    Returns (teacher-forcing L1, rollout L1, gradient norm) as device tensors: nothing is read on the host,
    so a GPU never waits for the CPU between steps. With one micro-batch this is exactly the release's step.
    """
    B = batch.features.shape[0]
    tf_sum = roll_sum = torch.zeros((), device=batch.features.device)
    for lo in range(0, B, micro):
        hi = min(lo + micro, B)
        weight = (hi - lo) / B  # the mean over the batch, assembled from the micro-batches' means
        last = hi == B
        sync = loss_fn.no_sync() if isinstance(loss_fn, DistributedDataParallel) and not last else nullcontext()
        with sync:  # one context, entered once: forward and backward both inside (no all-reduce but the last)
            with autocast:
                tf, roll = loss_fn(batch.features[lo:hi].float(), batch.actions[lo:hi], batch.states[lo:hi])
            scaler.scale((tf + roll) * weight).backward()
        tf_sum, roll_sum = tf_sum + tf.detach() * weight, roll_sum + roll.detach() * weight
    scaler.unscale_(optimizer)  # no-op without fp16: the norm is of the true gradients
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return tf_sum, roll_sum, grad_norm


def _log_line(row: dict[str, Any], last: int, elapsed: float, done: int) -> str:
    """A metrics row as one plain line (batch jobs, no terminal): step, loss, lr, clips/s, ETA."""
    eta = elapsed / max(done, 1) * (last - row["step"])
    return (f"step {row['step']}/{last}  loss {row['loss']:.4f} (tf {row['tf_loss']:.4f}, rollout "
            f"{row['rollout_loss']:.4f})  lr {row['lr']:.2e}  grad norm {row['grad_norm']:.3f}  "
            f"{row['clips_per_s']:.1f} clips/s  data wait {100 * row['data_wait_share']:.0f}%  "
            f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


class MetricsAccumulator:
    """Losses and gradient norms summed on the device between two log rows (read once per row), and the
    host's data-wait and wall time, per row and over the whole run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, tf, rollout, grad norm
        self.steps, self.wait = 0, 0.0
        self.since = time.perf_counter()
        self.totals = {"steps": 0, "wait": 0.0, "time": 0.0}

    def add(self, tf: torch.Tensor, roll: torch.Tensor, grad_norm: torch.Tensor, wait: float) -> None:
        self.sums += torch.stack([tf + roll, tf, roll, grad_norm]).double()  # [4], stays on the device
        self.steps += 1
        self.wait += wait

    def row(self, step: int, lr: float, batch: int, info: DistInfo) -> dict[str, Any]:
        """The mean of the interval (over ranks too); reading it is the interval's one host sync."""
        loss, tf, roll, grad_norm = all_mean((self.sums / self.steps).tolist(), info)
        now = time.perf_counter()  # after the read: every step of the interval has finished on the device
        secs = (now - self.since) / self.steps
        self.totals = {"steps": self.totals["steps"] + self.steps, "wait": self.totals["wait"] + self.wait,
                       "time": self.totals["time"] + now - self.since}
        row = {"step": step, "loss": loss, "tf_loss": tf, "rollout_loss": roll, "lr": lr, "grad_norm": grad_norm,
               "clips_per_s": batch / secs, "step_seconds": secs, "data_wait_share": self.wait / self.steps / secs,
               "time": time.time()}
        self.sums.zero_()
        self.steps, self.wait, self.since = 0, 0.0, now
        return row

    def restart_clock(self) -> None:
        """Leave time spent outside the steps (evaluation, checkpoints) out of the next row."""
        self.since = time.perf_counter()


def _start_run_dir(run_dir: Path, m: Manifest, step: int) -> None:
    """Save the resolved config; forget metric rows past the step we resume from (they are redone)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(m.to_dict(), indent=1))
    for name in ("metrics.jsonl", "eval.jsonl"):
        truncate_jsonl(run_dir / name, step)


def _evaluate_and_plot(cfg: TrainSection, T: int, model: ACPredictor, source: WindowSource, featurize: Featurize,
                       held: list, autocast: AbstractContextManager, step: int, run_dir: Path, info: DistInfo,
                       bad: BadViews) -> dict[str, Any]:
    """Rank 0 evaluates on the held-out windows (of T frames) and redraws the plots; the others wait."""
    result: dict[str, Any] = {}
    if info.is_main and held:
        result = evaluate_windows(model, source, held, info.device, bad, T, cfg.auto_steps, cfg.eval_horizons,
                                  autocast, step, featurize)
        append_jsonl(run_dir / "eval.jsonl", result)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        tqdm.write(format_eval(result))
        plot_horizons(result, run_dir / "eval.png")
    if info.is_main:
        plot_losses(read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl"), run_dir / "loss.png")
    barrier(info)
    return result


def _checkpoint(run_dir: Path, m: Manifest, states: dict[str, Stateful], step: int, fingerprint: str,
                info: DistInfo, keep: bool) -> Path:
    """Every rank takes part (the RNG of every rank is gathered); rank 0 writes the kept step_N.pt (every
    checkpoint_every steps) and then latest.pt. Returns latest.pt."""
    extra = {"config": m.to_dict(), "predictor_config": predictor_config(m).to_dict(), "data_fingerprint": fingerprint}
    payload = checkpoint_payload(states, step, extra)
    folder = run_dir / "checkpoints"
    if info.is_main:
        write_checkpoints(folder, payload, step, keep, m.train.keep_checkpoints)
    barrier(info)
    return folder / "latest.pt"


def _resume(run_dir: Path, m: Manifest, states: dict[str, Stateful], fingerprint: str, info: DistInfo,
            echo: Callable[[str], None]) -> int:
    """Continue from the run's newest intact checkpoint (0 for a new run), after making sure it is the same
    run: a setting that changes the model, or other features, is refused naming each change."""
    folder = run_dir / "checkpoints"
    if info.is_main:
        for path in remove_temp_files(folder):
            echo(f"removed {path}: the temp file of a save that was killed")
    barrier(info)
    found = resume_checkpoint(folder, warn=lambda line: echo(f"warning: {line}") if info.is_main else None)
    if found is None:
        return 0
    ckpt, path = found
    changes = run_changes(ckpt.get("config", {}), m.to_dict())
    saved = ckpt.get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        changes.append(f"the features (store fingerprint): {saved[:16]} -> {fingerprint[:16]}")
    if changes:
        raise UsageError(f"{run_dir} holds another run (checkpoint {path.name}, step {ckpt['step']}); this command "
                         "changes what is trained:\n  " + "\n  ".join(changes) + "\nResume with the run's own "
                         "settings, or start a new run in another folder (--out, or train.out).")
    return restore(ckpt, states)
