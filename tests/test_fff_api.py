"""The public FFF API: constructors, attributes, shapes, dtypes, and the caller's arrays."""
import copy
import pickle

import numpy as np
import pytest

from _fff_testing import compare_with_reference, random_layer_and_x, random_weights, unaligned_copy
from pyfff import FFF


@pytest.fixture
def weights(rng):
    """(w_in, b_in, w_out) of a float32 layer: depth 3, 2 trees, d_in 11, d_out 5."""
    return random_weights(rng, 11, 5, 3, n_trees=2)


def test_attributes_and_repr(weights):
    w_in, b_in, w_out = weights
    layer = FFF(w_in, b_in, w_out, n_trees=2, activation="gelu_tanh")
    assert (layer.depth, layer.n_trees, layer.n_nodes, layer.d_in, layer.d_out) == (3, 2, 15, 11, 5)
    assert layer.dtype == np.float32 and isinstance(layer.dtype, np.dtype)
    assert layer.activation == "gelu_tanh"
    assert layer.n_neurons == 30
    assert repr(layer) == "FFF(d_in=11, d_out=5, depth=3, n_trees=2, dtype=float32, activation='gelu_tanh')"
    assert FFF(w_in, b_in, w_out, n_trees=2).activation == "gelu"  # the default, as UltraFastBERT


@pytest.mark.parametrize("n_rows, n_trees, depth", [(1, 1, 0), (3, 3, 0), (3, 1, 1), (14, 2, 2), (4095, 1, 11),
                                                     (16380, 4, 11)])
def test_depth_is_derived_from_the_rows(n_rows, n_trees, depth):
    layer = FFF(np.ones((n_rows, 1), np.float32), None, np.ones((n_rows, 1), np.float32), n_trees=n_trees)
    assert (layer.depth, layer.n_nodes, layer.n_trees) == (depth, 2 ** (depth + 1) - 1, n_trees)


def test_from_torch_layout_equals_transposed_w_out(weights):
    w_in, b_in, w_out = weights
    torch_w_out = np.ascontiguousarray(w_out.T)  # linear_out.weight: (d_out, n_trees * n_nodes)
    a = FFF.from_torch_layout(w_in, b_in, torch_w_out, n_trees=2, activation="relu")
    b = FFF(w_in, b_in, w_out, n_trees=2, activation="relu")
    assert repr(a) == repr(b)
    x = np.random.default_rng(1).standard_normal((9, 11)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x), strict=True)
    np.testing.assert_array_equal(a.w_out, w_out)
    assert FFF.from_torch_layout(w_in, None, torch_w_out, n_trees=2).b_in is None


def test_random_is_reproducible_by_seed():
    a = FFF.random(13, 7, 4, n_trees=2, seed=3)
    b = FFF.random(13, 7, 4, n_trees=2, seed=3)
    c = FFF.random(13, 7, 4, n_trees=2, seed=4)
    for name in ("w_in", "b_in", "w_out"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), strict=True)
        assert not np.array_equal(getattr(a, name), getattr(c, name))
    assert repr(a) == "FFF(d_in=13, d_out=7, depth=4, n_trees=2, dtype=float32, activation='gelu')"
    assert a.w_in.shape == (62, 13) and a.b_in.shape == (62,) and a.w_out.shape == (62, 7)
    x = np.random.default_rng(0).standard_normal((20, 13)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x), strict=True)
    assert not np.array_equal(a(x), c(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "float64"])
def test_random_dtype_and_activation(dtype):
    layer = FFF.random(8, 3, 2, dtype=dtype, activation="relu")
    assert layer.dtype == np.dtype(dtype)
    assert layer.w_in.dtype == layer.b_in.dtype == layer.w_out.dtype == np.dtype(dtype)
    assert layer.activation == "relu"
    compare_with_reference(layer, np.random.default_rng(0).standard_normal((50, 8)))


def test_random_has_order_one_logits_and_outputs():
    layer = FFF.random(768, 768, 11, seed=0)
    x = np.random.default_rng(0).standard_normal((64, 768)).astype(np.float32)
    y = layer(x)
    assert 0.1 < np.std(y) < 10
    z = x @ layer.w_in[0] + layer.b_in[0]
    assert 0.3 < np.std(z) < 3


# ------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_keep_their_dtype_without_a_copy(weights, dtype):
    w_in, b_in, w_out = (a.astype(dtype) for a in weights)
    layer = FFF(w_in, b_in, w_out, n_trees=2)
    assert layer.dtype == dtype
    for mine, theirs in ((layer.w_in, w_in), (layer.b_in, b_in), (layer.w_out, w_out)):
        assert mine.dtype == dtype
        assert np.shares_memory(mine, theirs)


@pytest.mark.parametrize("name", ["w_in", "b_in", "w_out"])
def test_weights_cannot_be_rebound(weights, name):
    # the compiled layer holds pointers to the validated arrays
    layer = FFF(*weights, n_trees=2)
    with pytest.raises(AttributeError):
        setattr(layer, name, getattr(layer, name).copy())


def test_weight_dtypes_follow_w_in(weights):
    w_in, b_in, w_out = weights
    layer = FFF(w_in.astype(np.float64), b_in, w_out.astype(np.float16), n_trees=2)
    assert layer.dtype == layer.b_in.dtype == layer.w_out.dtype == np.float64
    layer = FFF(w_in, b_in.astype(np.float64), w_out.astype(np.float64), n_trees=2)
    assert layer.dtype == layer.b_in.dtype == layer.w_out.dtype == np.float32
    layer = FFF(w_in.astype(np.float16), b_in, w_out, n_trees=2)  # float16 is widened to float32
    assert layer.dtype == np.float32


def test_byte_swapped_weights_keep_their_precision(weights):
    """Big-endian float64 weights (e.g. from a '>f8' file) must give a float64 layer.

    Regression (fixed in 01b2242): `_as_float_array` tested `arr.dtype in
    _FLOATS`, False for dtype('>f8'), so such weights became float32.
    """
    w_in, b_in, w_out = (a.astype(np.float64) for a in weights)
    swapped = [a.astype(a.dtype.newbyteorder()) for a in (w_in, b_in, w_out)]
    layer = FFF(*swapped, n_trees=2)
    assert layer.dtype == np.float64
    x = np.random.default_rng(0).standard_normal((5, 11))
    np.testing.assert_array_equal(layer(x), FFF(w_in, b_in, w_out, n_trees=2)(x), strict=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_input(global_random_seed, dtype):
    """A C-contiguous (n, d_in) input in foreign byte order must be converted, not read as native.

    Regression (fixed in 1bb7c59): the fast path of ``BoundLayer.forward``
    checked only ``PyArray_TYPE``, which does not encode the byte order, so
    '>f4' data was read as '<f4' (outputs of 1e+304).
    """
    layer, x = random_layer_and_x(global_random_seed, 9, 13, 4, 3, dtype=dtype)
    swapped = x.astype(x.dtype.newbyteorder())
    assert swapped.flags.c_contiguous and swapped.dtype != x.dtype
    for n_threads in (1, 2, None):
        np.testing.assert_array_equal(layer(swapped, n_threads=n_threads), layer(x), strict=True)
        np.testing.assert_array_equal(layer(swapped[0], n_threads=n_threads), layer(x[0]), strict=True)
    np.testing.assert_array_equal(layer.routes(swapped), layer.routes(x), strict=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["w_in", "b_in", "w_out"])
def test_unaligned_weights(weights, which, dtype):
    """Weights read from a byte blob at an odd offset (np.frombuffer) must work.

    Regression (fixed in 37188cc): ``_as_float_array`` kept such arrays as
    they were, and the compiled layer requires aligned data, so FFF() raised
    "internal error: w_in must be a C-contiguous array ...".
    """
    args = {name: a.astype(dtype) for name, a in zip(("w_in", "b_in", "w_out"), weights)}
    aligned = FFF(args["w_in"], args["b_in"], args["w_out"], n_trees=2)
    args[which] = unaligned_copy(args[which])
    layer = FFF(args["w_in"], args["b_in"], args["w_out"], n_trees=2)
    x = np.random.default_rng(0).standard_normal((9, 11)).astype(dtype)
    np.testing.assert_array_equal(layer(x), aligned(x), strict=True)
    np.testing.assert_array_equal(layer.routes(x), aligned.routes(x), strict=True)


@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_dtype", [np.float16, np.float32, np.float64, np.longdouble])
def test_inputs_are_cast_to_the_layer_dtype(global_random_seed, layer_dtype, x_dtype):
    layer, x = random_layer_and_x(global_random_seed, 30, 9, 4, 3, dtype=layer_dtype)
    x_other = x.astype(x_dtype)
    y = layer(x_other)
    assert y.dtype == layer_dtype
    np.testing.assert_array_equal(y, layer(x_other.astype(layer_dtype)), strict=True)
    np.testing.assert_array_equal(layer.routes(x_other), layer.routes(x_other.astype(layer_dtype)))


def test_python_lists_are_accepted(weights):
    layer = FFF(*weights, n_trees=2)
    x = np.linspace(-1, 1, 22).reshape(2, 11)
    np.testing.assert_array_equal(layer(x.tolist()), layer(x), strict=True)
    np.testing.assert_array_equal(layer(x[0].tolist()), layer(x)[0], strict=True)
    layer_list = FFF(weights[0].tolist(), weights[1].tolist(), weights[2].tolist(), n_trees=2)
    assert layer_list.dtype == np.float64


# ------------------------------------------------------------------- shapes
@pytest.mark.parametrize("lead", [(), (1,), (4,), (2, 3), (2, 1, 3), (3, 2, 2, 2)])
def test_leading_dimensions(global_random_seed, lead):
    layer, x = random_layer_and_x(global_random_seed, int(np.prod(lead, dtype=int)), 10, 4, 4, n_trees=3)
    xs = x.reshape(lead + (10,))
    y = layer(xs)
    routes = layer.routes(xs)
    assert y.shape == lead + (4,)
    assert routes.shape == lead + (3, 5) and routes.dtype == np.int64
    np.testing.assert_array_equal(y.reshape(-1, 4), layer(x), strict=True)
    np.testing.assert_array_equal(routes.reshape(-1, 3, 5), layer.routes(x), strict=True)
    compare_with_reference(layer, xs, y=y, routes=routes)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5), (3, 0, 2)])
@pytest.mark.parametrize("n_threads", [1, 2, None, -1])
def test_empty_batch(lead, n_threads):
    layer = FFF.random(6, 4, 3, n_trees=2)
    for dtype in (np.float32, np.float64):
        x = np.zeros(lead + (6,), dtype)
        y = layer(x, n_threads=n_threads)
        assert y.shape == lead + (4,) and y.dtype == np.float32
        assert layer.routes(x, n_threads=n_threads).shape == lead + (2, 4)


def test_one_d_input_is_one_token(global_random_seed):
    layer, x = random_layer_and_x(global_random_seed, 3, 17, 6, 5, n_trees=2)
    assert layer(x[1]).shape == (6,)
    assert layer.routes(x[1]).shape == (2, 6)
    np.testing.assert_array_equal(layer(x[1]), layer(x)[1], strict=True)
    np.testing.assert_array_equal(layer.routes(x[1]), layer.routes(x)[1], strict=True)


# ------------------------------------------------------- the caller's arrays
def _snapshot(*arrays):
    return [None if a is None else (a.copy(), a.dtype, a.strides) for a in arrays]


def _assert_unchanged(before, *arrays):
    for snap, a in zip(before, arrays):
        if snap is None:
            continue
        np.testing.assert_array_equal(a, snap[0], strict=True)
        assert (a.dtype, a.strides) == snap[1:]


@pytest.mark.parametrize("x_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("w_dtype", [np.float16, np.float32, np.float64])
def test_caller_arrays_are_never_modified(rng, w_dtype, x_dtype):
    w_in, b_in, w_out = (a.astype(w_dtype) for a in random_weights(rng, 12, 7, 4, n_trees=2))
    w_in_f = np.asfortranarray(w_in)  # forces a copy inside the layer
    x = rng.standard_normal((40, 12)).astype(x_dtype)
    x[5] = np.nan
    x_view = x[::2]
    arrays = (w_in, w_in_f, b_in, w_out, x)
    before = _snapshot(*arrays)
    for layer in (FFF(w_in, b_in, w_out, n_trees=2), FFF(w_in_f, b_in, w_out, n_trees=2),
                  FFF.from_torch_layout(w_in, b_in, w_out.T, n_trees=2)):
        for n_threads in (1, 2):
            layer(x, n_threads=n_threads)
            layer(x_view, n_threads=n_threads)
            layer.routes(x, n_threads=n_threads)
    _assert_unchanged(before, *arrays)


def test_read_only_and_memory_mapped_weights(tmp_path, global_random_seed):
    layer0, x = random_layer_and_x(global_random_seed, 25, 16, 8, 5, n_trees=2)
    paths = {}
    for name in ("w_in", "b_in", "w_out"):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], getattr(layer0, name))
    mapped = {name: np.load(p, mmap_mode="r") for name, p in paths.items()}
    assert not mapped["w_in"].flags.writeable
    layer = FFF(mapped["w_in"], mapped["b_in"], mapped["w_out"], n_trees=2)
    assert np.shares_memory(layer.w_in, mapped["w_in"])  # still memory-mapped, not copied
    x.setflags(write=False)
    for n_threads in (1, 2):
        np.testing.assert_array_equal(layer(x, n_threads=n_threads), layer0(x), strict=True)
    compare_with_reference(layer, x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pickle_and_deepcopy(global_random_seed, dtype, bias):
    """A layer survives pickle (multiprocessing, joblib) and copy.deepcopy.

    Regression (broken by d57f8d7, fixed in fedb25d): the compiled
    ``_fff_cpu.BoundLayer`` inside FFF cannot be pickled by Cython ("no
    default __reduce__ due to non-trivial __cinit__").
    """
    layer, x = random_layer_and_x(global_random_seed, 20, 9, 4, 3, n_trees=2, dtype=dtype, activation="relu",
                                  bias=bias)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert repr(clone) == repr(layer)
        np.testing.assert_array_equal(clone(x), layer(x), strict=True)
        np.testing.assert_array_equal(clone.routes(x), layer.routes(x), strict=True)
