"""Tests of the V-JEPA 2-AC predictor, its loss and rollout, and released-checkpoint loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stages.models.predictor import (
    ACPredictor,
    PredictorConfig,
    ac_loss,
    block_causal_mask,
    build_predictor,
    layer_norm_features,
    rollout,
)
from stages.models.release_weights import CheckpointError, load_strict
from stages.models.vit import weights_digest

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
TINY = PredictorConfig(
    img_size=32, patch_size=16, embed_dim=24, predictor_embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0
)  # head_dim 24 -> 8 RoPE dims per axis; 4 tokens per frame


def _golden_config(c: dict) -> PredictorConfig:
    """The release's constructor arguments -> PredictorConfig (num_frames/tubelet_size do not matter)."""
    return PredictorConfig(
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        embed_dim=c["embed_dim"],
        predictor_embed_dim=c["predictor_embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        action_dim=c["action_embed_dim"],
    )


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN / "predictor.pt", weights_only=False)


@pytest.fixture(scope="module")
def golden_loss() -> dict:
    return torch.load(GOLDEN / "loss.pt", weights_only=False)


def _golden_model(golden: dict) -> ACPredictor:
    model = ACPredictor(_golden_config(golden["config"]))
    load_strict(model, golden["state_dict"], source=str(GOLDEN / "predictor.pt"))
    return model


def _tiny_batch(num_t: int, seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw features [B, T*hw, D], actions [B, T-1, 7] and states [B, T, 7] of a random clip."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, num_t * TINY.tokens_per_frame, TINY.embed_dim, generator=g) * 3 + 1
    actions = torch.randn(batch, num_t - 1, TINY.action_dim, generator=g) * 0.1
    states = torch.randn(batch, num_t, TINY.action_dim, generator=g)
    return feats, actions, states


def _grads(model: ACPredictor) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# -- golden fixtures from the released code ------------------------------------------------------


def test_golden_forward(golden: dict) -> None:
    model = _golden_model(golden).eval()
    with torch.no_grad():
        out = model(golden["z"], golden["actions"], golden["states"])
    assert out.shape == golden["output"].shape
    assert (out - golden["output"]).abs().max().item() <= 1e-5


def test_golden_loss_and_gradients(golden: dict, golden_loss: dict) -> None:
    model = _golden_model(golden).train()
    tf, roll = ac_loss(
        model, golden_loss["features"], golden_loss["actions"], golden_loss["states"], golden_loss["auto_steps"]
    )
    assert abs(tf.item() - golden_loss["teacher_forcing_loss"].item()) <= 1e-5
    assert abs(roll.item() - golden_loss["rollout_loss"].item()) <= 1e-5
    (tf + roll).backward()
    grads = _grads(model)
    assert {n for n, g in grads.items() if g is not None} == set(golden_loss["grads"])
    assert grads["extrinsics_encoder.weight"] is None and grads["extrinsics_encoder.bias"] is None
    for name, expected in golden_loss["grads"].items():
        torch.testing.assert_close(grads[name], expected, atol=1e-5, rtol=1e-5, msg=name)


def test_loss_accepts_per_frame_features(golden: dict, golden_loss: dict) -> None:
    model = _golden_model(golden)
    feats = golden_loss["features"]  # [B, T*hw, D]
    per_frame = feats.unflatten(1, (golden_loss["states"].shape[1], -1))  # [B, T, hw, D]
    with torch.no_grad():
        flat = ac_loss(model, feats, golden_loss["actions"], golden_loss["states"])
        split = ac_loss(model, per_frame, golden_loss["actions"], golden_loss["states"])
    assert torch.equal(flat[0], split[0]) and torch.equal(flat[1], split[1])


def test_rollout_matches_loss_rollout(golden: dict, golden_loss: dict) -> None:
    """rollout() from frame 0 gives the frames the loss's rollout compares (auto_steps = 2)."""
    model = _golden_model(golden)
    feats, actions, states = golden_loss["features"], golden_loss["actions"], golden_loss["states"]
    h = layer_norm_features(feats)  # [B, T*hw, D]
    hw = feats.shape[1] // states.shape[1]
    with torch.no_grad():
        pred = rollout(model, h[:, :hw], actions, states, steps=2)  # [B, 2, hw, D]
        _, roll = ac_loss(model, feats, actions, states, auto_steps=2)
    assert pred.shape == (feats.shape[0], 2, hw, feats.shape[-1])
    mine = (pred.flatten(1, 2) - h[:, hw : 3 * hw]).abs().mean()
    assert abs(mine.item() - roll.item()) <= 1e-5
    assert abs(roll.item() - golden_loss["rollout_loss"].item()) <= 1e-5


# -- released-checkpoint loading -----------------------------------------------------------------


def _save_release_like(path: Path, state: dict[str, torch.Tensor]) -> None:
    wrapped = {"module.backbone." + k: v for k, v in state.items()}
    torch.save({"encoder": {"module.backbone.patch_embed.proj.bias": torch.zeros(3)}, "predictor": wrapped}, path)


def test_checkpoint_loads_with_prefixes(tmp_path: Path, golden: dict) -> None:
    cfg = _golden_config(golden["config"])
    path = tmp_path / "vjepa2-ac.pt"
    _save_release_like(path, golden["state_dict"])
    model = build_predictor(cfg, str(path))
    for key, value in golden["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert set(model.state_dict()) == set(golden["state_dict"])
    with torch.no_grad():
        out = model(golden["z"], golden["actions"], golden["states"])
    assert (out - golden["output"]).abs().max().item() <= 1e-5


def test_checkpoint_missing_key(tmp_path: Path, golden: dict) -> None:
    state = dict(golden["state_dict"])
    del state["predictor_blocks.1.attn.proj.bias"]
    path = tmp_path / "missing.pt"
    _save_release_like(path, state)
    with pytest.raises(CheckpointError, match="missing") as err:
        build_predictor(_golden_config(golden["config"]), str(path))
    assert str(path) in str(err.value) and "predictor_blocks.1.attn.proj.bias" in str(err.value)


def test_checkpoint_unexpected_key(tmp_path: Path, golden: dict) -> None:
    state = dict(golden["state_dict"])
    state["predictor_blocks.0.attn.q_norm.weight"] = torch.ones(64)
    path = tmp_path / "unexpected.pt"
    _save_release_like(path, state)
    with pytest.raises(CheckpointError, match="unexpected") as err:
        build_predictor(_golden_config(golden["config"]), str(path))
    assert str(path) in str(err.value) and "predictor_blocks.0.attn.q_norm.weight" in str(err.value)


# -- block-causal structure ----------------------------------------------------------------------


def test_block_causal_mask_layout() -> None:
    mask = block_causal_mask(3, 2)  # 3 steps of 2 tokens
    expected = torch.tensor(
        [[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 1]] * 2, dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    assert torch.equal(block_causal_mask(2, 2, past=1), expected[2:])  # new steps' rows after one cached step


@pytest.mark.parametrize("what", ["frame", "action", "state"])
def test_perturbing_step_t_changes_only_steps_from_t(what: str) -> None:
    model = build_predictor(TINY, seed=3).eval()
    num_t, hw, t = 4, TINY.tokens_per_frame, 2
    feats, _, states = _tiny_batch(num_t)
    actions = torch.randn(2, num_t, 7)
    z, a, s = feats.clone(), actions.clone(), states.clone()
    if what == "frame":
        z[:, t * hw : (t + 1) * hw] += 1.0
    elif what == "action":
        a[:, t] += 1.0
    else:
        s[:, t] += 1.0
    with torch.no_grad():
        base = model(feats, actions, states).unflatten(1, (num_t, hw))  # [B, T, hw, D]
        moved = model(z, a, s).unflatten(1, (num_t, hw))  # [B, T, hw, D]
    assert torch.equal(base[:, :t], moved[:, :t])
    for step in range(t, num_t):
        assert (base[:, step] - moved[:, step]).abs().max() > 1e-4, step


def test_any_number_of_steps_and_mask_cache() -> None:
    model = build_predictor(TINY, seed=0)
    feats, _, states = _tiny_batch(3)
    actions = torch.randn(2, 3, 7)
    with torch.no_grad():
        for num_t in (1, 2, 3):
            out = model(feats[:, : num_t * 4], actions[:, :num_t], states[:, :num_t])
            assert out.shape == (2, num_t * 4, TINY.embed_dim)
        again = model(feats[:, :4], actions[:, :1], states[:, :1])
    assert torch.equal(again, model(feats[:, :4], actions[:, :1], states[:, :1]).detach())
    assert len(model._layouts) == 3  # one mask per T, reused


# -- init ----------------------------------------------------------------------------------------


def test_init_is_seeded_and_leaves_global_rng_alone() -> None:
    rng = torch.random.get_rng_state()
    a, b, c = (build_predictor(TINY, seed=s) for s in (0, 0, 1))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest(c)


def test_init_statistics_and_depth_scaling() -> None:
    cfg = PredictorConfig(embed_dim=64, predictor_embed_dim=256, depth=2, num_heads=4, img_size=32)
    model = build_predictor(cfg, seed=0)
    fc1 = model.predictor_blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.03)
    assert fc1.abs().max().item() <= 2.0
    assert torch.count_nonzero(model.predictor_blocks[0].attn.qkv.bias) == 0
    assert torch.equal(model.predictor_norm.weight, torch.ones(256))
    assert torch.count_nonzero(model.predictor_norm.bias) == 0
    for layer_id, block in enumerate(model.predictor_blocks, start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.05)
    block2 = model.predictor_blocks[1].attn.proj.weight  # scaled by 1/sqrt(2*2)
    unscaled = model.predictor_blocks[1].attn.qkv.weight  # same init, no depth scaling
    assert (unscaled.std() / block2.std()).item() == pytest.approx(math.sqrt(4.0), rel=0.03)


# -- contract ------------------------------------------------------------------------------------


def test_loss_shapes_and_gradients_reach_every_used_parameter() -> None:
    model = build_predictor(TINY, seed=1)
    feats, actions, states = _tiny_batch(4)
    feats.requires_grad_(True)
    tf, roll = ac_loss(model, feats, actions, states, auto_steps=2)
    assert tf.shape == () and roll.shape == () and torch.isfinite(tf) and torch.isfinite(roll)
    (tf + roll).backward()
    assert feats.grad is None  # targets and inputs are detached: only the predictor learns
    for name, param in model.named_parameters():
        if name.startswith("extrinsics_encoder."):
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


def test_rollout_shapes_and_layer_norm() -> None:
    model = build_predictor(TINY, seed=2)
    feats, actions, states = _tiny_batch(4)
    h0 = layer_norm_features(feats[:, :4])  # [B, hw, D]
    with torch.no_grad():
        pred = rollout(model, h0, actions, states, steps=3)
    assert pred.shape == (2, 3, 4, TINY.embed_dim)
    assert not torch.isnan(pred).any()
    torch.testing.assert_close(pred.mean(-1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        rollout(model, h0, actions, states, steps=4)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_cached_rollout_equals_the_full_one(steps: int) -> None:
    """Keys and values of the frames already predicted are kept: each later step computes only its own
    tokens, and the frames equal those of recomputing the whole history, up to float rounding."""
    model = build_predictor(TINY, seed=2).eval()
    feats, actions, states = _tiny_batch(5, batch=3)
    h0 = layer_norm_features(feats[:, :4])  # [B, hw, D]
    with torch.no_grad():
        full = rollout(model, h0, actions, states, steps)  # [B, steps, hw, D]
        cached = rollout(model, h0, actions, states, steps, cached=True)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_a_cached_forward_of_several_steps_equals_the_whole_sequences() -> None:
    """Steps after cached ones keep the block-causal rule among themselves and see every cached token."""
    model = build_predictor(TINY, seed=3).eval()
    feats, _, states = _tiny_batch(4)
    actions = torch.randn(2, 4, 7)
    with torch.no_grad():
        whole = model(feats, actions, states)  # [B, 4*hw, D]
        cache = model.new_cache()
        first = model(feats[:, :4], actions[:, :1], states[:, :1], cache=cache)  # [B, hw, D]
        rest = model(feats[:, 4:], actions[:, 1:], states[:, 1:], cache=cache)  # [B, 3*hw, D]
    assert cache.steps == 4 and cache.layers[0].k.shape[2] == 4 * (TINY.cond_tokens + 4)
    torch.testing.assert_close(torch.cat((first, rest), dim=1), whole, atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_same_loss_and_gradients() -> None:
    feats, actions, states = _tiny_batch(4)
    results = []
    for flag in (False, True):
        model = build_predictor(TINY, seed=4)
        model.activation_checkpointing = flag
        tf, roll = ac_loss(model, feats, actions, states)
        (tf + roll).backward()
        results.append(((tf + roll).detach(), _grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for name, grad in grads_a.items():
        if grad is None:
            assert grads_b[name] is None
        else:
            torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_on_cpu_is_close_to_fp32() -> None:
    model = build_predictor(TINY, seed=5)
    feats, actions, states = _tiny_batch(4)
    with torch.no_grad():
        ref = sum(ac_loss(model, feats, actions, states))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tf, roll = ac_loss(model, feats, actions, states)
    assert tf.dtype == torch.float32 and torch.isfinite(tf) and torch.isfinite(roll)
    assert abs((tf + roll).item() - ref.item()) <= 0.02 * ref.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tf, roll = ac_loss(model, feats, actions, states)
    (tf + roll).backward()  # backward works under autocast too
    assert model.predictor_embed.weight.grad is not None


def test_shape_errors() -> None:
    model = build_predictor(TINY, seed=0)
    feats, actions, states = _tiny_batch(3)
    with pytest.raises(ValueError):
        model(feats[:, :5], actions[:, :2], states[:, :2])  # 5 tokens for 2 steps
    with pytest.raises(ValueError):
        ac_loss(model, feats, actions[:, :1], states)  # T-1 actions needed
    with pytest.raises(ValueError):
        ac_loss(model, feats, actions, states, auto_steps=3)  # more than T-1 steps


def test_extrinsics_token_when_enabled() -> None:
    cfg = PredictorConfig(**{**TINY.to_dict(), "use_extrinsics": True})
    model = build_predictor(cfg, seed=0)
    feats, _, states = _tiny_batch(2)
    actions, extrinsics = torch.randn(2, 2, 7), torch.randn(2, 2, 6)
    out = model(feats, actions, states, extrinsics)
    assert out.shape == feats.shape
    out.sum().backward()
    assert model.extrinsics_encoder.weight.grad is not None
    with pytest.raises(ValueError, match="extrinsics"):
        model(feats, actions, states)


def test_config_dict_and_tokens_per_frame() -> None:
    cfg = PredictorConfig()
    assert cfg.tokens_per_frame == 256
    assert PredictorConfig(**cfg.to_dict()) == cfg


def test_released_size_is_about_300m_parameters() -> None:
    with torch.device("meta"):
        model = ACPredictor(PredictorConfig())
    count = sum(p.numel() for p in model.parameters())
    assert 2.9e8 < count < 3.2e8


def test_flex_attention_equals_the_dense_mask_reference(golden: dict, golden_loss: dict) -> None:
    """FlexAttention's block mask gives the release's outputs (forward here: torch has no CPU backward for
    FlexAttention; the gradient check below runs where a GPU is)."""
    import warnings

    model = _golden_model(golden).eval()
    with torch.no_grad():
        dense = model(golden["z"], golden["actions"], golden["states"])
        model.attention = "flex"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile" (the CPU reference)
            flexed = model(golden["z"], golden["actions"], golden["states"])
    torch.testing.assert_close(flexed, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flexed, golden["output"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_attention_loss_and_gradients_on_cuda(golden: dict, golden_loss: dict) -> None:
    losses, grads = {}, {}
    for attention in ("dense", "flex"):
        model = _golden_model(golden).cuda()
        model.attention = attention
        tf, roll = ac_loss(model, golden_loss["features"].cuda(), golden_loss["actions"].cuda(),
                           golden_loss["states"].cuda(), golden_loss["auto_steps"])
        (tf + roll).backward()
        losses[attention] = (tf + roll).item()
        grads[attention] = _grads(model)
    assert losses["flex"] == pytest.approx(losses["dense"], rel=1e-5)
    for name, g in grads["dense"].items():
        if g is not None:
            torch.testing.assert_close(grads["flex"][name], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_loss_compiles_as_one_graph(checkpointing: bool) -> None:
    """`train.compile` gets the whole loss (teacher forcing + rollout, every block, RoPE) as one graph, with
    activation checkpointing too: a graph break there leaves the model's forward uncompiled."""
    import torch._dynamo as dynamo

    from stages.train.loop import _LossModule

    cfg = PredictorConfig(img_size=32, patch_size=16, embed_dim=32, predictor_embed_dim=48, depth=2, num_heads=2)
    model = ACPredictor(cfg).train()
    model.activation_checkpointing = checkpointing
    z, a, s = torch.randn(2, 4, 4, 32), torch.randn(2, 3, 7), torch.randn(2, 4, 7)  # [B, T, hw, D], actions, states
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = dynamo.explain(_LossModule(model, 2))(z, a, s)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


def test_the_compiled_loss_inside_ddp_is_split_at_its_buckets(tmp_path: Path) -> None:
    """Training wraps DDP around the compiled loss: Dynamo compiles on the first call, inside DDP's forward,
    and splits the graph at DDP's gradient buckets (DDPOptimizer), so the all-reduce of a bucket can start
    while the backward of the rest still runs. Without DDP the loss is one graph; with DDP's default first
    bucket (1 MB) and one large bucket, two; with 2 MB buckets, more."""
    import torch._dynamo as dynamo
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stages.train.loop import _LossModule

    cfg = PredictorConfig(img_size=32, patch_size=16, embed_dim=32, predictor_embed_dim=256, depth=4, num_heads=4)
    inputs = torch.randn(2, 4, 4, 32), torch.randn(2, 3, 7), torch.randn(2, 4, 7)  # [B, T, hw, D], actions, states

    def graphs(bucket_mb: float | None) -> int:
        """Graphs compiled for one forward + backward of the ~13 MB model (DDP with `bucket_mb` buckets)."""
        compiled: list[torch.fx.GraphModule] = []

        def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            compiled.append(gm)
            return gm.forward

        dynamo.reset()
        loss = torch.compile(_LossModule(ACPredictor(cfg).train(), 2), backend=counting)
        if bucket_mb is not None:
            loss = DistributedDataParallel(loss, bucket_cap_mb=bucket_mb)
        tf, roll = loss(*inputs)
        (tf + roll).backward()
        return len(compiled)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        counts = [graphs(None), graphs(100.0), graphs(2.0)]
    finally:
        dist.destroy_process_group()
        dynamo.reset()
    assert counts[0] == 1 and counts[1] == 2 and counts[2] > 2, counts
