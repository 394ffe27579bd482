"""`pipeline eval` and `pipeline export` on a tiny trained run: eval gives training's held-out numbers plus the
spread; the exported file loads strictly the way the release's hub does and evaluates to the same numbers;
every user mistake is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UsageError
from pipeline.manifest import Manifest, load_manifest
from stages.cache.fingerprint import predictor_config, vit_config
from stages.extract.driver import extract
from stages.models.predictor import ACPredictor, build_predictor
from stages.models.release_weights import CheckpointError
from stages.models.vit import VisionTransformer, build_encoder
from stages.train.loop import train
from stages.train.windows import split_of
from stages.use.evaluate_checkpoint import evaluate_checkpoint
from stages.use.export import export_release

runner = CliRunner()
STEPS = 2
RELEASE_KEYS = {"encoder", "target_encoder", "predictor", "epoch"}


def _salt(episodes: list[str]) -> str:
    """A split salt that holds out some but not all of the 3 episodes."""
    return next(s for s in map(str, range(100)) if {split_of(e, 0.5, s) for e in episodes} == {"train", "heldout"})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path) -> Path:
    """A tiny store and a run of STEPS steps in <root>/run (kept step_2 and latest); <root>/manifest.yaml."""
    root = tmp_path_factory.mktemp("eval_export")
    episodes = (synthetic_dataset / "episodes.txt").read_text().splitlines()
    profile = {**TINY, "data": {**TINY["data"], "root": str(synthetic_dataset)},
               "predictor": {"embed_dim": 32, "depth": 1, "num_heads": 1, "mlp_ratio": 2.0},
               "train": {"out": "run", "global_batch_size": 4, "warmup_steps": 1, "constant_steps": 4,
                         "decay_steps": 1, "lr": 1e-3, "heldout_fraction": 0.5, "split_salt": _salt(episodes),
                         "log_every": 1, "eval_every": 0, "eval_windows": 6, "eval_horizons": 2,
                         "checkpoint_every": STEPS, "checkpoint_minutes": 0, "loader_threads": 1, "device": "cpu"}}
    (root / "manifest.yaml").write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": profile}}))
    extract(load(root), show_progress=False, echo=lambda _: None)
    train(load(root), root / "run", steps=STEPS, show_progress=False, echo=lambda _: None)
    return root


def load(root: Path, *overrides: str) -> Manifest:
    return load_manifest(root / "manifest.yaml", None, list(overrides))


def cli(root: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "-m", str(root / "manifest.yaml")])
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    assert output.startswith("error: ") and output.strip().count("\n") == 0, output
    return output


def numbers(result: dict) -> list:
    return [result["windows"], result["tf_loss"], result["rollout_loss"], result["horizons"]]


def test_eval_of_a_run_checkpoint_gives_trainings_numbers_and_the_spread(run: Path) -> None:
    ckpt = run / "run" / "checkpoints" / "latest.pt"
    report = evaluate_checkpoint(load(run), ckpt)
    assert (report.kind, report.step, report.split, report.architecture_from) == ("run", STEPS, "heldout", "checkpoint")
    logged = json.loads((run / "run" / "eval.json").read_text())  # training's own held-out evaluation at the end
    assert report.result["windows"] == logged["windows"] > 0
    for got, want in zip(report.result["horizons"], logged["horizons"], strict=True):
        assert got["model_l1"] == pytest.approx(want["model_l1"], rel=1e-6)
        assert got["copy_l1"] == pytest.approx(want["copy_l1"], rel=1e-6)
        for who in ("model_l1", "copy_l1"):
            assert got[f"{who}_p10"] <= got[f"{who}_p50"] <= got[f"{who}_p90"] and got[f"{who}_std"] >= 0
        assert 0 <= got["model_better"] <= 1
        assert got["shuffled_l1"] == pytest.approx(want["shuffled_l1"], rel=1e-6) and got["zero_l1"] > 0
        assert got["action_ratio"] == pytest.approx(got["shuffled_l1"] / got["model_l1"])
    assert report.result["tf_loss"] == pytest.approx(logged["tf_loss"], rel=1e-6)
    written = json.loads((ckpt.parent / "latest.eval.json").read_text())  # beside the checkpoint by default
    assert numbers(written) == numbers(report.result) and (ckpt.parent / "latest.eval.png").stat().st_size > 0
    assert "ratio" in report.format() and "heldout" in report.format() and "shuffled/true" in report.format()
    whole = evaluate_checkpoint(load(run), run / "run", split="all", write=False)  # a run folder means latest.pt
    assert whole.split_episodes == 3 and whole.result["windows"] >= report.result["windows"]


def test_export_loads_strictly_the_release_way_and_evaluates_to_the_same_numbers(run: Path, tmp_path: Path) -> None:
    m = load(run)
    out = tmp_path / "vjepa2-ac-tiny.pt"
    s = export_release(m, run / "run", out)
    assert s.step == STEPS and "random init" in s.encoder_source and "random init" in s.format()
    blob = torch.load(out, map_location="cpu", weights_only=True)  # plain data only: what torch.load allows by default
    assert set(blob) >= RELEASE_KEYS and blob["epoch"] == 0
    assert set(blob) - RELEASE_KEYS == {"predictor_config", "encoder_config", "step", "exported_from", "encoder_source"}
    assert all(k.startswith("module.") for name in ("encoder", "target_encoder", "predictor") for k in blob[name])

    def hub_clean(state: dict) -> dict:  # the hub's _clean_backbone_key: delete the wrappers' names anywhere
        return {k.replace("module.", "").replace("backbone.", ""): v for k, v in state.items()}

    encoder, predictor = VisionTransformer(vit_config(m)), ACPredictor(predictor_config(m))
    encoder.load_state_dict(hub_clean(blob["encoder"]), strict=True)
    predictor.load_state_dict(hub_clean(blob["predictor"]), strict=True)
    demo = build_encoder(vit_config(m), None, seed=m.encoder.seed)  # the manifest's random-init encoder
    assert all(torch.equal(v, demo.state_dict()[k]) for k, v in encoder.state_dict().items())
    trained = torch.load(run / "run" / "checkpoints" / "latest.pt", weights_only=False)["predictor"]
    assert all(torch.equal(v, trained[k]) for k, v in predictor.state_dict().items())
    build_predictor(predictor_config(m), out, "predictor")  # the project's loader of released files, strict

    ours = evaluate_checkpoint(m, run / "run" / "checkpoints" / "latest.pt", write=False)
    exported = evaluate_checkpoint(m, out)
    assert (exported.kind, exported.step, exported.architecture_from) == ("release", STEPS, "checkpoint")
    assert numbers(exported.result) == numbers(ours.result)
    assert out.with_name("vjepa2-ac-tiny.eval.json").exists() and out.with_name("vjepa2-ac-tiny.eval.png").exists()
    released = tmp_path / "released.pt"  # as the release ships it: no predictor_config, the manifest's is used
    torch.save({k: blob[k] for k in RELEASE_KEYS}, released)
    bare = evaluate_checkpoint(m, released, write=False)
    assert bare.architecture_from == "manifest" and numbers(bare.result) == numbers(ours.result)


def test_cli_eval_json_and_export(run: Path, tmp_path: Path) -> None:
    for command in ("eval", "export"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0
    code, output = cli(run, "export", str(run / "run"), "--to", str(tmp_path / "x.pt"), "--checkpoint", f"step_{STEPS}")
    assert code == 0 and "exported" in output, output
    code, output = cli(run, "eval", str(tmp_path / "x.pt"), "--json", "--out", str(tmp_path / "e" / "x.json"))
    assert code == 0, output
    report = json.loads(output)
    assert report["kind"] == "release" and report["step"] == STEPS and len(report["horizons"]) == 2
    assert json.loads((tmp_path / "e" / "x.json").read_text())["horizons"] == report["horizons"]
    assert (tmp_path / "e" / "x.png").exists()
    code, output = cli(run, "eval", str(run / "run"), "--split", "all")
    assert code == 0 and "predictor L1" in output and "all:" in output, output


def test_user_mistakes_end_in_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    latest = str(run / "run" / "checkpoints" / "latest.pt")
    cases = [
        (("eval", str(tmp_path / "missing.pt")), "no such checkpoint file"),
        (("eval", str(garbage)), "cannot be read"),
        (("eval", str(foreign)), "no 'predictor' entry"),
        (("eval", latest, "--split", "heldout", "--set", "train.heldout_fraction=0"), "--split all"),
        (("eval", latest, "--split", "sideways"), "--split sideways"),
        (("eval", latest, "--set", "encoder.embed_dim=128"), "manifest's encoder and crop.size give 4 x 128"),
        (("export", str(run / "run"), "--to", str(tmp_path / "y.pt"), "--checkpoint", "step_9"), "step_0000009.pt"),
        (("export", str(garbage), "--to", str(tmp_path / "y.pt")), "cannot be read"),
        (("export", str(run / "run"), "--to", str(tmp_path / "y.pt"), "-s", "encoder.seed=5"), "encoder.seed: 0 -> 5"),
    ]
    for args, says in cases:
        code, output = cli(run, *args)
        assert code == 2 and says in one_line_error(output), (args, output)
    assert not (tmp_path / "y.pt").exists()


def test_a_released_file_of_another_architecture_is_named(run: Path, tmp_path: Path) -> None:
    m = load(run)
    released = tmp_path / "released.pt"
    torch.save({"predictor": {f"module.{k}": v for k, v in build_predictor(predictor_config(m)).state_dict().items()}},
               released)
    with pytest.raises(CheckpointError, match=r"missing keys.*manifest's predictor section"):
        evaluate_checkpoint(load(run, "predictor.depth=2"), released, write=False)


def test_export_writes_the_encoder_of_the_manifests_checkpoint(run: Path, tmp_path: Path) -> None:
    m = load(run)
    weights = build_encoder(vit_config(m), None, seed=7).state_dict()
    released = {f"module.backbone.{k}": v for k, v in weights.items()} | {"module.backbone.pos_embed": torch.ones(1)}
    torch.save({"target_encoder": released}, tmp_path / "vitg.pt")
    ckpt = torch.load(run / "run" / "checkpoints" / "latest.pt", weights_only=False)
    ckpt["config"]["encoder"]["checkpoint"] = str(tmp_path / "vitg.pt")  # a run trained on that encoder's features
    torch.save(ckpt, tmp_path / "run.pt")
    s = export_release(load(run, f"encoder.checkpoint={tmp_path / 'vitg.pt'}"), tmp_path / "run.pt", tmp_path / "ac.pt")
    assert s.encoder_source == f"{tmp_path / 'vitg.pt'}['target_encoder']" and s.notes == []
    blob = torch.load(tmp_path / "ac.pt", weights_only=True)
    assert blob["encoder"].keys() == {f"module.{k}" for k in weights}  # pos_embed (unused with RoPE) left out
    assert all(torch.equal(blob["encoder"][f"module.{k}"], v) for k, v in weights.items())
    with pytest.raises(UsageError, match=r"encoder\.checkpoint: .*-> None"):  # a random-init manifest: not the run's
        export_release(m, tmp_path / "run.pt", tmp_path / "refused.pt")


def test_a_damaged_latest_falls_back_to_the_newest_intact_checkpoint(run: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """As resume does: a run folder whose latest.pt is truncated is evaluated from its kept step_N.pt, said in a
    warning; naming the damaged file itself stays an error naming it."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    latest = copy / "checkpoints" / "latest.pt"
    latest.unlink()  # a hard link of step_N: write a torn copy of its own
    latest.write_bytes((copy / "checkpoints" / f"step_{STEPS:07d}.pt").read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        report = evaluate_checkpoint(load(run), copy, out=tmp_path / "e.json")
    assert report.step == STEPS and Path(report.checkpoint).name == f"step_{STEPS:07d}.pt"
    assert any("latest.pt is damaged" in r.getMessage() for r in caplog.records)
    with pytest.raises((UsageError, CheckpointError), match=r"latest\.pt"):
        evaluate_checkpoint(load(run), latest, out=tmp_path / "f.json")
