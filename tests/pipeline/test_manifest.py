"""The manifest: the shipped profiles load, overrides apply, bad input names the key and value."""

from pathlib import Path

import pytest

from pipeline.manifest import LeRobotSection, ManifestError, load_manifest

MANIFEST = Path(__file__).resolve().parents[2] / "data_manifest.yaml"


@pytest.mark.parametrize("profile", ["droid", "droid_lerobot", "demo", "sim", "bench"])
def test_shipped_profiles_load_with_required_keys(profile: str) -> None:
    m = load_manifest(MANIFEST, profile)
    assert m.profile == profile
    for value in (m.data.root, m.data.episodes, m.cache.path):
        assert value
    assert Path(m.cache.path).is_absolute()  # resolved against the manifest's folder


def test_droid_profile_is_the_paper_setup() -> None:
    m = load_manifest(MANIFEST, "droid")
    assert (m.data.cameras, m.data.fps, m.data.frames_per_clip) == (["left_mp4_path"], 4.0, 16)
    assert (m.data.video_fps, m.views.phase, m.train.window_range) == ("auto", "random", "release")
    assert (m.crop.size, m.crop.scale, m.crop.ratio) == (256, (1.777, 1.777), (0.75, 1.35))
    assert (m.encoder.preset, m.encoder.precision, m.encoder.checkpoint_key) == ("vit_giant", "bf16", "target_encoder")
    assert m.encoder.checkpoint.endswith("vitg.pt")


def test_droid_lerobot_profile_is_the_droid_one_on_the_lerobot_port() -> None:
    m, droid = load_manifest(MANIFEST, "droid_lerobot"), load_manifest(MANIFEST, "droid")
    assert (m.data.format, m.data.cameras, m.data.episodes) == ("lerobot", ["observation.images.exterior_1_left"],
                                                                  "all")
    assert m.data.lerobot == LeRobotSection() and m.cache.path != droid.cache.path
    assert (m.crop, m.encoder, m.predictor, m.train) == (droid.crop, droid.encoder, droid.predictor, droid.train)


def test_default_profile_and_overrides(tmp_path: Path) -> None:
    m = load_manifest(MANIFEST, None, ["encoder.batch_size=7", "crop.scale=[0.3, 1]", "encoder.checkpoint=null",
                                       "train.lr=3e-4",
                                       f"cache.path={tmp_path}/c"])
    assert m.profile == "demo"
    assert m.encoder.batch_size == 7
    assert m.crop.scale == (0.3, 1.0)
    assert m.encoder.checkpoint is None
    assert m.train.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; floats accept it
    assert m.cache.path == f"{tmp_path}/c"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("encoder.bogus=1", "unknown key 'encoder.bogus'"),
        ("bogus.key=1", "unknown key 'bogus'"),
        ("crop.size=100", "crop.size: 100"),
        ("data.fps=fast", "data.fps: 'fast'"),
        ("views.phase=sometimes", "views.phase: 'sometimes'"),
        ("encoder.preset=vit_tiny", "encoder.preset: 'vit_tiny'"),
        ("cache.shard_frames=6", "cache.shard_frames: 6"),
        ("crop.ratio=[1.0]", "crop.ratio"),
        ("views.per_episode=0", "views.per_episode: 0"),
        ("noequals", "dotted.key=value"),
        ("data.cameras=left_mp4_path", "data.cameras: 'left_mp4_path' must be a list"),
        ("data.cameras=[left_mp4_path, left_mp4_path]", "lists a camera twice"),
        ("data.cameras=[left]", "data.cameras: 'left'"),
        ("data.cameras=[]", "at least one camera"),
        ("data.video_fps=0", "data.video_fps: 0"),
        ("data.video_fps=fast", "data.video_fps: 'fast' is not valid"),
        ("encoder.mlp_ratio=48/0", "encoder.mlp_ratio: '48/0'"),
        ("train.window_range=most", "train.window_range: 'most'"),
        ("cache.compression_level=99", "cache.compression_level: 99 must be a zstd level"),
        ("train.eps=-1e-8", "train.eps: -1e-08 must be > 0"),
        ("train.betas=[0.9, 1.0]", "train.betas: .0.9, 1.0. must both be in"),
        ("train.loader_threads=0", "train.loader_threads: 0"),
        ("train.prefetch_batches=-1", "train.prefetch_batches: -1"),
        ("train.weight_decay=-0.1", "train.weight_decay: -0.1"),
        ("train.start_lr=-1", "train.start_lr: -1.0"),
        ("train.final_lr=-1", "train.final_lr: -1.0"),
        ("train.eval_every=-5", "train.eval_every: -5"),
        ("train.eval_windows=0", "train.eval_windows: 0"),
        ("train.micro_batch_size=100000", "train.micro_batch_size: 100000 must be in [0, train.global_batch_size"),
        ("profile=droid", "the profile is chosen with --profile"),
        ("synthetic.explore=1.5", "synthetic.explore: 1.5 must be in"),
        ("synthetic.width=33", "synthetic.width: 33 must be even"),
        ("synthetic.episodes=0", "synthetic.episodes: 0"),
        ("data.lerobot.orientation_format=rpy", "data.lerobot.orientation_format: 'rpy'"),
    ],
)
def test_bad_values_name_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message.replace("[", r"\[")):
        load_manifest(MANIFEST, "demo", [override])


def test_cameras_fps_and_fractions() -> None:
    m = load_manifest(MANIFEST, "demo", ["data.cameras=null", "data.camera=ext1_mp4_path"])  # the older spelling
    assert (m.data.cameras, m.data.camera) == (["ext1_mp4_path"], None)
    with pytest.raises(ManifestError, match="both set"):  # never a silent winner between the two
        load_manifest(MANIFEST, "demo", ["data.camera=ext1_mp4_path"])
    assert load_manifest(MANIFEST, "demo", ["data.camera=wrist_mp4_path"]).data.cameras == ["wrist_mp4_path"]
    m = load_manifest(MANIFEST, "demo", ["data.cameras=[ext1_mp4_path, wrist_mp4_path]", "data.video_fps=15",
                                         "encoder.mlp_ratio=48/11", "views.phase=all"])
    assert m.data.cameras == ["ext1_mp4_path", "wrist_mp4_path"] and m.data.fps_override() == 15.0
    assert m.encoder.mlp_ratio == 48 / 11 and m.views.phase == "all"
    assert load_manifest(MANIFEST, "demo").data.fps_override() is None


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "m.yaml"
    bad.write_text("profiles: {a: {data: {root: x}}}\ndefault_profile: a\n")
    with pytest.raises(ManifestError, match=r"missing key data\.episodes"):
        load_manifest(bad)
    bad.write_text("profiles: {a: {}}\ndefault_profile: b\n")
    with pytest.raises(ManifestError, match="profile 'b' not found"):
        load_manifest(bad)
    bad.write_text("profiles: {a: {}}\ndefault_profile: a\nextra: 1\n")
    with pytest.raises(ManifestError, match="unknown key 'extra'"):
        load_manifest(bad)


@pytest.mark.parametrize(("content", "message"), [
    (None, "is a folder, not a YAML file"),
    (b"\xff\xfe profiles", "is not UTF-8 text"),
    (b"profiles: {a: 5}\ndefault_profile: a\n", "profile 'a': expected a mapping of sections, got 5"),
    (b"profiles: [a]\ndefault_profile: a\n", "profiles: expected a mapping of profile names"),
    (b"profiles: {a: {}}\ndefault_profile: [a]\n", r"default_profile: \['a'\] must be a profile's name"),
    (b"profiles: {a: {}}\n", "no default_profile, and no --profile given"),
    (b"profiles: {a: {profile: b}}\ndefault_profile: a\n", "unknown key 'profile'"),
])
def test_malformed_manifest_files_are_named(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)
