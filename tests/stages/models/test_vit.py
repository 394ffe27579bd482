"""Tests of the V-JEPA 2 encoder, its 3-D RoPE and released-checkpoint loading."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from stages.models.release_weights import CheckpointError, load_strict, read_state_dict
from stages.models.rope import (
    Rotation,
    grid_positions,
    rope_axis_dim,
    rotate_axis,
)
from stages.models.vit import (
    VIT_PRESETS,
    VisionTransformer,
    ViTConfig,
    build_encoder,
    encode_frames,
    weights_digest,
)

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "encoder.pt"
TINY = ViTConfig(
    img_size=32, patch_size=16, tubelet_size=2, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0
)


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=False)


@pytest.fixture(scope="module")
def golden_model(golden: dict) -> VisionTransformer:
    c = golden["config"]
    fields = ("img_size", "patch_size", "tubelet_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
    model = VisionTransformer(ViTConfig(**{k: c[k] for k in fields})).eval()
    load_strict(model, golden["state_dict"], source=str(GOLDEN))
    return model


@pytest.fixture(scope="module")
def tiny() -> VisionTransformer:
    return build_encoder(TINY, None, seed=0)


# -- golden fixtures from the released code ------------------------------------------------------


def test_golden_per_frame_features(golden: dict, golden_model: VisionTransformer) -> None:
    frames = golden["frames"]  # [B, 3, T, H, W]
    B, C, T, H, W = frames.shape
    flat = frames.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)  # row b*T + t
    out = encode_frames(golden_model, flat)
    assert out.shape == golden["per_frame_features"].shape
    assert (out - golden["per_frame_features"]).abs().max().item() <= 1e-5


def test_golden_video_features(golden: dict, golden_model: VisionTransformer) -> None:
    with torch.no_grad():
        out = golden_model(golden["video"])
    assert out.shape == golden["video_features"].shape
    assert (out - golden["video_features"]).abs().max().item() <= 1e-5


# -- RoPE ----------------------------------------------------------------------------------------


def test_rope_axis_dim() -> None:
    assert rope_axis_dim(64) == 20  # ViT-g head: 3 x 20 rotated, 4 untouched
    assert rope_axis_dim(8) == 2
    assert rope_axis_dim(128) == 42


def test_rotate_axis_matches_hand_reference() -> None:
    # d = 4: omega = (1, 1/100); cos/sin laid out [f0, f1, f0, f1]; partner (-x1, x0, -x3, x2).
    x = [0.3, -1.2, 2.0, 0.7]
    p = 1.7
    f0, f1 = p * 1.0, p / 100.0
    expected = [
        x[0] * math.cos(f0) - x[1] * math.sin(f0),
        x[1] * math.cos(f1) + x[0] * math.sin(f1),
        x[2] * math.cos(f0) - x[3] * math.sin(f0),
        x[3] * math.cos(f1) + x[2] * math.sin(f1),
    ]
    out = rotate_axis(torch.tensor([[x]], dtype=torch.float64), torch.tensor([p], dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64))


def test_rope_3d_axes_and_untouched_dims() -> None:
    # head_dim 8 -> d = 2: dims 0-1 time, 2-3 row, 4-5 column, 6-7 untouched; omega = 1.
    x = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(1, 1, 1, 8)
    t, r, c = (torch.tensor([v], dtype=torch.float64) for v in (0.5, 1.0, 2.5))
    out = Rotation([t, r, c])(x)[0, 0, 0]
    for start, angle in ((0, 0.5), (2, 1.0), (4, 2.5)):
        a, b = x[0, 0, 0, start].item(), x[0, 0, 0, start + 1].item()
        assert out[start].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle))
        assert out[start + 1].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle))
    assert torch.equal(out[6:], x[0, 0, 0, 6:])


def test_rope_time_only_rotates_time_dims() -> None:
    x = torch.randn(2, 3, 5, 64)
    t = torch.arange(5)
    out = Rotation([t])(x)
    zero = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(out, Rotation([t, zero, zero])(x))
    assert torch.equal(out[..., 20:], x[..., 20:])


def test_rope_keeps_dtype_and_zero_position_is_identity() -> None:
    x = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    zero = torch.zeros(4)
    out = Rotation([zero, zero, zero])(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_table_per_forward_rotates_exactly_as_each_axis_on_its_own(dtype: torch.dtype) -> None:
    """The whole-head table (built once, reused by every layer) gives the per-axis form's bits: float32
    rescaled positions (the predictor's frames), integer ones (the encoder, the predictor's actions)."""
    x = (3 * torch.randn(2, 4, 3, 16, 64)).to(dtype)  # [B, heads, T, hw, hd]
    d = rope_axis_dim(64)
    for t, r, c in [(torch.arange(3.0)[:, None], torch.rand(16) * 16, torch.rand(16) * 16),
                    (torch.arange(3)[:, None], torch.randint(0, 4, (16,)), torch.randint(0, 4, (16,)))]:
        axes = [rotate_axis(x[..., :d], t), rotate_axis(x[..., d : 2 * d], r), rotate_axis(x[..., 2 * d : 3 * d], c)]
        reference = torch.cat([*axes, x[..., 3 * d :]], dim=-1)
        rotation = Rotation([t, r, c])
        for _ in range(2):  # the second call reuses the table
            assert torch.equal(rotation(x).view(torch.int16 if dtype != torch.float32 else torch.int32),
                               reference.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_grid_positions_order() -> None:
    t, r, c = grid_positions(2, 2, 3, device="cpu")
    assert t.tolist() == [0] * 6 + [1] * 6
    assert r.tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert c.tolist() == [0, 1, 2] * 4


# -- checkpoint loading ----------------------------------------------------------------------------


def _save_release_like(path: Path, state: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    wrapped = {"module.backbone." + k: v for k, v in state.items()}
    wrapped["module.backbone.pos_embed"] = torch.zeros(1, 4, TINY.embed_dim)
    torch.save({"target_encoder": wrapped, "encoder": dict(wrapped), "epoch": 3, **(extra or {})}, path)


def test_checkpoint_loads_with_prefixes_and_pos_embed(tmp_path: Path) -> None:
    source = build_encoder(TINY, None, seed=5)
    path = tmp_path / "release.pt"
    _save_release_like(path, source.state_dict(), extra={"args": argparse.Namespace(lr=1.0)})
    for key in ("target_encoder", "encoder"):
        loaded = build_encoder(TINY, str(path), checkpoint_key=key)
        assert weights_digest(loaded) == weights_digest(source)
        assert not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())


def test_checkpoint_missing_key(tmp_path: Path) -> None:
    state = build_encoder(TINY, None).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "missing.pt"
    _save_release_like(path, state)
    with pytest.raises(CheckpointError, match="missing") as err:
        build_encoder(TINY, str(path))
    assert str(path) in str(err.value) and "blocks.1.mlp.fc2.bias" in str(err.value)


def test_checkpoint_unexpected_key(tmp_path: Path) -> None:
    state = build_encoder(TINY, None).state_dict()
    state["blocks.0.attn.q_norm.weight"] = torch.ones(24)
    path = tmp_path / "unexpected.pt"
    _save_release_like(path, state)
    with pytest.raises(CheckpointError, match="unexpected") as err:
        build_encoder(TINY, str(path))
    assert str(path) in str(err.value) and "blocks.0.attn.q_norm.weight" in str(err.value)


def test_checkpoint_shape_mismatch(tmp_path: Path) -> None:
    state = build_encoder(TINY, None).state_dict()
    state["norm.weight"] = torch.ones(7)
    path = tmp_path / "shape.pt"
    _save_release_like(path, state)
    with pytest.raises(CheckpointError, match=r"norm\.weight") as err:
        build_encoder(TINY, str(path))
    assert str(path) in str(err.value)


def test_checkpoint_missing_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "top.pt"
    _save_release_like(path, build_encoder(TINY, None).state_dict())
    with pytest.raises(CheckpointError, match="predictor") as err:
        read_state_dict(path, "predictor")
    assert str(path) in str(err.value) and "target_encoder" in str(err.value)


def test_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pt", "encoder")


# -- random init and digest ------------------------------------------------------------------------


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    rng = torch.random.get_rng_state()
    a, b, c = (build_encoder(TINY, None, seed=s) for s in (0, 0, 1))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest(c)


def test_random_init_follows_release_recipe(tiny: VisionTransformer) -> None:
    assert torch.equal(tiny.norm.weight, torch.ones(TINY.embed_dim))
    assert torch.equal(tiny.blocks[0].attn.qkv.bias, torch.zeros(3 * TINY.embed_dim))
    fc1_std = tiny.blocks[1].mlp.fc1.weight.std().item()
    fc2_std = tiny.blocks[1].mlp.fc2.weight.std().item()
    assert fc1_std == pytest.approx(0.02, rel=0.1)
    assert fc2_std == pytest.approx(0.02 / math.sqrt(4.0), rel=0.1)  # block 2: / sqrt(2 * 2)


def test_weights_digest_sees_one_weight(tiny: VisionTransformer) -> None:
    other = build_encoder(TINY, None, seed=0)
    assert weights_digest(other) == weights_digest(tiny)
    with torch.no_grad():
        other.blocks[1].attn.proj.weight[3, 4] += 1e-3
    assert weights_digest(other) != weights_digest(tiny)


# -- encode_frames ---------------------------------------------------------------------------------


def test_encode_frames_is_per_frame(tiny: VisionTransformer) -> None:
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batched = encode_frames(tiny, frames)
    alone = encode_frames(tiny, frames[1:2])
    shuffled = encode_frames(tiny, frames[[2, 1, 0]])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1], shuffled[1], atol=1e-6, rtol=0)
    assert not batched.requires_grad


def test_non_square_input_shapes(tiny: VisionTransformer) -> None:
    frames = torch.randn(2, 3, 32, 48)
    assert encode_frames(tiny, frames).shape == (2, 2 * 3, TINY.embed_dim)
    with torch.no_grad():
        video = tiny(torch.randn(1, 3, 4, 32, 48))
    assert video.shape == (1, 2 * 2 * 3, TINY.embed_dim)


def test_forward_rejects_cropping_shapes(tiny: VisionTransformer) -> None:
    with pytest.raises(ValueError, match="tubelet"):
        tiny(torch.randn(1, 3, 3, 32, 32))


# -- config and presets ----------------------------------------------------------------------------


def test_config_defaults_are_vit_giant() -> None:
    cfg = ViTConfig()
    assert cfg == VIT_PRESETS["vit_giant"]
    assert cfg.tokens_per_frame == 256
    assert cfg.head_dim == 64 and cfg.mlp_hidden_dim == 6144
    assert ViTConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("name", "expected"), [("vit_large", 0.30e9), ("vit_huge", 0.63e9), ("vit_giant", 1.0e9)]
)
def test_preset_parameter_counts(name: str, expected: float) -> None:
    with torch.device("meta"):
        model = VisionTransformer(VIT_PRESETS[name])
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(expected, rel=0.05)
