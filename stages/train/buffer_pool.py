"""CPU tensors that the loader reads batches into, used again once nothing refers to them any more.

Why: a batch of ViT-g windows is large (8 x 16 frames = 92 MB), and a fresh allocation of that size is
fresh pages from the kernel: zeroing them and faulting them in on first touch costs more than the checked
read itself.
Pinned buffers (a CUDA trainer) are not pooled here: torch's caching host allocator already reuses them,
and it knows when an asynchronous copy out of one has finished.

A buffer is handed out as a view of the tensor the pool keeps, and counts as free again when no other
tensor (a batch, a slice of it, a numpy array over it) shares its storage, so a caller that keeps a batch
simply makes the pool allocate another one: nothing is ever overwritten under a live reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: an unknown torch, so nothing is pooled


def _users(base: torch.Tensor) -> int:
    """How many tensors share `base`'s storage (plus the temporary storage object this call makes)."""
    return _use_count(base.untyped_storage()._cdata) if _use_count is not None else 0


Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # (shape, dtype) -> uninitialised tensor


def plain(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked, so that the copy to the GPU can be asynchronous (reused by torch's host allocator)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class BufferPool:
    """Up to `keep` reusable CPU tensors of each shape and dtype (the newest); call it as an `Allocator`."""

    def __init__(self, keep: int):
        self.keep = keep
        self._kept: dict[tuple[tuple[int, ...], torch.dtype], list[tuple[torch.Tensor, int]]] = {}  # (tensor, users
        # when only the pool holds it)
        self.allocated = 0  # fresh tensors made (for tests and benchmarks)

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor: a free kept one if there is one, else a new one (kept if there is room)."""
        kept = self._kept.setdefault((tuple(shape), dtype), [])
        for base, alone in kept:
            if _users(base) <= alone:
                return base.view(base.shape)  # a new tensor over the kept storage
        self.allocated += 1
        fresh = torch.empty(shape, dtype=dtype)
        if _use_count is None:
            return fresh
        if len(kept) >= self.keep:  # all held by callers: forget the oldest (its holder keeps it alive)
            kept.pop(0)
        kept.append((fresh, _users(fresh)))
        return fresh.view(fresh.shape)
