"""Kernel loader: the ``.cu`` files of ``pyfff/gpu/kernels`` compiled by ``cupy.RawModule``.

One module per (file, device), built on first use and memoized with
``cupy.memoize(for_each_device=True)``; CuPy's own disk cache keeps the
compiled binary between processes. A ``#line`` directive makes NVRTC's
messages name the real file and line. Templates are instantiated through
name expressions (one per dtype and vector width), so the source is never
generated per shape.
"""
from __future__ import annotations

from pathlib import Path

import cupy

__all__ = ["KERNEL_DIR", "NAME_EXPRESSIONS", "get_kernel", "get_module"]

KERNEL_DIR = Path(__file__).with_name("kernels")

_OPTIONS = ("-std=c++17",)

# C++ type and the vector widths (elements per 16-byte load, or 1) compiled for it.
_TYPES = (("float", (4, 1)), ("double", (2, 1)))

# fff_route and fff_route_staged take EXACT = whether a row is exactly the vectors the lanes keep in registers
# (16 lanes x 12 vectors: 768 floats, 384 doubles), fff_route also OUT (0: no output; 1, 2: forms y, 2 when a
# row of y is exactly those vectors); fff_output_staged takes column-slice vectors per lane (SJ) and tokens per
# warp (TPW).
_STAGED_OUT_SJ = (3, 6)
_STAGED_OUT_TPW = (1, 2, 4)

NAME_EXPRESSIONS = {
    "fff.cu": tuple(f"fff_output<{ctype}, {vec}>" for ctype, vecs in _TYPES for vec in vecs)
    + tuple(f"fff_route<{ctype}, {vec}, {exact}, {out}>" for ctype, vecs in _TYPES for vec in vecs
            for exact in ("false", "true") for out in (0, 1, 2))
    + tuple(f"fff_route_staged<{ctype}, {vec}, {exact}>" for ctype, vecs in _TYPES for vec in vecs
            for exact in ("false", "true"))
    + tuple(f"fff_output_staged<{ctype}, {vec}, {sj}, {tpw}>" for ctype, vecs in _TYPES for vec in vecs
            for sj in _STAGED_OUT_SJ for tpw in _STAGED_OUT_TPW),
}


@cupy.memoize(for_each_device=True)
def get_module(filename):
    """The compiled ``cupy.RawModule`` of ``kernels/<filename>`` on the current device."""
    path = KERNEL_DIR / filename
    code = f'#line 1 "{path.name}"\n' + path.read_text(encoding="utf-8")
    return cupy.RawModule(code=code, options=_OPTIONS, name_expressions=NAME_EXPRESSIONS.get(filename))


@cupy.memoize(for_each_device=True)
def get_kernel(filename, name):
    """Kernel ``name`` (a name expression such as ``"fff_output<float, 4>"``, or an ``extern "C"`` name)."""
    return get_module(filename).get_function(name)
