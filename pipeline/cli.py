"""The `pipeline` command: load the manifest, apply overrides, call a stage, print its summary.

Stages are imported inside their command so that `pipeline --help` stays fast. Every mistake a user
can make, and every error of the machine, ends in one line on stderr and a documented exit code
(`pipeline/errors.py`), not a traceback: 0 success; 1 work failed or problems found; 2 usage or
configuration; 130 / 143 interrupted. Those are the project's typed errors (usage, manifest, store,
damage, episode, checkpoint) and OSError; anything else is a bug and keeps its traceback (exit 1).
`PIPELINE_DEBUG=1` prints the traceback of every error.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import EXIT_FAILED, EXIT_USAGE, DamagedDataError, Interrupted, UsageError, file_in_the_way
from pipeline.manifest import Manifest, load_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="V-JEPA 2-AC post-training pipeline: cache encoder features of DROID episodes "
                       "in sharded Zarr (extract), then train the action-conditioned predictor from them.")

ManifestOpt = Annotated[Path, typer.Option("--manifest", "-m", help="data_manifest.yaml to read.")]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="Profile of the manifest (default: its default_profile).")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: dotted.key=value (repeatable).")]
RESUME_HINT = {"extract": "re-run the same `pipeline extract` to resume (nothing was half-committed)",
               "train": "re-run the same `pipeline train` to resume from the last checkpoint"}


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (not the one of its creation: an
    embedding program or a test harness may swap it, and a closed stream would turn a warning into an error)."""

    @property
    def stream(self) -> object:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


@app.callback()
def _setup() -> None:
    """Warnings (a record skipped, a view skipped) print as one `warning:` line each on stderr."""
    handler = _Stderr()
    handler.setLevel(logging.WARNING)  # libraries that lower their loggers' levels (dask does) still stay quiet
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@contextmanager
def _user_errors(command: str = "") -> Iterator[None]:
    """Every error a user can cause or meet ends with one line and its exit code, not a traceback."""
    from pipeline.errors import StoreError
    from stages.extract.droid import EpisodeError
    from stages.models.release_weights import CheckpointError

    try:
        try:
            yield
        except BaseException:
            if os.environ.get("PIPELINE_DEBUG", "") not in ("", "0"):
                traceback.print_exc()
            raise
    except Interrupted as err:
        detail = f"{err.detail}; " if err.detail else ""
        typer.secho(f"interrupted ({err}): {detail}{RESUME_HINT.get(command, 're-run to resume')}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {RESUME_HINT.get(command, 're-run to resume')}", err=True)
        raise typer.Exit(130) from None
    except DamagedDataError as err:
        raise _fail(f"{err}. Run `pipeline verify --repair`, then `pipeline extract` to redo the damaged views "
                    "(or set train.on_bad_data: skip to train without them).", EXIT_FAILED) from None
    except EpisodeError as err:  # extract.on_error: raise
        raise _fail(f"episode {err}", EXIT_FAILED) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _fail(f"disk full (no space left on device) writing {err.filename or 'the output'}: free space "
                        "or point the path elsewhere, then re-run to resume", EXIT_FAILED) from None
        raise _fail(_os_message(err), EXIT_USAGE if isinstance(err, PATH_ERRORS) else EXIT_FAILED) from None
    except (StoreError, CheckpointError, UsageError) as err:
        raise _fail(str(err), EXIT_USAGE) from None


# A path that cannot be used as given (the user's to fix, exit 2); any other OSError is the machine's (exit 1).
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def _os_message(err: OSError) -> str:
    """'PATH: what is wrong', from an OSError; a folder asked for where a file is says which file is in the way."""
    if err.filename is None:
        return str(err)
    path = Path(err.filename)
    what = (err.strerror or str(err)).lower()
    if isinstance(err, NotADirectoryError | FileExistsError):
        file = file_in_the_way(path)
        what = ("is a file, not a folder" if file == path else f"{file} is a file, not a folder") if file else what
    elif isinstance(err, IsADirectoryError):
        what = "is a folder, not a file"
    return f"{path}: {what}"


def _load(manifest: Path, profile: str | None, overrides: list[str] | None) -> Manifest:
    with _user_errors():
        return load_manifest(manifest, profile, overrides or [])


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write the episodes (and episodes.txt) into.")],
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the trajectories.")] = 0,
    width: Annotated[int, typer.Option(help="Video width in pixels (1280 for DROID's size).")] = 320,
    height: Annotated[int, typer.Option(help="Video height in pixels (720 for DROID's size).")] = 180,
    min_seconds: Annotated[float, typer.Option(help="Shortest episode.")] = 10.0,
    max_seconds: Annotated[float, typer.Option(help="Longest episode.")] = 20.0,
    scenes: Annotated[int, typer.Option(help="Episodes share this many scenes (cameras, table); 0 = one each.")] = 0,
    explore: Annotated[float, typer.Option(help="Share of behaviours that are runs of exploring moves in every "
                                           "direction (0: scripted only, as the demo).")] = 0.0,
) -> None:
    """Write synthetic episodes in the real DROID raw layout (metadata json, trajectory.h5, H.264 MP4s)."""
    from stages.demo.synthetic import Exploration, write_synthetic_dataset

    with _user_errors():
        folders = write_synthetic_dataset(out, episodes, seed=seed, width=width, height=height, min_seconds=min_seconds,
                                          max_seconds=max_seconds, progress=True, scenes=scenes,
                                          explore=Exploration(explore))
    typer.echo(f"Wrote {len(folders)} episodes to {out} (list: {out / 'episodes.txt'})")


@app.command()
def extract(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    scheduler: Annotated[
        str | None, typer.Option(help="local | inline | a dask scheduler address (overrides extract.scheduler).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Stage one: encode the missing views of the manifest's episodes into the feature store."""
    m = _load(manifest, profile, set_)
    from stages.extract.driver import extract as run_extract

    with _user_errors("extract"):
        s = run_extract(m, scheduler=scheduler, echo=lambda line: typer.echo(line, err=json_out))
    typer.echo(json.dumps(s.to_dict(), indent=1) if json_out else "\n" + s.format())
    if s.incomplete:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def status(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """What the feature store holds for the manifest: fingerprint, views planned/committed/stale/failed, bytes."""
    m = _load(manifest, profile, set_)
    from stages.cache.status import status_report

    with _user_errors():
        report = status_report(m)
    typer.echo(json.dumps(report.to_dict(), indent=1) if json_out else report.format())


@app.command()
def verify(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Move broken commit records aside (quarantine, no data "
                                         "deleted) so that the next `pipeline extract` redoes those views.")] = False,
    sample: Annotated[float, typer.Option(help="Check a random fraction of the views (0 < f <= 1).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the --sample draw (default: a new one).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every byte of the store against what was committed; exit 0 when sound, 1 when problems were found."""
    m = _load(manifest, profile, set_)
    from stages.cache.verify import verify as run_verify

    with _user_errors():
        s = run_verify(m, repair=repair, sample=sample, seed=seed, show_progress=not json_out)
    typer.echo(json.dumps(s.to_dict(), indent=1) if json_out else s.format())
    if not s.sound:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def gc(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Remove what is listed as removable (default: only list).")]
    = False,
    grace_hours: Annotated[float, typer.Option(help="Leave unreferenced attempts and superseded commits younger "
                                               "than this (a running extract or training may use them).")] = 24.0,
    other_stores: Annotated[bool, typer.Option("--other-stores", help="With --yes, also remove the stores of "
                                               "other fingerprints under cache.path.")] = False,
) -> None:
    """List (and with --yes remove) what no reader needs: unreferenced attempts, superseded and quarantined
    commits, temp files of killed writes, other fingerprints' stores -- never anything a commit references."""
    m = _load(manifest, profile, set_)
    from stages.cache.gc import collect_garbage

    with _user_errors():
        typer.echo(collect_garbage(m, yes, grace_hours, other_stores).format())


@app.command()
def train(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: train.out of the manifest).")] = None,
    steps: Annotated[int | None, typer.Option(help="Stop after optimizer step N (the schedule is unchanged).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Require a checkpoint in the run folder to continue "
                                         "from (without it, a run folder with a checkpoint is continued anyway).")]
    = False,
    online: Annotated[bool, typer.Option("--online", help="Decode, crop and encode every clip in the step, the "
                                         "released way (the baseline; no feature store needed).")] = False,
) -> None:
    """Stage two: train the action-conditioned predictor from the feature cache (torchrun for several GPUs)."""
    m = _load(manifest, profile, set_)
    from stages.train.checkpoints import has_checkpoint
    from stages.train.loop import train as run_train

    run_dir = out or Path(m.train.out)
    if resume and not has_checkpoint(run_dir / "checkpoints"):
        raise _fail(f"--resume: no checkpoint in {run_dir / 'checkpoints'}", EXIT_USAGE)
    with _user_errors("train"):
        s = run_train(m, run_dir, steps, online=online)
    if s.rank == 0:  # under torchrun every rank returns a summary; one prints it
        typer.echo("\n" + s.format())


@app.command()
def demo(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile to run.")] = "demo",
    set_: SetOpt = None,
    episodes: Annotated[int | None, typer.Option(help="Synthetic episodes to write if data.root has none "
                                                 "(default: synthetic.episodes).")] = None,
) -> None:
    """The whole job on built-in data: synthetic DROID episodes (once), extract, train, evaluate, plot."""
    m = _load(manifest, profile, set_)
    from stages.demo.run import run_demo

    with _user_errors():
        s = run_demo(m, episodes, echo=typer.echo)
    typer.echo("\n" + s.format())
    if s.failed:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def bench(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile to measure (the `bench` profile sizes "
                                         "encoder and predictor like the release, at 1280x720).")] = "bench",
    set_: SetOpt = None,
    episodes: Annotated[int, typer.Option(help="Episodes to measure on (the bench profile writes them once).")] = 4,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds of the training measurements (0: skip).")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps per kind and round.")] = 20,
    gpu_tflops: Annotated[float, typer.Option(help="bf16 TFLOP/s an accelerator achieves, for the rate the "
                                              "released config needs (default: an H100's dense peak).")] = 989.0,
    gpu: Annotated[bool, typer.Option("--gpu", help="The GPU measurements instead (ViT-g extraction, released "
                                      "predictor step time and MFU, pinned loader, NCCL); needs CUDA.")] = False,
    budget: Annotated[float | None, typer.Option(help="With --gpu: seconds after which optional measurements "
                                                 "(compiled steps, the largest-batch search, extraction end to "
                                                 "end) are skipped, for a short GPU lease.")] = None,
    index: Annotated[int, typer.Option("--index", help="Only how long opening a store of this many synthetic "
                                       "commit records takes, locally and on moto's S3 server with 20 ms added "
                                       "to every request (12000: all of DROID at 8 episodes a part).")] = 0,
    index_views: Annotated[int, typer.Option(help="With --index: views per record (64: DROID's with two "
                                             "cameras and every phase).")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here (with --gpu: after "
                                             "every section, so a run cut short keeps what it measured).")] = None,
) -> None:
    """Measure extraction, the store, and training cached vs online (the throughput claim), with ratios."""
    m = _load(manifest, profile, set_)
    from stages.bench.run import ensure_data, run_bench, run_index_bench

    log = (lambda line: typer.echo(line, err=True)) if json_out else typer.echo
    with _user_errors():
        if index < 0 or index_views < 1:
            raise UsageError(f"--index {index} / --index-views {index_views}: must be >= 0 / >= 1")
        if index:
            report = run_index_bench(index, index_views, log)
        elif gpu:
            from stages.bench.gpu import run_gpu_bench

            ensure_data(m, episodes, log)
            save = (lambda figures: out.write_text(json.dumps(figures, indent=1))) if out else None
            report = run_gpu_bench(m, log, budget_seconds=budget, save=save)
        else:
            ensure_data(m, episodes, log)
            report = run_bench(m, episodes, repeats=repeats, steps=steps, gpu_tflops=gpu_tflops, echo=log)
    typer.echo(json.dumps(report.to_dict(), indent=1) if json_out else report.format())
    if out:
        out.write_text(json.dumps(report.to_dict(), indent=1))


@app.command()
def inspect(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    view: Annotated[str | None, typer.Option(help="View id, or a unique prefix of one (default: a random "
                                             "committed view, drawn with --seed).")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: inspect_<view id>.png here).")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a static page into this folder: index.html with a "
                                              "table of the views' facts, and one PNG per view.")] = None,
    views: Annotated[int, typer.Option(help="Views on the --html page (random committed ones).")] = 6,
    seed: Annotated[int | None, typer.Option(help="Seed of the random draw of views (default: a new one).")] = None,
) -> None:
    """Pictures of the feature cache (1600x1000 PNG per view): raw frames with the crop box, the encoder's
    input, a PCA of the cached features, states and actions over time."""
    m = _load(manifest, profile, set_)
    from stages.use.inspect_cache import inspect_cache

    with _user_errors():
        s = inspect_cache(m, view=view, out=out, html=html, views=views, seed=seed)
    typer.echo(s.format())


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint of `pipeline train` (or its run folder: "
                                               "latest.pt), or a file in the release's vjepa2-ac-vitg.pt format.")],
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option(help="Episodes to evaluate on: heldout | train | all (training's split: "
                                       "train.heldout_fraction, train.split_salt).")] = "heldout",
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON file to write, the plot beside it as .png (default: "
                                             "<checkpoint stem>.eval.json / .eval.png beside the checkpoint).")]
    = None,
) -> None:
    """Evaluate a predictor checkpoint on the feature cache: teacher-forcing and rollout L1 per horizon against
    copying the last frame, with the spread over windows."""
    m = _load(manifest, profile, set_)
    from stages.use.evaluate_checkpoint import evaluate_checkpoint

    with _user_errors():
        report = evaluate_checkpoint(m, checkpoint, split=split, out=out)
    typer.echo(json.dumps(report.to_dict(), indent=1) if json_out else report.format())


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (its checkpoints/latest.pt) or a checkpoint .pt file.")],
    to: Annotated[Path, typer.Option("--to", help="The .pt file to write.")],
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[str, typer.Option(help="In a run folder: latest, step_N (a kept one) or a path.")]
    = "latest",
) -> None:
    """Write a run's checkpoint in the release's vjepa2-ac-vitg.pt format (encoder + predictor), for the
    release's hub loader and planning notebook; the encoder is the manifest's."""
    m = _load(manifest, profile, set_)
    from stages.use.export import export_release

    with _user_errors():
        s = export_release(m, run, to, which=checkpoint)
    typer.echo(s.format())


@app.command()
def plan(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Our checkpoint (or run folder) or a released "
                                                    "vjepa2-ac-vitg.pt (default: <train.out>/checkpoints/latest.pt).")]
    = None,
    view: Annotated[str | None, typer.Option(help="A committed view of the store (its id or a unique prefix).")]
    = None,
    start_frame: Annotated[int | None, typer.Option(help="Frame of --view to start from.")] = None,
    goal_frame: Annotated[int | None, typer.Option(help="Frame of --view to reach.")] = None,
    start_image: Annotated[Path | None, typer.Option(help="Image file of the start (instead of --view).")] = None,
    goal_image: Annotated[Path | None, typer.Option(help="Image file of the goal.")] = None,
    state: Annotated[str | None, typer.Option(help="Robot state at --start-image: 'x y z roll pitch yaw gripper'.")]
    = None,
    closed_loop: Annotated[int | None, typer.Option(help="Run the closed-loop benchmark on N start/goal pairs of "
                                                    "the synthetic scene instead (planner vs baselines; 30 or more "
                                                    "tell a planner from chance).")] = None,
    out: Annotated[Path | None, typer.Option(help="--closed-loop: folder for closed_loop.json / .png (default: "
                                             "<train.out>/closed_loop).")] = None,
    seed: Annotated[int | None, typer.Option(help="plan.seed: the CEM's samples and, with --closed-loop, which "
                                             "start/goal pairs are drawn.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Plan actions towards a goal frame with the trained predictor (CEM, the released way; settings plan.*),
    or with --closed-loop N measure receding-horizon planning against baselines in the synthetic scene."""
    m = _load(manifest, profile, [*(set_ or []), *([f"plan.seed={seed}"] if seed is not None else [])])
    from stages.use.plan import run_plan

    with _user_errors():
        if closed_loop is not None:
            from stages.use.closed_loop import run_closed_loop

            if any(v is not None for v in (view, start_frame, goal_frame, start_image, goal_image, state)):
                raise UsageError("--closed-loop draws its own start/goal pairs: leave out --view, --start-*, "
                                 "--goal-* and --state")
            s = run_closed_loop(m, checkpoint, closed_loop, out, echo=lambda line: typer.echo(line, err=json_out))
        else:
            s = run_plan(m, checkpoint, view, start_frame, goal_frame, start_image, goal_image, state)
    typer.echo(json.dumps(s.to_dict(), indent=1) if json_out else s.format())


def main() -> None:
    """The `pipeline` entry point: the app, with a command line that does not parse said in one `error:` line
    (exit 2) like every other mistake, instead of a boxed usage text; no arguments at all show the help."""
    if not sys.argv[1:]:
        app(["--help"])  # prints the help and exits 0
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as err:  # click's errors (typer >= 0.20 carries its own click): parse errors
        where = getattr(getattr(err, "ctx", None), "command_path", "pipeline")
        raise SystemExit(_fail(f"{err.format_message().rstrip('.')} (see `{where} --help`)",
                               getattr(err, "exit_code", EXIT_USAGE)).exit_code) from None
    except typer.Abort:  # end of input at a prompt
        raise SystemExit(130) from None
    raise SystemExit(code or 0)


if __name__ == "__main__":
    main()
