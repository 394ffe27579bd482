"""The frozen V-JEPA 2 video encoder (ViT with 3-D RoPE), as V-JEPA 2-AC uses it.

Why one file: stage 1 of the pipeline caches this encoder's features, and the cache is only worth
something if the features are the release's. So this module reproduces the released architecture
and its state-dict key names exactly (a released ``vitg.pt`` loads strictly), encodes every frame
on its own as a 2-frame tubelet like V-JEPA 2-AC does, and gives the weights a digest so the cache
fingerprint changes whenever the weights do.

Architecture (docs/release.md, "The encoder"): Conv3d tubelet/patch embedding -> pre-norm blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) with 3-D RoPE on q and k and no absolute position
embedding -> final LayerNorm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from stages.models.release_weights import load_strict, read_state_dict
from stages.models.rope import Rotation, grid_positions

INIT_STD = 0.02  # std of the truncated normal init of Linear/Conv weights (release)
INIT_CUTOFF = 2.0  # absolute truncation bound of that normal (release: +-2, i.e. ~no truncation)


@dataclass(frozen=True)
class ViTConfig:
    """Size of a V-JEPA 2 encoder; defaults are ViT-g, the encoder of V-JEPA 2-AC."""

    img_size: int = 256  # training resolution; sets tokens_per_frame (inputs may differ)
    patch_size: int = 16  # spatial side of a patch in pixels
    tubelet_size: int = 2  # frames per token along time; single frames are repeated to fill it
    embed_dim: int = 1408  # token width D
    depth: int = 40  # number of transformer blocks
    num_heads: int = 22  # attention heads; head_dim 64 gives 20 RoPE dims per axis + 4 untouched
    mlp_ratio: float = 48 / 11  # MLP hidden = int(D * mlp_ratio) = 6144 for ViT-g
    qkv_bias: bool = True  # the released qkv Linear has a bias
    norm_eps: float = 1e-6  # LayerNorm eps of the release (not torch's 1e-5)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def tokens_per_frame(self) -> int:
        """Tokens one tubelet yields at img_size (256 for 256 px, patch 16)."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VIT_PRESETS: dict[str, ViTConfig] = {
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge": ViTConfig(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "vit_giant": ViTConfig(embed_dim=1408, depth=40, num_heads=22, mlp_ratio=48 / 11),
}


class PatchEmbed3D(nn.Module):
    """Tubelet x patch tokens by one strided Conv3d, flattened time-major, then rows, then columns."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, D, T', h, w]
        return x.flatten(2).transpose(1, 2)  # [B, T'*h*w, D]


Rotate = Callable[[Tensor], Tensor]  # RoPE applied to q or k [B, heads, N, hd]


Mask = Tensor | BlockMask  # a dense boolean [N, N] mask (True = may attend) or FlexAttention's block mask


class KVCache:
    """The keys (rotated) and values one attention layer has seen, for decoding step by step: a new step's
    queries attend to them and to its own keys, so earlier tokens are never computed again."""

    def __init__(self) -> None:
        self.k: Tensor | None = None  # [B, heads, N_past, hd]
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [B, heads, N_new, hd]; return all keys and values so far."""
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)  # [B, heads, N_past + N_new, hd]
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


_FLEX: dict[str, Callable[..., Tensor]] = {}  # device type -> flex_attention (compiled on CUDA, once)


FLEX_SHAPES = 64  # compiled FlexAttention variants kept per process (one per batch, length, grad or not)


def flex(device: torch.device) -> Callable[..., Tensor]:
    """FlexAttention for a device: compiled on CUDA (the fused kernel: no [N, N] scores or mask in memory);
    the eager reference elsewhere (forward only on the CPU: torch has no CPU backward for it).

    Each shape compiles its own kernel (dynamic=False). Dynamo's default of 8 variants per function is
    too few (evaluation's horizons and last batch, training, rollout lengths, a batch-size search): past
    it, flex_attention silently falls back to the unfused form, which materialises [B, H, N, N] scores
    (~1 GB per clip and layer at the released size). So the limit is raised, process-wide, to FLEX_SHAPES.
    """
    if device.type not in _FLEX:
        if device.type == "cuda":
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_SHAPES)
            _FLEX[device.type] = torch.compile(flex_attention, dynamic=False)
        else:
            _FLEX[device.type] = flex_attention
    return _FLEX[device.type]


class Attention(nn.Module):
    """Multi-head self-attention; `rotate` puts RoPE on q and k, `mask` is optional.

    Shared by the encoder (3-D RoPE, no mask) and the AC predictor (RoPE per token kind, block-causal
    mask): both are the release's attention with key names qkv / proj. A dense boolean mask goes to
    SDPA as the release does (which rules out the flash kernel); a `BlockMask` goes to FlexAttention,
    which skips the masked blocks and never materialises the mask.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rotate: Rotate, mask: Mask | None = None, cache: KVCache | None = None) -> Tensor:
        """x [B, N, D] -> [B, N, D]; with `cache`, x holds only new tokens, which also attend to the cached ones
        (`mask` is then [N, N_past + N] or None) and are added to it."""
        B, N, D = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # [B, N, 3, heads, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, hd] each
        q, k = rotate(q), rotate(k)
        if cache is not None:
            k, v = cache.extend(k, v)  # [B, heads, N_past + N, hd] each
        if isinstance(mask, BlockMask):
            out = flex(x.device)(q, k, v, block_mask=mask)  # [B, heads, N, hd]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, N, hd]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (key names fc1/fc2 as in the release)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, N, D]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (encoder and predictor)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor, rotate: Rotate, mask: Mask | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rotate, mask, cache)  # [B, N, D]
        return x + self.mlp(self.norm2(x))  # [B, N, D]


@torch.no_grad()
def init_release_weights(model: nn.Module, blocks: nn.ModuleList, generator: torch.Generator | None = None) -> None:
    """The release's init (encoder and predictor): trunc-normal(0.02) Linear/Conv weights, zero biases,
    LayerNorm 1/0, then block l's (1-based) attn.proj and mlp.fc2 weights divided by sqrt(2 l) so the
    residual stream's variance does not grow with depth."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv3d):
            nn.init.trunc_normal_(m.weight, std=INIT_STD, a=-INIT_CUTOFF, b=INIT_CUTOFF, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class VisionTransformer(nn.Module):
    """V-JEPA 2 encoder: video [B, 3, T, H, W] -> tokens [B, (T/tubelet)*(H/p)*(W/p), D].

    H and W need not equal ``cfg.img_size``: RoPE positions come from the input's own grid.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.qkv_bias, cfg.norm_eps)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        init_release_weights(self, self.blocks, generator)

    def forward(self, x: Tensor) -> Tensor:
        num_t, h, w = self._grid(x)
        t, r, c = grid_positions(num_t, h, w, device=x.device)  # 3 x [N]
        x = self.patch_embed(x)  # [B, N, D]
        rotate = Rotation([t, r, c])  # one table for every layer's q and k
        for block in self.blocks:
            x = block(x, rotate)  # [B, N, D]
        return self.norm(x)  # [B, N, D]

    def _grid(self, x: Tensor) -> tuple[int, int, int]:
        """Token grid (T', h, w) of a video input; refuses shapes the patching would crop."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W], got {tuple(x.shape)}")
        _, _, T, H, W = x.shape
        tub, p = self.cfg.tubelet_size, self.cfg.patch_size
        if T % tub or H % p or W % p:
            raise ValueError(f"T={T} must divide by tubelet {tub}, H={H} and W={W} by patch {p}")
        return T // tub, H // p, W // p


@torch.no_grad()
def encode_frames(model: VisionTransformer, frames: Tensor) -> Tensor:
    """Encode each frame [B, 3, H, W] on its own -> [B, h*w, D] (the V-JEPA 2-AC way).

    Each frame is repeated ``tubelet_size`` times along time to form one tubelet, so its features
    cannot depend on the other frames of the batch or clip. One forward covers the whole batch.
    Runs without gradients: the encoder is frozen and its features are inputs/targets only.
    """
    if frames.dim() != 4:
        raise ValueError(f"expected frames [B, 3, H, W], got {tuple(frames.shape)}")
    tubelets = frames.unsqueeze(2).repeat(1, 1, model.cfg.tubelet_size, 1, 1)  # [B, 3, tubelet, H, W]
    return model(tubelets)  # [B, h*w, D]


def build_encoder(
    cfg: ViTConfig, checkpoint: str | Path | None, checkpoint_key: str = "target_encoder", seed: int = 0
) -> VisionTransformer:
    """A frozen encoder in eval mode: released weights from ``checkpoint``, or seeded random ones.

    The model is built on the meta device and materialised once, so construction neither costs a
    throw-away init nor touches the global RNG; random weights come from a local generator and are
    bit-identical for the same (cfg, seed). A checkpoint loads strictly, ignoring only ``pos_embed``.
    """
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    model.to_empty(device="cpu")
    if checkpoint is None:
        model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    else:
        state = read_state_dict(checkpoint, checkpoint_key)
        load_strict(model, state, source=f"{checkpoint}[{checkpoint_key!r}]", ignore=("pos_embed",))
    model.eval()
    model.requires_grad_(False)
    return model


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtypes, shapes, raw bytes), for cache fingerprints."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
        digest.update(raw.numpy().data)
    return digest.hexdigest()
