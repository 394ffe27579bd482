"""The V-JEPA 2-AC action-conditioned predictor and its training loss.

Why one file for both: the predictor only means something together with how it is trained and
rolled out. The loss feeds it layer-normed features and its own layer-normed predictions, and
planning later rolls it forward the same way. Keeping the model, the loss and the rollout in one
place keeps those three in step. Everything follows the released code (docs/release.md, "The predictor" and "The loss")
so that a released ``vjepa2-ac-vitg.pt`` loads strictly and the checkpoints we write load in the
release:

- per time step t the sequence is ``[action_t, state_t, frame_t tokens]`` (plus ``extrinsics_t``
  after the state when ``use_extrinsics``);
- pre-norm blocks with a block-causal mask: every token of step t attends to all tokens of steps
  <= t, so a prediction for frame t+1 never sees the future;
- 3-D RoPE on frame tokens (time, rescaled row and column, float32 positions) and time-only RoPE on
  the action/state tokens (integer positions), as in ``stages/models/rope.py``;
- the action/state tokens are dropped at the end, then ``predictor_norm`` and ``predictor_proj``.

The loss is teacher forcing plus a short autoregressive rollout, both L1 against layer-normed
targets; ``rollout`` exposes the autoregressive part for evaluation and planning.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from stages.models.release_weights import load_strict, read_state_dict
from stages.models.rope import Rotation, autocast_dtype, grid_positions
from stages.models.vit import Block, KVCache, Mask, init_release_weights


@dataclass(frozen=True)
class PredictorConfig:
    """Size of the AC predictor; defaults are the released V-JEPA 2-AC predictor (~300 M parameters)."""

    img_size: int = 256  # training resolution of the encoder; sets the RoPE grid g = img_size / patch
    patch_size: int = 16  # encoder patch side; with img_size gives 16 x 16 = 256 tokens per frame
    embed_dim: int = 1408  # encoder width D_enc (ViT-g): width of the input features and of the output
    predictor_embed_dim: int = 1024  # predictor width P
    depth: int = 24  # number of transformer blocks
    num_heads: int = 16  # attention heads; head_dim 64 -> 20 RoPE dims per axis + 4 untouched
    mlp_ratio: float = 4.0  # MLP hidden = int(P * mlp_ratio)
    qkv_bias: bool = True  # the released qkv Linear has a bias
    norm_eps: float = 1e-6  # LayerNorm eps of the release's blocks and predictor_norm
    action_dim: int = 7  # width of actions and states (xyz, 3 Euler angles, gripper); "action_embed_dim"
    use_extrinsics: bool = False  # add a camera-extrinsics token per step (released model: no)

    def __post_init__(self) -> None:
        if self.predictor_embed_dim % self.num_heads:
            raise ValueError(
                f"predictor_embed_dim {self.predictor_embed_dim} is not a multiple of num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side at img_size (16): frame rows/columns are rescaled to this grid."""
        return self.img_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one encoded frame at img_size (256 for 256 px, patch 16)."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.predictor_embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.predictor_embed_dim * self.mlp_ratio)

    @property
    def cond_tokens(self) -> int:
        """Conditioning tokens per time step: action, state (and extrinsics)."""
        return 3 if self.use_extrinsics else 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Layout(NamedTuple):
    """Everything the blocks need about a (T, h, w) input besides the tokens themselves."""

    mask: Mask | None  # [N, N] bool (True = may attend; N = T * (K + h*w)), the same rule as a BlockMask, or
    # for steps after cached ones [N_new, N_past + N_new] (None: one new step, which sees everything)
    frame_t: Tensor  # [T, 1] float32 time of frame tokens
    frame_r: Tensor  # [h*w] float32 row, rescaled to the training grid
    frame_c: Tensor  # [h*w] float32 column, rescaled to the training grid
    cond_t: Tensor  # [T, 1] int64 time of action/state tokens
    num_t: int  # time steps T
    hw: int  # frame tokens per step


def block_causal_mask(num_t: int, tokens_per_step: int, device: torch.device | str | None = None,
                      past: int = 0) -> Tensor:
    """Boolean [N, N] mask (True = may attend) where each token of step t sees every token of steps <= t.

    Within a step attention is full (actions, states and frame tokens see each other), so the
    prediction for frame t+1 can use a_t and s_t but nothing from later steps. With `past` steps already
    in a key/value cache, the rows are the `num_t` new steps and the columns all steps: [N_new, N_past + N_new].
    """
    key_step = torch.arange((past + num_t) * tokens_per_step, device=device) // tokens_per_step  # [N_past + N]
    query_step = key_step[past * tokens_per_step :]  # [N]
    return query_step[:, None] >= key_step[None, :]  # [N, N_past + N]


def block_causal_block_mask(num_t: int, tokens_per_step: int, device: torch.device | str) -> BlockMask:
    """The block-causal rule as FlexAttention's BlockMask: fully masked tiles are skipped, and the [N, N]
    boolean mask never exists during attention (it is evaluated once here, per (T, hw, device))."""
    n = num_t * tokens_per_step

    def may_attend(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q // tokens_per_step) >= (kv // tokens_per_step)

    return create_block_mask(may_attend, None, None, n, n, device=device)


@dataclass
class PredictorCache:
    """Per block, the keys and values of the steps a rollout has computed (`ACPredictor.new_cache`)."""

    layers: list[KVCache]
    steps: int = 0  # time steps cached


def _rotate_kinds(x: Tensor, lay: _Layout, n_cond: int, cond: Rotation, frame: Rotation) -> Tensor:
    """RoPE per token kind on q or k [B, heads, N, hd], re-assembled per step in [a, s, frame] order.

    Action/state tokens turn by their integer time only (in x's dtype), frame tokens by float32
    (time, row, column) like the release (`cond` and `frame`: this forward's tables). A Linear acts on
    each token alone, so one qkv over the whole sequence equals the release's per-kind qkv.
    """
    x = x.unflatten(2, (lay.num_t, n_cond + lay.hw))  # [B, heads, T, K + hw, hd]
    turned = (cond(x[:, :, :, :n_cond]), frame(x[:, :, :, n_cond:]))  # [B, heads, T, K, hd], [.., T, hw, hd]
    return torch.cat(turned, dim=3).flatten(2, 3)  # [B, heads, N, hd]


class ACPredictor(nn.Module):
    """V-JEPA 2-AC predictor: (z [B, T*hw, D_enc], actions [B, T, 7], states [B, T, 7]) -> [B, T*hw, D_enc].

    Output frame t is the prediction of the features of frame t+1. Works for any T >= 1 (the rollout
    calls it with a growing T). ``state_dict()`` keys are the release's names, without prefix.
    """

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        P = cfg.predictor_embed_dim
        self.predictor_embed = nn.Linear(cfg.embed_dim, P)
        self.action_encoder = nn.Linear(cfg.action_dim, P)
        self.state_encoder = nn.Linear(cfg.action_dim, P)
        # Always created (6 = action_dim - 1 inputs, as in the release) so released checkpoints load.
        self.extrinsics_encoder = nn.Linear(cfg.action_dim - 1, P)
        self.predictor_blocks = nn.ModuleList(
            Block(P, cfg.num_heads, cfg.mlp_hidden_dim, cfg.qkv_bias, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.predictor_norm = nn.LayerNorm(P, eps=cfg.norm_eps)
        self.predictor_proj = nn.Linear(P, cfg.embed_dim)
        self.activation_checkpointing: bool = False  # recompute blocks in backward to save memory
        self.attention: Literal["dense", "flex"] = "dense"  # dense mask + SDPA (the release), or FlexAttention
        self._layouts: dict[tuple[int, int, str, str], _Layout] = {}  # (T, hw, device, attention) -> layout
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        init_release_weights(self, self.predictor_blocks, generator)

    def new_cache(self) -> PredictorCache:
        """An empty key/value cache for `forward(..., cache=)`: a rollout's later steps then compute only the
        newest frame's tokens (planning, evaluation), not the whole history again."""
        return PredictorCache([KVCache() for _ in self.predictor_blocks])

    def forward(self, z: Tensor, actions: Tensor, states: Tensor, extrinsics: Tensor | None = None,
                cache: PredictorCache | None = None) -> Tensor:
        """With `cache`, z, actions and states are the steps after those cached, which they attend to; the
        cache grows by them. Outputs equal those of the whole sequence's forward up to float rounding."""
        num_t = actions.shape[1]
        hw = self._check_inputs(z, actions, states, extrinsics)
        lay = self._layout(num_t, hw, z.device, 0 if cache is None else cache.steps)
        x = self.predictor_embed(z).unflatten(1, (num_t, hw))  # [B, T, hw, P]
        cond = [self.action_encoder(actions), self.state_encoder(states)]  # 2 x [B, T, P]
        if self.cfg.use_extrinsics:
            cond.append(self.extrinsics_encoder(extrinsics))  # [B, T, P]
        cond_tokens = torch.stack(cond, dim=2)  # [B, T, K, P]
        x = torch.cat((cond_tokens, x), dim=2).flatten(1, 2)  # [B, T*(K+hw), P]
        qk, head_dim = autocast_dtype(x), self.cfg.predictor_embed_dim // self.cfg.num_heads  # q and k's
        rotate = functools.partial(  # tables built once, before the (checkpointed, compiled) blocks use them
            _rotate_kinds, lay=lay, n_cond=self.cfg.cond_tokens,
            cond=Rotation([lay.cond_t]).build(qk, head_dim, x.device),
            frame=Rotation([lay.frame_t, lay.frame_r, lay.frame_c]).build(qk, head_dim, x.device))
        for i, block in enumerate(self.predictor_blocks):
            if cache is not None:
                x = block(x, rotate, lay.mask, cache.layers[i])  # [B, T*(K+hw), P]
            elif self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, rotate, lay.mask, use_reentrant=False)  # [B, T*(K+hw), P]
            else:
                x = block(x, rotate, lay.mask)  # [B, T*(K+hw), P]
        if cache is not None:
            cache.steps += num_t
        x = x.unflatten(1, (num_t, -1))[:, :, self.cfg.cond_tokens :].flatten(1, 2)  # [B, T*hw, P]
        return self.predictor_proj(self.predictor_norm(x))  # [B, T*hw, D_enc]

    def _check_inputs(self, z: Tensor, actions: Tensor, states: Tensor, extrinsics: Tensor | None) -> int:
        """Validate shapes; return hw, the frame tokens per time step."""
        num_t = actions.shape[1]
        if z.dim() != 3 or z.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"expected z [B, T*hw, {self.cfg.embed_dim}], got {tuple(z.shape)}")
        if num_t < 1 or states.shape[:2] != actions.shape[:2] or actions.shape[0] != z.shape[0]:
            raise ValueError(
                f"actions {tuple(actions.shape)} and states {tuple(states.shape)} must be [B, T, "
                f"{self.cfg.action_dim}] with the batch of z {tuple(z.shape)}"
            )
        if z.shape[1] % num_t:
            raise ValueError(f"z has {z.shape[1]} tokens, not a multiple of T = {num_t}")
        if self.cfg.use_extrinsics and (extrinsics is None or extrinsics.shape[:2] != actions.shape[:2]):
            raise ValueError("use_extrinsics is set: pass extrinsics [B, T, action_dim - 1]")
        return z.shape[1] // num_t

    def _mask(self, num_t: int, tokens_per_step: int, device: torch.device, past: int) -> Mask | None:
        """The block-causal mask of `_Layout.mask`: steps after cached ones attend densely (one new step sees
        every token: no mask); a whole sequence as `self.attention` wants it."""
        if past:
            return None if num_t == 1 else block_causal_mask(num_t, tokens_per_step, device, past)  # [N, N_past + N]
        if self.attention == "flex":
            return block_causal_block_mask(num_t, tokens_per_step, device)
        return block_causal_mask(num_t, tokens_per_step, device)  # [N, N]

    def _layout(self, num_t: int, hw: int, device: torch.device, past: int = 0) -> _Layout:
        """Mask and RoPE positions for T steps of hw frame tokens after `past` cached ones, built once per
        (T, hw, device, past).

        Frame rows/columns are scaled by g / h and g / w (g = img_size / patch), as float32 like the
        release, so a frame at another resolution spans the training grid. The frame grid is taken
        to be square (h = w = sqrt(hw)), as it is for the release's square inputs.
        """
        key = (num_t, hw, str(device), self.attention, past)
        if key not in self._layouts:
            side = math.isqrt(hw)
            if side * side != hw:
                raise ValueError(f"{hw} tokens per frame do not form a square grid")
            _, row, col = grid_positions(1, side, side, device=device)  # [hw] each
            scale = self.cfg.grid_size / side
            steps = past + torch.arange(num_t, device=device)  # [T]
            self._layouts[key] = _Layout(
                mask=self._mask(num_t, self.cfg.cond_tokens + hw, device, past),
                frame_t=steps.to(torch.float32)[:, None],  # [T, 1]
                frame_r=row.to(torch.float32) * scale,  # [hw]
                frame_c=col.to(torch.float32) * scale,  # [hw]
                cond_t=steps[:, None],  # [T, 1]
                num_t=num_t,
                hw=hw,
            )
        return self._layouts[key]


def build_predictor(
    cfg: PredictorConfig, checkpoint: str | Path | None = None, checkpoint_key: str = "predictor", seed: int = 0
) -> ACPredictor:
    """A predictor with seeded random weights (training from scratch) or a released file's weights.

    Built on the meta device and materialised once, so there is no throw-away init and the global RNG
    is untouched; random weights come from a local generator and are bit-identical per (cfg, seed).
    A checkpoint loads strictly: any missing or unexpected key is a CheckpointError naming the file.
    The model is returned in train mode with gradients enabled; call ``.eval()`` for planning.
    """
    with torch.device("meta"):
        model = ACPredictor(cfg)
    model.to_empty(device="cpu")
    if checkpoint is None:
        model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    else:
        state = read_state_dict(checkpoint, checkpoint_key)
        load_strict(model, state, source=f"{checkpoint}[{checkpoint_key!r}]")
    return model


def layer_norm_features(x: Tensor) -> Tensor:
    """Layer norm over the last dim without affine weights, in float32 ("normalize_reps").

    Targets and the predictor's inputs/outputs live on this scale, so an L1 distance between them is
    comparable across dims. The release calls ``F.layer_norm`` with its default eps (1e-5), which
    autocast runs in float32; autocast is switched off here so the same holds on every device.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.layer_norm(x.float(), (x.shape[-1],))  # [..., D]


def _extend(predictor: ACPredictor, z: Tensor, actions: Tensor, states: Tensor, steps: int, hw: int) -> Tensor:
    """Append ``steps`` predicted frames to the context z [B, k*hw, D], one at a time.

    With n frames in z, the predictor sees actions/states of steps < n (ground-truth states; only the
    frames are the model's own) and its last output frame, layer-normed, becomes frame n.
    """
    for _ in range(steps):
        n = z.shape[1] // hw
        nxt = layer_norm_features(predictor(z, actions[:, :n], states[:, :n]))[:, -hw:]  # [B, hw, D]
        z = torch.cat((z, nxt), dim=1)  # [B, (n+1)*hw, D]
    return z


def _extend_cached(predictor: ACPredictor, z: Tensor, actions: Tensor, states: Tensor, steps: int, hw: int
                   ) -> Tensor:
    """`_extend` with a key/value cache: each step after the first computes only the newest frame's tokens."""
    cache, n = predictor.new_cache(), z.shape[1] // hw
    out = predictor(z, actions[:, :n], states[:, :n], cache=cache)[:, -hw:]  # [B, hw, D]
    frames = [z]
    for k in range(steps):
        frames.append(layer_norm_features(out))  # [B, hw, D]: frame n + k
        if k + 1 < steps:
            m = n + k  # the step of the frame just predicted
            out = predictor(frames[-1], actions[:, m : m + 1], states[:, m : m + 1], cache=cache)  # [B, hw, D]
    return torch.cat(frames, dim=1)  # [B, (n+steps)*hw, D]


def rollout(predictor: ACPredictor, h0: Tensor, actions: Tensor, states: Tensor, steps: int,
            cached: bool = False) -> Tensor:
    """Predict ``steps`` frames autoregressively from the layer-normed first frame h0 [B, hw, D].

    actions/states are [B, >= steps, 7]; step n uses actions[:, :n+1] and ground-truth states[:, :n+1],
    as in the loss. Returns [B, steps, hw, D], each frame layer-normed. Gradients flow if enabled:
    wrap in ``torch.no_grad()`` for evaluation and planning. `cached` keeps the keys and values of the
    frames already predicted (the same result up to float rounding, cheaper the longer the rollout).
    """
    if actions.shape[1] < steps or states.shape[1] < steps:
        raise ValueError(f"{steps} steps need >= {steps} actions and states, got {actions.shape[1]}, {states.shape[1]}")
    hw = h0.shape[1]
    z = (_extend_cached if cached else _extend)(predictor, h0, actions, states, steps, hw)  # [B, (1+steps)*hw, D]
    return z[:, hw:].unflatten(1, (steps, hw))  # [B, steps, hw, D]


def ac_loss(
    predictor: ACPredictor, features: Tensor, actions: Tensor, states: Tensor, auto_steps: int = 2
) -> tuple[Tensor, Tensor]:
    """(teacher-forcing L1, rollout L1) of a T-frame clip, exactly as the release trains (docs/release.md, "The loss").

    features: raw encoder features [B, T*hw, D] or [B, T, hw, D]; actions [B, T-1, 7]; states [B, T, 7].
    Targets are layer-normed and detached, so gradients reach only the predictor. Teacher forcing
    predicts frames 1..T-1 from ground-truth frames 0..T-2; the rollout starts from frame 0 and the
    first teacher-forced prediction and feeds its own predictions back for ``auto_steps`` frames.
    """
    num_t = states.shape[1]
    if features.dim() == 4:
        features = features.flatten(1, 2)  # [B, T*hw, D]
    if features.shape[1] % num_t or actions.shape[1] != num_t - 1:
        raise ValueError(
            f"features {tuple(features.shape)}, actions {tuple(actions.shape)}, states {tuple(states.shape)}: "
            "need T frames, T-1 actions, T states"
        )
    if not 1 <= auto_steps <= num_t - 1:
        raise ValueError(f"auto_steps {auto_steps} must be in [1, T-1 = {num_t - 1}]")
    hw = features.shape[1] // num_t
    h = layer_norm_features(features.detach())  # [B, T*hw, D]

    z_tf = layer_norm_features(predictor(h[:, :-hw], actions, states[:, :-1]))  # [B, (T-1)*hw, D]
    tf_loss = (z_tf - h[:, hw:]).abs().mean()

    z = torch.cat((h[:, :hw], z_tf[:, :hw]), dim=1)  # [B, 2*hw, D]
    z = _extend(predictor, z, actions, states, auto_steps - 1, hw)  # [B, (1+auto_steps)*hw, D]
    z_ar = z[:, hw:]  # [B, auto_steps*hw, D]
    roll_loss = (z_ar - h[:, hw : (auto_steps + 1) * hw]).abs().mean()
    return tf_loss, roll_loss
