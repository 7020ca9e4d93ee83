"""Version and build/runtime configuration (``pyfff.show_config()``)."""
from __future__ import annotations

import platform
import sys

__version__ = "0.1.0"


def _config_dict():
    from threadpoolctl import threadpool_info

    from . import _fff_cpu, _qgemm
    from ._openmp_helpers import _openmp_effective_n_threads, _openmp_parallelism_enabled

    import numpy as np

    pools = threadpool_info()
    openmp = [p for p in pools if p.get("user_api") == "openmp"]
    blas = [p for p in pools if p.get("user_api") == "blas"]
    return {
        "pyfff": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "openmp": _openmp_parallelism_enabled(),
        "openmp_runtime": [f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('filepath')})".strip()
                           for p in openmp],
        "default_n_threads": _openmp_effective_n_threads(None),
        "simd_variant": _fff_cpu.simd_variant(),
        "int8_path": _qgemm.default_path(),
        "int8_paths": _qgemm.paths(),
        "blas": [f"{p.get('internal_api')} {p.get('version')} {p.get('architecture') or ''} "
                 f"threads={p.get('num_threads')}" for p in blas],
        "gpu": _gpu_info(),
    }


def _gpu_info():
    """CuPy and CUDA device for pyfff.gpu, or why it is unavailable (imports CuPy if installed)."""
    from . import gpu

    if not gpu.HAS_CUPY:
        return f"unavailable: {gpu.UNAVAILABLE_REASON}"
    import cupy

    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return f"CuPy {cupy.__version__}, device {dev.id}: {name}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"


def show_config(file=None, mode="stdout"):
    """pyfff's version, OpenMP on/off and runtime, default threads, SIMD variant, int8 code paths and BLAS.

    Parameters
    ----------
    file : file-like, optional
        Where ``mode="stdout"`` prints (default: ``sys.stdout``).
    mode : {"stdout", "dicts"}, default="stdout"
        "stdout" prints the configuration and returns None (as ``numpy.show_config``); "dicts" prints nothing and
        returns it as a dict.
    """
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    cfg = _config_dict()
    if mode == "dicts":
        return cfg
    out = file or sys.stdout
    width = max(len(k) for k in cfg)
    for key, value in cfg.items():
        if isinstance(value, list):
            value = "; ".join(value) if value else "(none loaded)"
        print(f"{key:<{width}} : {value}", file=out)
    return None
