"""3-D rotary position embedding (RoPE) of V-JEPA 2, shared by the encoder and the AC predictor.

Why a file of its own: the encoder rotates every token by (time, row, column) and the
action-conditioned predictor rotates frame tokens the same way (with rescaled, possibly
fractional rows/columns) and its action/state tokens by time only. Released checkpoints were
trained with one particular, slightly unusual RoPE, so both models must share exactly this code:

- a head of size ``head_dim`` gives ``d = 2 * ((head_dim // 3) // 2)`` dims to each of time, row
  and column, in that order from the start of the head; the last ``head_dim - 3d`` dims are left
  alone (``rope_axis_dim``);
- per axis, ``omega_i = 1 / 10000 ** (i / (d/2))`` is computed in the dtype of the rotated tensor
  (bf16 under autocast, like the release), ``f = pos * omega``; as in the release, the power runs under
  the caller's autocast, and CUDA's autocast computes ``pow`` in float32 where the CPU's keeps bf16, so
  the tables are float32 on a GPU and bf16 on the CPU under bf16 autocast (the release does the same);
- ``cos``/``sin`` of ``f`` are laid out ``[f, f]`` (half repeated, NOT interleaved: a quirk of the
  release that the checkpoints depend on), while the partner vector pairs neighbours:
  ``y[2j] = -x[2j+1]``, ``y[2j+1] = x[2j]``; the result is ``x * cos + y * sin``.

The dtype of the positions matters in reduced precision, exactly as in the release: integer
positions make ``f`` (and cos/sin) come out in the dtype of ``x`` (the release's encoder and the
predictor's action/state tokens), float32 positions promote ``f`` to float32 (the release's
predictor frame tokens, whose rows/columns are rescaled floats). In float32 both are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROPE_THETA = 10000.0  # base of the frequency ladder, as in the release


def rope_axis_dim(head_dim: int) -> int:
    """Dims per axis (time, row, column): the largest even number <= head_dim // 3."""
    return 2 * ((head_dim // 3) // 2)


def _omega(half: int, like: Tensor) -> Tensor:
    """Frequencies 1 / theta^(i/half) in the dtype of ``like``.

    The operations (divide, power, reciprocal) follow the release's order, so bf16 rounding matches.
    """
    exponent = torch.arange(half, dtype=like.dtype, device=like.device) / float(half)  # [half]
    return 1.0 / ROPE_THETA**exponent  # [half]


def _partner(x: Tensor) -> Tensor:
    """Pairwise partner: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., d/2, 2]
    even, odd = pairs.unbind(-1)  # [..., d/2] each
    return torch.stack((-odd, even), dim=-1).flatten(-2)  # [..., d]


def axis_table(d: int, pos: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [..., N, d] of one axis at positions ``pos`` [N] (or broadcastable), for tensors like
    ``like``: frequencies in its dtype, laid out [f, f], exactly as the release computes them."""
    if d % 2:
        raise ValueError(f"RoPE needs an even number of dims per axis, got {d}")
    omega = _omega(d // 2, like)  # [d/2]
    freq = pos.to(like.device).unsqueeze(-1) * omega  # [..., N, d/2]
    cos, sin = freq.cos(), freq.sin()  # [..., N, d/2] each
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # [..., N, d] each, layout [f, f]


def rotate_axis(x: Tensor, pos: Tensor) -> Tensor:
    """Rotate ``x`` [..., N, d] by positions ``pos`` [N] (or any shape broadcastable to [..., N]).

    Returns a tensor of the dtype of ``x``. Where the release would hand attention a promoted
    (float32) tensor, casting back here gives the same numbers as autocast's cast before attention.
    """
    return apply_table(x, *axis_table(x.shape[-1], pos, x))


def head_table(head_dim: int, axes: list[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [..., N, head_dim] of a whole head: the first d dims follow ``axes[0]``, the next d
    ``axes[1]``, ...; the dims after them pass through (cos 1, sin 0).

    Why: a model applies the same rotation in every layer, to q and to k; built once per forward, the
    table turns each application into one multiply-add over the head, where the per-axis form recomputed
    the frequencies and concatenated four pieces every time. Element by element the arithmetic is the
    release's (pass-through dims: x * 1 + y * 0 = x).
    """
    d = rope_axis_dim(head_dim)
    tables = [axis_table(d, pos, like) for pos in axes]
    shape = torch.broadcast_shapes(*(cos.shape[:-1] for cos, _ in tables))
    rest = head_dim - d * len(axes)
    one = torch.ones((*shape, rest), dtype=tables[0][0].dtype, device=like.device)  # [..., N, rest]
    cos = torch.cat([c.expand(*shape, d) for c, _ in tables] + [one], dim=-1)  # [..., N, head_dim]
    sin = torch.cat([s.expand(*shape, d) for _, s in tables] + [torch.zeros_like(one)], dim=-1)  # [..., N, hd]
    return cos, sin


def apply_table(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + partner(x) * sin`` in the dtype the release computes it in, cast back to ``x``'s."""
    return (x * cos + _partner(x) * sin).to(x.dtype)  # [..., N, d]


class Rotation:
    """The RoPE of one forward pass: its table is built once per (dtype, head_dim) of what it rotates (q
    and k under autocast), and reused by every layer after that.

    `build` makes the table ahead of the layers: under torch.compile, filling the cache inside an
    activation-checkpointed block (a higher-order op) is a graph break; built before them, each layer
    only looks it up. A table not built ahead is built on first use.
    """

    def __init__(self, axes: list[Tensor]):
        self.axes = axes  # positions per axis, e.g. [time, row, column], each [N] or broadcastable
        self._tables: dict[tuple[torch.dtype, int], tuple[Tensor, Tensor]] = {}

    def build(self, dtype: torch.dtype, head_dim: int, device: torch.device) -> Rotation:
        """The table for tensors of `dtype` and `head_dim`, made now (in the caller's autocast state)."""
        if (dtype, head_dim) not in self._tables:
            like = torch.empty(0, dtype=dtype, device=device)
            self._tables[(dtype, head_dim)] = head_table(head_dim, self.axes, like)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` [..., N, head_dim] rotated (see `head_table`)."""
        return apply_table(x, *self.build(x.dtype, x.shape[-1], x.device)._tables[(x.dtype, x.shape[-1])])


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear applied to ``x`` returns here: autocast's when it is on for x's device."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def grid_positions(
    num_t: int, h: int, w: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(time, row, column) of the ``num_t * h * w`` tokens of a time-major, row-major grid.

    Token n -> (n // (h*w), (n % (h*w)) // w, n % w), as int64 tensors [N] (integer positions, like
    the release's encoder; convert to float and rescale for the predictor's frame tokens).
    """
    n = torch.arange(num_t * h * w, device=device)  # [N]
    per_frame = h * w
    return n // per_frame, (n % per_frame) // w, n % w  # [N] each
