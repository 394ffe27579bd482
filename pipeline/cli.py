"""The `pipeline` command: load the manifest, apply overrides, call a stage.

Stages are imported inside their command so that `pipeline --help` stays fast.
Exit codes: 0 success; 1 the run finished but some episodes failed; 2 bad manifest or usage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.manifest import Manifest, ManifestError, load_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="V-JEPA 2-AC post-training pipeline: cache encoder features of DROID episodes "
                       "in sharded Zarr (extract), then train the action-conditioned predictor from them.")

ManifestOpt = Annotated[Path, typer.Option("--manifest", "-m", help="data_manifest.yaml to read.")]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="Profile of the manifest (default: its default_profile).")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: dotted.key=value (repeatable).")]
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors about the user's input (store, checkpoint, files, values) end with a message and exit 2,
    not a traceback."""
    from pipeline.store import StoreError
    from stages.checkpoint import CheckpointError

    try:
        yield
    except (StoreError, CheckpointError, FileNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _load(manifest: Path, profile: str | None, overrides: list[str] | None) -> Manifest:
    try:
        return load_manifest(manifest, profile, overrides or [])
    except ManifestError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


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
) -> None:
    """Write synthetic episodes in the real DROID raw layout (metadata json, trajectory.h5, H.264 MP4s)."""
    from stages.synthetic import write_synthetic_dataset

    folders = write_synthetic_dataset(out, episodes, seed=seed, width=width, height=height,
                                      min_seconds=min_seconds, max_seconds=max_seconds, progress=True, scenes=scenes)
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
    from stages.extract import extract as run_extract
    from stages.status import human_bytes

    with _user_errors():
        s = run_extract(m, scheduler=scheduler)
    if json_out:
        typer.echo(json.dumps(s.to_dict(), indent=1))
    else:
        typer.echo(
            f"\nstore      {s.store}\n"
            f"episodes   {s.episodes}   views: planned {s.views_planned}, done now {s.views_done}, "
            f"skipped (committed) {s.views_skipped}, failed episodes {len(s.failed)}\n"
            f"frames     {s.frames} in {s.seconds:.1f} s = {s.frames_per_second:.1f} frames/s end to end"
            f" (encoder alone {s.encoder_frames_per_second:.1f} frames/s)\n"
            f"written    {human_bytes(s.bytes_written)}")
        for f in s.failed:
            typer.secho(f"failed     {f['episode']}: {f['reason']}", fg=typer.colors.YELLOW)
    if s.failed:
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
    from stages.status import format_report, status_report

    with _user_errors():
        report = status_report(m)
    typer.echo(json.dumps(report, indent=1) if json_out else format_report(report))


@app.command()
def gc(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Free space: remove uncommitted parts (left by killed runs) and parts whose views were all re-extracted.

    Do not run it while an extract writes to the same store: a part being written is uncommitted too.
    """
    m = _load(manifest, profile, set_)
    from pipeline.store import FeatureStore
    from stages.encoder import reader_spec
    from stages.status import human_bytes

    with _user_errors():
        store = FeatureStore(m.cache.path, reader_spec(m)).check()
        doomed = [(p, "uncommitted") for p in store.uncommitted_parts()]
        doomed += [(p, "superseded") for p in store.superseded_parts()]
        freed = 0
        for part, why in doomed:
            freed += store.part_bytes(part)
            typer.echo(f"{'would remove' if dry_run else 'removed'} {why} part {part}")
            if not dry_run:
                store.drop_part(part)
    typer.echo(f"{len(doomed)} parts, {human_bytes(freed)} {'to free' if dry_run else 'freed'} in {store.url}")


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
) -> None:
    """Stage two: train the action-conditioned predictor from the feature cache (torchrun for several GPUs)."""
    m = _load(manifest, profile, set_)
    from stages.run_files import latest_checkpoint
    from stages.train import train as run_train

    run_dir = out or Path(m.train.out)
    if resume and latest_checkpoint(run_dir) is None:
        typer.secho(f"error: --resume: no checkpoint in {run_dir / 'checkpoints'}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    with _user_errors():
        s = run_train(m, run_dir, steps)
    _print_train_summary(s)


def _print_train_summary(s) -> None:
    if s.end_step == s.start_step:
        typer.echo(f"Nothing to do: the run in {s.run_dir} is already at step {s.end_step}.")
        return
    typer.echo(f"\ntrained   steps {s.start_step + 1}..{s.end_step} in {s.seconds:.1f} s, "
               f"{s.clips_per_second:.1f} clips/s, data wait {100 * s.data_wait_share:.1f}% of step time, "
               f"{s.world_size} rank(s){'' if s.ranks_in_sync else ', RANKS OUT OF SYNC'}")
    if s.first_loss is not None:
        typer.echo(f"loss      {s.first_loss:.4f} -> {s.last_loss:.4f}")
    typer.echo(f"results   {s.run_dir}: metrics.jsonl, loss.png, eval.json, eval.png, checkpoints/latest.pt")


@app.command()
def demo(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile to run.")] = "demo",
    set_: SetOpt = None,
    episodes: Annotated[int, typer.Option(help="Synthetic episodes to write if data.root has none.")] = 16,
) -> None:
    """The whole job on built-in data: synthetic DROID episodes (once), extract, train, evaluate, plot."""
    m = _load(manifest, profile, set_)
    from stages.extract import extract as run_extract
    from stages.synthetic import write_synthetic_dataset
    from stages.train import train as run_train

    root = Path(m.data.root)
    if not (root / "episodes.txt").exists():
        typer.echo(f"Writing {episodes} synthetic DROID-format episodes to {root} ...")
        write_synthetic_dataset(root, episodes, seed=0, progress=True, scenes=1)  # one lab set-up
    with _user_errors():
        s = run_extract(m)
        if s.views_done:
            typer.echo(f"extract: {s.views_done} views, {s.frames} frames in {s.seconds:.1f} s "
                       f"({s.frames_per_second:.1f} frames/s end to end); {s.views_skipped} views already cached\n")
        t = run_train(m)
    _print_train_summary(t)
    final_eval = Path(t.run_dir) / "eval.json"
    if t.end_step == t.start_step and final_eval.exists():  # nothing trained now: show the last evaluation
        from stages.evaluate import format_eval

        typer.echo(format_eval(json.loads(final_eval.read_text())))
    typer.echo(f"\nResults: episodes {root}, feature store {s.store}, run {t.run_dir} "
               f"(loss.png, eval.png, metrics.jsonl, eval.json, checkpoints/)")
    if s.failed:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def bench(
    manifest: ManifestOpt = Path("data_manifest.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    episodes: Annotated[int, typer.Option(help="Episodes of the manifest to benchmark on.")] = 4,
    out: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    """Measure encoder-only vs end-to-end extraction frames/s on the same frames, and the store codecs."""
    m = _load(manifest, profile, set_)
    from stages.bench import format_bench, run_bench

    figures = run_bench(m, episodes)
    typer.echo(format_bench(figures))
    if out:
        out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    app()
