"""Both ways the driver uses threads give the one-thread result, bit for bit.

pyfff/_fff_cpu.pyx runs a batch either as one tile per thread, or (a batch
below a full tile per thread, on at most 4 threads with >= 512 tokens each)
one tile at a time with all threads inside it (src/fff_kernels.h, fff_tile_body).
"""
import numpy as np
import pytest

from pyfff import FFF
from _fff_testing import compare_with_reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, n_threads, tile", [
    (2000, 3, 2048),    # inside one tile: 3 threads, 667 tokens each
    (1100, 2, 2048),    # inside one tile, a ragged last chunk
    (3000, 2, 1024),    # one tile per thread, three tiles
    (700, 4, 2048),     # 175 tokens per thread: one small tile each
    (6000, 5, 16384),   # 1200 tokens per thread, but 5 threads: one small tile each
    (5000, 4, 16384),   # inside one 5000-token tile: 4 threads, 1250 tokens each
])
def test_thread_modes_are_bitwise_identical(dtype, batch, n_threads, tile):
    layer = FFF.random(29, 13, 8, n_trees=2, seed=5, dtype=dtype)
    x = np.random.default_rng(batch).standard_normal((batch, 29)).astype(dtype)
    y1 = layer(x, n_threads=1)
    r1 = layer.routes(x, n_threads=1)
    compare_with_reference(layer, x, y=y1, routes=r1)
    y = np.empty_like(y1)
    r = np.empty_like(r1)
    layer._bound.fill(x, y, r, n_threads, tile)
    np.testing.assert_array_equal(y, y1, strict=True)
    np.testing.assert_array_equal(r, r1, strict=True)


def test_default_threads_skip_small_batches():
    """n_threads=None runs batches below serial_below tokens on the calling thread (bench/interleave.py says why);
    an explicit count is always honoured; the result is the same bits either way."""
    from pyfff._openmp_helpers import _openmp_effective_n_threads

    layer = FFF.random(768, 768, depth=11, seed=3)
    bound = layer._bound
    assert bound.serial_below == layer.serial_below == 256   # 256 tokens x 12 nodes x (768 + 768) multiply-adds
    assert bound.threads_for(None, 255) == 1
    assert bound.threads_for(None, 256) == _openmp_effective_n_threads(None)
    assert bound.threads_for(2, 10) == 2 and bound.threads_for(-1, 10) == _openmp_effective_n_threads(-1)
    with pytest.raises(ValueError):
        bound.threads_for(0, 10)
    assert FFF.random(16, 16, depth=2, seed=0)._bound.serial_below > 10_000   # a tiny layer: nearly always
    x = np.random.default_rng(0).standard_normal((300, 768)).astype(np.float32)
    for n in (1, 255, 256, 300):
        assert np.array_equal(layer(x[:n]), layer(x[:n], n_threads=2))
        assert np.array_equal(layer.routes(x[:n]), layer.routes(x[:n], n_threads=1))


def _child_forward(layer, x):
    """Runs in a forked child (module level so multiprocessing can name it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x, n_threads=2)
    return y, [str(w.message) for w in caught]


def test_fork_after_threads_does_not_hang():
    """libgomp cannot start threads again in a child forked after the parent used them: pyfff's kernels run
    single-threaded there (warning once) instead of waiting forever."""
    import multiprocessing

    layer = FFF.random(32, 16, depth=5, seed=1)
    x = np.ones((5000, 32), np.float32)
    ref = layer(x, n_threads=2)                                   # the parent uses OpenMP threads
    with multiprocessing.get_context("fork").Pool(1) as pool:
        y, messages = pool.apply_async(_child_forward, (layer, x)).get(timeout=120)
    assert np.array_equal(y, ref)
    from pyfff._openmp_helpers import _openmp_parallelism_enabled

    if _openmp_parallelism_enabled():
        assert any("forked after OpenMP threads were used" in m for m in messages), messages


def test_thread_counts_are_capped():
    from pyfff._openmp_helpers import MAX_N_THREADS, _openmp_effective_n_threads, _openmp_parallelism_enabled

    assert MAX_N_THREADS >= 256
    if _openmp_parallelism_enabled():
        assert _openmp_effective_n_threads(10**9) == MAX_N_THREADS == _openmp_effective_n_threads(MAX_N_THREADS)
