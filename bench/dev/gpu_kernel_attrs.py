"""Registers and local memory (spills) of pyfff.gpu's compiled kernels on this device.

Run (repository root, GPU machine): PYTHONPATH=$PWD python bench/dev/gpu_kernel_attrs.py [substring]
"""
from __future__ import annotations

import sys

import cupy as cp

from pyfff.gpu import _loader

_ATTRS = {"registers": 4, "local bytes": 3, "static smem": 1}  # CU_FUNC_ATTRIBUTE_*


def main(pattern=""):
    for name in _loader.NAME_EXPRESSIONS["fff.cu"]:
        if pattern not in name:
            continue
        ptr = _loader.get_kernel("fff.cu", name).kernel.ptr
        attrs = ", ".join(f"{k} {cp.cuda.driver.funcGetAttribute(a, ptr)}" for k, a in _ATTRS.items())
        print(f"{name:45s} {attrs}")


if __name__ == "__main__":
    main(*sys.argv[1:])
