"""``pyfff bench``: time the FFF kernel against dense feedforward layers and print a table.

The timing, checking and speed-up logic lives in :mod:`pyfff.benchmark`; this
module parses the options, runs the cases (progress on stderr), prints the
table on stdout, and writes ``--json`` / ``--plot`` files.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

from . import benchmark as B
from .fff import MAX_DEPTH

DEFAULT_BATCHES = (1, 2048, 16384)
DEFAULT_KERNELS = ("pyfff", "dense", "dense_gelu")
# without --kernels, dense_gelu runs only up to this batch: at 16384 it alone would take ~15 s of the minute
DEFAULT_GELU_MAX_BATCH = 2048
PLOT_FAMILIES = {"fff": "-o", "dense": "--s", "reference": ":^"}


def _int_list(text):
    """'1,2048' or '1-14' (inclusive range) or a mix: '1-4,8' -> [1, 2, 3, 4, 8]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise argparse.ArgumentTypeError(f"empty range {part!r}")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer or a range a-b: {part!r}") from None
    return out


def _str_list(text):
    return [p.strip() for p in text.split(",") if p.strip()]


def _flatten(lists, default):
    if not lists:
        return list(default)
    seen = []
    # action="append" + nargs="+" + a type returning a list: three levels
    for item in itertools.chain.from_iterable(itertools.chain.from_iterable(lists)):
        if item not in seen:
            seen.append(item)
    return seen


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench",
        help="time the FFF kernel against dense feedforward layers (same threads, same run)",
        description=(
            "Time pyfff's FFF layer against the dense feedforward of the same neuron count (two BLAS matrix "
            "products on the same number of threads), check every output against the reference, and print "
            "time per token and speed-up over dense. Lists take commas and ranges: --depth 1-14, --batch 1,2048. "
            "By default every batch is run at every depth (--star: each batch at --star-depth and each depth "
            "at --star-batch, which is what --plot needs)."),
    )
    p.add_argument("--batch", type=_int_list, nargs="+", action="append", metavar="N",
                   help=f"tokens per call (default: {','.join(map(str, DEFAULT_BATCHES))})")
    p.add_argument("--depth", type=_int_list, nargs="+", action="append", metavar="D",
                   help=f"tree depth; the dense baseline has 2**(D+1)-1 neurons (default: {B.DEFAULT_DEPTH})")
    p.add_argument("--width", type=_int_list, nargs="+", action="append", metavar="W",
                   help=f"d_in = d_out (default: {B.DEFAULT_WIDTH})")
    p.add_argument("--threads", type=_int_list, nargs="+", action="append", metavar="T",
                   help="thread counts (default: 1 and all usable cores)")
    p.add_argument("--dtype", type=_str_list, nargs="+", action="append", metavar="DTYPE",
                   help="float32 and/or float64 (default: float32)")
    p.add_argument("--kernels", type=_str_list, nargs="+", action="append", metavar="K",
                   help=(f"implementations (default: {','.join(DEFAULT_KERNELS)}, dense_gelu only with SciPy "
                         f"and up to batch {DEFAULT_GELU_MAX_BATCH}); also numpy_ref, dense_<N>, dense_<N>_gelu, "
                         f"e.g. dense_{B.BERT_BASE_NEURONS}"))
    p.add_argument("--repeat", type=int, default=5,
                   help="timed runs per case after one warm-up (default 5; calls over ~1 s get fewer, "
                        "fast ones more; the median run is reported)")
    p.add_argument("--max-time", type=float, default=3.0, metavar="S",
                   help="stop timing a case after S seconds once 2 runs are done (default 3)")
    p.add_argument("--star", action="store_true",
                   help="run the batches at --star-depth only and the depths at --star-batch only")
    p.add_argument("--star-depth", type=int, default=B.DEFAULT_DEPTH, help="depth of the batch sweep with --star")
    p.add_argument("--star-batch", type=int, default=2048, help="batch of the depth sweep with --star")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    p.add_argument("--pool-tokens", type=int, default=B.POOL_TOKENS, metavar="N",
                   help=f"calls cycle through distinct inputs of at least N tokens in all (default {B.POOL_TOKENS}), "
                        "so that no call finds its routes cache-hot from an identical call; 1: every call reuses "
                        "one input (cache-hot, optimistic at small batches)")
    p.add_argument("--json", metavar="FILE", help="write the machine info and all results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw time per token against depth and against batch (needs matplotlib: pip install "
                        "'pyfff[plot]')")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def plan(args):
    """The (shape, n_threads, kernel) cases of a run, in order, from the parsed options."""
    batches = _flatten(args.batch, DEFAULT_BATCHES)
    depths = _flatten(args.depth, [B.DEFAULT_DEPTH])
    widths = _flatten(args.width, [B.DEFAULT_WIDTH])
    n_all = B.all_threads()
    threads = _flatten(args.threads, sorted({1, n_all}))
    dtypes = _flatten(args.dtype, ["float32"])
    kernels = _flatten(args.kernels, _default_kernels())
    checks = [("batch", batches, 1, None), ("depth", depths, 0, MAX_DEPTH), ("width", widths, 1, None),
              ("threads", threads, 1, None), ("repeat", [args.repeat], 1, None),
              ("pool-tokens", [args.pool_tokens], 1, None)]
    if args.star:
        checks += [("star-depth", [args.star_depth], 0, MAX_DEPTH), ("star-batch", [args.star_batch], 1, None)]
    for name, values, low, high in checks:
        bad = [v for v in values if v < low or (high is not None and v > high)]
        if bad:
            limits = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"--{name} values must be {limits}, got {bad}")
    for dt in dtypes:
        if dt not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {dt!r}")
    for k in kernels:
        if not B.is_impl(k):
            raise ValueError(f"unknown kernel {k!r}; expected one of {list(B.available_impls())}")
    if args.star:
        pairs = [(b, args.star_depth) for b in batches]
        pairs += [(args.star_batch, d) for d in depths if (args.star_batch, d) not in pairs]
    else:
        pairs = [(b, d) for d in depths for b in batches]
    cases = []
    for width, dtype, (batch, depth), n in itertools.product(widths, dtypes, pairs, threads):
        shape = B.Shape(batch=batch, depth=depth, width=width, dtype=dtype)
        for k in kernels:
            if k == "numpy_ref" and n != threads[0]:
                continue  # single-threaded: once per shape
            if k == "dense_gelu" and not args.kernels and batch > DEFAULT_GELU_MAX_BATCH:
                continue
            cases.append((shape, n, k))
    return cases


def _default_kernels():
    """DEFAULT_KERNELS, without dense_gelu where SciPy (its exact erf) is not installed."""
    try:
        import scipy.special  # noqa: F401
    except ImportError:
        return tuple(k for k in DEFAULT_KERNELS if k != "dense_gelu")
    return DEFAULT_KERNELS


def _progress(args, text):
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _blas_last(cases):
    """Indices of the cases, the BLAS (dense) ones last, otherwise in their order.

    OpenBLAS's worker threads keep spinning for a while after a multithreaded
    GEMM; a pyfff case timed right after one shares the cores with them (2
    threads at batch 2048 measured 1.66x one thread that way, 1.92-2.02x
    alone)."""
    return sorted(range(len(cases)), key=lambda i: cases[i][2].startswith("dense"))


def run_cases(args, cases):
    """Run every case (BLAS cases last); returns (results in case order, skipped) with speed-ups filled in."""
    results, skipped = {}, []
    t_start = time.perf_counter()
    for i, case_index in enumerate(_blas_last(cases), 1):
        shape, n, kernel = cases[case_index]
        where = f"[{i}/{len(cases)}] {kernel} threads={n} batch={shape.batch} depth={shape.depth} " \
                f"width={shape.width} {shape.dtype}"
        try:
            work = B.Workload(shape, args.seed, args.pool_tokens)
            prep = B.prepare(kernel, work, n)
        except B.Unavailable as exc:
            skipped.append(f"{kernel} ({shape.label}, {n} threads): {exc}")
            _progress(args, f"{where}: skipped ({exc})")
            continue
        times, out, load = B.measure(prep, repeat=args.repeat, max_time=args.max_time)
        res = B.result_from(prep, shape, times, B.check(prep, out), load)
        del out
        results[case_index] = res
        _progress(args, f"{where}: {res.us_per_token:.3f} us/token, {res.n_runs} runs, "
                        f"correct={'yes' if res.correct else 'NO'}  ({time.perf_counter() - t_start:.1f} s)")
    return B.speedups([results[i] for i in sorted(results)]), skipped


# a row timed while other processes used more than this many cores gets a '*' (see the footnote)
BUSY_CORES = 0.25


def _fmt_time(us):
    return f"{us:.3g}" if us < 1000 else f"{us:.0f}"


def _busy(r):
    return r.other_load is not None and r.other_load > BUSY_CORES


def format_table(results):
    """The results as a fixed-width text table (one row per result, in case order)."""
    head = ["kernel", "threads", "batch", "depth", "width", "dtype", "us/token", "speed-up", "scaling", "GFLOP/s",
            "GB/s", "correct"]
    rows = []
    for r in results:
        rows.append([
            r.kernel, str(r.n_threads), str(r.batch), str(r.depth), str(r.width), r.dtype,
            _fmt_time(r.us_per_token) + ("*" if _busy(r) else ""),
            "-" if r.speedup is None else f"{r.speedup:.1f}x",
            "-" if r.speedup_vs_1t is None else f"{r.speedup_vs_1t:.2f}x", f"{r.gflops:.1f}", f"{r.gbytes_per_s:.1f}",
            "yes" if r.correct else "NO",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    table = [line(head), line(["-" * w for w in widths])] + [line(row) for row in rows]
    busy = [r.other_load for r in results if _busy(r)]
    if busy:
        table.append(f"* other processes used up to {max(busy):.1f} of {os.cpu_count()} cores while the rows marked * "
                     "were timed: their times (and speed-ups from them) may be disturbed; rerun on an idle machine")
    return "\n".join(table)


def _plot_label(r, attr):
    """A line's name; along depth the dense FF's neuron count changes with the tree's."""
    if r.family == "dense" and attr == "depth" and r.n_neurons == 2 ** (r.depth + 1) - 1:
        return r.kernel.replace(f"_{r.n_neurons}", " (tree's neurons)")
    return r.kernel


def write_plot(results, path):
    """Time per token against depth (at the batch with most depths) and against batch (at the depth with most
    batches), one line per kernel and thread count, for the run's first width and dtype. Needs matplotlib."""
    if not results:
        raise ValueError("no results to plot")
    width, dtype = results[0].width, results[0].dtype
    results = [r for r in results if (r.width, r.dtype) == (width, dtype)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def best_fixed(attr, other):
        counts = {}
        for r in results:
            counts.setdefault(getattr(r, other), set()).add(getattr(r, attr))
        # the fixed value under which `attr` varies most; ties: the larger fixed value
        return max(counts, key=lambda v: (len(counts[v]), v))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, attr, other in ((axes[0], "depth", "batch"), (axes[1], "batch", "depth")):
        fixed = best_fixed(attr, other)
        lines = {}
        for r in results:
            if getattr(r, other) == fixed:
                lines.setdefault((r.family, _plot_label(r, attr), r.n_threads), []).append(r)
        busy_label = f"timed while other processes used > {BUSY_CORES} cores"
        for (family, kernel, n), rs in sorted(lines.items()):
            rs.sort(key=lambda r: getattr(r, attr))
            ax.plot([getattr(r, attr) for r in rs], [r.us_per_token for r in rs], PLOT_FAMILIES.get(family, "-"),
                    label=f"{kernel}, {n} thread{'s' if n > 1 else ''}")
            busy = [r for r in rs if _busy(r)]
            if busy:  # the '*' rows of the table: crossed out, their times may be disturbed
                ax.plot([getattr(r, attr) for r in busy], [r.us_per_token for r in busy], "kx", markersize=9,
                        label=busy_label)
                busy_label = None  # one legend entry
        ax.set_yscale("log")
        if attr == "batch":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(attr)
        ax.set_ylabel("time per token (us)")
        ax.set_title(f"time per token: width {width}, {dtype}, {other} {fixed}")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("timed while"))  # that one last
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    """Entry point of ``pyfff bench``; returns the exit status (1 if any output was wrong)."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pyfff bench: --plot needs matplotlib; install it with: pip install 'pyfff[plot]'",
                  file=sys.stderr)
            return 2
    try:
        cases = plan(args)
    except ValueError as exc:
        print(f"pyfff bench: {exc}", file=sys.stderr)
        return 2
    _progress(args, f"pyfff bench: {len(cases)} cases")
    t0 = time.perf_counter()
    results, skipped = run_cases(args, cases)
    elapsed = time.perf_counter() - t0
    print("pyfff bench: us/token = median timed call (time.perf_counter, after 1 warm-up, each call on new "
          "tokens) / batch; speed-up = time of the dense FF "
          "with the tree's neuron count (two BLAS matmuls, activation not timed) on the same threads and batch "
          "in this run / time of this row; scaling = the same kernel's time on 1 thread / this row's; "
          "correct = first rows match pyfff.reference")
    print(format_table(results))
    for line in skipped:
        print(f"skipped: {line}")
    wrong = [r for r in results if not r.correct]
    for r in wrong:
        print(f"WRONG: {r.kernel} threads={r.n_threads} batch={r.batch} depth={r.depth}: {r.check['detail']}")
    print(f"total {elapsed:.1f} s")
    if args.json:
        options = {k: v for k, v in vars(args).items() if k != "func"}
        doc = {"machine": B.machine_info(), "options": options, "elapsed_s": elapsed,
               "results": [r.as_dict() for r in results], "skipped": skipped}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        _progress(args, f"wrote {args.json}")
    if args.plot:
        if results:
            write_plot(results, args.plot)
            _progress(args, f"wrote {args.plot}")
        else:
            print("pyfff bench: nothing was timed, no plot written", file=sys.stderr)
            return 2
    return 1 if wrong else 0
