"""The FLOP model's block-causal count (MFU): only the query-key pairs the mask lets through."""

from __future__ import annotations

import pytest

from stages.bench.flops import RELEASED_PREDICTOR, predictor_forward_flops, predictor_train_flops_per_clip


def test_one_step_attends_everything() -> None:
    assert predictor_forward_flops(RELEASED_PREDICTOR, 1, causal=True) == predictor_forward_flops(RELEASED_PREDICTOR, 1)


@pytest.mark.parametrize("steps", [2, 7, 15])
def test_causal_attention_is_the_masked_fraction_of_dense(steps: int) -> None:
    """Step t attends to steps 0..t: (T+1)/2T of the T^2 step pairs; the linear layers are unchanged."""
    cfg = RELEASED_PREDICTOR
    tokens = steps * (cfg.tokens_per_frame + cfg.cond_tokens)
    dense_attention = cfg.depth * 2 * 2 * tokens**2 * cfg.predictor_embed_dim
    saved = predictor_forward_flops(cfg, steps) - predictor_forward_flops(cfg, steps, causal=True)
    assert saved == pytest.approx(dense_attention * (1 - (steps + 1) / (2 * steps)))


def test_released_step_counts_fewer_flops_causal() -> None:
    dense, causal = (predictor_train_flops_per_clip(RELEASED_PREDICTOR, 16, 2, c) for c in (False, True))
    assert 1.1 < dense / causal < 1.3  # the attention is a large share at 16 frames x 258 tokens
