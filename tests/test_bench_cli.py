"""pyfff.benchmark, ``pyfff bench`` and bench/_registry.py at tiny sizes.

These check the structure of what the benchmarks produce and that
correctness is recorded (and that a wrong output is caught); they never
assert anything about timings.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pyfff import FFF
from pyfff import benchmark as B
from pyfff.__main__ import main
from pyfff._cli_bench import _int_list, format_table

TINY = B.Shape(batch=9, depth=3, width=16)
FAST = dict(repeat=2, min_time=0.0, max_time=0.0)  # time_calls keywords: two runs, whatever they take
CLI_TINY = ["bench", "--batch", "3,5", "--depth", "2", "--width", "8", "--threads", "1", "--repeat", "2",
            "--max-time", "0", "-q"]


# ------------------------------------------------------------------ timing
def test_time_calls_warms_up_then_times_at_least_repeat_runs():
    calls = []
    times, out = B.time_calls(lambda: calls.append(1) or len(calls), repeat=4, warmup=2, min_time=0.0)
    assert len(times) == 4 and len(calls) == 6
    assert out == 6  # the last call's value
    assert all(t >= 0 for t in times)


def test_time_calls_stops_at_max_time_after_min_runs():
    times, _ = B.time_calls(lambda: sum(range(1000)), repeat=50, warmup=0, min_time=10.0, max_time=0.0,
                            min_runs=3)
    assert len(times) == 3


def test_time_calls_caps_runs():
    times, _ = B.time_calls(lambda: None, repeat=1, warmup=0, min_time=1e9, max_time=1e9, max_runs=7)
    assert len(times) == 7


@pytest.mark.parametrize("t_one,expected", [(0.5, 3), (0.01, 100), (1e-9, 1000), (0.0, 1000)])
def test_plan_rounds(t_one, expected):
    assert B.plan_rounds(t_one, budget=1.0, min_rounds=3, max_rounds=1000) == expected


# ------------------------------------------------------------ correctness
def _tiny_layer_and_input():
    work = B.Workload(TINY)
    return work.layer, work.x


def test_check_fff_output_accepts_the_kernel_output():
    layer, x = _tiny_layer_and_input()
    check = B.check_fff_output(layer, x, layer(x))
    assert check.correct and check.n_rows == TINY.batch and check.detail == ""
    assert check.max_rel_err < B.TOLERANCES[np.dtype(np.float32)]


def test_check_fff_output_only_looks_at_the_first_rows():
    layer, x = _tiny_layer_and_input()
    y = layer(x)
    y[5] += 1.0
    assert B.check_fff_output(layer, x, y, n_rows=5).correct
    check = B.check_fff_output(layer, x, y, n_rows=6)
    assert not check.correct and "row 5" in check.detail


def test_check_fff_output_rejects_a_route_change_away_from_a_tie():
    layer, x = _tiny_layer_and_input()
    routes = layer.routes(x)
    wrong = routes.copy()
    wrong[0, 0, 1:] = 0  # row 0 "walks" to nodes it cannot reach: differs at level 1
    check = B.check_fff_output(layer, x, layer(x), routes=wrong)
    assert not check.correct and "route" in check.detail


def test_check_fff_output_accepts_a_route_change_at_a_zero_logit():
    # root logit exactly 0 for row 0: x orthogonal to w_in[0] and b_in[0] = 0. The reference goes left;
    # an implementation going right there (rounding) is accepted without comparing its output.
    layer, x = _tiny_layer_and_input()
    b_in = layer.b_in.copy()
    b_in[0] = 0.0
    layer = FFF(layer.w_in, b_in, layer.w_out)
    x = x.copy()
    x[0] = 0.0
    routes = layer.routes(x)
    assert routes[0, 0, 0] == 0 and routes[0, 0, 1] == 1  # left at the tie
    other = routes.copy()
    other[0, 0, 1:] = [2, 5, 11]  # right at the root, then anywhere
    y = layer(x)
    y[0] = 123.0  # the output of a tie row is not compared
    check = B.check_fff_output(layer, x, y, routes=other)
    assert check.correct and check.n_route_ties == 1


def test_check_dense_output():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8), dtype=np.float32)
    w1 = rng.standard_normal((7, 8), dtype=np.float32)
    w2 = rng.standard_normal((7, 8), dtype=np.float32)
    y = (x @ w1.T) @ w2
    assert B.check_dense_output(x, w1, w2, y).correct
    y[2, 3] += 1.0
    check = B.check_dense_output(x, w1, w2, y)
    assert not check.correct and check.detail == "1 of 5 rows wrong"


# ------------------------------------------------------- implementations
@pytest.mark.parametrize("name,kernel,family", [
    ("pyfff", "pyfff", "fff"),
    ("numpy_ref", "numpy_ref", "reference"),
    ("dense", "dense_15", "dense"),  # the tree's neuron count at depth 3
    ("dense_gelu", "dense_15+gelu", "dense"),
    ("dense_6", "dense_6", "dense"),
])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_run_case_records_correctness_and_costs(name, kernel, family, n_threads):
    if name.endswith("gelu"):
        pytest.importorskip("scipy.special")
    r = B.run_case(name, TINY, n_threads, **FAST)
    assert (r.kernel, r.family) == (kernel, family)
    assert r.n_threads == (1 if name == "numpy_ref" else n_threads)
    assert (r.batch, r.depth, r.width, r.dtype) == (9, 3, 16, "float32")
    assert r.correct is True and r.check["correct"] is True and r.check["n_rows"] == 9
    assert r.n_runs == 2 and 0 < r.best_s <= r.median_s
    assert r.flops > 0 and r.bytes > 0 and r.us_per_token > 0
    assert r.activation_timed == (family != "dense" or name.endswith("gelu"))
    d = r.as_dict()
    assert {"us_per_token", "gflops", "gbytes_per_s", "correct", "check"} <= set(d)
    json.dumps(d)


def test_costs_are_worked_out_by_hand():
    shape = B.Shape(batch=10, depth=11, width=768)
    # FFF: 12 nodes x (dot + axpy) of 768 -> 2 FLOPs per multiply-add
    assert B._fff_costs(shape, 4)[0] == 2 * 10 * 12 * 2 * 768
    # dense: two (10 x 768) x (768 x 4095)-shaped products
    assert B._dense_costs(shape, 4095, 4)[0] == 2 * 10 * 4095 * 768 * 2


def test_run_case_float64():
    r = B.run_case("pyfff", B.Shape(batch=4, depth=2, width=8, dtype="float64"), 1, **FAST)
    assert r.correct and r.dtype == "float64"


def test_numpy_ref_refuses_large_batches():
    with pytest.raises(B.Unavailable):
        B.prepare("numpy_ref", B.Workload(B.Shape(batch=B.NUMPY_REF_MAX_BATCH + 1, depth=1, width=4)), 1)


@pytest.mark.parametrize("name", ["bogus", "dense_x", "pyfff_1t"])
def test_prepare_unknown_name(name):
    with pytest.raises(ValueError, match="unknown implementation"):
        B.prepare(name, B.Workload(TINY), 1)


def test_workload_is_deterministic():
    a, b = B.Workload(TINY, seed=3), B.Workload(TINY, seed=3)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.layer.w_in, b.layer.w_in)
    assert not np.array_equal(a.x, B.Workload(TINY, seed=4).x)


def test_speedups_compare_same_threads_and_shape_only():
    def res(kernel, family, n_threads, best, n_neurons=15, activation_timed=False, batch=9):
        return B.Result(kernel=kernel, family=family, n_threads=n_threads, batch=batch, depth=3, width=16,
                        dtype="float32", n_neurons=n_neurons, best_s=best, median_s=best, n_runs=1, flops=1.0,
                        bytes=1.0, correct=True, activation_timed=activation_timed)

    rows = [res("dense_15", "dense", 1, 8.0), res("dense_15", "dense", 2, 4.0),
            res("dense_15+gelu", "dense", 1, 16.0, activation_timed=True), res("dense_3072", "dense", 1, 6.0, 3072),
            res("pyfff", "fff", 1, 2.0), res("pyfff", "fff", 2, 1.0), res("pyfff", "fff", 1, 1.0, batch=5)]
    B.speedups(rows)
    assert [r.speedup for r in rows] == [1.0, 1.0, 0.5, 8.0 / 6.0, 4.0, 4.0, None]
    assert rows[4].speedup_bert == 3.0 and rows[5].speedup_bert is None
    assert [r.speedup_vs_1t for r in rows] == [None, 2.0, None, None, None, 2.0, None]


def test_machine_info():
    info = B.machine_info()
    assert {"cpu_model", "cpu_count", "thread_env", "pyfff_config"} <= set(info)
    assert "openmp" in info["pyfff_config"] and "simd_variant" in info["pyfff_config"]
    json.dumps(info)


# ------------------------------------------------------------------- CLI
@pytest.mark.parametrize("text,expected", [("1", [1]), ("1,2048", [1, 2048]), ("1-4,8", [1, 2, 3, 4, 8]),
                                           (" 3 , 5 ", [3, 5])])
def test_int_list(text, expected):
    assert _int_list(text) == expected


@pytest.mark.parametrize("text", ["a", "4-2", "1-x"])
def test_int_list_errors(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _int_list(text)


def test_default_plan_covers_the_issue_sizes():
    from pyfff._cli_bench import plan
    from pyfff.__main__ import build_parser

    cases = plan(build_parser().parse_args(["bench"]))
    seen = {(s.batch, s.depth, s.width, s.dtype, n, k) for s, n, k in cases}
    for n in {1, B.all_threads()}:
        for batch in (1, 2048):
            assert (batch, 11, 768, "float32", n, "pyfff") in seen
            assert (batch, 11, 768, "float32", n, "dense") in seen


def test_star_plan():
    from pyfff._cli_bench import plan
    from pyfff.__main__ import build_parser

    args = build_parser().parse_args(["bench", "--star", "--batch", "1,16", "--depth", "2-4", "--threads", "1",
                                      "--kernels", "pyfff", "--star-depth", "3", "--star-batch", "16"])
    pairs = [(s.batch, s.depth) for s, _, _ in plan(args)]
    assert pairs == [(1, 3), (16, 3), (16, 2), (16, 4)]


def test_cli_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(CLI_TINY + ["--kernels", "pyfff,dense,numpy_ref", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel"))
    cols = lines[header].split()
    assert cols[:8] == ["kernel", "threads", "batch", "depth", "width", "dtype", "us/token", "speed-up"]
    assert cols[8] == "scaling" and cols[-1] == "correct"
    rows = [line.split() for line in lines[header + 2: header + 8]]
    assert [r[0] for r in rows] == ["pyfff", "dense_7", "numpy_ref"] * 2
    assert [r[1:6] for r in rows] == [["1", "3", "2", "8", "float32"]] * 3 + [["1", "5", "2", "8", "float32"]] * 3
    assert all(r[-1] == "yes" for r in rows)
    assert all(r[7].endswith("x") for r in rows) and rows[1][7] == "1.0x"
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 6 and all(r["correct"] for r in doc["results"])
    assert {"cpu_model", "pyfff_config", "thread_env"} <= set(doc["machine"])
    assert doc["options"]["width"] == [[[8]]] and doc["options"]["repeat"] == 2
    assert all(r["speedup"] is not None for r in doc["results"])


def test_cli_bench_exit_status_1_when_an_output_is_wrong(monkeypatch, capsys):
    monkeypatch.setattr(B, "check_fff_output", lambda *a, **k: B.Check(False, 1, 1.0, 0, "1 of 1 rows wrong"))
    assert main(CLI_TINY + ["--kernels", "pyfff"]) == 1
    out = capsys.readouterr().out
    assert "WRONG: pyfff" in out and " NO" in out


@pytest.mark.parametrize("argv,message", [
    (["--kernels", "bogus"], "unknown kernel"),
    (["--dtype", "float16"], "float32 or float64"),
    (["--threads", "0"], ">= 1"),
    (["--depth", "25"], "in 0..24"),
    (["--repeat", "0"], "--repeat values must be >= 1"),
    (["--star", "--star-batch", "0"], "--star-batch"),
    (["--pool-tokens", "0"], "--pool-tokens"),
])
def test_cli_bench_bad_options(argv, message, capsys):
    assert main(CLI_TINY + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_bench_skips_what_cannot_run(capsys):
    argv = ["bench", "--batch", str(B.NUMPY_REF_MAX_BATCH + 1), "--depth", "0", "--width", "2", "--threads", "1",
            "--kernels", "numpy_ref", "--repeat", "1", "--max-time", "0", "-q"]
    assert main(argv) == 0
    assert "skipped: numpy_ref" in capsys.readouterr().out


def test_cli_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(CLI_TINY + ["--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'pyfff[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    argv = ["bench", "--star", "--batch", "2,4", "--depth", "1,2", "--width", "8", "--threads", "1",
            "--kernels", "pyfff,dense", "--star-depth", "2", "--star-batch", "4", "--repeat", "2",
            "--max-time", "0", "-q", "--plot", str(png)]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_table_empty():
    assert format_table([]).splitlines()[0].split()[0] == "kernel"


# ------------------------------------------------------- bench/_registry
def _load_registry():
    path = Path(__file__).resolve().parents[1] / "bench" / "_registry.py"
    spec = importlib.util.spec_from_file_location("_bench_registry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_entries_prepare_and_are_correct():
    reg = _load_registry()
    assert {"numpy_ref", "pyfff_1t", "pyfff_nt", "dense_4095", "dense_3072"} <= set(reg.REGISTRY)
    work = B.Workload(B.Shape(batch=3, depth=2, width=8))
    for name, make in reg.REGISTRY.items():
        if name.endswith("gelu") and importlib.util.find_spec("scipy") is None:
            continue
        for n in reg.thread_counts(name):
            prep = make(work, n)
            assert prep.n_threads == n
            with prep.limits():
                y = prep.run()
            assert y.shape == (3, 8) and prep.check(y).correct, name
    assert reg.thread_counts("pyfff_1t") == [1]
    assert reg.thread_counts("pyfff_nt") == [B.all_threads()]
    assert reg.thread_counts("dense_4095") == sorted({1, B.all_threads()})


def test_other_load_is_measured_and_flags_busy_rows():
    with B.OtherLoad() as load:
        sum(range(100_000))
    assert load.cores is None or load.cores >= 0.0
    r = B.run_case("pyfff", TINY, 1, **FAST)
    r.other_load = 1.5
    table = format_table([r])
    assert table.splitlines()[2].split()[6].endswith("*")
    assert "other processes used up to 1.5" in table
    r.other_load = 0.0
    assert "*" not in format_table([r])


def test_default_plan_runs_dense_gelu_only_up_to_batch_2048():
    from pyfff._cli_bench import plan
    from pyfff.__main__ import build_parser

    cases = plan(build_parser().parse_args(["bench"]))
    assert {s.batch for s, _, k in cases if k == "dense_gelu"} == {1, 2048}
    assert 16384 in {s.batch for s, _, k in cases if k == "dense"}
    cases = plan(build_parser().parse_args(["bench", "--kernels", "dense_gelu"]))
    assert 16384 in {s.batch for s, _, k in cases}


def test_cli_plot_with_nothing_timed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["bench", "--batch", str(B.NUMPY_REF_MAX_BATCH + 1), "--depth", "0", "--width", "2", "--threads", "1",
            "--kernels", "numpy_ref", "-q", "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 2
    assert "no plot written" in capsys.readouterr().err


def test_write_plot_with_mixed_widths_and_dtypes_and_without_results(tmp_path):
    pytest.importorskip("matplotlib")
    from pyfff._cli_bench import write_plot

    rs = [B.run_case("pyfff", B.Shape(batch=b, depth=1, width=w, dtype=dt), 1, **FAST)
          for w, dt in ((8, "float32"), (4, "float64")) for b in (2, 3)]
    for r, load in zip(rs, (1.0, 0.0, None, 1.0)):
        r.other_load = load  # busy points are crossed out
    write_plot(rs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(ValueError):
        write_plot([], tmp_path / "q.png")


def test_dense_gelu_without_scipy_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.special", None)  # import scipy.special -> ImportError
    with pytest.raises(B.Unavailable, match="SciPy"):
        B.prepare("dense_gelu", B.Workload(TINY), 1)


def test_workload_cycles_through_distinct_inputs():
    work = B.Workload(B.Shape(batch=1000, depth=1, width=4))
    assert len(work.inputs) == -(-B.POOL_TOKENS // 1000)
    seen = [work.next_x() for _ in range(len(work.inputs) + 1)]
    assert seen[-1] is seen[0] and work.last_x is seen[-1]
    assert all(not np.array_equal(a, b) for a, b in zip(seen, seen[1:-1]))
    assert all(x.shape == (1000, 4) and x.flags.c_contiguous for x in seen)
    assert len(B.Workload(B.Shape(batch=B.POOL_TOKENS, depth=1, width=4)).inputs) == 1
    hot = B.Workload(B.Shape(batch=3, depth=1, width=4), pool_tokens=1)  # one input, reused by every call
    assert len(hot.inputs) == 1 and hot.next_x() is hot.next_x()


@pytest.mark.parametrize("name", ["pyfff", "numpy_ref", "dense"])
def test_checks_judge_the_output_of_the_last_input(name):
    prep = B.prepare(name, B.Workload(TINY), 1)
    first = prep.run().copy()
    last = prep.run()
    assert prep.check(last).correct
    assert not prep.check(first).correct  # the first call's output belongs to another input


def test_default_kernels_leave_out_dense_gelu_without_scipy(monkeypatch):
    import sys

    from pyfff import _cli_bench

    monkeypatch.setitem(sys.modules, "scipy.special", None)  # import raises ImportError
    assert "dense_gelu" not in _cli_bench._default_kernels()
    assert {"pyfff", "dense"} <= set(_cli_bench._default_kernels())


def test_blas_cases_run_last():
    """OpenBLAS threads spin after a GEMM: every dense case runs after every other case."""
    from pyfff._cli_bench import _blas_last
    cases = [(None, 1, k) for k in ("pyfff", "dense", "numpy_ref", "dense_gelu", "pyfff", "dense_3072")]
    assert _blas_last(cases) == [0, 2, 4, 1, 3, 5]


def test_benchmark_only_from_the_root_collects_the_benchmarks():
    """`pytest --benchmark-only` at the repository root collects bench/; plain `pytest` collects tests/ only."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def collected(*args):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                             cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    with_bench = collected("--benchmark-only")
    assert "bench/bench_fff.py::" in with_bench and "bench/bench_qgemm.py::" in with_bench
    assert "tests/test_fff_kernel.py::" in with_bench
    assert "bench/" not in collected()
