"""The int8 dense layer (src/qgemm.h via pyfff.quantize) against its NumPy reference, on every code path.

Every path computes the same int32 accumulators and shares one float epilogue, so on one machine all paths must
agree bitwise; the reference (exact integer product, float64 epilogue) must agree to float32 rounding.
Paths this CPU cannot run are listed by ``test_paths_reported``; tests/qgemm_check.c covers the others where
they run (an AMX or AVX-VNNI machine, aarch64 under qemu).
"""
from __future__ import annotations

import numpy as np
import pytest

from pyfff import _qgemm
from pyfff.quantize import (QuantizedLinear, check_quantize, int8_paths, pack_weight, quantize_activations,
                            quantize_weight, qlinear_reference)

PATHS = int8_paths()
SHAPES = [  # (M, K, N): batch 0/1/7/97, widths not a multiple of 4, 16 or 64, one panel, several panels
    (0, 37, 5), (1, 1, 1), (1, 64, 64), (7, 37, 65), (97, 100, 130), (7, 768, 64), (13, 3, 200), (97, 64, 63),
]


def _layer_inputs(rng, M, K, N, *, bias=True):
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    x = rng.standard_normal((M, K)).astype(np.float32)
    if M > 2:
        x[0] = 0.0                    # all zero: scale 0, output = bias
        x[1] = np.abs(x[1])           # all positive: zero point 0
        x[2] = -np.abs(x[2])          # all negative: zero point 255
    return x, w, b


def _scale_of(ref):
    return max(1.0, float(np.abs(ref).max())) if ref.size else 1.0


def test_paths_reported():
    assert PATHS[0] == _qgemm.default_path() or "PYFFF_INT8_PATH" in __import__("os").environ
    assert "generic" in PATHS
    assert set(PATHS) <= set(_qgemm.PATH_NAMES)
    print("int8 paths on this CPU:", PATHS, "; not runnable here:", sorted(set(_qgemm.PATH_NAMES) - set(PATHS)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("gelu", [False, True])
def test_against_reference(rng, path, M, K, N, gelu):
    x, w, b = _layer_inputs(rng, M, K, N, bias=(N % 2 == 1))
    layer = QuantizedLinear.from_float(w, b, path=path)
    q, scale = layer.weight_int8()
    ref = qlinear_reference(x, q, scale, b, gelu=gelu)
    y = layer(x, gelu=gelu)
    assert y.shape == (M, N) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6 * _scale_of(ref))
    if M > 2:                          # a zero row gives act(bias) exactly (up to the GELU approximation)
        expect = np.zeros(N) if b is None else b.astype(np.float64)
        if gelu:
            expect = qlinear_reference(np.zeros((1, K), np.float32), q, scale, b, gelu=True)[0]
        np.testing.assert_allclose(y[0], expect, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_paths_agree_bitwise(rng, M, K, N):
    x, w, b = _layer_inputs(rng, M, K, N)
    outs = {p: QuantizedLinear.from_float(w, b, path=p)(x, gelu=True) for p in PATHS}
    for p, y in outs.items():
        assert np.array_equal(y, outs["generic"]), p


@pytest.mark.parametrize("path", PATHS)
def test_row_blocks_and_strides_bitwise(rng, path):
    """A row's result never depends on the other rows, their number, or the row strides."""
    x, w, b = _layer_inputs(rng, 200, 70, 90)
    layer = QuantizedLinear.from_float(w, b, path=path)
    whole = layer(x)
    parts = np.concatenate([layer(x[s:s + 37]) for s in range(0, 200, 37)])
    assert np.array_equal(whole, parts)
    wide = np.zeros((200, 100), np.float32)
    wide[:, 5:75] = x
    out = np.zeros((200, 120), np.float32)
    layer(wide[:, 5:75], out=out[:, 10:100])             # row strides 100 and 120
    assert np.array_equal(out[:, 10:100], whole)
    assert not out[:, :10].any() and not out[:, 100:].any()
    assert np.array_equal(layer(x[7]), whole[7])          # 1-D input


@pytest.mark.parametrize("path", PATHS)
def test_accumulate(rng, path):
    x, w, b = _layer_inputs(rng, 9, 40, 70)
    layer = QuantizedLinear.from_float(w, b, path=path)
    base = rng.standard_normal((9, 70)).astype(np.float32)
    out = base.copy()
    assert layer(x, out=out, accumulate=True) is out
    np.testing.assert_allclose(out, base + layer(x), rtol=1e-6, atol=1e-6)


def test_inputs_not_modified(rng):
    x, w, b = _layer_inputs(rng, 7, 37, 65)
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    layer = QuantizedLinear.from_float(w, b)
    layer(x, gelu=True)
    assert np.array_equal(x, x0) and np.array_equal(w, w0) and np.array_equal(b, b0)


def test_activation_quantization_matches_kernel(rng):
    x = rng.standard_normal((50, 77)).astype(np.float32) * rng.uniform(1e-3, 1e3, (50, 1)).astype(np.float32)
    x[0] = 0
    x[1] = np.abs(x[1])
    x[2] = -np.abs(x[2])
    q, s, z = quantize_activations(x)
    qk, sk, zk = _qgemm.quantize_rows(x)
    assert np.array_equal(q, qk) and np.array_equal(s, sk) and np.array_equal(z, zk)
    assert s[0] == 0 and z[1] == 0 and z[2] == 255
    # dequantization error at most half a step (plus float rounding)
    err = np.abs((q.astype(np.float64) - z[:, None]) * s[:, None] - x)
    assert (err <= 0.5 * s[:, None] * (1 + 1e-5) + 1e-30).all()


def test_weight_quantization(rng):
    w = (rng.standard_normal((37, 9)) * 0.05).astype(np.float32)
    w[:, 3] = 0                                         # an all-zero channel
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.abs(q).max() == 127
    assert scale[3] == 0 and not q[:, 3].any()
    assert (np.abs(q * scale.astype(np.float64) - w) <= scale / 2 * (1 + 1e-5) + 1e-12).all()
    packed, colsum = pack_weight(q)
    assert packed.shape == (1, 16, 64, 4) and colsum.shape == (64,)
    assert np.array_equal(colsum[:9], q.sum(axis=0)) and not colsum[9:].any()
    assert packed[0, 2, 5, 1] == q[9, 5]                # packed[p, g, j, r] = q[4 g + r, 64 p + j]
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(np.array([[np.nan]], np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="at most 65536"):
        quantize_weight(np.ones((65537, 1), np.float32))


def test_errors(rng):
    x, w, b = _layer_inputs(rng, 4, 8, 6)
    layer = QuantizedLinear.from_float(w, b)
    with pytest.raises(TypeError, match="float"):
        layer(x.astype(np.int32))
    with pytest.raises(ValueError, match=r"shape \(M, 8\)"):
        layer(x[:, :7])
    with pytest.raises(ValueError, match="accumulate"):
        layer(x, accumulate=True)
    with pytest.raises(ValueError, match="shape"):
        layer(x, out=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="float32"):
        layer(x, out=np.empty((4, 6), np.float64))
    buf = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        layer(buf, out=buf[:, :6])
    with pytest.raises(ValueError, match="unknown int8 code path 'sse9'"):
        QuantizedLinear.from_float(w, b, path="sse9")
    missing = sorted(set(_qgemm.PATH_NAMES) - set(PATHS))
    if missing:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            QuantizedLinear.from_float(w, b, path=missing[0])
    with pytest.raises(ValueError, match=r"accepted: None, 'int8'"):
        check_quantize("int4")
    assert layer(x.astype(np.float64)).dtype == np.float32   # other float dtypes are cast


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_threads", [1, 2, 3, 64])
def test_threads_split_channels_bitwise(rng, path, n_threads):
    """n_threads splits the output panels between OpenMP threads: the same bits for every thread count."""
    x, w, b = _layer_inputs(rng, 21, 70, 300)              # 5 panels, the last one partial
    layer = QuantizedLinear.from_float(w, b, path=path)
    one = layer(x, gelu=True)
    assert np.array_equal(layer(x, gelu=True, n_threads=n_threads), one)
    base = rng.standard_normal((21, 300)).astype(np.float32)
    acc_one, acc_n = base.copy(), base.copy()
    layer(x, out=acc_one, accumulate=True)
    layer(x, out=acc_n, accumulate=True, n_threads=n_threads)
    assert np.array_equal(acc_n, acc_one)
