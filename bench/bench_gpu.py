"""GPU benchmark of issue 6: pyfff.gpu's FFF kernels, the plain warp-per-token kernel, and cuBLAS dense.

Run from the repository root on a machine with CuPy and an NVIDIA GPU::

    python bench/bench_gpu.py --json gpu.json --md gpu.md        # width 768, depth 11, batch 1/2048/16384

``pytest bench/bench_gpu.py`` runs a quick smoke version (batch 2048) and is
skipped without a GPU.

Timing: every implementation is called a few times to warm up (compilation,
memory pool), then ``iters`` calls are enqueued back to back between two CUDA
events, and the elapsed time between the events divided by ``iters`` is one
sample; the best and the median of ``repeats`` samples are reported, with the
host time spent enqueueing one call (if it exceeds the GPU time, the figure is
bound by Python, not the GPU). The dense baseline is the 4095-neuron
feedforward ``gelu(x @ W1.T + b1) @ W2`` with cuBLAS SGEMM (CuPy does not use
TF32 unless ``CUPY_TF32=1``, which this script refuses).

Correctness is checked for every FFF implementation against the NumPy
reference (``pyfff.reference``): tokens whose route equals the reference's
must match it to 1e-3 relative; tokens whose route differs (a logit within
rounding of zero) are counted and may be at most 0.1% of the batch.

Bandwidth: "bytes moved" is the least a kernel must move: X read once, Y
written once, and each weight row (of w_in, b_in, w_out) that some token
visits read once. Achieved GB/s = bytes / time, set against a measured
device-to-device copy (read + write) and the GPU's nominal HBM bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

WIDTH = 768
DEPTH = 11
DENSE_NEURONS = 2 ** (DEPTH + 1) - 1
BATCHES = (1, 2048, 16384)

# name -> keyword arguments of pyfff.gpu.FFF._run (splits, sort_output, smem, variant); None: the public call
# layer(x) with the layer's defaults (the staged schedule from batch 1024 on, batch order below).
FFF_SCHEDULES = {
    "pyfff_gpu": None,
    "staged": {"splits": "staged", "sort_output": False, "smem": True},
    "staged,fused": {"splits": "staged", "sort_output": False, "smem": True, "variant": {"fused": True}},
    "staged,all-stages-staged": {"splits": "staged", "sort_output": False, "smem": "all"},
    "direct": {"splits": (), "sort_output": False, "smem": False},
}
FFF_SCHEDULES = {k if v is None else f"pyfff_gpu[{k}]": v for k, v in FFF_SCHEDULES.items()}

NOMINAL_HBM = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12}


def gpu_time(fn, *, target_s=0.03, repeats=7, warmup=3):
    """(best, median) GPU seconds per call from CUDA events around back-to-back calls, and host seconds per call."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = cupy.cuda.get_elapsed_time(start, end) * 1e-3
    iters = max(3, min(2000, int(target_s / max(one, 1e-6))))
    gpu, host = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        t_host = time.perf_counter() - t0
        end.synchronize()
        gpu.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3 / iters)
        host.append(t_host / iters)
    return min(gpu), statistics.median(gpu), statistics.median(host), iters


def copy_bandwidth(n_bytes=2 << 30):
    """Measured device-to-device copy, bytes read + written per second."""
    import cupy

    a = cupy.ones(n_bytes // 4, dtype=cupy.float32)
    b = cupy.empty_like(a)
    best, _, _, _ = gpu_time(lambda: cupy.copyto(b, a), target_s=0.05, repeats=5)
    del a, b
    return 2 * n_bytes / best


def machine():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "gpu": name,
        "sm_count": props["multiProcessorCount"],
        "l2_bytes": props.get("l2CacheSize"),
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "CUPY_TF32": os.environ.get("CUPY_TF32", "(unset)"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "host": platform.node(),
    }


def dense_ff(layer):
    """The 4095-neuron dense feedforward with the layer's weights: gelu(x @ W1.T + b1) @ W2 (cuBLAS SGEMM)."""
    import cupy

    gelu_bias = cupy.ElementwiseKernel("T h, T b", "T out",
                                       "T z = h + b; out = (T)0.5 * z * ((T)1 + erf(z * (T)0.7071067811865476))",
                                       "pyfff_bench_gelu_bias")
    w1, b1, w2 = layer.w_in, layer.b_in, layer.w_out

    def run(x):
        return gelu_bias(x @ w1.T, b1) @ w2

    return run


class Reference:
    """NumPy reference routes and outputs of one batch, and the route-aware check of a fast path's y."""

    def __init__(self, cpu, x_host):
        from pyfff.reference import fff_forward, fff_routes

        self.nodes, _ = fff_routes(x_host, cpu.w_in, cpu.b_in, n_trees=cpu.n_trees)
        self.y = fff_forward(x_host, cpu.w_in, cpu.b_in, cpu.w_out, n_trees=cpu.n_trees, activation=cpu.activation)
        self.n_rows_visited = len(np.unique(self.nodes.reshape(len(x_host), -1) if len(x_host) else []))

    def check(self, y, nodes=None):
        """dict(correct, max_rel_err on tokens of agreeing routes, route_ties)."""
        n = len(self.y)
        scale = np.maximum(np.abs(self.y).max(axis=1, keepdims=True), 1.0)
        err = (np.abs(y - self.y) / scale).max(axis=1)
        if nodes is not None:
            agree = ~(nodes != self.nodes).any(axis=(1, 2))
        else:  # no routes (baseline kernel): a token off by more than the tolerance is counted as a tie
            agree = err <= 1e-3
        ties = int(n - agree.sum())
        max_err = float(err[agree].max(initial=0.0))
        return {"correct": bool(max_err <= 1e-3 and ties <= max(1, n // 1000)), "max_rel_err": max_err,
                "route_ties": ties}


def bench(batches=BATCHES, *, schedules=FFF_SCHEDULES, with_baselines=True, target_s=0.03, seed=0, log=print):
    import cupy

    import pyfff
    import pyfff.gpu

    sys.path.insert(0, str(Path(__file__).parent / "dev"))
    from gpu_baseline import warp_baseline

    if os.environ.get("CUPY_TF32") == "1":
        raise SystemExit("CUPY_TF32=1 would let cuBLAS use TF32; the dense baseline must be float32")
    info = machine()
    log(f"# {info}")
    cpu = pyfff.FFF.random(WIDTH, WIDTH, DEPTH, seed=seed)
    layer = pyfff.gpu.FFF.from_cpu(cpu)
    dense = dense_ff(layer)
    copy_bw = copy_bandwidth()
    nominal = next((v for k, v in NOMINAL_HBM.items() if k in info["gpu"]), None)
    log(f"# device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write); nominal HBM: "
        f"{'unknown' if nominal is None else f'{nominal / 1e9:.0f} GB/s'}")
    rows = []
    for batch in batches:
        rng = np.random.default_rng(seed + batch)
        x_host = rng.standard_normal((batch, WIDTH), dtype=np.float32)
        x = cupy.asarray(x_host)
        ref = Reference(cpu, x_host)
        bytes_min = (x_host.nbytes + batch * WIDTH * 4
                     + ref.n_rows_visited * (cpu.w_in.itemsize * (WIDTH + 1 + WIDTH)))
        impls = {}
        for name, kwargs in schedules.items():
            if kwargs is None:  # the public call; checked through _run with the same (default) schedule
                impls[name] = (lambda: layer(x), lambda: layer._run(x, want_output=True))
            else:
                run = (lambda kw=kwargs: layer._run(x, want_output=True, **kw))
                impls[name] = (run, run)
        if with_baselines:
            impls["warp_per_token (bench/dev)"] = (lambda: warp_baseline(layer, x), False)
            impls[f"cublas_dense_{DENSE_NEURONS}"] = (lambda: dense(x), None)
        results = {}
        for name, (fn, kind) in impls.items():
            out = fn()
            if callable(kind):  # an FFF schedule: kind() gives (y, (nodes, logits)) for the route-aware check
                y, (nodes, _) = kind()
                check = ref.check(cupy.asnumpy(y), cupy.asnumpy(nodes))
                if name == "pyfff_gpu":
                    check["correct"] &= bool(cupy.array_equal(out, y))
            elif kind is False:
                check = ref.check(cupy.asnumpy(out))
            else:  # dense: a different function; check it on a few rows against NumPy
                k = min(batch, 64)
                h = x_host[:k] @ cpu.w_in.T + cpu.b_in
                from pyfff.reference import apply_activation

                y_np = apply_activation(h, "gelu") @ cpu.w_out
                err = float(np.abs(cupy.asnumpy(out[:k]) - y_np).max() / max(1.0, np.abs(y_np).max()))
                check = {"correct": err <= 1e-3, "max_rel_err": err, "route_ties": None}
            best, med, host, iters = gpu_time(fn, target_s=target_s)
            results[name] = best
            row = {"batch": batch, "impl": name, "best_us": best * 1e6, "median_us": med * 1e6,
                   "host_us_per_call": host * 1e6, "iters": iters, **check}
            if kind is not None:  # FFF kernels: least bytes moved, and the bandwidth that makes
                row["bytes_moved"] = bytes_min
                row["gb_per_s"] = bytes_min / best / 1e9
                row["frac_of_copy_bw"] = bytes_min / best / copy_bw
                if nominal:
                    row["frac_of_nominal_hbm"] = bytes_min / best / nominal
            rows.append(row)
            log(json.dumps(row))
        dense_t = results.get(f"cublas_dense_{DENSE_NEURONS}")
        base_t = results.get("warp_per_token (bench/dev)")
        for row in rows:
            if row["batch"] == batch:
                if dense_t:
                    row["speedup_vs_dense"] = dense_t / (row["best_us"] * 1e-6)
                if base_t:
                    row["speedup_vs_warp_baseline"] = base_t / (row["best_us"] * 1e-6)
    return {"machine": info, "copy_bw": copy_bw, "nominal_hbm": nominal, "width": WIDTH, "depth": DEPTH,
            "rows": rows}


def markdown(result):
    m = result["machine"]
    lines = [f"GPU: {m['gpu']}, CuPy {m['cupy']}, CUDA runtime {m['cuda_runtime']}, driver {m['cuda_driver']}; "
             f"width {result['width']}, depth {result['depth']}, float32; measured copy bandwidth "
             f"{result['copy_bw'] / 1e9:.0f} GB/s",
             "",
             "| batch | implementation | best us | median us | host us/call | vs dense | vs warp baseline | GB/s | "
             "% of copy bw | correct (ties) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sd = f"{r['speedup_vs_dense']:.1f}x" if "speedup_vs_dense" in r else ""
        sb = f"{r['speedup_vs_warp_baseline']:.2f}x" if "speedup_vs_warp_baseline" in r else ""
        gb = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else ""
        fr = f"{100 * r['frac_of_copy_bw']:.0f}%" if "frac_of_copy_bw" in r else ""
        ties = "" if r["route_ties"] is None else f" ({r['route_ties']})"
        lines.append(f"| {r['batch']} | {r['impl']} | {r['best_us']:.1f} | {r['median_us']:.1f} | "
                     f"{r['host_us_per_call']:.1f} | {sd} | {sb} | {gb} | {fr} | {r['correct']}{ties} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--json", type=Path, help="write all rows and machine info here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    ap.add_argument("--target-ms", type=float, default=30.0, help="GPU time per sample (ms)")
    args = ap.parse_args(argv)
    result = bench(args.batches, target_s=args.target_ms * 1e-3)
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.md:
        args.md.write_text(table + "\n")
    bad = [r for r in result["rows"] if not r["correct"]]
    return 1 if bad else 0


def test_gpu_bench_smoke():
    """Quick run at batch 2048: every implementation is correct (skipped without CuPy and a GPU)."""
    import pytest

    import pyfff.gpu

    if not pyfff.gpu.HAS_CUPY:
        pytest.skip(f"needs CuPy and a CUDA device: {pyfff.gpu.UNAVAILABLE_REASON}")
    result = bench([2048], target_s=0.002, log=lambda *a: None)
    bad = [r for r in result["rows"] if not r["correct"]]
    assert not bad, bad


if __name__ == "__main__":
    sys.exit(main())
