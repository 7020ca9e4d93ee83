"""Repository-root pytest configuration: ``pytest --benchmark-only`` runs the benchmarks.

Plain ``pytest`` runs the test suite (``testpaths = tests`` in pyproject.toml). Asked for benchmarks and given no
paths, pytest also collects ``bench/`` (FFF, int8 layers, encoder, GPU where present), so that
``pytest --benchmark-only`` from the repository root does what pytest-benchmark users expect;
``pytest bench --benchmark-only`` keeps working.
"""
import os

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench")


def pytest_configure(config):
    if config.getoption("benchmark_only", default=False) and config.args_source == config.ArgsSource.TESTPATHS:
        config.args.append(BENCH)
