"""pytest configuration of bench/: collection of bench_*.py, machine info, and the shared case runner.

Run from the repository root::

    pytest bench --benchmark-only        # time everything (minutes)
    pytest bench --benchmark-disable     # CI smoke test: each light case once, correctness checked

Files named ``bench_*.py`` are collected here (the root configuration only
collects ``tests/``); the test functions inside them are named ``test_*``.
Nothing here sets threads, affinity or ``OMP_*`` variables: they are recorded.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # bench/_registry.py, whatever the rootdir

from pyfff import benchmark as B  # noqa: E402

# With benchmarks disabled (CI smoke), cases whose dense baseline needs more than this many FLOPs per call are
# skipped: batch 128 at depth 11 (1.6 GFLOP, ~15 ms) runs, batch 2048 at depth 11 (26 GFLOP) does not.
SMOKE_MAX_DENSE_FLOPS = 2e9


def pytest_addoption(parser):
    group = parser.getgroup("pyfff bench")
    group.addoption("--bench-budget", type=float, default=1.0, metavar="SECONDS",
                    help="pyfff benches: timed seconds per case (at least 3 rounds; default 1.0)")


def pytest_collect_file(file_path, parent):
    """Collect bench/bench_*.py as test modules (pytest's default pattern is test_*.py)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # a file named on the command line is collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add the CPU model, affinity, OMP_*/BLAS variables and pyfff.show_config() to the saved JSON."""
    machine_info["pyfff"] = B.machine_info()


def _benchmarks_disabled(config):
    return bool(config.getoption("benchmark_disable", default=False))


class CaseRunner:
    """Times one registry implementation on one shape with pytest-benchmark and records what it found.

    Keeps the median time of every (kernel, shape, threads) measured in this
    session, so a speed-up compares two measurements of the same run; a
    baseline not yet measured is measured on demand with the same method
    (``time.perf_counter`` around single calls on new inputs, median of at
    least 3, after a warm-up).
    """

    def __init__(self, config):
        self.config = config
        self.disabled = _benchmarks_disabled(config)
        self.budget = config.getoption("bench_budget")
        # (kernel, shape, n_threads) -> (median seconds per call, cores used by other processes meanwhile)
        self.times = {}

    def _baseline(self, base, shape, n_threads):
        """(median seconds, other processes' load) of implementation ``base`` (a pyfff.benchmark name) here."""
        kernel = {"dense": f"dense_{shape.n_neurons}", "pyfff": "pyfff"}[base]  # the Prepared.kernel of `base`
        key = (kernel, shape, n_threads)
        if key not in self.times:
            prep = B.prepare(base, B.Workload(shape), n_threads)
            assert prep.kernel == kernel
            times, _, load = B.measure(prep, repeat=3, max_time=self.budget)
            self.times[key] = (statistics.median(times), load)
        return self.times[key]

    def __call__(self, benchmark, impl, shape, n_threads=None):
        from _registry import REGISTRY

        if self.disabled and 4.0 * shape.batch * shape.n_neurons * shape.width > SMOKE_MAX_DENSE_FLOPS:
            pytest.skip("heavy size: runs only when timing (pytest bench --benchmark-only)")
        work = B.Workload(shape)
        try:
            prep = REGISTRY[impl](work, n_threads)
        except B.Unavailable as exc:
            pytest.skip(str(exc))
        benchmark.group = shape.label
        info = benchmark.extra_info
        info.update(kernel=prep.kernel, family=prep.family, n_threads=prep.n_threads, dtype=shape.dtype,
                    batch=shape.batch, depth=shape.depth, width=shape.width, n_neurons=prep.n_neurons,
                    activation_timed=prep.activation_timed)
        # BLAS thread limit: once around the whole timed region
        with prep.limits(), B.OtherLoad() as load:
            if benchmark.disabled:
                y = benchmark(prep.run)
            else:
                t0 = time.perf_counter()
                prep.run()  # first call: warm-up, and the estimate of how many rounds fit in the budget
                t_one = time.perf_counter() - t0
                rounds = B.plan_rounds(t_one, self.budget)
                y = benchmark.pedantic(prep.run, rounds=rounds, warmup_rounds=1 if t_one < 0.2 else 0,
                                       iterations=1)
        check = B.check(prep, y)
        info.update(correct=check.correct, checked_rows=check.n_rows, max_rel_err=check.max_rel_err,
                    route_ties=check.n_route_ties)
        if check.detail:
            info["check_detail"] = check.detail
        if not benchmark.disabled:
            info["other_load"] = load.cores  # cores used by other processes meanwhile (shared machines)
            self._record(benchmark, prep, shape, load.cores)
        assert check.correct, f"{prep.kernel} output does not match the reference: {check.detail}"

    def _record(self, benchmark, prep, shape, load):
        # median: calls run on distinct inputs, the fastest run is the luckiest input (see pyfff.benchmark)
        t = benchmark.stats.stats.median  # the time this case reports
        self.times[(prep.kernel, shape, prep.n_threads)] = (t, load)
        info = benchmark.extra_info
        info.update(us_per_token=t / shape.batch * 1e6,
                    us_per_token_min=benchmark.stats.stats.min / shape.batch * 1e6,
                    gflops=prep.flops / t / 1e9, gbytes_per_s=prep.bytes / t / 1e9, flops_per_call=prep.flops,
                    bytes_per_call=prep.bytes)
        dense, dense_load = self._baseline("dense", shape, prep.n_threads)
        info["speedup_vs_dense"] = dense / t  # dense FF of the tree's neuron count, same threads, same run
        info["baseline"] = f"dense_{shape.n_neurons} on {prep.n_threads} thread(s)"
        info["baseline_other_load"] = dense_load
        if prep.family == "fff" and prep.n_threads > 1:
            info["speedup_vs_1t"] = self._baseline("pyfff", shape, 1)[0] / t


@pytest.fixture(scope="session")
def _case_runner(pytestconfig):
    return CaseRunner(pytestconfig)


@pytest.fixture
def bench_case(benchmark, _case_runner):
    """``bench_case(impl, shape, n_threads=None)``: benchmark registry entry ``impl`` on a pyfff.benchmark.Shape."""
    return lambda impl, shape, n_threads=None: _case_runner(benchmark, impl, shape, n_threads)
