"""Bad input to FFF: one clear exception per mistake, tested one by one."""
import re

import numpy as np
import pytest

import pyfff.fff
from pyfff import FFF

D_IN, D_OUT, N_TREES, DEPTH = 11, 5, 2, 2
N_ROWS = N_TREES * (2 ** (DEPTH + 1) - 1)  # 14


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((N_ROWS, D_IN)).astype(np.float32), rng.standard_normal(N_ROWS).astype(np.float32),
            rng.standard_normal((N_ROWS, D_OUT)).astype(np.float32))


@pytest.fixture
def layer(weights):
    return FFF(*weights, n_trees=N_TREES)


# ---------------------------------------------------------------- row counts
@pytest.mark.parametrize("n_rows, n_trees, match", [
    (14, 1, r"each tree has 14 neuron rows \(14 rows / 1 trees\); a balanced tree needs 2\*\*\(depth\+1\) - 1"),
    (12, 2, r"each tree has 6 neuron rows"),
    (14, 4, r"14 neuron rows cannot be split into n_trees=4 equal trees"),
    (0, 1, r"each tree has 0 neuron rows"),
])
def test_inconsistent_row_count(n_rows, n_trees, match):
    w_in = np.ones((n_rows, D_IN), np.float32)
    w_out = np.ones((n_rows, D_OUT), np.float32)
    with pytest.raises(ValueError, match=match):
        FFF(w_in, None, w_out, n_trees=n_trees)


def test_w_in_w_out_row_mismatch(weights):
    w_in, b_in, w_out = weights
    with pytest.raises(ValueError, match=r"w_in has 14 neuron rows but w_out has 7; w_out must be node-major"):
        FFF(w_in, b_in, w_out[:7], n_trees=N_TREES)


def test_torch_layout_given_to_the_constructor(weights):
    w_in, b_in, w_out = weights
    with pytest.raises(ValueError, match=r"w_out has 5;.*use FFF\.from_torch_layout"):
        FFF(w_in, b_in, w_out.T, n_trees=N_TREES)


def test_node_major_w_out_given_to_from_torch_layout(weights):
    w_in, b_in, w_out = weights
    with pytest.raises(ValueError, match=r"w_in has 14 neuron rows but w_out has 5"):
        FFF.from_torch_layout(w_in, b_in, w_out, n_trees=N_TREES)


def test_from_torch_layout_needs_2d_linear_out(weights):
    w_in, b_in, w_out = weights
    with pytest.raises(ValueError, match=r"linear_out_weight must be 2-D \(d_out, n_trees \* n_nodes\), got shape \(14,\)"):
        FFF.from_torch_layout(w_in, b_in, w_out[:, 0], n_trees=N_TREES)


def re_shape(shape):
    return re.escape(str(tuple(shape)))


@pytest.mark.parametrize("shape", [(7,), (14, 1), (15,), (1, 14)])
def test_b_in_wrong_shape(weights, shape):
    w_in, _, w_out = weights
    with pytest.raises(ValueError, match=rf"b_in must have shape \(14,\) to match w_in, got {re_shape(shape)}"):
        FFF(w_in, np.zeros(shape, np.float32), w_out, n_trees=N_TREES)


@pytest.mark.parametrize("which", ["w_in", "b_in"])
def test_zero_d_weight_reports_its_real_shape(weights, which):
    """A 0-d weight must be reported as shape ().

    Regression (fixed in 01b2242): np.ascontiguousarray turned 0-d weights
    into shape (1,), so the message said "got (1,)".
    """
    w_in, b_in, w_out = weights
    args = {"w_in": w_in, "b_in": b_in, "w_out": w_out}
    args[which] = np.float32(1.0)
    with pytest.raises(ValueError, match=rf"{which} must .*got (shape )?\(\)"):
        FFF(args["w_in"], args["b_in"], args["w_out"], n_trees=N_TREES)


@pytest.mark.parametrize("which, shape", [("w_in", (14,)), ("w_in", (2, 7, 11)), ("w_out", (14,)),
                                          ("w_out", (14, 5, 1))])
def test_weights_must_be_2d(weights, which, shape):
    w_in, b_in, w_out = weights
    args = {"w_in": w_in, "w_out": w_out}
    args[which] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=rf"{which} must be 2-D \(n_trees \* n_nodes, d_(in|out)\), "
                                         rf"got shape {re_shape(shape)}"):
        FFF(args["w_in"], b_in, args["w_out"], n_trees=N_TREES)


@pytest.mark.parametrize("d_in, d_out", [(0, 5), (11, 0)])
def test_zero_width(d_in, d_out):
    with pytest.raises(ValueError, match=rf"widths must be >= 1, got d_in={d_in}, d_out={d_out}"):
        FFF(np.ones((7, d_in), np.float32), None, np.ones((7, d_out), np.float32))


# ----------------------------------------------------------------- x shapes
@pytest.mark.parametrize("shape", [(3, 10), (3, 12), (10,), (0,), (2, 3, 1), (11, 2)])
@pytest.mark.parametrize("method", ["__call__", "routes"])
def test_x_of_the_wrong_width(layer, shape, method):
    with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., 11\), got {re_shape(shape)}"):
        getattr(layer, method)(np.ones(shape, np.float32))


@pytest.mark.parametrize("method", ["__call__", "routes"])
def test_zero_d_x(layer, method):
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 11\), got \(\)"):
        getattr(layer, method)(np.float32(1.0))


# --------------------------------------------------------------- activation
@pytest.mark.parametrize("activation", ["tanh", "GELU", "gelu_new", "", None])
def test_unknown_activation(weights, activation):
    with pytest.raises(ValueError, match=f"unknown activation {re.escape(repr(activation))}; expected one of"):
        FFF(*weights, n_trees=N_TREES, activation=activation)
    with pytest.raises(ValueError, match="unknown activation"):
        FFF.random(3, 2, 1, activation=activation)


# ------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["w_in", "b_in", "w_out"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_weights(weights, which, value, dtype):
    args = dict(zip(("w_in", "b_in", "w_out"), (a.astype(dtype) for a in weights)))
    args[which].flat[5] = value
    with pytest.raises(ValueError, match=rf"{which} contains non-finite values \(NaN or inf\)"):
        FFF(args["w_in"], args["b_in"], args["w_out"], n_trees=N_TREES)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_weights_overflowing_the_layer_dtype(weights):
    w_in, b_in, w_out = weights
    w_out = w_out.astype(np.float64)
    w_out[3, 1] = 1e300  # finite in float64, inf once cast to the layer's float32
    with pytest.raises(ValueError, match=r"w_out contains non-finite values"):
        FFF(w_in, b_in, w_out, n_trees=N_TREES)


# -------------------------------------------------------------------- types
BAD_DTYPES = [np.int32, np.int64, np.uint8, bool, np.complex64, np.complex128, object]


@pytest.mark.parametrize("bad", BAD_DTYPES)
@pytest.mark.parametrize("which", ["w_in", "b_in", "w_out"])
def test_weights_of_a_non_float_dtype(weights, which, bad):
    args = dict(zip(("w_in", "b_in", "w_out"), weights))
    args[which] = args[which].astype(bad)
    with pytest.raises(TypeError, match=rf"{which} must be a float32 or float64 array, got dtype"):
        FFF(args["w_in"], args["b_in"], args["w_out"], n_trees=N_TREES)


@pytest.mark.parametrize("bad", BAD_DTYPES + ["U3"])
@pytest.mark.parametrize("method", ["__call__", "routes"])
def test_x_of_a_non_float_dtype(layer, bad, method):
    x = np.ones((4, D_IN)).astype(bad)
    with pytest.raises(TypeError, match=rf"x must be a float array, got dtype {np.dtype(bad)}"):
        getattr(layer, method)(x)


def test_float64_layer_rejects_int_x(weights):
    layer = FFF(*(a.astype(np.float64) for a in weights), n_trees=N_TREES)
    with pytest.raises(TypeError, match=r"x must be a float array, got dtype int64"):
        layer(np.ones((2, D_IN), np.int64))


# ---------------------------------------------------------------- n_threads
@pytest.mark.parametrize("batch", [0, 1, 100])
@pytest.mark.parametrize("method", ["__call__", "routes"])
def test_n_threads_zero(layer, batch, method):
    with pytest.raises(ValueError, match=r"n_threads=0 is invalid"):
        getattr(layer, method)(np.ones((batch, D_IN), np.float32), n_threads=0)


@pytest.mark.parametrize("n_threads", [1.0, 2.5, "2", True, [2]])
def test_n_threads_of_a_wrong_type(layer, n_threads):
    with pytest.raises(TypeError, match=rf"n_threads must be an int or None, got {type(n_threads).__name__}"):
        layer(np.ones((3, D_IN), np.float32), n_threads=n_threads)


@pytest.mark.parametrize("n_threads", [10**6, 2**31, 2**40, np.int64(2**40)])
@pytest.mark.parametrize("shape", [(40, D_IN), (4, 10, D_IN)])
def test_huge_n_threads_is_capped_not_an_error(layer, n_threads, shape):
    """Any positive count is valid; the kernel never starts more threads than tiles.

    Regression (fixed in 1bb7c59): ``BoundLayer.forward`` assigned a positive
    Python int straight to a C int, so 2**31 raised OverflowError while
    np.int64(2**40) was capped by ``_openmp_effective_n_threads``.
    """
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(layer(x, n_threads=n_threads), layer(x, n_threads=1), strict=True)
    np.testing.assert_array_equal(layer.routes(x, n_threads=n_threads), layer.routes(x, n_threads=1), strict=True)


def test_n_threads_accepts_numpy_ints(layer):
    x = np.ones((3, D_IN), np.float32)
    np.testing.assert_array_equal(layer(x, n_threads=np.int64(2)), layer(x, n_threads=1), strict=True)


# ------------------------------------------------------------------ n_trees
@pytest.mark.parametrize("n_trees", [0, -1, -14])
def test_n_trees_below_one(weights, n_trees):
    with pytest.raises(ValueError, match=rf"n_trees must be >= 1, got {n_trees}"):
        FFF(*weights, n_trees=n_trees)


@pytest.mark.parametrize("n_trees", [2.0, "2", None, 1.5])
def test_n_trees_not_an_int(weights, n_trees):
    with pytest.raises(TypeError, match=rf"n_trees must be an int, got {type(n_trees).__name__}"):
        FFF(*weights, n_trees=n_trees)


def test_n_trees_bool_is_not_a_count(weights):
    """n_trees=True must be a TypeError, as n_threads=True is.

    Regression (fixed in 01b2242): operator.index(n_trees) accepts bools,
    so FFF(w_in[:7], ..., n_trees=True) built a one-tree layer.
    """
    w_in, b_in, w_out = weights
    with pytest.raises(TypeError, match=r"n_trees must be an int, got bool"):
        FFF(w_in[:7], b_in[:7], w_out[:7], n_trees=True)


@pytest.mark.parametrize("n_trees, error, match", [
    (0, ValueError, r"n_trees must be >= 1, got 0"),
    (-1, ValueError, r"n_trees must be >= 1, got -1"),
    (1.5, TypeError, r"n_trees must be an int, got float"),
])
def test_random_checks_n_trees(n_trees, error, match):
    """FFF.random must give the constructor's messages.

    Regression (fixed in 01b2242): FFF.random computed the row count before
    any check, so NumPy answered "negative dimensions are not allowed" and
    "'float' object cannot be interpreted as an integer".
    """
    with pytest.raises(error, match=match):
        FFF.random(4, 3, 2, n_trees=n_trees)


# -------------------------------------------------------------------- depth
@pytest.mark.parametrize("depth", [-1, 25, 40])
def test_random_depth_out_of_range(depth):
    with pytest.raises(ValueError, match=rf"depth must be in 0\.\.24, got {depth}"):
        FFF.random(2, 2, depth)


def test_depth_too_large(monkeypatch):
    # A real depth-25 tree is 2**26 rows; lower the limit instead of allocating it.
    monkeypatch.setattr(pyfff.fff, "MAX_DEPTH", 3)
    FFF(np.ones((15, 2), np.float32), None, np.ones((15, 2), np.float32))
    with pytest.raises(ValueError, match=r"depth 4 is larger than the supported maximum 3"):
        FFF(np.ones((31, 2), np.float32), None, np.ones((31, 2), np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex64, np.longdouble])
def test_random_dtype(dtype):
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got"):
        FFF.random(2, 2, 1, dtype=dtype)
