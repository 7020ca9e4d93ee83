"""The NumPy references themselves: hand-worked trees, known activation values, ties.

``pyfff.reference`` is the ground truth of every kernel test, so it is
checked here against numbers worked out by hand, against a per-token Python
loop written straight from the issue's definition, and against the masked
dense formulation.
"""
import math

import numpy as np
import pytest

from _fff_testing import random_weights
from pyfff import reference

# GELU(z) = z * Phi(z): Phi(1) = 0.841344746068543, Phi(3) = 0.998650101968370, Phi(-3) = 0.00134989803163009453
# (normal tables; the last to 18 digits, since 1 - Phi(3) keeps only 12 of them).
GELU_VALUES = {-3.0: -0.0040496940948902836, -1.0: -0.15865525393145707, 0.0: 0.0, 0.5: 0.34573123063700656,
               1.0: 0.8413447460685429, 3.0: 2.99595030590511}
GELU_TANH_VALUES = {-1.0: -0.15880800939172324, 0.0: 0.0, 1.0: 0.8411919906082768, 3.0: 2.996362607918227}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, table", [("gelu", GELU_VALUES), ("gelu_tanh", GELU_TANH_VALUES)])
def test_gelu_known_values(name, table, dtype):
    z = np.array(list(table), dtype=dtype)
    out = reference.apply_activation(z, name)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, list(table.values()), rtol=np.finfo(dtype).eps * 4, atol=1e-300)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_symmetry(name):
    # gelu(z) - gelu(-z) = z, since Phi(z) + Phi(-z) = 1 (and tanh is odd)
    z = np.linspace(-6, 6, 241)
    np.testing.assert_allclose(reference.apply_activation(z, name) - reference.apply_activation(-z, name), z,
                               atol=1e-15, rtol=1e-14)


def test_gelu_tanh_approximates_gelu():
    z = np.linspace(-5, 5, 201)
    diff = reference.apply_activation(z, "gelu") - reference.apply_activation(z, "gelu_tanh")
    assert 1e-4 < np.abs(diff).max() < 1e-3  # close, but a different function


def test_relu_and_nan():
    z = np.array([-2.0, -0.0, 0.0, 1.5, np.nan], dtype=np.float32)
    out = reference.apply_activation(z, "relu")
    np.testing.assert_array_equal(out, [0, 0, 0, 1.5, np.nan])
    assert out.dtype == np.float32
    for name in ("gelu", "gelu_tanh"):
        assert np.isnan(reference.apply_activation(np.array([np.nan]), name)).all()


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; expected one of \('gelu', 'gelu_tanh', 'relu'\)"):
        reference.apply_activation(np.zeros(3), "swish")


@pytest.mark.parametrize("n_rows, n_trees, depth", [(1, 1, 0), (3, 1, 1), (4095, 1, 11), (2, 2, 0), (28, 4, 2),
                                                     (8191 * 3, 3, 12)])
def test_depth_from_rows(n_rows, n_trees, depth):
    assert reference.depth_from_rows(n_rows, n_trees) == depth


@pytest.mark.parametrize("n_rows, n_trees, match", [
    (0, 1, "each tree has 0 neuron rows"), (2, 1, "each tree has 2 neuron rows"),
    (4096, 1, "each tree has 4096"), (6, 4, "cannot be split into n_trees=4"), (3, 0, "n_trees must be >= 1"),
])
def test_depth_from_rows_errors(n_rows, n_trees, match):
    with pytest.raises(ValueError, match=match):
        reference.depth_from_rows(n_rows, n_trees)


# ------------------------------------------------------------ hand-worked tree
# depth 1, d_in 2, d_out 2: root [1, 0]; left child [0, 1]; right child [1, 1] with bias -1.
W_IN = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
B_IN = np.array([0.0, 0.0, -1.0])
W_OUT = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
X = np.array([[2.0, 3.0], [-1.0, 5.0], [0.0, -4.0]])
# x0: root 2 > 0 -> right, 2 + 3 - 1 = 4: relu 2 * [1, 0] + 4 * [1, 1] = [6, 4]
# x1: root -1 -> left, 5: 0 * [1, 0] + 5 * [0, 1] = [0, 5]
# x2: root 0 (tie) -> left, -4: 0 + 0 = [0, 0]; with gelu: gelu(-4) * [0, 1]
NODES = [[[0, 2]], [[0, 1]], [[0, 1]]]
LOGITS = [[[2.0, 4.0]], [[-1.0, 5.0]], [[0.0, -4.0]]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_worked_tree(dtype):
    args = (X.astype(dtype), W_IN.astype(dtype), B_IN.astype(dtype))
    nodes, logits = reference.fff_routes(*args)
    np.testing.assert_array_equal(nodes, NODES)
    assert nodes.dtype == np.int64
    np.testing.assert_array_equal(logits, LOGITS)
    assert logits.dtype == dtype
    y = reference.fff_forward(*args, W_OUT.astype(dtype), activation="relu")
    np.testing.assert_array_equal(y, [[6.0, 4.0], [0.0, 5.0], [0.0, 0.0]])
    assert y.dtype == dtype
    y = reference.fff_forward(*args, W_OUT.astype(dtype), activation="gelu")
    g = GELU_VALUES
    expected = [[2 * 0.9772498680518208 + 4 * 0.9999683287581669, 4 * 0.9999683287581669],
                [g[-1.0] * 1, 5 * 0.9999997133484282], [0.0, -4 * 3.167124183311998e-05]]  # z * Phi(z)
    np.testing.assert_allclose(y, expected, rtol=8 * np.finfo(dtype).eps)


def test_two_trees_use_their_own_rows():
    # tree 1 is tree 0 with the weights negated: routes mirror, outputs add up
    w_in = np.concatenate([W_IN, -W_IN])
    b_in = np.concatenate([B_IN, -B_IN])
    w_out = np.concatenate([W_OUT, 10 * W_OUT])
    nodes, logits = reference.fff_routes(X, w_in, b_in, n_trees=2)
    np.testing.assert_array_equal(nodes[:, 0], np.array(NODES)[:, 0])
    np.testing.assert_array_equal(logits[:, 1, 0], -np.array(LOGITS)[:, 0, 0])
    np.testing.assert_array_equal(nodes[:, 1], [[0, 1], [0, 2], [0, 1]])  # the tie still goes left
    y = reference.fff_forward(X, w_in, b_in, w_out, n_trees=2, activation="relu")
    # tree 1: x0 root -2 -> left, -3: 0; x1 root 1 -> right, -(4) + 1 = -3: 1 * 10 * [1, 0]; x2 root 0 -> left, 4
    np.testing.assert_array_equal(y, [[6.0, 4.0], [10.0, 5.0], [0.0, 40.0]])


def test_without_bias_and_empty_batch():
    nodes, logits = reference.fff_routes(X, W_IN, None)
    np.testing.assert_array_equal(nodes, [[[0, 2]], [[0, 1]], [[0, 1]]])
    np.testing.assert_array_equal(logits, [[[2.0, 5.0]], [[-1.0, 5.0]], [[0.0, -4.0]]])
    for fn in (reference.fff_forward, reference.masked_dense_forward):
        assert fn(np.zeros((0, 2)), W_IN, B_IN, W_OUT).shape == (0, 2)


def test_nan_goes_left_and_poisons_only_its_row():
    x = np.array([[np.nan, 1.0], [2.0, 3.0]])
    nodes, _ = reference.fff_routes(x, W_IN, B_IN)
    np.testing.assert_array_equal(nodes[0], [[0, 1]])
    y = reference.fff_forward(x, W_IN, B_IN, W_OUT, activation="relu")
    assert np.isnan(y[0]).all()
    np.testing.assert_array_equal(y[1], [6.0, 4.0])


# ----------------------------------------------------- per-token Python loop
def loop_forward(x, w_in, b_in, w_out, n_trees, act):
    """The issue's definition, one token and one node at a time, in float64."""
    n_nodes = w_in.shape[0] // n_trees
    depth = n_nodes.bit_length() - 1
    y = np.zeros((x.shape[0], w_out.shape[1]))
    for i, xi in enumerate(x.astype(np.float64)):
        for t in range(n_trees):
            node = 0
            for _ in range(depth + 1):
                row = t * n_nodes + node
                z = math.fsum(float(a) * float(b) for a, b in zip(w_in[row], xi)) + float(b_in[row])
                y[i] += act(z) * w_out[row].astype(np.float64)
                node = 2 * node + 2 if z > 0 else 2 * node + 1
    return y


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_reference_matches_a_per_token_loop(global_random_seed, activation):
    rng = np.random.default_rng(global_random_seed)
    w_in, b_in, w_out = random_weights(rng, 7, 4, 3, n_trees=2, dtype=np.float64)
    x = rng.standard_normal((20, 7))
    acts = {"gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),
            "gelu_tanh": lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))),
            "relu": lambda z: max(z, 0.0)}
    expected = loop_forward(x, w_in, b_in, w_out, 2, acts[activation])
    np.testing.assert_allclose(reference.fff_forward(x, w_in, b_in, w_out, n_trees=2, activation=activation),
                               expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_dense_matches_fff_forward(global_random_seed, activation, dtype):
    rng = np.random.default_rng(global_random_seed)
    w_in, b_in, w_out = random_weights(rng, 9, 6, 5, n_trees=3, dtype=dtype)
    x = rng.standard_normal((64, 9)).astype(dtype)
    _, logits = reference.fff_routes(x, w_in, b_in, n_trees=3)
    clear = (np.abs(logits[:, :, :-1]) > 1e-3).all(axis=(1, 2))  # no routing logit near a tie
    assert clear.sum() >= 50
    dense = reference.masked_dense_forward(x, w_in, b_in, w_out, n_trees=3, activation=activation)
    assert dense.dtype == dtype
    tol = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(dense[clear],
                               reference.fff_forward(x, w_in, b_in, w_out, n_trees=3, activation=activation)[clear],
                               rtol=tol, atol=tol)


def test_masked_dense_on_the_hand_worked_tree():
    np.testing.assert_array_equal(reference.masked_dense_forward(X, W_IN, B_IN, W_OUT, activation="relu"),
                                  [[6.0, 4.0], [0.0, 5.0], [0.0, 0.0]])
