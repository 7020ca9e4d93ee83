"""Unit tests of the route-aware comparator in tests/_fff_testing.py.

The comparator must accept a route flip only at a logit within rounding of
zero and must reject wrong routes and wrong outputs. The cases are built by
hand on a depth-2 tree whose root logit is exactly ``b0`` for x = [1, 1]
(w_in[0] = [1, -1] cancels exactly), so the flip's logit is known.
"""
import numpy as np
import pytest

from _fff_testing import compare_with_reference, logit_tolerance
from pyfff import FFF, reference

X = np.array([[1.0, 1.0]])


def tiny_layer(b0, dtype=np.float32):
    """Depth 2, d_in 2, d_out 3; root logit b0 at x = [1, 1]; node 1 -> 4, node 2 -> 6 there."""
    w_in = np.array([[1, -1], [0.5, 0.25], [-0.25, 0.75], [1, 0], [0, 1], [1, 1], [-1, 1]])
    b_in = np.array([b0, 0.125, -0.25, 0, 0, 0, 0])  # node 1: z = 0.875, node 2: z = 0.25
    w_out = np.arange(21, dtype=np.float64).reshape(7, 3) / 10 - 1
    return FFF(w_in.astype(dtype), b_in.astype(dtype), w_out.astype(dtype), activation="relu")


def fake_y(layer, x, routes):
    """The output a kernel that followed ``routes`` would produce (relu)."""
    x = np.asarray(x, dtype=layer.dtype)
    y = np.zeros((x.shape[0], layer.d_out), dtype=layer.dtype)
    for i, path in enumerate(routes[:, 0, :]):
        for node in path:
            z = layer.w_in[node] @ x[i] + layer.b_in[node]
            y[i] += max(z, 0) * layer.w_out[node]
    return y


def test_accepts_the_kernel_itself():
    layer = tiny_layer(0.5)
    result = compare_with_reference(layer, X)
    assert result.agree.tolist() == [True]
    assert result.n_flipped == 0
    assert result.robust.tolist() == [True]
    np.testing.assert_array_equal(result.ref_nodes, [[[0, 2, 6]]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accepts_a_flip_at_an_exactly_zero_logit(dtype):
    layer = tiny_layer(0.0, dtype)
    assert reference.fff_routes(X.astype(dtype), layer.w_in, layer.b_in)[0].tolist() == [[[0, 1, 4]]]
    routes = np.array([[[0, 2, 6]]])  # right at the tie, then the reference's turns
    result = compare_with_reference(layer, X, y=fake_y(layer, X, routes), routes=routes)
    assert result.agree.tolist() == [False]
    assert result.n_flipped == 1
    assert result.robust.tolist() == [False]


def test_accepts_a_flip_at_a_1e_9_logit_in_float32():
    layer = tiny_layer(1e-9, np.float32)
    assert reference.fff_routes(X.astype(np.float32), layer.w_in, layer.b_in)[0].tolist() == [[[0, 2, 6]]]
    routes = np.array([[[0, 1, 4]]])
    result = compare_with_reference(layer, X, y=fake_y(layer, X, routes), routes=routes)
    assert result.n_flipped == 1


def test_rejects_a_flip_at_a_1e_9_logit_in_float64():
    # 1e-9 is far beyond float64 rounding (tol = 12 * 2.2e-16 here)
    layer = tiny_layer(1e-9, np.float64)
    routes = np.array([[[0, 1, 4]]])
    with pytest.raises(AssertionError, match="unjustified turn at node 0"):
        compare_with_reference(layer, X, y=fake_y(layer, X, routes), routes=routes)


def test_rejects_a_wrong_route():
    layer = tiny_layer(0.5)  # root logit 0.5: clearly right
    routes = np.array([[[0, 1, 4]]])
    with pytest.raises(AssertionError, match=r"tree 0, level 0: unjustified turn at node 0 .*went left"):
        compare_with_reference(layer, X, y=fake_y(layer, X, routes), routes=routes)


def test_rejects_a_wrong_turn_after_a_justified_flip():
    layer = tiny_layer(0.0)
    routes = np.array([[[0, 2, 5]]])  # node 2's logit is 0.25: it must go right to 6
    with pytest.raises(AssertionError, match="level 1: unjustified turn at node 2"):
        compare_with_reference(layer, X, y=fake_y(layer, X, routes), routes=routes)


@pytest.mark.parametrize(
    "routes, match",
    [
        ([[[0, 2, 7]]], "level 2: node is not a child"),
        ([[[0, 1, 6]]], "level 2: node is not a child"),
        ([[[1, 3, 7]]], "does not start at the root"),
    ],
)
def test_rejects_malformed_routes(routes, match):
    layer = tiny_layer(0.5)
    with pytest.raises(AssertionError, match=match):
        compare_with_reference(layer, X, y=layer(X), routes=np.array(routes))


def test_rejects_wrong_shapes_and_dtype():
    layer = tiny_layer(0.5)
    with pytest.raises(AssertionError, match="routes shape"):
        compare_with_reference(layer, X, routes=np.array([[0, 2, 6]]))
    with pytest.raises(AssertionError, match="output shape"):
        compare_with_reference(layer, X, y=layer(X)[0])
    with pytest.raises(AssertionError, match="output dtype"):
        compare_with_reference(layer, X, y=layer(X).astype(np.float64))


@pytest.mark.parametrize("dtype, delta", [(np.float32, 1e-3), (np.float64, 1e-9)])
def test_rejects_a_wrong_output(dtype, delta):
    layer = tiny_layer(0.5, dtype)
    y = layer(X)
    y[0, 1] += delta
    with pytest.raises(AssertionError, match=r"output differs from the reference at 1 element\(s\); first \[0, 1\]"):
        compare_with_reference(layer, X, y=y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accepts_an_output_one_ulp_off(dtype):
    layer = tiny_layer(0.5, dtype)
    y = layer(X)
    y[0] = np.nextafter(y[0], np.inf)
    compare_with_reference(layer, X, y=y)


def test_nan_must_match_nan():
    layer = tiny_layer(0.5)
    y = layer(X)
    y[0, 0] = np.nan
    with pytest.raises(AssertionError, match="output differs"):
        compare_with_reference(layer, X, y=y)
    x_nan = np.array([[np.nan, 1.0]])
    assert np.isnan(compare_with_reference(layer, x_nan).y_ref).all()
    with pytest.raises(AssertionError, match="output differs"):
        compare_with_reference(layer, x_nan, y=np.zeros((1, 3), np.float32))


def test_does_not_compare_outputs_of_flipped_samples():
    layer = tiny_layer(0.0)
    routes = np.array([[[0, 2, 6]]])
    y = np.full((1, 3), 123.0, dtype=np.float32)  # wrong, but the route is (justifiably) different
    assert compare_with_reference(layer, X, y=y, routes=routes).n_flipped == 1


def test_rejects_too_many_flips():
    layer = tiny_layer(0.0)
    x = np.ones((10, 2))
    routes = np.tile(np.array([[[0, 2, 6]]]), (10, 1, 1))
    y = fake_y(layer, x, routes)
    with pytest.raises(AssertionError, match=r"too many route flips \(10 > 1 allowed\)"):
        compare_with_reference(layer, x, y=y, routes=routes)
    assert compare_with_reference(layer, x, y=y, routes=routes, max_flip_fraction=1.0).n_flipped == 10


def test_logit_tolerance_scales_with_terms_and_eps():
    x = np.array([[1.0, 1.0], [3.0, -2.0]], dtype=np.float32)
    w = np.array([[1.0, -1.0], [0.5, 2.0]], dtype=np.float32)
    b = np.array([0.0, -4.0], dtype=np.float32)
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(logit_tolerance(x, w, b), [2 * 3 * eps * 2, 2 * 3 * eps * (1.5 + 4 + 4)])
    np.testing.assert_allclose(logit_tolerance(x.astype(np.float64), w, None),
                               [2 * 3 * np.finfo(np.float64).eps * 2, 2 * 3 * np.finfo(np.float64).eps * 5.5])


def test_global_random_seed_parsing():
    from conftest import DEFAULT_SEED, _parse_seeds

    assert _parse_seeds(None) == _parse_seeds("") == [DEFAULT_SEED]
    assert _parse_seeds("all") == list(range(100))
    assert _parse_seeds("7") == [7]
    assert _parse_seeds("3-5,9") == [3, 4, 5, 9]
    (seed,) = _parse_seeds("any")
    assert 0 <= seed <= 99
    for bad in ("100", "x", "5-3x", "-1"):
        with pytest.raises(pytest.UsageError):
            _parse_seeds(bad)
