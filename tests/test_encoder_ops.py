"""The compiled LayerNorm and attention (src/encoder_ops.h) against the encoder's NumPy references."""
from __future__ import annotations

import numpy as np
import pytest

from pyfff import _encoder_ops
from pyfff.encoder._forward import _attention_groups, attention_reference, layer_norm_


@pytest.mark.parametrize("m,h", [(0, 8), (1, 1), (7, 37), (97, 768), (5, 16)])
def test_layer_norm(rng, m, h):
    x = (rng.standard_normal((m, h)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(h).astype(np.float32)
    b = rng.standard_normal(h).astype(np.float32)
    x0 = x.copy()
    ref = layer_norm_(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)
    out = np.empty_like(x)
    _encoder_ops.layer_norm(x, w, b, 1e-5, out)
    assert np.array_equal(x, x0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    _encoder_ops.layer_norm(x, w, b, 1e-5, x)                     # in place
    assert np.array_equal(x, out)
    wide = np.zeros((m, h + 9), np.float32)                        # row stride > width
    wide[:, 3:3 + h] = x0
    _encoder_ops.layer_norm(wide[:, 3:3 + h], w, b, 1e-5, wide[:, 3:3 + h])
    assert np.array_equal(wide[:, 3:3 + h], out)


def _attention_case(rng, B, S, NH, HD, padded):
    H = NH * HD
    qkv = rng.standard_normal((B, S, 3 * H)).astype(np.float32)
    qkv[..., :H] *= np.float32(3 / np.sqrt(HD))                     # sharp-ish softmax
    mask_add = None
    if padded:
        lengths = rng.integers(1, S + 1, size=B)
        mask = (np.arange(S)[None] < lengths[:, None])
        mask_add = ((~mask).astype(np.float32) * np.float32(np.finfo(np.float32).min))
    ref = np.empty((B, S, NH, HD), np.float32)
    for bs, hs in _attention_groups(B, NH, 1):
        attention_reference(qkv.reshape(B, S, 3, NH, HD), ref, None if mask_add is None else mask_add[:, None, None, :],
                            bs, hs)
    return qkv, mask_add, ref.reshape(B, S, H)


@pytest.mark.parametrize("B,S,NH,HD", [(1, 1, 1, 1), (2, 7, 3, 12), (3, 33, 2, 16), (1, 128, 12, 64), (2, 17, 4, 5)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention(rng, B, S, NH, HD, padded):
    qkv, mask_add, ref = _attention_case(rng, B, S, NH, HD, padded)
    qkv0 = qkv.copy()
    ctx = np.full((B, S, NH * HD), np.nan, np.float32)
    _encoder_ops.attention(qkv, mask_add, ctx, NH, 0, B, 0, NH)
    assert np.array_equal(qkv, qkv0)
    np.testing.assert_allclose(ctx, ref, rtol=1e-5, atol=1e-5)


def test_attention_groups_bitwise(rng):
    """Any split over sequences and heads gives the same bits (each (sequence, head) is computed alone)."""
    B, S, NH, HD = 3, 21, 4, 8
    qkv, mask_add, _ = _attention_case(rng, B, S, NH, HD, True)
    whole = np.zeros((B, S, NH * HD), np.float32)
    _encoder_ops.attention(qkv, mask_add, whole, NH, 0, B, 0, NH)
    for n_workers in (2, 5, 16):
        parts = np.zeros_like(whole)
        for bs, hs in _attention_groups(B, NH, n_workers):
            _encoder_ops.attention(qkv, mask_add, parts, NH, *bs.indices(B)[:2], *hs.indices(NH)[:2])
        assert np.array_equal(parts, whole)


def test_attention_extreme_scores(rng):
    """Scores far apart (softmax of one key) and masked keys at float32 min give exact one-hot weights."""
    B, S, NH, HD = 1, 5, 1, 4
    qkv = np.zeros((B, S, 3 * HD), np.float32)
    qkv[0, :, :HD] = 100.0                         # q
    qkv[0, 2, HD:2 * HD] = 10.0                    # k of key 2 dominates (score 4000)
    qkv[0, :, 2 * HD:] = np.arange(S, dtype=np.float32)[:, None]
    ctx = np.empty((B, S, HD), np.float32)
    _encoder_ops.attention(qkv, None, ctx, NH, 0, 1, 0, 1)
    assert (ctx == 2.0).all()
    mask_add = np.zeros((B, S), np.float32)
    mask_add[0, 2] = np.finfo(np.float32).min      # mask the dominant key: the others tie at score 0
    _encoder_ops.attention(qkv, mask_add, ctx, NH, 0, 1, 0, 1)
    np.testing.assert_allclose(ctx, (0 + 1 + 3 + 4) / 4, rtol=1e-6)


def test_internal_errors():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="internal error"):
        _encoder_ops.layer_norm(x, np.ones(3, np.float32), np.zeros(3, np.float32), 1e-5, x)
    with pytest.raises(ValueError, match="internal error"):
        _encoder_ops.attention(np.zeros((1, 2, 12), np.float32), None, np.zeros((1, 2, 5), np.float32), 2, 0, 1, 0, 2)
