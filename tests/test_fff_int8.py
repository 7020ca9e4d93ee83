"""The int8 FFF layer (src/fff_quant.h via pyfff.fff_int8) against the float32 layer and its NumPy reference.

The contract: ``routes()`` bitwise equal to the float32 layer's on every input (the bound of src/fff_quant.h sends
every node it cannot decide to a 16-bit logit or to the float32 logit itself); outputs within
``int8_tolerance`` of the float32 layer's; bitwise the same for every thread count and every int8 code path
(the integer dot products are exact). Adversarial inputs put logits at exactly 0, just inside and just outside
the bound, and scale weights to huge and tiny magnitudes.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pyfff import FFF
from pyfff.fff_int8 import Int8FFF, int8_reference, int8_tolerance, prepare_int8
from pyfff.quantize import int8_paths

PATHS = int8_paths()
CASES = [  # (d_in, d_out, depth, n_trees)
    (1, 1, 0, 1), (37, 5, 2, 1), (64, 64, 4, 2), (100, 130, 5, 3), (17, 33, 12, 1), (768, 768, 11, 1),
]
BATCHES = [0, 1, 7, 97]


def _layer(d_in, d_out, depth, n_trees, seed=0, activation="gelu"):
    return FFF.random(d_in, d_out, depth, n_trees=n_trees, seed=seed, activation=activation)


def _x(n, d, seed=1, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((n, d)) * scale).astype(np.float32)


def _check(layer, q, x):
    """Routes equal, outputs within the derived tolerance and near the NumPy reference."""
    np.testing.assert_array_equal(q.routes(x), layer.routes(x))
    y_q, y_f = q(x), layer(x)
    assert y_q.dtype == np.float32 and y_q.shape == y_f.shape
    if x.shape[0]:
        err = np.abs(y_q.astype(np.float64) - y_f).max(axis=1)
        assert (err <= int8_tolerance(q, x)).all()
        y_ref, routes_ref, _, _ = int8_reference(q, x)
        np.testing.assert_array_equal(routes_ref, q.routes(x))
        # a node the kernel and the reference decide at different levels (their bounds' roundings differ) changes
        # that token's activation within the tolerance; every other token agrees to float32 rounding
        close = np.isclose(y_q, y_ref, rtol=1e-5, atol=1e-5 * (np.abs(y_ref).max() + 1e-30)).all(axis=1)
        assert close.mean() > 0.97
        assert (np.abs(y_q - y_ref).max(axis=1) <= 2 * int8_tolerance(q, x)).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("batch", BATCHES)
def test_routes_and_outputs(case, batch):
    layer = _layer(*case)
    _check(layer, layer.quantize("int8"), _x(batch, case[0]))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_activations(activation):
    layer = _layer(48, 20, 5, 2, activation=activation)
    _check(layer, layer.quantize("int8"), _x(97, 48))


@pytest.mark.parametrize("path", PATHS)
def test_paths_bitwise_equal(path):
    layer = _layer(100, 70, 7, 2)
    x = _x(200, 100)
    q_best, q_path = Int8FFF(layer), Int8FFF(layer, path=path)
    assert q_path.path == path
    np.testing.assert_array_equal(q_path(x), q_best(x))
    np.testing.assert_array_equal(q_path.routes(x), layer.routes(x))


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8, -1, None])
def test_threads_bitwise_equal(n_threads):
    layer = _layer(64, 40, 6, 1)
    q = layer.quantize("int8")
    x = _x(1000, 64)
    np.testing.assert_array_equal(q(x, n_threads=n_threads), q(x, n_threads=1))
    np.testing.assert_array_equal(q.routes(x, n_threads=n_threads), layer.routes(x))


def test_token_alone_equals_token_in_batch():
    layer = _layer(50, 30, 6, 2)
    q = layer.quantize("int8")
    x = _x(33, 50)
    y = q(x)
    for i in (0, 5, 32):
        np.testing.assert_array_equal(q(x[i:i + 1])[0], y[i])


def _logits_at_zero(layer, x):
    """A copy of ``layer`` whose biases put every node's float32 logit for token x[0] at (about) zero."""
    z = layer.w_in.astype(np.float64) @ x[0].astype(np.float64)
    return FFF(layer.w_in, (-z).astype(np.float32), layer.w_out, n_trees=layer.n_trees)


def test_logits_at_zero_take_the_float32_logit():
    layer = _layer(96, 16, 6, 1)
    x = _x(1, 96)
    tied = _logits_at_zero(layer, x)
    q = tied.quantize("int8")
    np.testing.assert_array_equal(q.routes(x), tied.routes(x))
    # none of these logits can be decided by a bound: every visited node takes the float32 logit
    assert q.last_stats == {"nodes": 7, "level2": 7, "float32": 7}


def test_exact_zero_logits():
    # zero input rows and zero biases: every logit is exactly 0 and goes left
    layer = FFF(np.zeros((15, 8), np.float32), np.zeros(15, np.float32), np.ones((15, 4), np.float32))
    q = layer.quantize("int8")
    x = _x(5, 8)
    np.testing.assert_array_equal(q.routes(x), layer.routes(x))
    assert (q.routes(x)[:, 0, :] == [0, 1, 3, 7]).all()
    np.testing.assert_array_equal(q(x), layer(x))


@pytest.mark.parametrize("offset", [-4, -1, 1, 4])
def test_logits_just_inside_and_outside_the_bound(offset):
    """Biases placed so a node's level-1 logit sits a few of its bounds' widths from 0, on both sides."""
    layer = _layer(64, 8, 0, 1, seed=3)
    x = _x(1, 64)
    q0 = layer.quantize("int8")
    z = float(layer.w_in[0].astype(np.float64) @ x[0].astype(np.float64))
    b1 = np.float32(-z + offset * 0.3 * _level1_bound(q0, x))
    shifted = FFF(layer.w_in, np.array([b1], np.float32), layer.w_out)
    q = shifted.quantize("int8")
    np.testing.assert_array_equal(q.routes(x), shifted.routes(x))
    _, _, level, _ = int8_reference(q, x)
    if abs(offset) * 0.3 < 0.9:
        assert level[0, 0, 0] >= 2      # inside the level-1 bound: decided later
    if abs(offset) * 0.3 > 1.1:
        assert level[0, 0, 0] == 1


def _level1_bound(q, x):
    from pyfff.fff_int8 import _quantize_tokens

    _, _, _, _, nx, ex, _ = _quantize_tokens(x)
    rec = q._arrays["rec"][0]
    return float(nx[0] * rec[0] + ex[0] * rec[1] + rec[4])


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30])
def test_huge_and_tiny_scales(scale):
    base = _layer(40, 12, 5, 1)
    layer = FFF(base.w_in * np.float32(scale), base.b_in * np.float32(scale), base.w_out)
    x = _x(97, 40)
    q = layer.quantize("int8")
    np.testing.assert_array_equal(q.routes(x), layer.routes(x))


@pytest.mark.parametrize("xscale", [0.0, 1e-30, 1e20])
def test_input_scales(xscale):
    layer = _layer(40, 12, 5, 1)
    x = _x(20, 40, scale=xscale)
    q = layer.quantize("int8")
    np.testing.assert_array_equal(q.routes(x), layer.routes(x))


def test_constant_and_one_sided_inputs():
    layer = _layer(40, 12, 5, 1)
    q = layer.quantize("int8")
    for x in (np.full((3, 40), 2.5, np.float32), np.abs(_x(9, 40)), -np.abs(_x(9, 40))):
        np.testing.assert_array_equal(q.routes(x), layer.routes(x))


def test_non_finite_tokens_route_as_float32():
    layer = _layer(16, 8, 4, 1)
    q = layer.quantize("int8")
    x = _x(4, 16)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    np.testing.assert_array_equal(q.routes(x), layer.routes(x))
    y = q(x)
    assert np.isfinite(y[[0, 3]]).all() and not np.isfinite(y[1]).all()


def test_fallback_rate_reported():
    layer = _layer(768, 64, 11, 1)
    q = layer.quantize("int8")
    q(_x(256, 768))
    st = q.last_stats
    assert st["nodes"] == 256 * 12
    assert 0 < st["level2"] < st["nodes"] // 2 and st["float32"] < st["level2"]
    assert q.nbytes < (layer.w_in.nbytes + layer.w_out.nbytes) / 1.9


def test_out_shapes_and_errors():
    layer = _layer(12, 6, 3, 1)
    q = layer.quantize("int8")
    x = _x(10, 12).reshape(2, 5, 12)
    out = np.empty((2, 5, 6), np.float32)
    assert q(x, out=out) is out
    np.testing.assert_array_equal(out, q(x))
    assert q(x).shape == (2, 5, 6) and q.routes(x).shape == (2, 5, 1, 4)
    np.testing.assert_array_equal(q(x.astype(np.float64)), q(x))
    with pytest.raises(ValueError, match="shape"):
        q(_x(3, 11))
    with pytest.raises(TypeError, match="float"):
        q(np.ones((3, 12), np.int32))
    with pytest.raises(TypeError, match="dtype"):
        q(x, out=np.empty((2, 5, 6), np.float64))
    with pytest.raises(ValueError, match="n_threads=0"):
        q(x, n_threads=0)
    before = x.copy()
    q(x)
    np.testing.assert_array_equal(x, before)


def test_quantize_errors():
    with pytest.raises(ValueError, match="unknown quantization mode"):
        _layer(8, 8, 2, 1).quantize("int4")
    with pytest.raises(TypeError, match="float32"):
        FFF.random(8, 8, 2, dtype=np.float64).quantize("int8")
    with pytest.raises(TypeError, match="FFF"):
        Int8FFF("not a layer")


def test_pickle_and_repr():
    layer = _layer(20, 10, 3, 2)
    q = layer.quantize("int8")
    q2 = pickle.loads(pickle.dumps(q))
    x = _x(9, 20)
    np.testing.assert_array_equal(q2(x), q(x))
    assert "Int8FFF(d_in=20" in repr(q) and q.quantize == "int8"


def test_prepared_rows():
    """The row preparation: codes in range, the record's scale and sums, bounds that hold for the rows."""
    layer = _layer(70, 30, 4, 1)
    a = prepare_int8(layer.w_in, layer.b_in, layer.w_out)
    assert a["q"].shape == (31, 128) and a["q_out"].shape == (31, 64)
    assert (a["q"][:, 70:] == 0).all() and np.abs(a["q"]).max() <= 127 and np.abs(a["q2"]).max() <= 127
    s = a["rec"][:, 5]
    w1 = s[:, None] * a["q"][:, :70]
    w2 = w1 + s[:, None] / 256 * a["q2"][:, :70]
    w = layer.w_in.astype(np.float64)
    assert (np.linalg.norm(w - w1, axis=1) <= a["rec"][:, 0]).all()
    assert (np.linalg.norm(w - w2, axis=1) <= a["rec"][:, 2]).all()
    assert (np.linalg.norm(w - w2, axis=1) < np.linalg.norm(w - w1, axis=1) / 50).all()
    np.testing.assert_array_equal(a["rec"][:, 7], a["q"].sum(axis=1))


def test_widest_input_sums_exactly():
    """At MAX_K input features the int32 sums of the largest codes (255 x 127 each) still fit; one more is refused."""
    from pyfff.quantize import MAX_K

    x = np.ones((2, MAX_K), np.float32)
    x[1] *= -1
    for bias in (-MAX_K * 0.5, -MAX_K + 0.5, -MAX_K - 0.5):      # logits far from 0, then just above and below
        layer = FFF(np.ones((1, MAX_K), np.float32), np.array([bias], np.float32), np.ones((1, 3), np.float32))
        q = layer.quantize("int8")
        np.testing.assert_array_equal(q.routes(x), layer.routes(x))
        y_ref = int8_reference(q, x)[0]
        np.testing.assert_allclose(q(x), y_ref, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 65536 input features"):
        FFF(np.ones((1, MAX_K + 1), np.float32), None, np.ones((1, 3), np.float32)).quantize("int8")
