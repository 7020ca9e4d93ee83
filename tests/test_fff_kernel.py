"""The compiled FFF kernels against the NumPy references, and their invariances.

Every fast path (one thread, several threads, None/-1, threadpoolctl limits,
non-contiguous inputs) is compared with ``pyfff.reference.fff_forward``
through the route-aware comparator of ``_fff_testing``; results must be
bitwise identical across thread counts, tile sizes, memory layouts and batch
composition (the kernel's documented guarantee).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from threadpoolctl import threadpool_limits

from _fff_testing import assert_outputs_close, compare_with_reference, random_layer_and_x, unaligned_copy
from pyfff import FFF, _fff_cpu, reference
from pyfff._openmp_helpers import _openmp_effective_n_threads

DTYPES = [np.float32, np.float64]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]
THREADS = [1, 2, None, -1]

# (batch, d_in, d_out, depth, n_trees): awkward sizes, widths off the SIMD
# width, deep trees only with batches the slow reference can afford.
SIZES = [
    (0, 17, 3, 3, 2),
    (1, 1, 1, 0, 1),
    (1, 768, 768, 11, 1),
    (7, 3, 17, 12, 4),
    (7, 17, 1, 2, 3),
    (97, 1, 768, 5, 1),
    (97, 768, 3, 8, 2),
    (1000, 17, 17, 12, 1),
    (1000, 768, 1, 3, 4),
    (1000, 3, 768, 6, 3),
]


def assert_same_across_threads(layer, x, y=None, routes=None):
    """layer(x) and layer.routes(x) are bitwise identical for every n_threads."""
    y = layer(x, n_threads=1) if y is None else y
    routes = layer.routes(x, n_threads=1) if routes is None else routes
    for n_threads in THREADS[1:] + [3]:
        np.testing.assert_array_equal(layer(x, n_threads=n_threads), y, strict=True,
                                      err_msg=f"n_threads={n_threads}")
        np.testing.assert_array_equal(layer.routes(x, n_threads=n_threads), routes, strict=True,
                                      err_msg=f"n_threads={n_threads}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, d_in, d_out, depth, n_trees", SIZES)
def test_matches_reference(global_random_seed, batch, d_in, d_out, depth, n_trees, dtype, activation):
    layer, x = random_layer_and_x(global_random_seed, batch, d_in, d_out, depth, n_trees=n_trees, dtype=dtype,
                                  activation=activation)
    y = layer(x, n_threads=1)
    routes = layer.routes(x, n_threads=1)
    assert y.shape == (batch, d_out) and y.dtype == dtype
    assert routes.shape == (batch, n_trees, depth + 1)
    compare_with_reference(layer, x, y=y, routes=routes)
    assert_same_across_threads(layer, x, y, routes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", range(13))
def test_every_depth(global_random_seed, depth, dtype):
    layer, x = random_layer_and_x(global_random_seed, 33, 19, 5, depth, n_trees=2, dtype=dtype)
    for n_threads in (1, 2):
        compare_with_reference(layer, x, n_threads=n_threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, d_in, d_out, depth, n_trees", [(1, 5, 3, 0, 1), (97, 33, 9, 7, 3)])
def test_without_bias(global_random_seed, batch, d_in, d_out, depth, n_trees, dtype):
    layer, x = random_layer_and_x(global_random_seed, batch, d_in, d_out, depth, n_trees=n_trees, dtype=dtype,
                                  bias=False)
    assert layer.b_in is None
    compare_with_reference(layer, x, n_threads=2)
    assert_same_across_threads(layer, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_trees_add_up(global_random_seed, dtype):
    """An n-tree layer is the sum of its trees run as one-tree layers."""
    layer, x = random_layer_and_x(global_random_seed, 50, 21, 6, 4, n_trees=3, dtype=dtype)
    n = layer.n_nodes
    parts = [FFF(layer.w_in[t * n:(t + 1) * n], layer.b_in[t * n:(t + 1) * n], layer.w_out[t * n:(t + 1) * n])
             for t in range(3)]
    routes = layer.routes(x)
    for t, part in enumerate(parts):
        np.testing.assert_array_equal(part.routes(x)[:, 0, :], routes[:, t, :])
    total = sum(part(x).astype(np.float64) for part in parts)
    assert_outputs_close(layer(x), total, np.abs(total) + 1, dtype)


# ------------------------------------------------------------ second reference
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, d_in, d_out, depth, n_trees", [(64, 17, 5, 6, 2), (16, 768, 33, 9, 1),
                                                               (200, 3, 1, 2, 4)])
def test_masked_dense_reference(global_random_seed, batch, d_in, d_out, depth, n_trees, dtype, activation):
    """The upstream training formulation agrees with the reference and the kernel.

    It computes every logit with one BLAS product, so it may round a logit
    differently: compare on the samples whose routing logits are all beyond
    rounding of zero (nearly all of them).
    """
    layer, x = random_layer_and_x(global_random_seed, batch, d_in, d_out, depth, n_trees=n_trees, dtype=dtype,
                                  activation=activation)
    result = compare_with_reference(layer, x)
    # at width 768 in float32 about 2% of tokens have a routing logit within rounding of 0
    assert result.robust.sum() >= 0.75 * batch
    dense = reference.masked_dense_forward(x, layer.w_in, layer.b_in, layer.w_out, n_trees=n_trees,
                                           activation=activation)
    assert dense.shape == (batch, d_out) and dense.dtype == dtype
    scale = np.abs(result.y_ref[result.robust]).astype(np.float64) + 1  # dense sums over zeros too
    assert_outputs_close(dense[result.robust], result.y_ref[result.robust], scale, dtype, what="masked dense")
    assert_outputs_close(layer(x)[result.robust], dense[result.robust], scale, dtype, what="kernel vs masked dense")


# ------------------------------------------------------------------ invariances
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_threads_limits_and_tiles(global_random_seed, dtype):
    # two 2048-token tiles and a ragged third one (tile=2048 below), even on one thread
    batch = 2 * 2048 + 77
    layer, x = random_layer_and_x(global_random_seed, batch, 37, 19, 9, n_trees=2, dtype=dtype)
    y = layer(x, n_threads=1)
    routes = layer.routes(x, n_threads=1)
    compare_with_reference(layer, x, y=y, routes=routes)
    assert_same_across_threads(layer, x, y, routes)
    with threadpool_limits(limits=1, user_api="openmp"):
        assert _openmp_effective_n_threads() == 1
        np.testing.assert_array_equal(layer(x), y, strict=True)
        np.testing.assert_array_equal(layer.routes(x), routes, strict=True)
    for tile in (1, 2, 7, 100, 512, 2048, _fff_cpu.DEFAULT_TILE, 10**6):
        for n_threads in (1, 2, 5):
            y_t = np.empty_like(y)
            r_t = np.empty_like(routes)
            _fff_cpu.fff_forward(x, layer.w_in, layer.b_in, layer.w_out, layer.depth, layer.n_trees,
                                 _fff_cpu.ACTIVATION_CODES["gelu"], y_t, r_t, n_threads, tile)
            np.testing.assert_array_equal(y_t, y, strict=True, err_msg=f"tile={tile}, n_threads={n_threads}")
            np.testing.assert_array_equal(r_t, routes, strict=True, err_msg=f"tile={tile}, n_threads={n_threads}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in, d_out", [(1, 1), (29, 11), (64, 64), (789, 100), (130, 250)])
def test_token_result_does_not_depend_on_the_batch(global_random_seed, d_in, d_out, dtype):
    """A token alone (the batch-1 path) and inside any batch (shared-row paths) gives the same bits.

    The widths cover the kernels' blocks: several vector blocks, a single
    vector block and a scalar tail, for 4/8/16-lane vectors.
    """
    layer, x = random_layer_and_x(global_random_seed, 300, d_in, d_out, 10, n_trees=2, dtype=dtype)
    x[200:230] = x[7]  # identical tokens share every node
    y = layer(x)
    for i in (0, 1, 7, 150, 215, 299):
        np.testing.assert_array_equal(layer(x[i]), y[i], strict=True)
        np.testing.assert_array_equal(layer(x[i:i + 1], n_threads=1), y[i:i + 1], strict=True)
        np.testing.assert_array_equal(layer.routes(x[i]), layer.routes(x)[i], strict=True)
    perm = np.random.default_rng(global_random_seed).permutation(300)
    np.testing.assert_array_equal(layer(x[perm], n_threads=2), y[perm], strict=True)
    doubled = np.concatenate([x, x[::-1]])
    np.testing.assert_array_equal(layer(doubled), np.concatenate([y, y[::-1]]), strict=True)
    np.testing.assert_array_equal(layer.routes(doubled)[:300], layer.routes(x), strict=True)
    for size in (2, 3, 5, 9, 17):  # small batches: partly filled groups of shared tokens
        np.testing.assert_array_equal(layer(x[100:100 + size]), y[100:100 + size], strict=True)


def _views(x_big):
    """Non-contiguous (and read-only, and foreign-byte-order) views; x_big is (2n, 2d)."""
    n2, d2 = x_big.shape
    d = d2 // 2
    ro = x_big[::2, :d].copy()
    ro.setflags(write=False)
    return {
        "rows strided": x_big[::2, :d],
        "cols strided": x_big[: n2 // 2, ::2],
        "fortran": np.asfortranarray(x_big[: n2 // 2, :d]),
        "transposed": np.ascontiguousarray(x_big[: n2 // 2, :d].T).T,
        "negative strides": x_big[::-2, d - 1::-1],
        "broadcast row": np.broadcast_to(x_big[0, :d], (5, d)),
        "read-only": ro,
        "3-D strided": x_big.reshape(2, n2 // 2, d2)[:, ::3, 1::2],
        "byte-swapped": x_big[: n2 // 2, :d].astype(x_big.dtype.newbyteorder()),
        "unaligned": unaligned_copy(x_big[n2 // 2:, :d]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", list(_views(np.zeros((4, 4))).keys()))
def test_non_contiguous_inputs(global_random_seed, view, dtype):
    layer, _ = random_layer_and_x(global_random_seed, 0, 23, 7, 6, n_trees=2, dtype=dtype)
    x_big = np.random.default_rng(global_random_seed).standard_normal((2 * 45, 2 * 23)).astype(dtype)
    x = _views(x_big)[view]
    assert x.shape[-1] == layer.d_in
    assert view in ("byte-swapped", "unaligned") or not x.flags.c_contiguous or not x.flags.writeable
    copy = np.ascontiguousarray(x, dtype=dtype)
    for n_threads in (1, 2):
        np.testing.assert_array_equal(layer(x, n_threads=n_threads), layer(copy, n_threads=n_threads), strict=True)
        np.testing.assert_array_equal(layer.routes(x, n_threads=n_threads), layer.routes(copy), strict=True)
    compare_with_reference(layer, x)


# ------------------------------------------------------------------- hypothesis
@given(
    batch=st.integers(0, 40),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    depth=st.integers(0, 8),
    n_trees=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_shapes_hypothesis(batch, d_in, d_out, depth, n_trees, dtype, activation, bias, seed):
    layer, x = random_layer_and_x(seed, batch, d_in, d_out, depth, n_trees=n_trees, dtype=dtype,
                                  activation=activation, bias=bias)
    y = layer(x, n_threads=1)
    routes = layer.routes(x, n_threads=1)
    compare_with_reference(layer, x, y=y, routes=routes, max_flip_fraction=0.1)
    np.testing.assert_array_equal(layer(x, n_threads=2), y, strict=True)
    np.testing.assert_array_equal(layer.routes(x, n_threads=2), routes, strict=True)


# ------------------------------------------------------------- routing details
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_logit_goes_left(dtype):
    """Ties (logit exactly 0) go left, at every level, whatever the summation order."""
    depth, d_in = 5, 768
    rng = np.random.default_rng(0)
    w_in = np.where(np.arange(d_in) % 2, 1.0, -1.0) * np.ones((2 ** (depth + 1) - 1, 1))  # +-1: sum 0 exactly
    w_out = rng.standard_normal((w_in.shape[0], 4))
    x = np.ones((3, d_in))
    x[1] *= 1024.0
    for b_in in (np.zeros(w_in.shape[0]), np.full(w_in.shape[0], -0.0), None):
        layer = FFF(w_in.astype(dtype), b_in if b_in is None else b_in.astype(dtype), w_out.astype(dtype))
        leftmost = [2 ** level - 1 for level in range(depth + 1)]
        for n_threads in (1, 2):
            np.testing.assert_array_equal(layer.routes(x, n_threads=n_threads)[:, 0], [leftmost] * 3)
        np.testing.assert_array_equal(reference.fff_routes(x.astype(dtype), layer.w_in, layer.b_in)[0][:, 0],
                                      [leftmost] * 3)
        # act(0) = 0 for every activation: the output of an all-tie path is exactly 0
        np.testing.assert_array_equal(layer(x), np.zeros((3, 4), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_decides_the_output(dtype):
    """Root logit exactly 0 (15 - 15): left child's output, not the right one's."""
    w_in = np.array([[5.0, -3.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    b_in = np.array([0.0, 0.5, -0.5], dtype=dtype)
    w_out = np.array([[1.0, 2.0], [10.0, 0.0], [0.0, 10.0]], dtype=dtype)
    x = np.array([[3.0, 5.0]], dtype=dtype)
    layer = FFF(w_in, b_in, w_out, activation="relu")
    np.testing.assert_array_equal(layer.routes(x), [[[0, 1]]])
    np.testing.assert_array_equal(layer(x), np.array([[35.0, 0.0]], dtype))  # relu(3 + 0.5) * 10
    tiny = np.finfo(dtype).smallest_subnormal
    layer_b = FFF(w_in, b_in + np.array([tiny, 0, 0], dtype), w_out, activation="relu")
    np.testing.assert_array_equal(layer_b.routes(x), [[[0, 2]]])  # a subnormal > 0 goes right (no FTZ/DAZ)
    np.testing.assert_array_equal(layer_b(x), np.array([[tiny, 45.0]], dtype))  # tiny * [1, 2] + 4.5 * [0, 10]


def _ulps(got, want):
    """Distance in units of the last place of `want` (both of one float dtype)."""
    return np.abs(got.astype(np.float64) - want.astype(np.float64)) / np.spacing(np.abs(want)).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_is_accurate_to_an_ulp(global_random_seed, dtype):
    """A depth-0 tree with unit weights outputs act(x): exact GELU within 1 ulp of the correctly rounded value.

    float32 GELU is evaluated in double precision (a vectorised erfc in
    src/fff_kernels.h, libm's erfc in the scalar twin), float64 with libm's erfc.  Inputs
    cover the polynomial's range, tiny and huge logits and the negative side
    where erfc underflows (z near -38).
    """
    rng = np.random.default_rng(global_random_seed)
    z = np.concatenate([rng.uniform(-12, 12, 40000), rng.uniform(-40, -30, 2000), rng.standard_normal(3000) * 1e-30,
                        rng.standard_normal(3000) * 1e30, [0.0, -0.0, 1e-45, -1e-45, 5.0, -5.0]]).astype(dtype)
    layer = FFF(np.ones((1, 1), dtype), np.zeros(1, dtype), np.ones((1, 1), dtype), activation="gelu")
    got = layer(z[:, None])[:, 0]
    z64 = z.astype(np.float64)
    want = reference.apply_activation(z, "gelu")  # 0.5 z erfc(-z / sqrt 2) in float64, rounded once
    ulps = _ulps(got, want)
    if dtype == np.float32:  # computed in double, rounded once
        limit = 1
        assert np.mean(got == want) > 0.99
    else:  # both round z / sqrt(2) (differently); erfc turns that half ulp into up to about z**2 ulps
        limit = 3 * (1.0 + z64 ** 2)
    bad = np.flatnonzero(ulps > limit)
    assert bad.size == 0, (z[bad[:5]], got[bad[:5]], want[bad[:5]])


# ------------------------------------------------------------------- NaN input
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_row(global_random_seed, dtype, activation):
    layer, x = random_layer_and_x(global_random_seed, 40, 13, 6, 5, n_trees=2, dtype=dtype,
                                  activation=activation)
    y = layer(x)
    x_nan = x.copy()
    x_nan[3, 7] = np.nan
    x_nan[20] = np.nan
    for n_threads in (1, 2):
        y_nan = layer(x_nan, n_threads=n_threads)
        assert np.isnan(y_nan[[3, 20]]).all()
        others = np.setdiff1d(np.arange(40), [3, 20])
        np.testing.assert_array_equal(y_nan[others], y[others], strict=True)
        leftmost = [2 ** level - 1 for level in range(6)]
        np.testing.assert_array_equal(layer.routes(x_nan, n_threads=n_threads)[[3, 20]], [[leftmost] * 2] * 2)
    compare_with_reference(layer, x_nan)


def test_concurrent_calls_from_python_threads(global_random_seed):
    """The GIL is released in the kernel: calls from several Python threads must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    layer, x = random_layer_and_x(global_random_seed, 600, 48, 16, 8, n_trees=2)
    expected = layer(x, n_threads=1)
    chunks = [x[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: (layer(c, n_threads=2), layer(x, n_threads=1)), chunks * 2))
    for i, (y_chunk, y_all) in enumerate(results):
        np.testing.assert_array_equal(y_chunk, expected[i % 4::4], strict=True)
        np.testing.assert_array_equal(y_all, expected, strict=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_and_huge_inputs(global_random_seed, dtype):
    """inf in x routes and poisons its row as in the reference; huge finite inputs stay finite.

    (Values that overflow inside a dot product are left out: whether a partial
    sum overflows depends on the summation order.)
    """
    layer, x = random_layer_and_x(global_random_seed, 8, 5, 3, 3, n_trees=2, dtype=dtype)
    big = np.finfo(dtype).max / 1024  # no partial sum (5 terms, then 8 path terms) can overflow
    x[1, 2], x[2, 0], x[3, :2], x[4], x[5] = np.inf, -np.inf, [np.inf, -np.inf], 1e30, big
    with np.errstate(all="ignore"):
        ref_nodes, _ = reference.fff_routes(x, layer.w_in, layer.b_in, n_trees=2)
        y_ref = reference.fff_forward(x, layer.w_in, layer.b_in, layer.w_out, n_trees=2)
    for n_threads in (1, 2):
        np.testing.assert_array_equal(layer.routes(x, n_threads=n_threads), ref_nodes)
        y = layer(x, n_threads=n_threads)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
        np.testing.assert_array_equal(np.isinf(y), np.isinf(y_ref))
    assert not np.isfinite(y[1:4]).any() and np.isfinite(y[[0, 4, 5, 6, 7]]).all()
