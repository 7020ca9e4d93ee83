"""FFF.__call__(x, out=...): results land in a caller's array, identical to the allocating call."""
import numpy as np
import pytest

from pyfff import FFF


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead", [(0,), (1,), (97,), (3, 7)])
def test_out_matches_the_allocating_call(dtype, lead):
    layer = FFF.random(17, 5, 4, n_trees=2, seed=1, dtype=dtype)
    x = np.random.default_rng(0).standard_normal(lead + (17,)).astype(dtype)
    out = np.full(lead + (5,), np.nan, dtype=dtype)
    for n_threads in (1, 2):
        y = layer(x, n_threads=n_threads, out=out)
        assert y is out
        np.testing.assert_array_equal(out, layer(x), strict=True)


def test_out_errors():
    layer = FFF.random(8, 4, 2)
    x = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\)"):
        layer(x, out=np.empty((4, 4), np.float32))
    with pytest.raises(TypeError, match="out must have the layer's dtype float32"):
        layer(x, out=np.empty((3, 4), np.float64))
    with pytest.raises(TypeError, match="out must be a numpy array"):
        layer(x, out=[[0.0] * 4] * 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        layer(x, out=np.empty((4, 3), np.float32).T)
    ro = np.empty((3, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        layer(x, out=ro)
    square = FFF.random(8, 8, 2)
    xs = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        square(xs, out=xs)
    with pytest.raises(ValueError, match="n_threads=0"):
        layer(x, n_threads=0, out=np.empty((3, 4), np.float32))
