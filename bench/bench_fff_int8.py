"""pytest-benchmark: the int8 FFF layer against the float32 layer it was made from (bench/fff_int8_speed.py).

``pytest bench/bench_fff_int8.py --benchmark-only``: width 768, depth 11, one thread, new tokens at every call;
both layers in one group per batch, so the comparison reads off one table. ``extra_info`` records, beside every timing, whether the routes equal
the float32 layer's (always, by design), the shares of nodes decided at level 2 and by the float32 logit, and the
largest output difference against the derived tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyfff import FFF
from pyfff.fff_int8 import int8_tolerance


@pytest.fixture(scope="module")
def layers():
    layer = FFF.random(768, 768, depth=11, seed=0)
    return {"float32": layer, "int8": layer.quantize("int8")}


@pytest.mark.parametrize("kind", ["float32", "int8"])
@pytest.mark.parametrize("batch", [1, 2048, 16384], ids=lambda b: f"b{b:05d}")
def test_fff_int8(benchmark, layers, kind, batch):
    rng = np.random.default_rng(batch)
    xs = [rng.standard_normal((batch, 768)).astype(np.float32) for _ in range(-(-4096 // batch))]
    y = np.empty((batch, 768), np.float32)
    layer = layers[kind]
    benchmark.group = f"FFF int8 vs float32, batch {batch:05d}"
    rounds = 1 if benchmark.disabled else max(5, 40000 // batch)
    calls = iter(range(1 << 62))                                  # every call on new tokens (bench/README.md)
    benchmark.pedantic(lambda: layer(xs[next(calls) % len(xs)], 1, out=y), rounds=rounds, iterations=1,
                       warmup_rounds=1)
    x = xs[0]
    info = {"batch": batch, "kind": kind}
    if kind == "int8":
        st = layer.last_stats
        assert np.array_equal(layer.routes(x), layers["float32"].routes(x))
        sample = x[:64]
        err = np.abs(layer(sample) - layers["float32"](sample)).max(axis=1)
        tol = int8_tolerance(layer, sample)
        assert (err <= tol).all()
        info.update(routes_equal=True, level2_share=st["level2"] / st["nodes"],
                    float32_share=st["float32"] / st["nodes"], max_err_over_tolerance=float((err / tol).max()))
    benchmark.extra_info.update(info)
