"""Loader and launcher of the plain warp-per-token baseline kernel (bench/dev/gpu_warp_baseline.cu).

Not part of the library: the baseline that issue 6's GPU kernels are measured
against. ``warp_baseline(layer, x)`` runs it on a :class:`pyfff.gpu.FFF`
(float32, one tree, GELU, widths multiples of 4 up to 1024) and returns y.
"""
from __future__ import annotations

from pathlib import Path

import cupy
import numpy as np

_SOURCE = Path(__file__).with_name("gpu_warp_baseline.cu")
_THREADS = 256


@cupy.memoize(for_each_device=True)
def _kernel():
    code = f'#line 1 "{_SOURCE.name}"\n' + _SOURCE.read_text(encoding="utf-8")
    return cupy.RawModule(code=code, options=("-std=c++17",)).get_function("fff_warp_baseline_f32")


def warp_baseline(layer, x):
    """y of shape (n, d_out) from the baseline kernel; x is a C-contiguous (n, d_in) float32 CuPy array."""
    if (layer.dtype != np.float32 or layer.n_trees != 1 or layer.activation != "gelu" or layer.b_in is None
            or layer.d_in % 4 or layer.d_out % 4 or max(layer.d_in, layer.d_out) > 1024):
        raise ValueError("the baseline kernel handles float32, one tree, GELU, a bias, widths 4k <= 1024")
    if x.dtype != cupy.float32 or not x.flags.c_contiguous or x.shape[1:] != (layer.d_in,):
        raise ValueError("x must be a C-contiguous (n, d_in) float32 CuPy array")
    n = x.shape[0]
    y = cupy.empty((n, layer.d_out), dtype=cupy.float32)
    if n:
        grid = (-(-n // (_THREADS // 32)),)  # one warp per token
        _kernel()(grid, (_THREADS,), (x, np.int64(n), np.int32(layer.d_in), np.int32(layer.d_out), layer.w_in,
                                      layer.b_in, layer.w_out, np.int32(layer.depth), y))
    return y
