"""The FLOP model of one training step, cached vs online: what the cache can save, before measuring it.

Counted are the matrix multiplies (2 FLOPs per multiply-add), which are nearly all of the work:

- encoder forward per frame (V-JEPA 2-AC encodes every frame alone, as one tubelet of the frame twice):
  patch embedding + per block qkv, attention scores and values (N^2), projection, MLP;
- predictor forward per clip: the teacher-forcing pass over T-1 steps plus the rollout's extra passes
  (step n of `auto_steps` re-runs the predictor on n+1 steps), each step being the frame's tokens plus
  the action and state tokens; attention counted dense (N^2), as the release's SDPA computes it (for MFU,
  `causal` counts only what the block-causal mask lets through, (T+1)/2T of it: the model's FLOPs);
- training = 3x forward (the backward pass costs about twice the forward).

An online step costs T encoder forwards plus the predictor's training; a cached step the predictor's
training alone. Their ratio is the speedup the cache can give when nothing else (decoding, I/O) counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.models.predictor import PredictorConfig
from stages.models.vit import ViTConfig

TRAIN_FACTOR = 3.0  # forward + backward ~ 3x forward
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
RELEASED_ENCODER = ViTConfig()  # ViT-g/16 at 256 px
RELEASED_PREDICTOR = PredictorConfig()  # 24 x 1024 on ViT-g features


def _block(tokens: int, dim: int, hidden: int, attended: float = 1.0) -> float:
    """Forward FLOPs of one pre-norm transformer block over `tokens` tokens (`attended`: the fraction of
    query-key pairs a mask lets through)."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim * attended  # scores and weighted values over all heads
    return float(linear + attention)


def encoder_flops_per_frame(cfg: ViTConfig) -> float:
    """One frame through the encoder (a tubelet of the frame repeated), forward."""
    tokens = cfg.tokens_per_frame
    patch = 2 * tokens * (3 * cfg.tubelet_size * cfg.patch_size**2) * cfg.embed_dim
    return patch + cfg.depth * _block(tokens, cfg.embed_dim, cfg.mlp_hidden_dim)


def predictor_forward_flops(cfg: PredictorConfig, steps: int, causal: bool = False) -> float:
    """The predictor over `steps` time steps (frames + action + state tokens each), forward; attention
    dense, or (causal) only the pairs the block-causal mask allows: step t sees steps 0..t."""
    hw, P = cfg.tokens_per_frame, cfg.predictor_embed_dim
    tokens = steps * (hw + cfg.cond_tokens)
    io = 2 * steps * hw * cfg.embed_dim * P * 2  # predictor_embed in, predictor_proj out
    attended = (steps + 1) / (2 * steps) if causal else 1.0
    return io + cfg.depth * _block(tokens, P, cfg.mlp_hidden_dim, attended)


def predictor_train_flops_per_clip(cfg: PredictorConfig, frames: int, auto_steps: int = 2,
                                   causal: bool = False) -> float:
    """Teacher forcing over frames-1 steps plus the rollout's passes, forward and backward."""
    forward = predictor_forward_flops(cfg, frames - 1, causal)
    forward += sum(predictor_forward_flops(cfg, n + 1, causal) for n in range(1, auto_steps))
    return TRAIN_FACTOR * forward


@dataclass(frozen=True)
class StepModel:
    """FLOPs of one clip's training step, cached and online, and what follows from them."""

    frames: int
    encoder_per_frame: float
    predictor_per_clip: float  # training (forward + backward)

    @property
    def online_per_clip(self) -> float:
        return self.frames * self.encoder_per_frame + self.predictor_per_clip

    @property
    def encoder_share(self) -> float:
        """The encoder's share of an online step."""
        return self.frames * self.encoder_per_frame / self.online_per_clip

    @property
    def speedup(self) -> float:
        """Cached over online, by FLOPs alone (no decoding, no I/O)."""
        return self.online_per_clip / self.predictor_per_clip

    def clips_per_second(self, tflops: float) -> float:
        """Cached training clips/s of one accelerator that achieves `tflops` on the predictor."""
        return tflops * 1e12 / self.predictor_per_clip

    def to_dict(self) -> dict[str, float]:
        return {"frames": self.frames, "encoder_flops_per_frame": self.encoder_per_frame,
                "predictor_train_flops_per_clip": self.predictor_per_clip,
                "online_flops_per_clip": self.online_per_clip, "encoder_share": self.encoder_share,
                "speedup_by_flops": self.speedup}


def step_model(encoder: ViTConfig, predictor: PredictorConfig, frames: int, auto_steps: int = 2) -> StepModel:
    return StepModel(frames, encoder_flops_per_frame(encoder),
                     predictor_train_flops_per_clip(predictor, frames, auto_steps))


def released(frames: int) -> StepModel:
    """The released V-JEPA 2-AC setup: ViT-g/16 at 256 px, the 24 x 1024 predictor, `frames` per clip."""
    return step_model(RELEASED_ENCODER, RELEASED_PREDICTOR, frames)
