"""pyfff.gpu: FFF inference on an NVIDIA GPU with CuPy RawKernels (optional).

``import pyfff`` never imports this subpackage, nor CuPy. Importing it works
out once whether CuPy and a CUDA device are usable (``HAS_CUPY``; the reason
when not is ``UNAVAILABLE_REASON``) and warns only when CuPy is installed but
unusable; building a :class:`FFF` without them raises ``RuntimeError``.

Usage::

    import pyfff, pyfff.gpu
    cpu = pyfff.FFF.random(768, 768, depth=11)
    gpu = pyfff.gpu.FFF.from_cpu(cpu)   # weights copied to the current device
    y = gpu(x)                          # CuPy in, CuPy out; NumPy in, NumPy out

The kernels are in ``pyfff/gpu/kernels/fff.cu``; how the forward pass is
organised is described in ``pyfff/gpu/_fff.py`` and ``docs/gpu.md``.
"""
from __future__ import annotations

import warnings

__all__ = ["FFF", "HAS_CUPY", "UNAVAILABLE_REASON"]


def _probe():
    """(HAS_CUPY, reason): whether CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); install cupy-cuda12x or cupy-cuda13x"
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, or a broken CUDA install
        reason = f"CuPy {cupy.__version__} is installed but CUDA is unusable: {exc}"
        warnings.warn(f"pyfff.gpu disabled: {reason}", RuntimeWarning, stacklevel=3)
        return False, reason
    if n_devices < 1:
        reason = f"CuPy {cupy.__version__} is installed but sees no CUDA device"
        warnings.warn(f"pyfff.gpu disabled: {reason}", RuntimeWarning, stacklevel=3)
        return False, reason
    return True, ""


HAS_CUPY, UNAVAILABLE_REASON = _probe()

from ._fff import FFF  # noqa: E402  (needs HAS_CUPY defined; imports CuPy only when used)
