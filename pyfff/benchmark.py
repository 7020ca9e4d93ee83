"""Timing and comparison of the FFF kernels against dense feedforward layers.

Shared by ``pyfff bench`` (``pyfff/_cli_bench.py``) and the pytest-benchmark
suite in ``bench/``. Importable without matplotlib, pytest or SciPy.

Contract
--------
* Inputs and weights are deterministic (seeded ``numpy.random.default_rng``),
  never uninitialised.
* Every implementation is timed with ``time.perf_counter`` around single calls,
  after at least one warm-up call. Calls cycle through distinct inputs (at
  least ``POOL_TOKENS`` tokens), so no call finds its routes' weight rows
  cache-hot from an identical previous call; the reported time is therefore
  the median of the runs (the best run is the luckiest input and is kept as
  ``best_s``).
* A dense baseline runs on the same number of threads as the FFF kernel it is
  compared with: the BLAS thread pool is limited once around the whole timed
  region (``threadpoolctl``), not per call. Its two matrix products write into
  preallocated buffers, so no allocation is timed for it (the FFF call does
  allocate its output): the speed-ups reported are, if anything, conservative.
* Every timed output is checked against ``pyfff.reference`` on its first rows
  (route-aware for the FFF: a row may take another route only where the
  node's logit is within rounding of zero); the verdict is recorded with the
  timing, never assumed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .fff import FFF
from .reference import apply_activation, fff_forward, fff_routes, masked_dense_forward

__all__ = [
    "BERT_BASE_NEURONS", "Check", "OtherLoad", "Prepared", "Result", "Shape", "Unavailable", "Workload",
    "all_threads", "available_impls", "blas_limits", "check_dense_output", "check_fff_output", "is_impl",
    "machine_info", "measure", "plan_rounds", "prepare", "result_from", "run_case", "speedups", "time_calls",
]

BERT_BASE_NEURONS = 3072
DEFAULT_WIDTH = 768
DEFAULT_DEPTH = 11
CHECK_ROWS = 64  # rows of every output compared with the reference
# Calls cycle through distinct inputs, at least this many tokens in all, so that no call finds its tokens' weight
# rows still in cache from an identical previous call (batch 1 with one fixed input would time a cache-hot route).
POOL_TOKENS = 4096
NUMPY_REF_MAX_BATCH = 2048  # the reference walks the tree with fancy indexing: slow beyond this
# allclose tolerances on outputs, relative to the largest reference value of the checked rows
TOLERANCES = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


# ---------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Shape:
    """One benchmark point: ``batch`` tokens through a width-``width`` layer of depth ``depth``."""

    batch: int
    depth: int = DEFAULT_DEPTH
    width: int = DEFAULT_WIDTH
    dtype: str = "float32"

    @property
    def n_neurons(self):
        """Neurons of the tree (one tree): ``2**(depth + 1) - 1``, 4095 at depth 11."""
        return 2 ** (self.depth + 1) - 1

    @property
    def label(self):
        # zero-padded so that pytest-benchmark's groups (sorted as text) come in numeric order
        return f"w{self.width:04d}-d{self.depth:02d}-b{self.batch:05d}-{self.dtype}"


@functools.lru_cache(maxsize=3)
def _layer(width, depth, dtype, seed):
    return FFF.random(width, width, depth, seed=seed, dtype=np.dtype(dtype))


@functools.lru_cache(maxsize=3)
def _dense_weights(n_neurons, width, dtype, seed):
    """(w1 of shape (n_neurons, width), w2 of shape (n_neurons, width)): N(0, 1/width), N(0, 1/n_neurons)."""
    rng = np.random.default_rng(seed + 1000)
    w1 = rng.standard_normal((n_neurons, width), dtype=np.float32) / np.float32(math.sqrt(width))
    w2 = rng.standard_normal((n_neurons, width), dtype=np.float32) / np.float32(math.sqrt(n_neurons))
    return w1.astype(dtype), w2.astype(dtype)


class Workload:
    """The FFF layer, its inputs and the dense weights of one :class:`Shape`; all seeded.

    ``inputs`` holds ``ceil(pool_tokens / batch)`` distinct (batch, width)
    inputs (one when the batch is at least ``pool_tokens``: then every call
    sees the same tokens, cache-hot routes included); :meth:`next_x`
    cycles through them, so consecutive timed calls see new tokens, as in
    inference, and ``last_x`` is the input of the latest call (the one whose
    output is checked). ``x`` is the first input.

    Layers and dense weights are cached (a few at a time) so that a sweep over
    batch sizes builds each layer once.
    """

    def __init__(self, shape: Shape, seed: int = 0, pool_tokens: int = POOL_TOKENS):
        self.shape = shape
        self.seed = seed
        self.layer = _layer(shape.width, shape.depth, shape.dtype, seed)
        rng = np.random.default_rng(seed + 1)
        n_inputs = max(1, -(-pool_tokens // shape.batch))  # ceil
        pool = rng.standard_normal((n_inputs, shape.batch, shape.width), dtype=np.float32).astype(shape.dtype)
        self.inputs = list(pool)  # C-contiguous (batch, width) views
        self.x = self.last_x = self.inputs[0]
        self._cycle = itertools.cycle(self.inputs)

    def next_x(self):
        """The next input of the cycle (timed calls pick their input with this: about 0.1 us)."""
        x = self.last_x = next(self._cycle)
        return x

    def dense_weights(self, n_neurons):
        return _dense_weights(n_neurons, self.shape.width, self.shape.dtype, self.seed)


# ------------------------------------------------------------- correctness
@dataclass
class Check:
    """The verdict on one output, from its first ``n_rows`` rows."""

    correct: bool
    n_rows: int
    max_rel_err: float  # max |y - ref| / max |ref| over the compared rows that took the reference's route
    n_route_ties: int = 0  # rows that took another route at a node whose logit is within rounding of 0
    detail: str = ""


def _logit_tolerance(x, w_in, b_in, nodes, dtype):
    """Rounding bound of each visited logit: ``d_in * eps * (|x| . |w| + |b|)``, shape of ``nodes``."""
    eps = np.finfo(dtype).eps
    absw = np.abs(w_in[nodes[:, 0, :]])  # (n, depth + 1, d_in)
    bound = np.einsum("nd,nld->nl", np.abs(x), absw)
    if b_in is not None:
        bound = bound + np.abs(b_in[nodes[:, 0, :]])
    return (x.shape[1] * eps * bound)[:, None, :]  # (n, 1, depth + 1)


def _compare_rows(y, ref, dtype):
    """Per-row ``allclose`` with a tolerance relative to the largest reference value; and the max error."""
    scale = max(float(np.max(np.abs(ref))), np.finfo(dtype).tiny) if ref.size else 1.0
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64)) / scale
    tol = TOLERANCES[np.dtype(dtype)]
    row_ok = np.all(err <= tol, axis=1) if ref.size else np.ones(len(ref), bool)
    return row_ok, err


def check_fff_output(layer: FFF, x, y, n_rows: int = CHECK_ROWS, routes=None, reference="tree") -> Check:
    """Compare the first ``n_rows`` rows of ``y = layer(x)`` with the reference, route-aware.

    Parameters
    ----------
    layer : FFF
    x : ndarray of shape (batch, d_in)
    y : ndarray of shape (batch, d_out)
        The output being checked.
    routes : ndarray of shape (>= n_rows, n_trees, depth + 1) or None
        Routes the implementation took. None: ``layer.routes(x)`` (the kernel's
        routing, on the whole batch as it was run); a row whose route differs
        from the reference's is accepted, without comparing its output, only
        if the logit of the node where the routes part is within the rounding
        bound of zero.
    reference : {"tree", "masked_dense"}
        ``pyfff.reference.fff_forward`` or the independent masked-dense
        formulation (used to check ``numpy_ref`` itself).
    """
    n = min(n_rows, x.shape[0])
    xs = np.ascontiguousarray(x[:n])
    if layer.n_trees != 1:
        raise ValueError("check_fff_output handles single-tree layers (the benchmark layers)")
    ref_fn = fff_forward if reference == "tree" else masked_dense_forward
    ref = ref_fn(xs, layer.w_in, layer.b_in, layer.w_out, activation=layer.activation)  # (n, d_out)
    ref_nodes, ref_logits = fff_routes(xs, layer.w_in, layer.b_in)  # (n, 1, depth + 1)
    # routes of the whole batch: the kernel may pick another code path for 64 rows than for the full batch
    got_nodes = (layer.routes(x) if routes is None else np.asarray(routes))[:n]
    row_ok, err = _compare_rows(np.asarray(y[:n]), ref, layer.dtype)
    same_route = np.all(got_nodes == ref_nodes, axis=(1, 2))
    tol = _logit_tolerance(xs, layer.w_in, layer.b_in, ref_nodes, layer.dtype)
    differs = got_nodes != ref_nodes  # (n, 1, depth + 1)
    first = np.argmax(differs, axis=2)[:, 0]  # first differing level (0 where none)
    # the routes part below the node one level up: that node's logit decided the branch
    decide = np.maximum(first - 1, 0)
    rows = np.arange(n)
    near_zero = (first >= 1) & (np.abs(ref_logits[rows, 0, decide]) <= tol[rows, 0, decide])
    ties = ~same_route & near_zero
    bad = (~same_route & ~near_zero) | (same_route & ~row_ok)
    max_err = float(err[same_route].max()) if same_route.any() and err.size else 0.0
    detail = ""
    if bad.any():
        r = int(np.argmax(bad))
        why = "route differs away from a tie" if not same_route[r] else f"output error {err[r].max():.3g}"
        detail = f"{int(bad.sum())} of {n} rows wrong (first: row {r}, {why})"
    return Check(correct=not bad.any(), n_rows=n, max_rel_err=max_err, n_route_ties=int(ties.sum()), detail=detail)


def check_dense_output(x, w1, w2, y, activation=None, n_rows: int = CHECK_ROWS) -> Check:
    """Compare the first rows of a dense feedforward output with the same computation in float64."""
    n = min(n_rows, x.shape[0])
    h = x[:n].astype(np.float64) @ w1.astype(np.float64).T  # (n, n_neurons)
    if activation is not None:
        h = apply_activation(h, activation)
    ref = h @ w2.astype(np.float64)  # (n, width)
    row_ok, err = _compare_rows(np.asarray(y[:n]), ref, y.dtype)
    bad = ~row_ok
    detail = f"{int(bad.sum())} of {n} rows wrong" if bad.any() else ""
    return Check(correct=not bad.any(), n_rows=n, max_rel_err=float(err.max()) if err.size else 0.0, detail=detail)


# ----------------------------------------------------------- thread control
@functools.lru_cache(maxsize=1)
def _controller():
    """One ThreadpoolController for the process: creating one scans the loaded libraries."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_limits(n_threads):
    """Context manager limiting the BLAS pool to ``n_threads`` (enter it once, around a timed region)."""
    return _controller().limit(limits=int(n_threads), user_api="blas")


def all_threads():
    """What ``n_threads=None`` means for the FFF kernel here (usable cores, honouring OMP/threadpoolctl limits)."""
    from ._openmp_helpers import _openmp_effective_n_threads

    return int(_openmp_effective_n_threads(None))


# ---------------------------------------------------------- implementations
class Unavailable(Exception):
    """An implementation that cannot run here or at this size (the reason is the message)."""


@dataclass
class Prepared:
    """One implementation, ready to time on one workload.

    ``run()`` is the timed call and returns the output; ``limits()`` is entered
    once around all timed calls; ``flops`` and ``bytes`` are per call, worked
    out by hand (see :func:`prepare`); ``check(y)`` judges an output.
    """

    kernel: str
    family: str  # "fff", "dense" or "reference"
    n_threads: int
    n_neurons: int
    run: Callable[[], np.ndarray]
    check: Callable[[np.ndarray], Check]
    flops: float
    bytes: float
    limits: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    activation_timed: bool = True


def _fff_costs(shape: Shape, itemsize):
    """FLOPs (2 per multiply-add; activations not counted) and bytes of weight rows plus x and y, per call.

    Bytes count each token's own ``2 * (depth + 1)`` weight rows, as if no row
    were shared between tokens: an upper bound of the memory traffic, so the
    GB/s column is the rate at which weight rows are consumed, not DRAM traffic.
    """
    per_token_madds = (shape.depth + 1) * 2 * shape.width  # dot products + axpys
    flops = 2.0 * shape.batch * per_token_madds
    nbytes = itemsize * shape.batch * (per_token_madds + 2 * shape.width)
    return flops, float(nbytes)


def _dense_costs(shape: Shape, n_neurons, itemsize):
    """FLOPs of the two matrix products; bytes: both weight matrices once, x, y, and h written and read."""
    flops = 2.0 * shape.batch * n_neurons * 2 * shape.width
    nbytes = itemsize * (2 * n_neurons * shape.width + 2 * shape.batch * shape.width + 2 * shape.batch * n_neurons)
    return flops, float(nbytes)


def _prepare_fff(work: Workload, n_threads):
    layer = work.layer
    flops, nbytes = _fff_costs(work.shape, layer.dtype.itemsize)
    # A preallocated output, as the dense baseline's matmuls get.
    y = np.empty((work.shape.batch, layer.d_out), dtype=layer.dtype)
    return Prepared(
        kernel="pyfff", family="fff", n_threads=n_threads, n_neurons=layer.n_neurons,
        run=lambda: layer(work.next_x(), n_threads=n_threads, out=y),
        check=lambda y: check_fff_output(layer, work.last_x, y), flops=flops, bytes=nbytes)


def _prepare_numpy_ref(work: Workload, n_threads):
    layer = work.layer
    if work.shape.batch > NUMPY_REF_MAX_BATCH:
        raise Unavailable(f"numpy_ref runs only up to batch {NUMPY_REF_MAX_BATCH} (it is slow)")
    flops, nbytes = _fff_costs(work.shape, layer.dtype.itemsize)

    def check(y):
        x = work.last_x
        routes = fff_routes(x[:CHECK_ROWS], layer.w_in, layer.b_in)[0]  # numpy_ref's own routes
        return check_fff_output(layer, x, y, routes=routes, reference="masked_dense")

    return Prepared(
        kernel="numpy_ref", family="reference", n_threads=1, n_neurons=layer.n_neurons,
        run=lambda: fff_forward(work.next_x(), layer.w_in, layer.b_in, layer.w_out, activation=layer.activation),
        check=check, flops=flops, bytes=nbytes, limits=lambda: blas_limits(1))


def _gelu_inplace(h, tmp):
    """Exact (erf) GELU of ``h`` in place, ``tmp`` a buffer of h's shape; needs SciPy's erf."""
    from scipy.special import erf

    np.multiply(h, h.dtype.type(1 / math.sqrt(2.0)), out=tmp)
    erf(tmp, out=tmp)
    tmp += 1
    h *= tmp
    h *= h.dtype.type(0.5)


def _make_dense(n_neurons: Optional[int], gelu: bool):
    """Dense feedforward ``act(x @ w1.T) @ w2`` on NumPy's BLAS; ``n_neurons=None``: the tree's count."""

    def prepare_dense(work: Workload, n_threads):
        if gelu:
            try:
                import scipy.special  # noqa: F401
            except ImportError:
                raise Unavailable("the GELU dense variant needs SciPy (scipy.special.erf)") from None
        shape = work.shape
        n = shape.n_neurons if n_neurons is None else n_neurons
        w1, w2 = work.dense_weights(n)
        w1t = w1.T  # (width, n) view: sgemm with a transposed operand, no copy
        dtype = work.x.dtype
        h = np.empty((shape.batch, n), dtype=dtype)
        tmp = np.empty_like(h) if gelu else None
        y = np.empty((shape.batch, shape.width), dtype=dtype)

        def run():
            np.matmul(work.next_x(), w1t, out=h)
            if gelu:
                _gelu_inplace(h, tmp)
            np.matmul(h, w2, out=y)
            return y

        flops, nbytes = _dense_costs(shape, n, dtype.itemsize)
        return Prepared(
            kernel=f"dense_{n}" + ("+gelu" if gelu else ""), family="dense", n_threads=n_threads, n_neurons=n,
            run=run, check=lambda out: check_dense_output(work.last_x, w1, w2, out, "gelu" if gelu else None),
            flops=flops, bytes=nbytes, limits=lambda: blas_limits(n_threads), activation_timed=gelu)

    return prepare_dense


_DENSE_NAME = re.compile(r"^dense(?:_(\d+))?(_gelu)?$")


def available_impls():
    """Names accepted by :func:`prepare`, with one line each."""
    return {
        "pyfff": "the FFF layer (pyfff kernels) on the requested threads",
        "numpy_ref": f"pyfff.reference.fff_forward, 1 thread, batch <= {NUMPY_REF_MAX_BATCH}",
        "dense": "dense FF with the tree's neuron count (4095 at depth 11): two BLAS matrix products",
        "dense_gelu": "the same plus exact (erf) GELU between them (needs SciPy)",
        "dense_<N>": f"dense FF with N neurons, e.g. dense_{BERT_BASE_NEURONS} (BERT-base)",
        "dense_<N>_gelu": "dense_<N> with exact GELU",
    }


def is_impl(name: str) -> bool:
    """Whether :func:`prepare` knows ``name``."""
    return name in ("pyfff", "numpy_ref") or bool(_DENSE_NAME.match(name))


def prepare(name: str, work: Workload, n_threads: int) -> Prepared:
    """Set up implementation ``name`` (see :func:`available_impls`) on ``work`` with ``n_threads``.

    Raises :class:`Unavailable` when it cannot run here or at this size.
    """
    n_threads = int(n_threads)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if name == "pyfff":
        return _prepare_fff(work, n_threads)
    if name == "numpy_ref":
        return _prepare_numpy_ref(work, n_threads)
    m = _DENSE_NAME.match(name)
    if m:
        return _make_dense(int(m.group(1)) if m.group(1) else None, bool(m.group(2)))(work, n_threads)
    raise ValueError(f"unknown implementation {name!r}; expected one of {list(available_impls())}")


# ------------------------------------------------------------------ timing
def time_calls(fn, *, repeat=5, warmup=1, min_time=0.1, max_time=3.0, min_runs=2, max_runs=10_000):
    """Time single calls of ``fn()`` with ``time.perf_counter``, after ``warmup`` untimed calls.

    Runs until at least ``repeat`` runs and ``min_time`` seconds are done (so
    fast calls get many runs), but stops once ``max_time`` seconds are spent and
    ``min_runs`` runs are done (so a 2-second call is not run 5 times).

    Returns
    -------
    times : list of float, seconds per call
    out : the last call's return value
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    spent = 0.0
    while len(times) < max_runs:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) >= repeat and spent >= min_time:
            break
        if len(times) >= min_runs and spent >= max_time:
            break
    return times, out


class OtherLoad:
    """CPU used by *other* processes while a block runs, in cores (Linux; None elsewhere).

    The machine's busy time from ``/proc/stat`` minus this process's CPU time
    (``time.process_time``, all threads), over the wall time. On a shared
    machine, timings on several threads are only trustworthy when this is
    near 0.
    """

    def __enter__(self):
        self.cores = None
        self._start = (self._busy(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy0, cpu0, t0 = self._start
        busy1, cpu1, t1 = self._busy(), time.process_time(), time.perf_counter()
        if busy0 is not None and busy1 is not None and t1 > t0:
            self.cores = max(0.0, ((busy1 - busy0) - (cpu1 - cpu0)) / (t1 - t0))
        return False

    @staticmethod
    def _busy():
        """Seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq, steal)."""
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
            ticks = [int(v) for v in fields[1:9]]
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        except (OSError, ValueError, IndexError, AttributeError):
            return None


def plan_rounds(t_one, budget=1.0, min_rounds=3, max_rounds=1000):
    """Rounds of a call lasting ``t_one`` seconds that fit in ``budget`` seconds, clamped."""
    if t_one <= 0:
        return max_rounds
    return int(min(max_rounds, max(min_rounds, math.ceil(budget / t_one))))


@dataclass
class Result:
    """One timed implementation on one shape and thread count."""

    kernel: str
    family: str
    n_threads: int
    batch: int
    depth: int
    width: int
    dtype: str
    n_neurons: int
    best_s: float
    median_s: float
    n_runs: int
    flops: float
    bytes: float
    correct: bool
    check: dict = field(default_factory=dict)
    activation_timed: bool = True
    speedup: Optional[float] = None  # over the dense FF of the tree's neuron count, same threads, same run
    speedup_bert: Optional[float] = None  # over dense_3072, when it was measured in the same run
    speedup_vs_1t: Optional[float] = None  # over the same kernel on 1 thread, same shape, same run
    other_load: Optional[float] = None  # cores used by other processes while this case was timed

    @property
    def time_s(self):
        """The reported seconds per call: the median run."""
        return self.median_s

    @property
    def us_per_token(self):
        return self.time_s / self.batch * 1e6

    @property
    def us_per_token_best(self):
        return self.best_s / self.batch * 1e6

    @property
    def gflops(self):
        return self.flops / self.time_s / 1e9

    @property
    def gbytes_per_s(self):
        return self.bytes / self.time_s / 1e9

    def as_dict(self):
        d = dataclasses.asdict(self)
        d.update(us_per_token=self.us_per_token, us_per_token_best=self.us_per_token_best, gflops=self.gflops,
                 gbytes_per_s=self.gbytes_per_s)
        return d


def result_from(prep: Prepared, shape: Shape, times, check: Check, other_load=None) -> Result:
    return Result(
        kernel=prep.kernel, family=prep.family, n_threads=prep.n_threads, batch=shape.batch, depth=shape.depth,
        width=shape.width, dtype=shape.dtype, n_neurons=prep.n_neurons, best_s=min(times),
        median_s=statistics.median(times), n_runs=len(times), flops=prep.flops, bytes=prep.bytes,
        correct=check.correct, check=dataclasses.asdict(check), activation_timed=prep.activation_timed,
        other_load=other_load)


def measure(prep: Prepared, **timing) -> tuple:
    """Time ``prep.run`` (``time_calls`` keywords) inside its thread limits.

    Returns (times, last output, cores used by other processes meanwhile or None).
    """
    with prep.limits(), OtherLoad() as load:
        times, out = time_calls(prep.run, **timing)
    return times, out, load.cores


def check(prep: Prepared, out) -> Check:
    """``prep.check(out)`` on one BLAS thread: the check's small matrix products must not leave
    OpenBLAS worker threads spinning on the cores the next timed case runs on."""
    with blas_limits(1):
        return prep.check(out)


def run_case(name: str, shape: Shape, n_threads: int, seed: int = 0, pool_tokens: int = POOL_TOKENS,
             **timing) -> Result:
    """Prepare, time and check one implementation on one shape (see :class:`Workload` for ``pool_tokens``)."""
    work = Workload(shape, seed, pool_tokens)
    prep = prepare(name, work, n_threads)
    times, out, load = measure(prep, **timing)
    return result_from(prep, shape, times, check(prep, out), load)


def speedups(results):
    """Fill the speed-ups (ratios of median times) of each result from the other rows of the same run.

    ``speedup``: over the matmul-only dense FF (activation not timed) with the
    tree's neuron count, at the same batch, depth, width, dtype and thread
    count; ``speedup_bert``: the same over ``dense_3072``; ``speedup_vs_1t``:
    over the same kernel on one thread. A row without its baseline keeps None.
    """
    def key(r):
        return (r.batch, r.depth, r.width, r.dtype, r.n_threads)

    tree, bert, one = {}, {}, {}
    for r in results:
        if r.n_threads == 1:
            one[(r.kernel,) + key(r)[:-1]] = r.time_s
        if r.family == "dense" and not r.activation_timed:
            if r.n_neurons == 2 ** (r.depth + 1) - 1:
                tree[key(r)] = r.time_s
            if r.n_neurons == BERT_BASE_NEURONS:
                bert[key(r)] = r.time_s
    for r in results:
        if key(r) in tree:
            r.speedup = tree[key(r)] / r.time_s
        if key(r) in bert:
            r.speedup_bert = bert[key(r)] / r.time_s
        k1 = (r.kernel,) + key(r)[:-1]
        if r.n_threads > 1 and k1 in one:
            r.speedup_vs_1t = one[k1] / r.time_s
    return results


# ------------------------------------------------------------- the machine
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """CPU model, CPU counts and affinity, OMP_*/GOMP_*/KMP_* variables, and ``pyfff.show_config()``."""
    from ._config import show_config

    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "thread_env": {k: v for k, v in sorted(os.environ.items())
                       if k.startswith(("OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_")) or k == "PYFFF_ARCH"},
        "pyfff_config": show_config(mode="dicts"),
    }
