"""pyfff.gpu against the NumPy reference: outputs, routes, awkward sizes, dtypes, activations, bad input.

The GPU tests run where CuPy sees a CUDA device and are skipped elsewhere with
the reason. The comparator and the import-hygiene tests run everywhere.

Routing is a hard sign decision, so the comparator is route-aware
(:func:`check_fff`): the GPU's route may differ from the reference only where
the reference logit that decided the first differing step is within rounding
of zero; every step of the GPU's own route must follow the sign of its logit
(recomputed in float64) unless that logit is within rounding of zero; and the
GPU's output must equal, to a dtype tolerance, the float64 sum along the GPU's
own route, and the reference output wherever the routes agree.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pyfff
import pyfff.gpu
from pyfff.reference import apply_activation, fff_forward, fff_routes

requires_gpu = pytest.mark.skipif(not pyfff.gpu.HAS_CUPY,
                                  reason=f"needs CuPy and a CUDA device: {pyfff.gpu.UNAVAILABLE_REASON}")

# relative/absolute output tolerance (times max(1, max|y|)) per dtype
TOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10}

ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]
DTYPES = [np.float32, np.float64]

# (splits, sort_output, smem) schedules of the pipeline; None: the layer's default for the batch.
# "mid": one split at half the depth; "staged": the splits of the staged schedule (stages fit shared memory).
SCHEDULES = {
    "default": None,
    "direct": ((), False, False),
    "leafsort": ((), True, False),
    "split_mid": ("mid", True, False),
    "split_mid_unsorted_out": ("mid", False, False),
    "split_1": ((1,), True, False),
    "staged": ("staged", False, True),
    "staged_mid": ("mid", False, True),
    "staged_unsplit": ((), False, True),
    "staged_leafsort": ("mid", True, True),
    "staged_all": ("staged", False, "all"),
    "staged_all_leafsort": ("mid", True, "all"),
}
STAGED = ["staged", "staged_mid", "staged_unsplit", "staged_leafsort", "staged_all", "staged_all_leafsort"]


# ---------------------------------------------------------------------------------------------- comparator
def logit_tolerance(x, w_rows, b_rows, dtype):
    """Rounding allowance of a logit w . x + b computed in ``dtype`` in any summation order.

    2 * (d + 2) * eps * (sum |w_i x_i| + |b|): twice the worst-case error bound of a length-d sum, so a
    reference and a kernel that each err within it may disagree on the sign only inside it.
    """
    d = x.shape[-1]
    eps = np.finfo(dtype).eps
    mag = np.abs(w_rows.astype(np.float64) * x.astype(np.float64)).sum(axis=-1)
    if b_rows is not None:
        mag = mag + np.abs(b_rows.astype(np.float64))
    return 2.0 * (d + 2) * eps * mag


def assert_divergences_are_ties(x, w_in, b_in, n_trees, routes, other, other_logits=None):
    """Where two routes part, the logit of their last common node must be within rounding of zero.

    ``other_logits`` (n, n_trees, depth + 1) are the logits that ``other`` was computed with; None: that
    logit is recomputed in float64. Returns how many (token, tree) routes part.
    """
    dtype = np.asarray(x).dtype
    n_nodes = w_in.shape[0] // n_trees
    differs = routes != other
    n_ties = 0
    for i, t in zip(*np.nonzero(differs.any(axis=-1))):
        level = int(np.argmax(differs[i, t]))
        assert level > 0, f"token {i} tree {t}: route does not start at the root: {routes[i, t]} vs {other[i, t]}"
        row = t * n_nodes + other[i, t, level - 1]
        tol = logit_tolerance(x[i], w_in[row], None if b_in is None else b_in[row], dtype)
        if other_logits is not None:
            z = float(other_logits[i, t, level - 1])
        else:
            z = float(x[i].astype(np.float64) @ w_in[row].astype(np.float64)) + (0.0 if b_in is None else b_in[row])
        assert abs(z) <= tol, (f"token {i} tree {t}: routes part at level {level} after a logit of {z:.3g} "
                               f"(allowance {tol:.3g}): {routes[i, t]} vs {other[i, t]}")
        n_ties += 1
    return n_ties


def check_fff(x, w_in, b_in, w_out, n_trees, activation, y, routes):
    """Assert that (y, routes) of a fast path are right for input x; returns the number of route ties seen.

    x : (n, d_in) array in the layer dtype; weights as given to the layer (node-major w_out);
    y : (n, d_out); routes : (n, n_trees, depth + 1) node indices within each tree.
    """
    x = np.asarray(x)
    dtype = x.dtype
    n = x.shape[0]
    n_nodes = w_in.shape[0] // n_trees
    levels = routes.shape[-1]
    assert routes.shape == (n, n_trees, levels) and y.shape == (n, w_out.shape[1])
    ref_nodes, ref_logits = fff_routes(x, w_in, b_in, n_trees=n_trees)
    assert ref_nodes.shape == routes.shape

    # 1. the first difference from the reference route must follow a reference logit within rounding of zero
    differs = routes != ref_nodes  # (n, T, L)
    n_ties = assert_divergences_are_ties(x, w_in, b_in, n_trees, routes, ref_nodes, ref_logits)

    # 2. the fast path's own route, step by step, and its output along that route, in float64
    x64 = x.astype(np.float64)
    y_own = np.zeros((n, w_out.shape[1]))
    for t in range(n_trees):
        for level in range(levels):
            node = routes[:, t, level]
            assert ((node >= 2**level - 1) & (node < 2 ** (level + 1) - 1)).all(), f"node off level {level}"
            rows = t * n_nodes + node
            z = np.einsum("nd,nd->n", x64, w_in[rows].astype(np.float64))
            if b_in is not None:
                z = z + b_in[rows]
            if level + 1 < levels:
                tol = logit_tolerance(x, w_in[rows], None if b_in is None else b_in[rows], dtype)
                expected = 2 * node + 1 + (z > 0)
                bad = (routes[:, t, level + 1] != expected) & ~(np.abs(z) <= tol)
                assert not bad.any(), f"tree {t} level {level}: wrong turn for tokens {np.nonzero(bad)[0][:10]}"
            y_own += apply_activation(z, activation)[:, None] * w_out[rows].astype(np.float64)
    tol = TOL[np.dtype(dtype)]
    scale = max(1.0, float(np.abs(y_own).max(initial=0.0)))
    np.testing.assert_allclose(y, y_own, rtol=tol, atol=tol * scale, equal_nan=True,
                               err_msg="output differs from the float64 sum along its own route")

    # 3. the reference output wherever the routes agree
    same = ~differs.any(axis=(1, 2))
    y_ref = fff_forward(x, w_in, b_in, w_out, n_trees=n_trees, activation=activation)
    np.testing.assert_allclose(y[same], y_ref[same], rtol=tol, atol=tol * scale, equal_nan=True,
                               err_msg="output differs from the reference where the routes agree")
    return n_ties


def test_comparator_accepts_flip_at_tiny_logit_and_rejects_large():
    """The comparator itself: a turn that differs at a zero logit passes, at a large logit it fails."""
    # depth 1, one tree, d_in 2: root logit = x0 - x1 (+0 bias), children's logits = x0 and x1
    w_in = np.array([[1.0, -1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    b_in = np.zeros(3, dtype=np.float32)
    w_out = np.array([[1.0], [10.0], [100.0]], dtype=np.float32)
    relu = "relu"
    x = np.array([[0.5, 0.5], [2.0, -1.0]], dtype=np.float32)  # root logits 0 (tie) and 3 (clear right)
    y_ref = fff_forward(x, w_in, b_in, w_out, activation=relu)
    nodes, _ = fff_routes(x, w_in, b_in)
    assert check_fff(x, w_in, b_in, w_out, 1, relu, y_ref, nodes) == 0

    # token 0 goes right instead of left at its zero root logit: allowed, with the output of that route
    flipped = nodes.copy()
    flipped[0, 0, 1] = 2
    y_flip = y_ref.copy()
    y_flip[0] = 0 * 1.0 + 0.5 * 100.0  # relu(0) * w_out[0] + relu(x1) * w_out[2]
    assert check_fff(x, w_in, b_in, w_out, 1, relu, y_flip, flipped) == 1

    # token 1 goes left at a root logit of 3: rejected, whatever the output
    wrong = nodes.copy()
    wrong[1, 0, 1] = 1
    y_wrong = y_ref.copy()
    y_wrong[1] = 3.0 * 1.0 + 2.0 * 10.0
    with pytest.raises(AssertionError, match="logit of 3"):
        check_fff(x, w_in, b_in, w_out, 1, relu, y_wrong, wrong)

    # right route, wrong output: rejected
    y_bad = y_ref.copy()
    y_bad[1] += 1e-2
    with pytest.raises(AssertionError, match="own route"):
        check_fff(x, w_in, b_in, w_out, 1, relu, y_bad, nodes)


def test_import_pyfff_does_not_import_cupy():
    code = "import sys, pyfff; assert 'cupy' not in sys.modules, 'import pyfff imported cupy'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_unavailable_is_a_clear_error():
    if pyfff.gpu.HAS_CUPY:
        pytest.skip("CuPy and a device are present")
    with pytest.raises(RuntimeError, match="needs CuPy"):
        pyfff.gpu.FFF.from_cpu(pyfff.FFF.random(4, 4, 1))


# ---------------------------------------------------------------------------------------------- helpers
def make_layer(d_in, d_out, depth, *, n_trees=1, dtype=np.float32, activation="gelu", seed=0):
    cpu = pyfff.FFF.random(d_in, d_out, depth, n_trees=n_trees, seed=seed, dtype=dtype, activation=activation)
    return cpu, pyfff.gpu.FFF.from_cpu(cpu)


def make_x(n, d_in, dtype=np.float32, seed=1):
    return np.random.default_rng(seed).standard_normal((n, d_in)).astype(dtype)


def schedule_args(layer, name):
    sched = SCHEDULES[name]
    if sched is None:
        return {}
    splits, sort_output, smem = sched
    if splits == "mid":
        splits = (min(max(layer.depth // 2, 1), 12),) if layer.depth >= 1 else ()
    return {"splits": splits, "sort_output": sort_output, "smem": smem}


def run_gpu(gpu, x, schedule="default"):
    """(y, routes) on the host from the GPU layer, through the given pipeline schedule."""
    import cupy as cp

    x2 = cp.asarray(x)
    y, (nodes, _) = gpu._run(x2, want_output=True, **schedule_args(gpu, schedule))
    return cp.asnumpy(y), cp.asnumpy(nodes).astype(np.int64)


def check_layer(cpu, x, y, routes):
    return check_fff(x, cpu.w_in, cpu.b_in, cpu.w_out, cpu.n_trees, cpu.activation, y, routes)


# ---------------------------------------------------------------------------------------------- GPU tests
@requires_gpu
@pytest.mark.parametrize("width", [1, 3, 17, 768])
@pytest.mark.parametrize("batch", [0, 1, 7, 97, 1000])
def test_awkward_sizes(batch, width):
    cpu, gpu = make_layer(width, width, depth=3, seed=batch + width)
    x = make_x(batch, width, seed=width)
    y = gpu(x)
    assert isinstance(y, np.ndarray) and y.shape == (batch, width) and y.dtype == np.float32
    check_layer(cpu, x, y, gpu.routes(x))
    for schedule in STAGED:
        check_layer(cpu, x, *run_gpu(gpu, x, schedule))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 97, 3000])
def test_staged_ultrafastbert_width(batch, dtype):
    """Width 768, depth 11: two staged route stages of 63 rows (float32: 194 KB of shared memory; float64
    does not fit six levels and takes three stages) and the output in column slices."""
    cpu, gpu = make_layer(768, 768, depth=11, dtype=dtype, seed=7)
    assert gpu._staged_splits() == ((6,) if dtype == np.float32 else (4, 8))
    x = make_x(batch, 768, dtype, seed=batch)
    for schedule in ("staged", "staged_mid", "staged_leafsort", "staged_unsplit", "staged_all"):
        check_layer(cpu, x, *run_gpu(gpu, x, schedule))


@requires_gpu
@pytest.mark.parametrize("bias", [30.0, -30.0])
def test_staged_skewed_routes(bias):
    """Every token takes the same side at most nodes (large biases): one bucket holds nearly the whole
    batch, spread over many blocks, and the other buckets are empty; and a stage whose subtree does not fit
    shared memory (rows of 4000 floats, six levels) falls back to the unstaged route kernel."""
    import cupy as cp

    rng = np.random.default_rng(5)
    d, depth = 64, 9
    n_nodes = 2 ** (depth + 1) - 1
    w_in = rng.standard_normal((n_nodes, d)).astype(np.float32)
    b_in = np.full(n_nodes, bias, np.float32)
    b_in[rng.random(n_nodes) < 0.1] *= -1
    cpu = pyfff.FFF(w_in, b_in, rng.standard_normal((n_nodes, 48)).astype(np.float32))
    gpu = pyfff.gpu.FFF.from_cpu(cpu)
    x = make_x(5000, d)
    y_ref, r_ref = run_gpu(gpu, x, "direct")
    check_layer(cpu, x, y_ref, r_ref)
    for schedule in STAGED:
        y, r = run_gpu(gpu, x, schedule)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_array_equal(y, y_ref)

    cpu2, gpu2 = make_layer(4000, 40, depth=6, seed=2)
    x2 = make_x(700, 4000)
    y_ref, r_ref = run_gpu(gpu2, x2, "direct")
    check_layer(cpu2, x2, y_ref, r_ref)
    for splits in [(1,), (3,), (2, 4), ()]:
        y, (nodes, _) = gpu2._run(cp.asarray(x2), want_output=True, splits=splits, smem=True)
        np.testing.assert_array_equal(cp.asnumpy(nodes).astype(np.int64), r_ref)
        np.testing.assert_array_equal(cp.asnumpy(y), y_ref)


@requires_gpu
@pytest.mark.parametrize("d_in,d_out", [(768, 64), (17, 768), (3, 5), (1024, 1028), (1100, 6)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_different_widths(dtype, d_in, d_out):
    cpu, gpu = make_layer(d_in, d_out, depth=4, n_trees=2, dtype=dtype)
    x = make_x(300, d_in, dtype)
    for schedule in ("direct", "split_mid", "staged", "staged_mid", "staged_all"):
        check_layer(cpu, x, *run_gpu(gpu, x, schedule))


@requires_gpu
@pytest.mark.parametrize("depth", range(13))
def test_depths(depth):
    cpu, gpu = make_layer(20, 12, depth=depth, seed=depth)
    x = make_x(1500, 20)
    y = gpu(x)
    check_layer(cpu, x, y, gpu.routes(x))


@requires_gpu
@pytest.mark.parametrize("schedule", ["direct", "leafsort", "split_mid", "split_1", "staged", "staged_mid"])
@pytest.mark.parametrize("n_trees", [1, 2, 3, 4])
def test_trees(n_trees, schedule):
    cpu, gpu = make_layer(33, 40, depth=6, n_trees=n_trees, seed=n_trees)
    x = make_x(500, 33)
    check_layer(cpu, x, *run_gpu(gpu, x, schedule))


@requires_gpu
@pytest.mark.parametrize("schedule", ["direct", "default", "split_mid_unsorted_out", "staged_mid", "staged_unsplit"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dtypes_and_activations(dtype, activation, schedule):
    cpu, gpu = make_layer(64, 48, depth=7, n_trees=2, dtype=dtype, activation=activation)
    x = make_x(1200, 64, dtype)
    y, routes = run_gpu(gpu, x, schedule)
    assert y.dtype == dtype
    check_layer(cpu, x, y, routes)


@requires_gpu
@pytest.mark.parametrize("splits,sort_output", [((), False), ((), True), ((1,), True), ((2, 5, 8), True),
                                                ((12,), True), ((3, 12), False), ((4, 10), False)])
@pytest.mark.parametrize("smem", [False, True, "all"], ids=["unstaged", "staged", "staged_all"])
@pytest.mark.parametrize("n_trees", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_schedules_deep_tree(splits, sort_output, smem, n_trees, dtype):
    """depth 13: keys stop at level 12 (4096 buckets); several re-sorts; all schedules agree with the reference."""
    import cupy as cp

    cpu, gpu = make_layer(8, 16, depth=13, n_trees=n_trees, dtype=dtype, seed=13)
    x = make_x(3000, 8, dtype)
    y, (nodes, _) = gpu._run(cp.asarray(x), want_output=True, splits=splits, sort_output=sort_output, smem=smem)
    check_layer(cpu, x, cp.asnumpy(y), cp.asnumpy(nodes).astype(np.int64))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_gelu_is_accurate_to_an_ulp(dtype):
    """A depth-0 tree with unit weights outputs act(x): GELU within 1 ulp of the correctly rounded value in
    float32 (evaluated in double, as on the CPU, whose result it nearly always equals); float64 within
    CUDA's erfc accuracy plus the conditioning of erfc to its rounded argument (about z**2 ulps)."""
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.uniform(-12, 12, 40000), rng.uniform(-40, -30, 2000), rng.standard_normal(3000) * 1e-30,
                        rng.standard_normal(3000) * 1e30]).astype(dtype)
    cpu = pyfff.FFF(np.ones((1, 1), dtype), np.zeros(1, dtype), np.ones((1, 1), dtype), activation="gelu")
    got = pyfff.gpu.FFF.from_cpu(cpu)(z[:, None])[:, 0]
    z64 = z.astype(np.float64)
    want = apply_activation(z, "gelu")  # 0.5 z erfc(-z / sqrt 2) in float64, rounded once
    ulps = np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want)).astype(np.float64)
    if dtype == np.float32:
        limit = 1
        assert np.mean(got == want) > 0.99
        assert np.mean(got == cpu(z[:, None])[:, 0]) > 0.99
    else:  # CUDA's double erfc is within 5 ulp; both sides round z / sqrt(2), which erfc amplifies by ~z**2
        limit = 8 + 3 * z64 ** 2
    bad = np.flatnonzero(ulps > limit)
    assert bad.size == 0, (z[bad[:5]], got[bad[:5]], want[bad[:5]])


VARIANTS = ([{"route_block": rb, "out_block": ob} for rb in (256, 512) for ob in (256, 768)]
            + [{"out_tpw": tpw, "out_sj": sj} for tpw in (1, 2, 4) for sj in (3, 6)]
            + [{"fused": fused, "route_block": rb} for fused in (False, True) for rb in (256, 512)])


@requires_gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}{v[k]}" for k in v))
@pytest.mark.parametrize("splits,sort_output,smem", [((), False, False), ((), True, False), ((3,), True, False),
                                                     ((3,), False, True), ((3,), False, "all"), ((), False, True)])
@pytest.mark.parametrize("dtype,d_in,d_out", [(np.float32, 768, 768), (np.float32, 17, 9), (np.float64, 40, 30),
                                              (np.float64, 1100, 7), (np.float32, 36, 900)])
@pytest.mark.parametrize("n_trees", [1, 2])
def test_kernel_variants(variant, splits, sort_output, smem, dtype, d_in, d_out, n_trees):
    """Both block sizes of both unstaged kernels and the tokens per warp of the staged output, on batches
    that leave blocks, warps and column slices partly empty."""
    import cupy as cp

    cpu, gpu = make_layer(d_in, d_out, depth=6, n_trees=n_trees, dtype=dtype, seed=d_in)
    for batch in (1, 5, 1001):
        x = make_x(batch, d_in, dtype, seed=batch)
        y, (nodes, _) = gpu._run(cp.asarray(x), want_output=True, splits=splits, sort_output=sort_output,
                                 smem=smem, variant=variant)
        check_layer(cpu, x, cp.asnumpy(y), cp.asnumpy(nodes).astype(np.int64))


def output_kernels(gpu):
    """(names of the kernels of the most recent plan that write y: a fused route, fff_route<..., OUT > 0>, or an
    output kernel; the name of its last route kernel)."""
    plan = next(reversed(gpu._plans.values()))
    names = [launch.name for launch in plan.launches]
    writers = [k for k in names if k.startswith("fff_output") or (k.startswith("fff_route<") and not k.endswith(" 0>"))]
    return writers, [k for k in names if k.startswith("fff_route")][-1]


@requires_gpu
@pytest.mark.parametrize("schedule", ["default", "direct", "staged", "staged_mid", "staged_unsplit",
                                      "split_mid_unsorted_out", "staged_all", "leafsort"])
@pytest.mark.parametrize("dtype,d_in,d_out,depth", [
    (np.float32, 768, 768, 11), (np.float64, 384, 384, 9), (np.float32, 17, 9, 15), (np.float32, 40, 768, 16),
    (np.float32, 1100, 36, 5), (np.float64, 36, 768, 4), (np.float32, 36, 770, 4), (np.float32, 20, 1, 0)])
def test_fused_output_is_bitwise_the_output_kernels(schedule, dtype, d_in, d_out, depth):
    """The last fff_route stage of a one-tree layer forms y itself (the ``fused`` variant) wherever its terms
    and a row of y fit its registers (levels <= 16, at most 192 vectors); elsewhere an output kernel does. Both
    give bitwise the same y and routes; fused or not is as promised (never with a leaf-sorted output)."""
    import cupy as cp

    cpu, gpu = make_layer(d_in, d_out, depth, dtype=dtype, seed=depth + d_out)
    x = make_x(9000 if d_in == 768 else 1501, d_in, dtype, seed=depth)
    runs = {}
    for fused in (True, False):
        y, (nodes, _) = gpu._run(cp.asarray(x), want_output=True, variant={"fused": fused},
                                 **schedule_args(gpu, schedule))
        runs[fused] = cp.asnumpy(y), cp.asnumpy(nodes).astype(np.int64), output_kernels(gpu)
    vec = 16 // np.dtype(dtype).itemsize  # the route's loads: 16 bytes if a row of x allows it, else scalar
    vec = vec if d_in % vec == 0 else 1
    fits = depth + 1 <= 16 and d_out % vec == 0 and d_out // vec <= 192 and "leafsort" not in schedule
    (y_f, r_f, (k_f, last_route)), (y_s, r_s, (k_s, _)) = runs[True], runs[False]
    assert len(k_f) == 1 and len(k_s) == 1 and k_s[0].startswith("fff_output")
    # fused wherever it fits and the last stage runs fff_route (not fff_route_staged)
    assert k_f[0].startswith("fff_route<") == (fits and last_route.startswith("fff_route<")), (k_f, last_route)
    np.testing.assert_array_equal(r_f, r_s)
    np.testing.assert_array_equal(y_f, y_s)
    check_layer(cpu, x, y_f, r_f)


@requires_gpu
@pytest.mark.parametrize("dtype,d_in,depth,splits,unstaged", [
    (np.float32, 768, 11, (7,), 1), (np.float32, 768, 11, (8,), 2), (np.float32, 768, 7, (), 2),
    (np.float64, 384, 9, (6,), 1), (np.float64, 384, 9, (7,), 2), (np.float32, 768, 11, (9,), 3)])
def test_partially_staged_route_stages(dtype, d_in, depth, splits, unstaged):
    """A first route stage deeper than the shared memory holds stages the levels that fit and walks up to two
    more through L1/L2 (finer buckets for the next stage); three more: the stage runs fff_route. Bitwise the
    same as batch order either way."""
    import cupy as cp

    cpu, gpu = make_layer(d_in, d_in, depth, dtype=dtype, seed=depth)
    x = make_x(3001, d_in, dtype, seed=5)
    y, (nodes, _) = gpu._run(cp.asarray(x), want_output=True, splits=splits, smem=True)
    names = [launch.name for launch in next(reversed(gpu._plans.values())).launches]
    assert names[0].startswith("fff_route_staged" if unstaged <= 2 else "fff_route<"), names
    y, routes = cp.asnumpy(y), cp.asnumpy(nodes).astype(np.int64)
    y_direct, r_direct = run_gpu(gpu, x, "direct")
    np.testing.assert_array_equal(routes, r_direct)
    np.testing.assert_array_equal(y, y_direct)
    check_layer(cpu, x, y, routes)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_more_than_32_terms(dtype):
    """fff_output takes terms 32 at a time: 3 trees of depth 12 give 39 terms per token."""
    cpu, gpu = make_layer(20, 36, depth=12, n_trees=3, dtype=dtype, seed=39)
    x = make_x(257, 20, dtype)
    check_layer(cpu, x, *run_gpu(gpu, x, "direct"))


@requires_gpu
def test_bad_schedule():
    import cupy as cp

    _, gpu = make_layer(8, 8, depth=5)
    x = cp.zeros((4, 8), cp.float32)
    for splits in [(0,), (6,), (3, 2), (2, 2)]:
        with pytest.raises(ValueError, match="splits"):
            gpu._run(x, want_output=True, splits=splits, sort_output=True)
    for variant in ({"route_block": 768}, {"out_block": 1024}, {"threads": 1}, {"out_tpw": 3}, {"out_sj": 4}):
        with pytest.raises(ValueError, match="variant"):
            gpu._run(x, want_output=True, variant=variant)
    with pytest.raises(ValueError, match="smem"):
        gpu._run(x, want_output=True, smem="first")


@requires_gpu
def test_large_batch_ultrafastbert_shape():
    cpu, gpu = make_layer(768, 768, depth=11, seed=11)
    x = make_x(16384, 768, seed=3)
    y = gpu(x)
    check_layer(cpu, x, y, gpu.routes(x))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_routes_match_cpu_layer(dtype):
    cpu, gpu = make_layer(96, 32, depth=9, n_trees=3, dtype=dtype)
    x = make_x(2000, 96, dtype).reshape(40, 50, 96)
    r_gpu = gpu.routes(x)
    r_cpu = cpu.routes(x)
    assert r_gpu.dtype == np.int64 and r_gpu.shape == r_cpu.shape == (40, 50, 3, 10)
    x2 = x.reshape(-1, 96)
    check_layer(cpu, x2, gpu(x).reshape(-1, 32), r_gpu.reshape(-1, 3, 10))
    assert_divergences_are_ties(x2, cpu.w_in, cpu.b_in, 3, r_gpu.reshape(-1, 3, 10), r_cpu.reshape(-1, 3, 10))


@requires_gpu
def test_input_and_output_types():
    import cupy as cp

    cpu, gpu = make_layer(16, 8, depth=4)
    x = make_x(30, 16)
    y_host = gpu(x)
    assert isinstance(y_host, np.ndarray)
    y_dev = gpu(cp.asarray(x))
    assert isinstance(y_dev, cp.ndarray) and y_dev.device.id == gpu.device_id
    np.testing.assert_array_equal(y_host, cp.asnumpy(y_dev))
    np.testing.assert_array_equal(gpu(x.tolist()), y_host)  # lists are arrays too
    np.testing.assert_array_equal(gpu(x.astype(np.float16).astype(np.float32)), gpu(x.astype(np.float16)))
    # leading shapes, as on the CPU
    assert gpu(x.reshape(2, 3, 5, 16)).shape == (2, 3, 5, 8)
    np.testing.assert_array_equal(gpu(x.reshape(2, 3, 5, 16)).reshape(30, 8), y_host)
    assert gpu(x[0]).shape == (8,)
    np.testing.assert_array_equal(gpu(x[0]), y_host[0])
    r = gpu.routes(cp.asarray(x[:2]))
    assert isinstance(r, cp.ndarray) and r.dtype == cp.int64 and r.shape == (2, 1, 5)
    assert gpu.routes(x[0]).shape == (1, 5)


@requires_gpu
def test_noncontiguous_and_misaligned_inputs():
    import cupy as cp

    cpu, gpu = make_layer(768, 64, depth=5)
    x = make_x(50, 768)
    expected = gpu(cp.asarray(x))
    # a transposed view, and a view whose start is 4 bytes past a 16-byte boundary (scalar-load path)
    xt = cp.asarray(np.ascontiguousarray(x.T)).T
    assert not xt.flags.c_contiguous
    np.testing.assert_array_equal(cp.asnumpy(gpu(xt)), cp.asnumpy(expected))
    buf = cp.zeros(50 * 768 + 1, cp.float32)
    xm = buf[1:].reshape(50, 768)
    xm[...] = cp.asarray(x)
    assert xm.flags.c_contiguous and xm.data.ptr % 16 != 0
    ym, (nodes, _) = gpu._run(xm, want_output=True)
    check_layer(cpu, x, cp.asnumpy(ym), cp.asnumpy(nodes).astype(np.int64))


@requires_gpu
@pytest.mark.parametrize("schedule", ["direct", "split_mid", "staged", "staged_mid", "staged_leafsort", "staged_all"])
def test_results_do_not_depend_on_schedule_or_run(schedule):
    """Bitwise equal across runs (the bucket order inside a sort varies with timing) and schedules."""
    cpu, gpu = make_layer(128, 128, depth=8, n_trees=2)
    x = make_x(4000, 128)
    y1, r1 = run_gpu(gpu, x, schedule)
    y2, r2 = run_gpu(gpu, x, schedule)
    y3, r3 = run_gpu(gpu, x, "leafsort")
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(y1, y3)
    np.testing.assert_array_equal(r1, r3)


@requires_gpu
@pytest.mark.parametrize("schedule", ["split_mid", "split_1", "staged", "staged_mid", "staged_leafsort"])
def test_sort_handoff_by_slots_or_scatter(schedule, monkeypatch):
    """A route stage hands its tokens to the next (when that runs fff_route) in bucket slots, or, where the
    slots would take too much memory, through fff_bucket_scatter: both give bitwise the same results."""
    from pyfff.gpu import _fff

    cpu = pyfff.FFF.random(40, 24, 9, n_trees=2, seed=9)
    x = make_x(3001, 40)
    y_slots, r_slots = run_gpu(pyfff.gpu.FFF.from_cpu(cpu), x, schedule)
    monkeypatch.setattr(_fff, "_SLOT_BYTES", 0)
    y_scatter, r_scatter = run_gpu(pyfff.gpu.FFF.from_cpu(cpu), x, schedule)
    np.testing.assert_array_equal(r_slots, r_scatter)
    np.testing.assert_array_equal(y_slots, y_scatter)
    check_layer(cpu, x, y_slots, r_slots)


@requires_gpu
@pytest.mark.parametrize("schedule", ["staged", "staged_all", "staged_leafsort", "split_mid"])
def test_dependent_launches_give_the_same_results(schedule, monkeypatch):
    """On sm_90 and later the kernels after the first of a pass are programmatic dependents (cuLaunchKernelEx);
    each waits for the one before it on the device, and the staged output stages its first rows before that
    wait. Bitwise the same results with plain launches, over repeated back-to-back passes."""
    import cupy as cp

    from pyfff.gpu import _fff

    cpu = pyfff.FFF.random(768, 768, 11, seed=4)
    x = cp.asarray(make_x(12288, 768, seed=4))
    runs = {}
    for pdl in (True, False):
        monkeypatch.setattr(_fff, "_PDL", pdl)
        gpu = pyfff.gpu.FFF.from_cpu(cpu)
        for _ in range(3):  # back-to-back passes; the last one's results are compared
            y, (nodes, _) = gpu._run(x, want_output=True, **schedule_args(gpu, schedule))
        runs[pdl] = cp.asnumpy(y), cp.asnumpy(nodes)
        launches = next(reversed(gpu._plans.values())).launches
        dependent = [launch.config is not None for launch in launches]
        major = cp.cuda.runtime.deviceGetAttribute(_fff._ATTR_CC_MAJOR, gpu.device_id)
        assert dependent == [False] + [pdl and major >= 9] * (len(launches) - 1), dependent
    (y1, r1), (y2, r2) = runs[True], runs[False]
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(y1, y2)
    check_layer(cpu, cp.asnumpy(x), y1, r1.astype(np.int64))


@requires_gpu
def test_nan_and_inf_input():
    cpu, gpu = make_layer(12, 6, depth=5, n_trees=2)
    x = make_x(40, 12)
    x[3, 5] = np.nan
    x[7, :] = np.inf
    y, r = gpu(x), gpu.routes(x)
    left = np.array([2**k - 1 for k in range(6)])  # 0, 1, 3, 7, ...: NaN logits go left
    np.testing.assert_array_equal(r[3], np.broadcast_to(left, (2, 6)))
    assert np.isnan(y[3]).all()
    check_layer(cpu, x, y, r)


@requires_gpu
def test_weights_from_cupy_and_round_trips():
    import cupy as cp

    cpu = pyfff.FFF.random(24, 10, 3, n_trees=2, seed=5)
    gpu = pyfff.gpu.FFF(cp.asarray(cpu.w_in), cp.asarray(cpu.b_in), cp.asarray(cpu.w_out), n_trees=2)
    assert isinstance(gpu.w_in, cp.ndarray)
    assert (gpu.depth, gpu.n_trees, gpu.n_nodes, gpu.d_in, gpu.d_out, gpu.dtype, gpu.activation) == (
        cpu.depth, cpu.n_trees, cpu.n_nodes, cpu.d_in, cpu.d_out, cpu.dtype, cpu.activation)
    assert gpu.n_neurons == cpu.n_neurons
    back = gpu.to_cpu()
    for name in ("w_in", "b_in", "w_out"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cpu, name))
    x = make_x(64, 24)
    np.testing.assert_array_equal(gpu(x), pyfff.gpu.FFF.from_cpu(cpu)(x))
    # no bias
    nb = pyfff.gpu.FFF(cpu.w_in, None, cpu.w_out, n_trees=2, activation="relu")
    assert nb.b_in is None
    check_fff(x, cpu.w_in, None, cpu.w_out, 2, "relu", nb(x), nb.routes(x))


@requires_gpu
def test_bad_input_same_errors_as_cpu():
    w_in = np.ones((7, 4), np.float32)
    b_in = np.zeros(7, np.float32)
    w_out = np.ones((7, 3), np.float32)
    bad_args = [
        ((w_in.astype(np.int32), b_in, w_out), {}),
        ((w_in, b_in, w_out[:6]), {}),
        ((w_in[:6], b_in[:6], w_out[:6]), {}),
        ((w_in, b_in[:5], w_out), {}),
        ((w_in.ravel(), b_in, w_out), {}),
        ((w_in, b_in, w_out), {"activation": "tanh"}),
        ((w_in, b_in, w_out), {"n_trees": 0}),
        ((w_in, b_in, w_out), {"n_trees": 2.0}),
        ((np.full((7, 4), np.nan, np.float32), b_in, w_out), {}),
    ]
    for args, kwargs in bad_args:
        with pytest.raises((TypeError, ValueError)) as cpu_err:
            pyfff.FFF(*args, **kwargs)
        with pytest.raises(cpu_err.type) as gpu_err:
            pyfff.gpu.FFF(*args, **kwargs)
        assert str(gpu_err.value) == str(cpu_err.value)

    _, gpu = make_layer(4, 3, depth=2)
    with pytest.raises(TypeError, match="float"):
        gpu(np.ones((2, 4), np.int64))
    with pytest.raises(TypeError, match="float"):
        gpu(np.ones((2, 4), np.complex64))
    with pytest.raises(ValueError, match="shape"):
        gpu(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="shape"):
        gpu(np.float32(1.0))
    with pytest.raises(TypeError, match="pyfff.FFF"):
        pyfff.gpu.FFF.from_cpu(gpu)
