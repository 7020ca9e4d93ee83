"""The GPU FFF layer: weights on a CUDA device, forward pass by pyfff's CuPy RawKernels.

Contract: same constructor, validation, routing rule, routes and dtypes
(float32, float64) as :class:`pyfff.FFF`, whose constructor does the
validation; the result is a CuPy array for a CuPy input and a NumPy array
for anything else (copied to the device and back).

How a forward pass runs (kernels in ``kernels/fff.cu``). Batch order (the
default below ``_SMEM_MIN_TOKENS`` tokens): for each tree, ``fff_route`` walks
every token's path (half a warp per token, the token's row of x in registers,
16-byte row loads through L1/L2, a shuffle reduction per level) and stores the
visited nodes and logits; then ``fff_output`` forms
``y = sum act(logit) * w_out[row]`` for all trees at once, one warp per token,
writing each row of y once. For one tree (when the row of y and the terms fit
its registers) the route kernel forms y itself right after each walk, and
the whole layer is one launch (the ``fused`` variant). The staged schedule (the default from
``_SMEM_MIN_TOKENS`` tokens on): the levels are split into stages whose
subtrees fit in shared memory (two stages of six levels at width 768, float32);
``fff_route_staged`` stages the root's subtree rows in shared memory and walks
every token through them, putting each token into the bucket of the node where
the next stage starts (per-bucket slots, its rank from the histogram's atomic);
``fff_route`` walks the later stages in that bucket order (rows through L1) and
writes the order; ``fff_output_staged`` then forms y in that order, with the
segment's ancestor and subtree rows of w_out staged. Where slots would take too
much memory, or with ``smem="all"`` (every stage staged), ``fff_bucket_scatter``
sorts the tokens between stages instead.
Every schedule gives bitwise the same results. Launches are prepared once per
(batch size, schedule, stream) in a :class:`_Plan` with cached workspaces and
enqueued through ``cuLaunchKernel`` (on sm_90 and later, the kernels after the
first through ``cuLaunchKernelEx`` as programmatic dependents).

Other schedules (``_run(splits=..., sort_output=..., smem=...)``, all tested)
re-sort the tokens between unstaged route stages and/or by their leaf; they
measured slower on the H100 (docs/gpu.md).
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict

import numpy as np

from ..fff import FFF as _CpuFFF

__all__ = ["FFF"]

_ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # PYFFF_ACT_* in kernels/fff.cu
_KERNEL_FILE = "fff.cu"
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_SCATTER_THREADS = 256  # PYFFF_SCATTER_THREADS
_SCATTER_TOKENS = 256 * 2  # PYFFF_SCATTER_THREADS * PYFFF_SCATTER_ITEMS
_MAX_KEY_LEVEL = 12  # PYFFF_MAX_BUCKETS = 2**12
_INT32_MAX = 2**31 - 1

# Schedule default below _SMEM_MIN_TOKENS (docs/gpu.md has the measurements behind it): batch order, no
# re-sorting. The unstaged sorted schedules (re-sort at level 6 and/or by leaf) raised L1 hit rates but were
# slower than batch order on the H100; they stay selectable through _run(splits=..., sort_output=...) and are
# tested.
_DEFAULT_SPLITS = ()
_DEFAULT_SORT_OUTPUT = False
# From this batch size on, the default is the staged schedule (weight rows staged in shared memory). On the
# H100 at width 768, depth 11 (bench/dev/gpu_stage_times.py, fifth session): staged 47.2 / 76.4 / 94.8 / 113.7
# us against batch order (one fused launch) 34.0 / 64.2 / 93.5 / 119.8 us at batch 4096 / 8192 / 12288 / 16384.
_SMEM_MIN_TOKENS = 12288
# Kernel variants: threads per block of fff_route (256 or 512) and fff_output (256: three blocks per SM, or 768:
# one), and tokens per warp and vectors per lane and token (column slices of 32 * out_sj vectors) of
# fff_output_staged.
# fused: the last fff_route stage of a one-tree layer also forms y (fff_route<..., OUT>) where it can (levels <=
# _ROUTE_LANES, a row of y at most _ROUTE_VECTORS vectors), instead of a separate output kernel; None: where no
# route stage stages rows (smem False). Measured against fff_output (batch order): 22.5 / 34.0 / 64.2 / 119.8 us
# against 27.4 / 44.4 / 77.4 / 131.0 us at batch 2048 / 4096 / 8192 / 16384; against fff_output_staged (staged
# schedule): 67.5 / 94.3 / 118.0 us against 76.4 / 94.8 / 113.7 at 8192 / 12288 / 16384 (the fused kernel reads
# 12 rows of w_out per token through L1, the staged one shares rows between a warp's two tokens in shared memory).
_VARIANT = {"route_block": 256, "out_block": 256, "out_tpw": 2, "out_sj": 6, "fused": None}
_VARIANT_CHOICES = {"route_block": (256, 512), "out_block": (256, 768), "out_tpw": (1, 2, 4), "out_sj": (3, 6),
                    "fused": (None, False, True)}
_STAGED_ROUTE_BLOCK = 512  # PYFFF_STAGED_ROUTE_BLOCK: one block per SM (its subtree fills most of the shared memory)
# Route stages before the last load x with L2's normal policy, so that the next stage finds part of it there;
# the last stage streams it (evict-first).
_KEEP_X_IN_L2 = True
# A route stage hands its tokens to the next one (when that runs fff_route) in per-bucket slots, 2**key_level * n
# ints, instead of through fff_bucket_scatter, when those take at most this many bytes.
_SLOT_BYTES = 64 << 20
# A route stage deeper than shared memory holds still stages its upper levels if this many at most are left below
# them (their rows read through L1/L2); deeper ones run fff_route.
_UNSTAGED_LEVELS = 2
_ROUTE_TOKENS_PER_WARP = 2  # 32 / PYFFF_ROUTE_LANES

_ROUTE_LANES = 16  # PYFFF_ROUTE_LANES: lanes per token in the route kernels
_ROUTE_VECTORS = 16 * 12  # PYFFF_ROUTE_LANES * PYFFF_ROUTE_XV: vectors of a row the route kernels keep in registers
_MAX_PLANS = 8  # launch plans (workspaces) kept per layer, most recent first

# Kernels after the first of a pass are launched as programmatic dependents (sm_90 and later; measured in
# docs/gpu.md, fifth session).
_PDL = True
_ATTR_CC_MAJOR = 75  # cudaDevAttrComputeCapabilityMajor
_ATTR_SM_COUNT = 16  # cudaDevAttrMultiProcessorCount
_ATTR_SMEM_PER_SM = 81  # cudaDevAttrMaxSharedMemoryPerMultiprocessor
_ATTR_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin
_SMEM_RESERVED = 1024  # shared memory the system reserves per block (sm_80 and later)
_FUNC_ATTR_STATIC_SMEM = 1  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
_FUNC_ATTR_NUM_REGS = 4  # CU_FUNC_ATTRIBUTE_NUM_REGS
_FUNC_ATTR_MAX_DYN_SMEM = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_FUNC_ATTR_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT


def _cupy():
    from . import HAS_CUPY, UNAVAILABLE_REASON

    if not HAS_CUPY:
        raise RuntimeError(f"pyfff.gpu needs CuPy and a CUDA device: {UNAVAILABLE_REASON}")
    import cupy

    return cupy


def _host(a):
    """A CuPy array copied to the host; anything else unchanged (pyfff.FFF validates it)."""
    cp = _cupy()
    return cp.asnumpy(a) if isinstance(a, cp.ndarray) else a


_KERNEL_NAMES = {}  # function pointer -> name expression of the kernels loaded so far (CuPy names them mangled)


def _kernel(name, device_id):
    """A compiled kernel of kernels/fff.cu on the current device (memoized by the loader)."""
    from . import _loader  # imports CuPy

    cp = _cupy()
    kernel = _loader.get_kernel(_KERNEL_FILE, name)
    _KERNEL_NAMES[kernel.kernel.ptr] = name
    if "_staged" in name:  # may use all the shared memory a block can opt in to
        static = cp.cuda.driver.funcGetAttribute(_FUNC_ATTR_STATIC_SMEM, kernel.kernel.ptr)
        cp.cuda.driver.funcSetAttribute(kernel.kernel.ptr, _FUNC_ATTR_MAX_DYN_SMEM, _smem_optin(device_id) - static)
    elif name.startswith(("fff_route", "fff_output")):
        # no shared memory: ask for the largest L1 (carveout 0 %), where weight rows are cached
        cp.cuda.driver.funcSetAttribute(kernel.kernel.ptr, _FUNC_ATTR_CARVEOUT, 0)
    return kernel


def _staged_out_block(sj, tpw):
    """Threads per block of fff_output_staged<..., sj, tpw> (PYFFF_STAGED_OUT_BLOCK)."""
    return 1024 if sj * tpw <= 6 else 512


def _smem_optin(device_id):
    """Bytes of dynamic shared memory one block may use on the device."""
    return int(_cupy().cuda.runtime.deviceGetAttribute(_ATTR_SMEM_OPTIN, device_id))


def _subtree_bytes(levels, row_elems, itemsize):
    """Shared memory of a staged route stage: a subtree of ``levels`` levels, rows of ``row_elems`` weights
    and one bias each."""
    return -(-((2**levels - 1) * (row_elems + 1) * itemsize) // 16) * 16


class _Launch:
    """One prepared kernel launch: argument values packed once, as cuLaunchKernel takes them.

    Arguments are ctypes objects; the x and y pointers are ctypes objects shared with the plan, which
    sets them before each call. Launching through the driver directly costs a few microseconds of host
    time instead of CuPy's per-argument conversion.
    """

    __slots__ = ("kernel", "name", "fptr", "grid", "grid_y", "block", "smem", "cargs", "params", "config",
                 "attr")

    def __init__(self, kernel, grid, block, cargs, *, grid_y=1, smem=0):
        self.kernel = kernel
        self.fptr = kernel.kernel.ptr
        self.name = _KERNEL_NAMES.get(self.fptr, "?")  # as in kernels/fff.cu, e.g. "fff_route<float, 4, true, 0>"
        self.grid = int(grid)
        self.grid_y = int(grid_y)
        self.block = int(block)
        self.smem = int(smem)
        self.cargs = cargs
        self.params = (ctypes.c_void_p * len(cargs))(*[ctypes.addressof(a) for a in cargs])
        self.config = None  # a _LaunchConfig once dependent() is called
        self.attr = None

    def dependent(self):
        """Launch with programmatic stream serialization (cuLaunchKernelEx): the kernel may start while the one
        before it in the stream finishes; it waits for it on the device (grid_dependency in kernels/fff.cu)."""
        self.attr = _LaunchAttr(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        self.attr.value.allowed = 1
        self.config = _LaunchConfig(self.grid, self.grid_y, 1, self.block, 1, 1, self.smem, None,
                                    ctypes.pointer(self.attr), 1)


# cuLaunchKernelEx's structures (cuda.h, CUDA 12 and later), for programmatic dependent launches, which CuPy does
# not wrap.
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttrValue(ctypes.Union):
    _fields_ = [("allowed", ctypes.c_int), ("pad", ctypes.c_char * 64), ("align", ctypes.c_uint64)]


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchAttrValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)),
                ("n_attrs", ctypes.c_uint)]


_CU_LAUNCH_KERNEL_EX = []  # the driver's cuLaunchKernelEx, once loaded


def _cu_launch_kernel_ex():
    if not _CU_LAUNCH_KERNEL_EX:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _CU_LAUNCH_KERNEL_EX.append(fn)
    return _CU_LAUNCH_KERNEL_EX[0]


def _pdl_supported(device_id):
    """Whether plans on this device launch their kernels after the first as programmatic dependents: sm_90 or
    later, a Linux driver with cuLaunchKernelEx, and _PDL set."""
    cp = _cupy()
    if not _PDL or cp.cuda.runtime.deviceGetAttribute(_ATTR_CC_MAJOR, device_id) < 9:
        return False
    try:
        _cu_launch_kernel_ex()
    except (OSError, AttributeError):
        return False
    return True


def _launch(launch, stream_ptr):
    """Enqueue ``launch`` on the stream; CUDA errors raise ``CUDADriverError``."""
    cp = _cupy()
    if launch.config is None:
        cp.cuda.driver.launchKernel(launch.fptr, launch.grid, launch.grid_y, 1, launch.block, 1, 1, launch.smem,
                                    stream_ptr, ctypes.addressof(launch.params), 0)
        return
    launch.config.stream = stream_ptr
    status = _cu_launch_kernel_ex()(ctypes.byref(launch.config), launch.fptr, ctypes.addressof(launch.params), None)
    if status:
        raise cp.cuda.driver.CUDADriverError(status)


def _ptr(arr):
    return ctypes.c_void_p(arr.data.ptr)


def _grid(kernel, block, n_items, device_id, smem=0):
    """Blocks for ``n_items`` warps' worth of work: at most what fits on the device at once (one contiguous
    chunk of positions per block), at least one."""
    cp = _cupy()
    regs = cp.cuda.driver.funcGetAttribute(_FUNC_ATTR_NUM_REGS, kernel.kernel.ptr)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    per_sm = max(1, min(2048 // block, 65536 // (regs_per_warp * (block // 32))))
    if smem:
        smem_sm = cp.cuda.runtime.deviceGetAttribute(_ATTR_SMEM_PER_SM, device_id)
        per_sm = max(1, min(per_sm, smem_sm // (smem + _SMEM_RESERVED)))
    n_sm = cp.cuda.runtime.deviceGetAttribute(_ATTR_SM_COUNT, device_id)
    return max(1, min(-(-n_items // (block // 32)), per_sm * n_sm))


def _output_slices(rows, nvec, vec_bytes, sj, device_id, reserve=0):
    """(vectors per column slice, number of slices) for fff_output_staged with ``rows`` staged rows of
    ``nvec`` vectors and ``sj`` vectors per lane (and ``reserve`` bytes beside them), or None when not even a
    32-vector slice (or the whole row) fits. Slices are as wide as the kernel takes (32 * sj vectors) and as
    equal as they can be."""
    width = min(32 * sj, nvec, (_smem_optin(device_id) - reserve) // (rows * vec_bytes))
    if width < min(32, nvec):  # narrower slices would leave lanes idle: fff_output does better
        return None
    n_slices = -(-nvec // width)
    return -(-nvec // n_slices), n_slices


class _Plan:
    """Workspaces and prepared launches for one batch size, schedule and stream of one layer.

    The workspaces (nodes, logits, bucket keys, permutations, histograms) are reused by later calls
    with the same key; ``run`` writes x's and y's addresses into the prepared arguments, zeroes the
    histograms and enqueues the launches. Not safe for concurrent calls from several host threads.
    """

    def __init__(self, layer, n, vec_in, want_output, splits, sort_output, smem, variant):
        cp = _cupy()
        levels = layer.depth + 1
        itemsize = layer.dtype.itemsize
        self.nodes = cp.empty((n, layer.n_trees, levels), dtype=cp.int32)
        self.logits = cp.empty((n, layer.n_trees, levels), dtype=layer.dtype)
        n_sorts = len(splits) * layer.n_trees + (1 if sort_output else 0)
        # per sort: histogram, cursors, bucket starts
        self.work = cp.zeros((n_sorts, 3, (1 << _MAX_KEY_LEVEL) + 1), dtype=cp.int32) if n_sorts else None
        keys = cp.empty(n, dtype=cp.int32) if n_sorts else layer._dummy
        self.x_arg = ctypes.c_void_p(0)
        self.y_arg = ctypes.c_void_p(0)
        self._keep = [keys]  # buffers referenced only by launch arguments
        dev = layer.device_id
        r_block = variant["route_block"]
        exact = "true" if layer.d_in == _ROUTE_VECTORS * vec_in else "false"
        route = _kernel(f"fff_route<{layer._ctype}, {vec_in}, {exact}, 0>", dev)
        route_grid = _grid(route, r_block, -(-n // _ROUTE_TOKENS_PER_WARP), dev)
        # the last route stage forms y itself (OUT 1, or 2: a row of y is exactly _ROUTE_VECTORS vectors)
        fuse = (want_output and (not smem if variant["fused"] is None else variant["fused"])
                and layer.n_trees == 1 and not sort_output
                and levels <= _ROUTE_LANES and layer.d_out % vec_in == 0 and layer.d_out // vec_in <= _ROUTE_VECTORS)
        out_code = 2 if layer.d_out == _ROUTE_VECTORS * vec_in else 1
        route_out = _kernel(f"fff_route<{layer._ctype}, {vec_in}, {exact}, {out_code}>", dev) if fuse else None
        fused = False  # whether a launch forms y
        staged_route = _kernel(f"fff_route_staged<{layer._ctype}, {vec_in}, {exact}>", dev) if smem else None
        scatter = _kernel("fff_bucket_scatter", dev)
        dummy = layer._dummy
        has_bias = layer.b_in is not None
        b_in = layer.b_in if has_bias else layer.w_in  # never read without a bias
        i32, i64 = ctypes.c_int32, ctypes.c_int64
        self.launches = []
        out_order, out_starts, out_key_level = None, None, 0
        out_counts = starts_counts = None  # the histograms behind out_starts and starts
        i_sort = 0
        bounds = (0, *splits, levels)

        def staged_stage(lo, hi):
            """Levels of its subtree that the route stage [lo, hi) stages in shared memory (fff_route_staged, given
            a sorted order when lo > 0): as many as fit, if that leaves at most _UNSTAGED_LEVELS below them
            (read through L1/L2); 0: the stage runs fff_route."""
            if not smem or not (lo == 0 or smem == "all"):
                return 0
            fit = max((k for k in range(1, hi - lo + 1) if _subtree_bytes(k, layer.d_in, itemsize) <= _smem_optin(dev)),
                      default=0)
            return fit if fit and fit >= hi - lo - _UNSTAGED_LEVELS else 0

        for tree in range(layer.n_trees):
            order, starts = None, None
            handoff = None  # (slots, sort index) left by the stage before for this one, or None
            for stage in range(len(bounds) - 1):
                lo, hi = bounds[stage], bounds[stage + 1]
                last = stage == len(bounds) - 2
                if not last:
                    key_level = hi  # the node each token visits next
                elif sort_output and tree == 0:
                    key_level = min(layer.depth, _MAX_KEY_LEVEL)  # the leaf, or its ancestor at level 12
                else:
                    key_level = -1
                counts = self.work[i_sort, 0] if key_level >= 0 else dummy
                # The next route stage, if it runs fff_route, finds its tokens in bucket slots filled by this one
                # (no fff_bucket_scatter launch) where they fit in _SLOT_BYTES.
                use_slots = (not last and not staged_stage(hi, bounds[stage + 2])
                             and (1 << key_level) * n * 4 <= _SLOT_BYTES)
                slots = cp.empty((1 << key_level) * n, dtype=cp.int32) if use_slots else dummy
                args = [self.x_arg, i64(n), i32(layer.d_in), _ptr(layer.w_in), _ptr(b_in), i32(has_bias),
                        i32(layer.n_trees), i32(layer.depth), i32(tree), i32(lo), i32(hi)]
                if handoff is not None:  # fff_route reads the slots and writes the order and bucket starts
                    order, starts = cp.empty(n, dtype=cp.int32), self.work[handoff[1], 2]
                    starts_counts = self.work[handoff[1], 0]
                    self._keep.append(order)
                    args += [_ptr(handoff[0]), i32(2)]
                else:
                    args += [_ptr(dummy if order is None else order), i32(order is not None)]
                args += [_ptr(self.nodes), _ptr(self.logits), i32(key_level), _ptr(keys), _ptr(counts),
                         i32(_KEEP_X_IN_L2 and not last), _ptr(slots), i32(n if use_slots else 0)]
                if handoff is not None:
                    args += [_ptr(self.work[handoff[1], 0]), i32(n), _ptr(order), _ptr(starts)]
                else:
                    args += [_ptr(dummy), i32(0), _ptr(dummy), _ptr(dummy)]
                staged_levels = staged_stage(lo, hi)
                if staged_levels and handoff is None:
                    stage_bytes = _subtree_bytes(staged_levels, layer.d_in, itemsize)
                    args += [_ptr(dummy if starts is None else starts), i32(staged_levels)]
                    grid = _grid(staged_route, _STAGED_ROUTE_BLOCK, -(-n // _ROUTE_TOKENS_PER_WARP), dev, stage_bytes)
                    self.launches.append(_Launch(staged_route, grid, _STAGED_ROUTE_BLOCK, args, smem=stage_bytes))
                else:
                    route_smem = 4 * ((1 << lo) + 1) if handoff is not None else 0
                    fused = fuse and last
                    args += [_ptr(layer.w_out), i32(layer.d_out), i32(layer._act), self.y_arg if fused else _ptr(dummy)]
                    self.launches.append(_Launch(route_out if fused else route, route_grid, r_block, args,
                                                 smem=route_smem))
                handoff = None
                if key_level >= 0 and use_slots:
                    self._keep.append(slots)
                    handoff = (slots, i_sort)
                    i_sort += 1
                elif key_level >= 0:
                    perm = cp.empty(n, dtype=cp.int32)
                    self._keep.append(perm)
                    starts, starts_counts = self.work[i_sort, 2], self.work[i_sort, 0]
                    self.launches.append(_Launch(scatter, -(-n // _SCATTER_TOKENS), _SCATTER_THREADS, [
                        _ptr(keys), i64(n), _ptr(counts), i32(1 << key_level), _ptr(self.work[i_sort, 1]),
                        _ptr(perm), _ptr(starts)]))
                    i_sort += 1
                    if last:
                        out_order, out_starts, out_key_level, out_counts = perm, starts, key_level, starts_counts
                    else:
                        order = perm
            if smem and not sort_output and order is not None:  # the output follows the last route sort
                out_order, out_starts, out_key_level, out_counts = order, starts, bounds[-2], starts_counts
        out_shift = 0
        if smem and sort_output and len(bounds) > 2 and layer.n_trees == 1:
            # leaf order is also sorted by the last split's node: stage that subtree, neighbours share rows
            out_shift, out_key_level = out_key_level - bounds[-2], bounds[-2]
        if want_output and not fused:
            self.launches.append(self._output_launch(layer, n, smem, variant, out_order, out_starts,
                                                     out_key_level, out_shift, None if out_shift else out_counts))
        if _pdl_supported(dev):  # the first launch follows the histograms' memset, the others a kernel
            for launch in self.launches[1:]:
                launch.dependent()

    def _output_launch(self, layer, n, smem, variant, order, starts, key_level, shift=0, counts=None):
        """The launch that forms y: fff_output_staged where it applies (one tree, its rows fit), else fff_output."""
        i32, i64 = ctypes.c_int32, ctypes.c_int64
        dev = layer.device_id
        dummy = layer._dummy
        vec_out = 16 // layer.dtype.itemsize if layer.d_out % (16 // layer.dtype.itemsize) == 0 else 1
        nvec = layer.d_out // vec_out
        levels = layer.depth + 1
        if smem and layer.n_trees == 1 and levels <= 32 and (order is not None or key_level == 0):
            rows = key_level + 2 ** (levels - key_level) - 1
            # with the sort's histogram (given with `order`), the kernel stages its first rows before waiting for
            # the route to finish, from bucket starts it computes into shared memory after the rows
            starts_bytes = 0 if counts is None else -(-4 * ((1 << key_level) + 1) // 16) * 16
            slices = _output_slices(rows, nvec, vec_out * layer.dtype.itemsize, variant["out_sj"], dev, starts_bytes)
            if slices is not None:
                width, n_slices = slices
                nbytes = rows * width * vec_out * layer.dtype.itemsize + starts_bytes
                kernel = _kernel(f"fff_output_staged<{layer._ctype}, {vec_out}, {variant['out_sj']}, "
                                 f"{variant['out_tpw']}>", dev)
                block = _staged_out_block(variant["out_sj"], variant["out_tpw"])
                grid = _grid(kernel, block, -(-n // variant["out_tpw"]), dev, nbytes)
                return _Launch(kernel, -(-grid // n_slices), block, [
                    _ptr(self.nodes), _ptr(self.logits), i64(n), i32(layer.d_out), _ptr(layer.w_out),
                    i32(layer.depth), i32(layer._act), _ptr(dummy if order is None else order),
                    i32(order is not None), _ptr(dummy if starts is None else starts), i32(key_level),
                    i32(shift), i32(width), self.y_arg, ctypes.c_void_p(None if counts is None else counts.data.ptr)],
                    grid_y=n_slices, smem=nbytes)
        g_block = variant["out_block"]
        output = _kernel(f"fff_output<{layer._ctype}, {vec_out}>", dev)
        return _Launch(output, _grid(output, g_block, n, dev), g_block, [
            _ptr(self.nodes), _ptr(self.logits), i64(n), i32(layer.d_out), _ptr(layer.w_out),
            i32(layer.n_trees), i32(layer.depth), i32(layer._act),
            _ptr(dummy if order is None else order), i32(order is not None), self.y_arg])

    def run(self, x2, y, stream_ptr):
        self.x_arg.value = x2.data.ptr
        if y is not None:
            self.y_arg.value = y.data.ptr
        if self.work is not None:
            self.work.data.memset_async(0, self.work.nbytes)
        for launch in self.launches:
            _launch(launch, stream_ptr)


def _check_variant(variant):
    """``_VARIANT`` updated with ``variant``; ValueError for unknown keys or values."""
    merged = dict(_VARIANT)
    merged.update(variant or {})
    if set(merged) != set(_VARIANT):
        raise ValueError(f"unknown variant keys {sorted(set(merged) - set(_VARIANT))}")
    if any(merged[k] not in _VARIANT_CHOICES[k] for k in merged):
        raise ValueError(f"no compiled kernels for variant {merged}: choices are {_VARIANT_CHOICES}")
    return merged


class FFF:
    """A fast feedforward layer whose weights live on a CUDA device.

    Parameters
    ----------
    w_in : array_like or cupy.ndarray of shape (n_trees * n_nodes, d_in)
    b_in : array_like or cupy.ndarray of shape (n_trees * n_nodes,) or None
    w_out : array_like or cupy.ndarray of shape (n_trees * n_nodes, d_out)
        Node-major output weights, as for :class:`pyfff.FFF`.
    n_trees : int, default=1
    activation : {"gelu", "gelu_tanh", "relu"}, default="gelu"

    The arguments are validated by :class:`pyfff.FFF` (same errors, same
    dtype rules: float32 or float64, float16 widened to float32), then copied
    to the current CUDA device. Attributes mirror the CPU layer; ``w_in``,
    ``b_in`` and ``w_out`` are CuPy arrays.
    """

    def __init__(self, w_in, b_in, w_out, *, n_trees=1, activation="gelu"):
        cpu = _CpuFFF(_host(w_in), None if b_in is None else _host(b_in), _host(w_out),
                      n_trees=n_trees, activation=activation)
        self._init_from(cpu)

    @classmethod
    def from_cpu(cls, layer):
        """The GPU twin of a :class:`pyfff.FFF` (weights copied to the current device)."""
        if not isinstance(layer, _CpuFFF):
            raise TypeError(f"expected a pyfff.FFF, got {type(layer).__name__}")
        self = cls.__new__(cls)
        self._init_from(layer)
        return self

    def _init_from(self, cpu):
        cp = _cupy()
        self.depth = cpu.depth
        self.n_trees = cpu.n_trees
        self.n_nodes = cpu.n_nodes
        self.d_in = cpu.d_in
        self.d_out = cpu.d_out
        self.dtype = cpu.dtype
        self.activation = cpu.activation
        self.device_id = cp.cuda.Device().id
        self.w_in = cp.asarray(cpu.w_in)
        self.b_in = None if cpu.b_in is None else cp.asarray(cpu.b_in)
        self.w_out = cp.asarray(cpu.w_out)
        self._act = _ACT_CODES[cpu.activation]
        self._ctype = _CTYPES[self.dtype]
        self._dummy = cp.zeros(1, dtype=cp.int32)
        self._plans = OrderedDict()
        self._splits_staged = None  # _staged_splits, once known

    def to_cpu(self):
        """A :class:`pyfff.FFF` with these weights copied to the host."""
        cp = _cupy()
        return _CpuFFF(cp.asnumpy(self.w_in), None if self.b_in is None else cp.asnumpy(self.b_in),
                       cp.asnumpy(self.w_out), n_trees=self.n_trees, activation=self.activation)

    @property
    def n_neurons(self):
        """All neurons of the layer, ``n_trees * n_nodes``."""
        return self.n_trees * self.n_nodes

    def __repr__(self):
        return (f"pyfff.gpu.FFF(d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, "
                f"n_trees={self.n_trees}, dtype={self.dtype.name}, activation={self.activation!r}, "
                f"device={self.device_id})")

    # ------------------------------------------------------------------ calls
    def __call__(self, x):
        """Apply the layer.

        Parameters
        ----------
        x : cupy.ndarray or array_like of shape (..., d_in)
            Float input; other float dtypes are cast to the layer's dtype.

        Returns
        -------
        y : cupy.ndarray (for a CuPy input) or numpy.ndarray of shape (..., d_out), dtype of the layer
        """
        cp = _cupy()
        x2, lead, on_host = self._prepare(x)
        with cp.cuda.Device(self.device_id):
            y, _ = self._run(x2, want_output=True)
        y = y.reshape(lead + (self.d_out,))
        return cp.asnumpy(y) if on_host else y

    def routes(self, x):
        """Visited node indices (within each tree), level by level.

        Returns
        -------
        routes : cupy.ndarray or numpy.ndarray of shape (..., n_trees, depth + 1), dtype=int64
        """
        cp = _cupy()
        x2, lead, on_host = self._prepare(x)
        with cp.cuda.Device(self.device_id):
            _, (nodes, _) = self._run(x2, want_output=False)
            r = nodes.astype(cp.int64).reshape(lead + (self.n_trees, self.depth + 1))
        return cp.asnumpy(r) if on_host else r

    def _prepare(self, x):
        """x as a C-contiguous (n_samples, d_in) CuPy array of the layer dtype, its leading shape, and whether
        it came from the host."""
        cp = _cupy()
        if isinstance(x, cp.ndarray):
            on_host = False
            if x.device.id != self.device_id:
                raise ValueError(f"x is on device {x.device.id} but the layer's weights are on device "
                                 f"{self.device_id}")
        else:
            on_host = True
            x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a float array, got dtype {x.dtype}")
        shape = x.shape
        if not shape or shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., {self.d_in}), got {shape}")
        n = int(np.prod(shape[:-1], dtype=np.int64))
        if n > _INT32_MAX:
            raise ValueError(f"at most {_INT32_MAX} rows per call, got {n}")
        with cp.cuda.Device(self.device_id):
            if x.dtype != self.dtype:
                x = x.astype(self.dtype)
            x2 = cp.ascontiguousarray(cp.asarray(x.reshape(n, self.d_in)))
        return x2, shape[:-1], on_host

    # --------------------------------------------------------------- pipeline
    def _schedule(self, n):
        """(splits, sort_output, smem) used for a batch of n tokens by default.

        Large batches stage weight rows in shared memory (``smem``): the route is split into stages whose
        subtrees fit (re-sorting the tokens by node between stages); the first stage (whose subtree every
        token shares) stages its rows, later stages read theirs through L1 (their tokens arrive grouped by
        subtree; measured faster than staging them, docs/gpu.md) and the output follows the last sort.
        Small batches walk in batch order from L1/L2: staging a subtree costs more than its few tokens save.
        """
        if n < _SMEM_MIN_TOKENS:
            return _DEFAULT_SPLITS, _DEFAULT_SORT_OUTPUT, False
        return self._staged_splits(), False, True

    def _staged_splits(self):
        """Route stage boundaries for the staged schedule: as few stages as fit in shared memory, of about
        equal depth (each boundary costs a sort and a second read of x). Computed once per layer."""
        if self._splits_staged is None:
            self._splits_staged = self._fit_staged_splits()
        return self._splits_staged

    def _fit_staged_splits(self):
        levels = self.depth + 1
        optin = _smem_optin(self.device_id)
        fit = max(k for k in range(levels + 1) if k == 0 or _subtree_bytes(k, self.d_in, self.dtype.itemsize) <= optin)
        if fit == 0:
            return ()
        n_stages = -(-levels // fit)
        bounds = [round(i * levels / n_stages) for i in range(1, n_stages)]
        return tuple(b for b in bounds if 1 <= b <= min(self.depth, _MAX_KEY_LEVEL))

    def _check_schedule(self, splits, sort_output, smem):
        if smem not in (False, True, "all"):
            raise ValueError(f"smem must be False, True or 'all', got {smem!r}")
        splits = tuple(int(s) for s in splits)
        top = min(self.depth, _MAX_KEY_LEVEL)
        if any(not 1 <= s <= top for s in splits) or list(splits) != sorted(set(splits)):
            raise ValueError(f"splits must be increasing levels in 1..{top}, got {splits}")
        return splits, bool(sort_output), smem

    def _run(self, x2, *, want_output, splits=None, sort_output=None, smem=None, variant=None):
        """Run the pipeline on a (n, d_in) CuPy array; returns (y or None, (nodes, logits)).

        ``splits`` (levels at which the tokens are re-sorted by their node there, or "staged": the
        boundaries the staged schedule uses), ``sort_output`` (whether ``y`` is formed in leaf order),
        ``smem`` (True: the first route stage and the output stage their weight rows in shared memory where
        they fit, later route stages read theirs through L1 in sorted order; "all": every route stage that
        fits stages them; False: none) and ``variant`` (kernel variants, keys of ``_VARIANT``) default to
        :meth:`_schedule` and ``_VARIANT``; every choice gives bitwise the same results. ``nodes`` and
        ``logits`` are workspaces of the launch plan, overwritten by the next call with the same plan.
        """
        cp = _cupy()
        n = x2.shape[0]
        default = self._schedule(n)
        if isinstance(splits, str) and splits == "staged":
            splits = self._staged_splits()
        splits, sort_output, smem = self._check_schedule(
            default[0] if splits is None else splits, default[1] if sort_output is None else sort_output,
            default[2] if smem is None else smem)
        sort_output = sort_output and want_output
        variant = _check_variant(variant)
        y = cp.empty((n, self.d_out), dtype=self.dtype) if want_output else None
        if n == 0:
            levels = self.depth + 1
            return y, (cp.empty((0, self.n_trees, levels), cp.int32), cp.empty((0, self.n_trees, levels), self.dtype))
        vec = 16 // self.dtype.itemsize
        vec_in = vec if self.d_in % vec == 0 and x2.data.ptr % 16 == 0 else 1
        stream_ptr = cp.cuda.get_current_stream().ptr
        key = (n, vec_in, want_output, splits, sort_output, smem, tuple(sorted(variant.items())), stream_ptr)
        plan = self._plans.get(key)
        if plan is None:
            plan = _Plan(self, n, vec_in, want_output, splits, sort_output, smem, variant)
            self._plans[key] = plan
            while len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        plan.run(x2, y, stream_ptr)
        return y, (plan.nodes, plan.logits)
