"""Build pyfff's compiled extensions.

One extension table, one build_ext subclass that adds the OpenMP flags found
by a probe that compiles, links and *runs* a tiny OpenMP program with the
build compiler (honouring CC, CFLAGS and LDFLAGS).

Environment switches
--------------------
PYFFF_USE_OPENMP     probe (default) | 1 (require, no probe) | 0 (serial build)
PYFFF_FAIL_NO_OPENMP 1: fail the build instead of building serially
PYFFF_ARCH           native: add -march=native (opt-in; the default build is
                     portable and picks AVX-512/AVX2 at run time)
PYFFF_DEBUG          1: -O0 -g, with boundscheck/wraparound/initializedcheck on
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

EXTENSIONS = [
    # (module, sources)
    ("pyfff._openmp_helpers", ["pyfff/_openmp_helpers.pyx"]),
    ("pyfff._fff_cpu", ["pyfff/_fff_cpu.pyx"]),
    ("pyfff._qgemm", ["pyfff/_qgemm.pyx"]),
    ("pyfff._fff_int8", ["pyfff/_fff_int8.pyx"]),
    ("pyfff._encoder_ops", ["pyfff/_encoder_ops.pyx"]),
]

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)

BANNER = "\n" + "*" * 78 + "\n{}\n" + "*" * 78 + "\n"


def _openmp_flags(compiler):
    """(compile flags, link flags) for OpenMP with this compiler."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin" and "openmp" in os.getenv("CPPFLAGS", ""):
        # Apple clang: CPPFLAGS="-Xpreprocessor -fopenmp" plus libomp (README).
        return [], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _probe_openmp(compiler, cflags, ldflags):
    """Compile, link and run OPENMP_PROBE; return (ok, message)."""
    tmp = tempfile.mkdtemp(prefix="pyfff-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        extra_pre = os.getenv("CPPFLAGS", "").split()
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags + extra_pre)
        exe = os.path.join(tmp, "probe")
        compiler.link_executable(objs, "probe", output_dir=tmp,
                                 extra_postargs=ldflags + os.getenv("LDFLAGS", "").split())
        out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return False, f"the OpenMP test program failed to run: {out.stderr.strip()}"
        return True, f"OpenMP test program ran with {out.stdout.strip()} threads"
    except Exception as exc:  # compile/link errors come as several exception types
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """build_ext that decides on OpenMP once and adds the flags everywhere."""

    def build_extensions(self):
        mode = os.getenv("PYFFF_USE_OPENMP", "probe").lower()
        cflags, ldflags = _openmp_flags(self.compiler)
        if mode in ("0", "false", "no", "off"):
            use_openmp, why = False, "PYFFF_USE_OPENMP=0"
        elif mode in ("1", "true", "yes", "on"):
            use_openmp, why = True, "PYFFF_USE_OPENMP=1 (probe skipped)"
        else:
            use_openmp, why = _probe_openmp(self.compiler, cflags, ldflags)
        if not use_openmp:
            msg = (f"pyfff: OpenMP is NOT available ({why}).\n"
                   "pyfff will be built SERIAL: every kernel runs on one thread.\n"
                   "On macOS: brew install libomp; see README.md 'Building'.")
            if os.getenv("PYFFF_FAIL_NO_OPENMP", "0") not in ("", "0"):
                raise RuntimeError(msg + "\nPYFFF_FAIL_NO_OPENMP is set: failing the build.")
            print(BANNER.format(msg), file=sys.stderr)
            cflags, ldflags = [], []
        debug = os.getenv("PYFFF_DEBUG", "0") not in ("", "0")
        if self.compiler.compiler_type == "msvc":
            opt = ["/Od", "/Zi"] if debug else ["/O2"]
        else:
            opt = ["-O0", "-g"] if debug else ["-O3"]
            if os.getenv("PYFFF_ARCH", "") == "native":
                opt.append("-march=native")
        print(f"pyfff build: OpenMP={'on' if use_openmp else 'off'} ({why}); "
              f"flags={opt + cflags}; link={ldflags}; compiler={self.compiler.compiler_type}", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = opt + cflags + ext.extra_compile_args
            ext.extra_link_args = ldflags + ext.extra_link_args
        super().build_extensions()


def _extensions():
    # Skip cythonize for commands that do not build (sdist, --help, egg_info...).
    build_cmds = {"build", "build_ext", "install", "develop", "bdist_wheel", "editable_wheel", "bdist"}
    if not build_cmds.intersection(sys.argv[1:]):
        return []
    from Cython.Build import cythonize

    debug = os.getenv("PYFFF_DEBUG", "0") not in ("", "0")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    exts = [
        Extension(
            name,
            sources,
            include_dirs=[os.path.join(HERE, "src"), np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            depends=[os.path.join("src", f) for f in os.listdir(os.path.join(HERE, "src"))],
        )
        for name, sources in EXTENSIONS
    ]
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
