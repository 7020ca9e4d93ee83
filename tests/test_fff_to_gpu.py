"""FFF.to_gpu: the CPU layer's bridge to pyfff.gpu (the GPU tests are in test_gpu.py)."""
import subprocess
import sys

import numpy as np
import pytest

import pyfff
import pyfff.gpu


def test_import_pyfff_does_not_import_cupy():
    code = "import sys, pyfff; pyfff.FFF.random(4, 4, 1)(__import__('numpy').ones((2, 4), 'f4')); print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(pyfff.gpu.HAS_CUPY, reason="checks the error raised where CuPy or a GPU is missing")
def test_to_gpu_without_cupy_says_why():
    with pytest.raises(RuntimeError, match="needs CuPy and a CUDA device"):
        pyfff.FFF.random(8, 8, 2).to_gpu()


@pytest.mark.skipif(not pyfff.gpu.HAS_CUPY, reason=f"needs CuPy and a CUDA device: {pyfff.gpu.UNAVAILABLE_REASON}")
def test_to_gpu_matches_cpu():
    import cupy

    layer = pyfff.FFF.random(33, 17, 5, n_trees=2, seed=3)
    gpu = layer.to_gpu()
    x = np.random.default_rng(0).standard_normal((97, 33)).astype(np.float32)
    np.testing.assert_array_equal(cupy.asnumpy(gpu.routes(cupy.asarray(x))), layer.routes(x))
    np.testing.assert_allclose(gpu(x), layer(x), rtol=1e-5, atol=1e-5)
