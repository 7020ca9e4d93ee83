"""The build: OpenMP really on, thread counts honoured, show_config() complete."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import pyfff
from pyfff import _fff_cpu
from pyfff._openmp_helpers import _observed_n_threads, _openmp_effective_n_threads, _openmp_parallelism_enabled

N_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_openmp_is_enabled():
    """Fails when pyfff was built without OpenMP (set PYFFF_SKIP_OPENMP_TEST to allow it)."""
    if os.getenv("PYFFF_SKIP_OPENMP_TEST"):
        pytest.skip("PYFFF_SKIP_OPENMP_TEST is set: a serial build is accepted")
    assert _openmp_parallelism_enabled(), (
        "pyfff was built without OpenMP, so every kernel runs on one thread. Rebuild with a compiler that "
        "supports OpenMP (see README.md), or set PYFFF_SKIP_OPENMP_TEST=1 to accept a serial build."
    )
    assert any(p["user_api"] == "openmp" for p in threadpool_info()), "no OpenMP runtime is loaded"


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_counts_are_honoured(n_threads):
    # omp_get_num_threads() seen inside a prange: OpenMP really starts that many threads
    expected = n_threads if _openmp_parallelism_enabled() else 1
    assert _observed_n_threads(n_threads) == expected


def test_effective_n_threads_counts():
    if not _openmp_parallelism_enabled():
        assert [_openmp_effective_n_threads(n) for n in (None, -1, 1, 4)] == [1, 1, 1, 1]
        return
    omp_max = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "openmp"][0]  # omp_get_max_threads
    assert _openmp_effective_n_threads(None) == max(1, min(omp_max, N_CPUS))
    assert _openmp_effective_n_threads() == _openmp_effective_n_threads(None)
    assert _openmp_effective_n_threads(-1) == N_CPUS
    assert _openmp_effective_n_threads(-2) == max(1, N_CPUS - 1)
    assert _openmp_effective_n_threads(-1000) == 1
    assert _openmp_effective_n_threads(1) == 1
    assert _openmp_effective_n_threads(3) == 3  # an explicit count is taken as given
    assert _openmp_effective_n_threads(np.int32(2)) == 2


def test_effective_n_threads_respects_threadpool_limits():
    with threadpool_limits(limits=1, user_api="openmp"):
        assert _openmp_effective_n_threads(None) == 1
        # explicit counts override the limit (a serial build always answers 1)
        assert _openmp_effective_n_threads(2) == (2 if _openmp_parallelism_enabled() else 1)
    if N_CPUS >= 2 and _openmp_parallelism_enabled():
        with threadpool_limits(limits=2, user_api="openmp"):
            assert _openmp_effective_n_threads(None) == 2


def test_effective_n_threads_respects_omp_num_threads():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = "from pyfff._openmp_helpers import _openmp_effective_n_threads as f; print(f(None), f(-1))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expected_all = N_CPUS if _openmp_parallelism_enabled() else 1
    assert out.stdout.split() == ["1", str(expected_all)]


@pytest.mark.parametrize("n_threads, error, match", [
    (0, ValueError, r"n_threads=0 is invalid"),
    (True, TypeError, r"n_threads must be an int or None, got bool"),
    (1.0, TypeError, r"n_threads must be an int or None, got float"),
    ("1", TypeError, r"n_threads must be an int or None, got str"),
])
def test_effective_n_threads_errors(n_threads, error, match):
    with pytest.raises(error, match=match):
        _openmp_effective_n_threads(n_threads)


CONFIG_KEYS = ["pyfff", "python", "numpy", "openmp", "openmp_runtime", "default_n_threads", "simd_variant", "int8_path",
               "int8_paths", "blas"]


def test_show_config_prints_or_returns(capsys):
    """Printed once (returns None, so a REPL shows it once); mode="dicts" returns it without printing."""
    assert pyfff.show_config() is None
    printed = capsys.readouterr().out
    cfg = pyfff.show_config(mode="dicts")
    assert capsys.readouterr().out == ""
    for key in CONFIG_KEYS:
        assert key in cfg
        assert any(line.split(":")[0].strip() == key for line in printed.splitlines()), key
    assert cfg["pyfff"] == pyfff.__version__
    assert cfg["openmp"] is _openmp_parallelism_enabled()
    assert cfg["default_n_threads"] == _openmp_effective_n_threads(None)
    assert cfg["simd_variant"] == _fff_cpu.simd_variant()
    assert cfg["int8_paths"][0] == cfg["int8_path"]
    assert isinstance(cfg["blas"], list) and isinstance(cfg["openmp_runtime"], list)
    if cfg["openmp"]:
        assert cfg["openmp_runtime"], "OpenMP is on but show_config() names no runtime"
    buf = io.StringIO()
    assert pyfff.show_config(file=buf) is None
    assert buf.getvalue() == printed
    with pytest.raises(ValueError, match="'stdout' or 'dicts'"):
        pyfff.show_config(mode="json")


def test_show_config_under_threadpool_limits():
    with threadpool_limits(limits=1, user_api="openmp"):
        assert pyfff.show_config(mode="dicts")["default_n_threads"] == 1


# gcc's x86-64 micro-architecture levels, as /proc/cpuinfo names the flags
V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}
V4_FLAGS = V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_simd_variant_matches_the_cpu():
    variant = _fff_cpu.simd_variant()
    assert isinstance(variant, str) and variant
    flags = _cpu_flags()
    if flags is None or not variant.startswith("x86-64"):
        # no runtime dispatch here: the variant must say so
        assert "no runtime dispatch" in variant
        return
    expected = "x86-64-v4" if V4_FLAGS <= flags else "x86-64-v3" if V3_FLAGS <= flags else "x86-64 baseline"
    assert variant.startswith(expected), (variant, sorted(V4_FLAGS - flags))
