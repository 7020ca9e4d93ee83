"""The NumPy encoder at UltraFastBERT-1x11-long size, with pytest-benchmark.

Run from the repository root::

    pytest bench/bench_encoder.py --benchmark-only      # about 2 minutes on 2 cores
    pytest bench/bench_encoder.py --benchmark-disable   # smoke: every case once, checks still asserted

A random checkpoint of the published shape (16 layers, width 768, 12 heads,
FFF depth 11 with 1 tree, vocabulary 32768, 128 positions; 755 MB in the
upstream format with the duplicated tied decoder) is written once per session
in the upstream format, exported with ``pyfff.export``, and timed:

* ``test_load``: ``pyfff.load`` of the upstream folder and of the export;
* ``test_peak_memory``: peak RSS of a fresh process that loads the export (or the
  upstream folder) and runs batch 8 x 128 (asserted at most 1.3x the exported
  weights' size, i.e. the tied decoder counted once);
* ``test_tokens_per_second``: ``hidden_states`` at sequence 128, batch 1 and 8,
  for the FFF model and for the same encoder with a dense 3072 intermediate
  (BERT-base's feed-forward) so that the FFF gain is visible.

``extra_info`` records tokens/s, the sizes, and ``correct``: the output of the
timed model against the float64 reference of ``tests/encoder_reference.py``
on one sequence (FFF: a sequence whose reference routes keep every node logit
at least 1e-4 away from 0, so that a float32 route flip cannot make the check
meaningless; the margin found is recorded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # encoder_helpers, encoder_reference

import encoder_helpers as eh  # noqa: E402
import encoder_reference as ref  # noqa: E402
import pyfff  # noqa: E402

SEQ = 128
SHAPE = dict(n_layers=16, hidden=768, n_heads=12, vocab=32768, max_seq=SEQ, n_trees=1, depth=11)
MARGIN = 1e-4
PEAK_RSS_FACTOR = 1.3


def _write(root, name, **kw):
    """Upstream-format random checkpoint + its export; returns (upstream folder, export folder, tensors, config)."""
    config = eh.crammed_config(**{**SHAPE, **kw})
    tensors = eh.crammed_tensors(config, seed=0)
    src, _, _ = eh.write_crammed(root / name, config, tensors)
    dst = pyfff.export(src, root / (name + "-export"))
    return {"src": str(src), "export": str(dst), "tensors": tensors, "config": config}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-bench")
    t0 = time.perf_counter()
    out = {"fff": _write(root, "ufb-1x11"), "dense3072": _write(root, "dense-3072", intermed_type="ff", d_ff=3072)}
    print(f"\nwrote the 1x11-long-shaped checkpoints in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def _weights_bytes(folder):
    with open(os.path.join(folder, "model.safetensors"), "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())


@pytest.mark.parametrize("source", ["export", "src"])
def test_load(benchmark, checkpoints, source):
    path = checkpoints["fff"][source]
    benchmark.group = "encoder load (1x11-long shape)"
    model = benchmark.pedantic(pyfff.load, args=(path,), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(source="pyfff export" if source == "export" else "upstream HF folder",
                                file_MB=os.path.getsize(os.path.join(path, "model.safetensors")) / 1e6,
                                parameters=model.n_parameters())


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    import pyfff
    base = status("VmRSS")
    t0 = time.perf_counter()
    model = pyfff.load(sys.argv[1])
    t_load = time.perf_counter() - t0
    after_load = status("VmRSS")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(8, 128))
    h = model.hidden_states(ids)
    print(json.dumps({"base": base, "after_load": after_load, "peak": status("VmHWM"), "t_load": t_load,
                      "finite": bool(np.isfinite(h).all())}))
""")


@pytest.mark.parametrize("source", ["export", "src"])
def test_peak_memory(benchmark, checkpoints, source):
    """Peak RSS of a fresh process: import, load, one batch 8 x 128 forward."""
    path = checkpoints["fff"][source]
    weights = _weights_bytes(checkpoints["fff"]["export"])  # what the model needs (tied decoder once)

    def run():
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, path], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    benchmark.group = "encoder peak memory (1x11-long shape)"
    r = benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = r["peak"] / weights
    benchmark.extra_info.update(source=source, weights_MB=weights / 1e6, peak_rss_MB=r["peak"] / 1e6,
                                rss_after_import_MB=r["base"] / 1e6, rss_after_load_MB=r["after_load"] / 1e6,
                                peak_over_weights=ratio, load_s_in_fresh_process=r["t_load"],
                                correct=r["finite"])
    assert r["finite"]
    assert ratio <= PEAK_RSS_FACTOR, f"peak RSS {r['peak'] / 1e6:.0f} MB = {ratio:.2f}x the weights"


def _check(model, ckpt):
    """Fast vs float64 reference on one sequence (FFF: one with a safe routing margin)."""
    rng = np.random.default_rng(1)
    for _attempt in range(6):
        ids = rng.integers(0, model.config.vocab_size, size=(1, SEQ))
        want, margin = ref.crammed_encoder(ckpt["tensors"], ckpt["config"], ids)
        if margin[0] > MARGIN:
            break
    else:
        return {"correct": False, "check": f"no sequence with routing margin > {MARGIN} in 6 tries"}
    err = float(np.abs(model.hidden_states(ids) - want).max())
    return {"correct": bool(np.allclose(model.hidden_states(ids), want, rtol=1e-3, atol=1e-3)),
            "max_abs_err": err, "route_margin": float(margin[0])}


_checked = {}


@pytest.mark.parametrize("n_threads", [None, 1], ids=["all-threads", "1-thread"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("ffn", ["fff", "dense3072"])
def test_tokens_per_second(benchmark, checkpoints, ffn, batch, n_threads):
    ckpt = checkpoints[ffn]
    model = pyfff.load(ckpt["export"], n_threads=n_threads)
    if ffn not in _checked:
        _checked[ffn] = _check(model, ckpt)
    ids = np.random.default_rng(batch).integers(0, model.config.vocab_size, size=(batch, SEQ))
    mask = np.ones_like(ids)
    benchmark.group = f"encoder tokens/s, seq {SEQ}, batch {batch}, {'all' if n_threads is None else n_threads} thread(s)"
    rounds = 5 if batch == 1 else 3
    benchmark.pedantic(model.hidden_states, args=(ids, mask), rounds=rounds, iterations=1, warmup_rounds=1)
    info = benchmark.extra_info
    info.update(_checked[ffn], ffn=ffn, batch=batch, seq=SEQ, n_threads=model.n_threads)
    if not benchmark.disabled:
        info["tokens_per_s"] = batch * SEQ / benchmark.stats.stats.min
    assert _checked[ffn]["correct"], _checked[ffn]
