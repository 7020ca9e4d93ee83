"""A seeded mutation fuzzer over the shipped checkpoints: every malformed file must end in a clean error.

Each case copies a checkpoint (tiny UltraFastBERT MLM or classifier, all-MiniLM-L6-v2 when installed, with its
large weight file linked, not copied, or a pyfff export of the tiny ones, float32 and int8), applies one mutation (a JSON value of a config or tokenizer file replaced,
deleted, or the file truncated; a safetensors header entry changed; header or data bytes flipped or cut), then loads
it and, if that works, runs a forward pass and tokenizes a text. Accepted outcomes: success, or CheckpointError,
NotImplementedError or FileNotFoundError at load or in use (the contract of docs/encoder.md). Anything else (KeyError, AttributeError,
a tokenizers panic, RecursionError ...) fails the test with the seed that reproduces it.

``PYFFF_FUZZ_CASES`` sets the number of cases (default 300; ``.ci/run`` uses the default).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings

import numpy as np
import pytest

import pyfff
from encoder_helpers import TINY
from pyfff.encoder import CheckpointError
from test_encoder import MINILM

N_CASES = int(os.environ.get("PYFFF_FUZZ_CASES", "300"))
ACCEPTED = (CheckpointError, NotImplementedError, FileNotFoundError)
SOURCES = [os.path.join(TINY, "mlm"), os.path.join(TINY, "classifier")] + ([MINILM] if MINILM else [])
ODD_VALUES = [None, -1, 0, 1, 2 ** 63, -(2 ** 70), 1e308, float("nan"), "x", "", [], {}, True, [1, [2, [3]]],
              {"a": {"b": None}}, "[PAD]", 3.5, "gelu", ["ScriptableLMForPreTraining"], [None]]


def _json_paths(node, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):
            yield from _json_paths(v, prefix + (i,))


def _mutate_json(rng, path):
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    paths = [p for p, _ in _json_paths(doc) if p]
    kind = rng.random()
    if kind < 0.08 or not paths:
        text = json.dumps(doc)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text[:rng.randrange(len(text))])                    # truncated JSON
        return
    target = rng.choice(paths)
    parent = doc
    for key in target[:-1]:
        parent = parent[key]
    if kind < 0.25 and isinstance(parent, dict):
        del parent[target[-1]]
    else:
        parent[target[-1]] = rng.choice(ODD_VALUES)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)


def _mutate_safetensors(rng, path):
    data = bytearray(open(path, "rb").read())
    n = int.from_bytes(data[:8], "little")
    kind = rng.random()
    if kind < 0.15:
        del data[rng.randrange(len(data)):]                              # truncated file
    elif kind < 0.3:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(8 + n)] = rng.randrange(256)              # header bytes flipped
    elif kind < 0.4:
        data[:8] = rng.choice([0, 1, n + 1, 2 ** 40, 2 ** 64 - 1]).to_bytes(8, "little")
    else:
        header = json.loads(bytes(data[8:8 + n]))
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets", None])
        if field is None:
            header[name] = rng.choice(ODD_VALUES)
        elif field == "dtype":
            header[name]["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F8", "x", 1])
        elif field == "shape":
            header[name]["shape"] = rng.choice([[], [0], [-1], [2 ** 62 + 1, 4], [1] * 40, ["a"], [True], None,
                                                [rng.randrange(1, 100)]])
        else:
            b, e = header[name]["data_offsets"]
            header[name]["data_offsets"] = rng.choice([[e, b], [b, e + 4], [b - 4, e - 4], [0, 0], [b], None,
                                                       [b, 2 ** 62], [-4, e]])
        raw = json.dumps(header).encode()
        data = bytearray(len(raw).to_bytes(8, "little")) + raw + data[8 + n:]
    with open(path, "wb") as fh:
        fh.write(data)


def _copy(src, dst):
    """Copy a checkpoint; a weight file over 10 MB is linked instead (unless it is the file being mutated)."""
    os.makedirs(dst)
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            s, d = os.path.join(root, f), os.path.join(dst, rel, f)
            if os.path.getsize(s) > 10_000_000:
                os.symlink(s, d)
            else:
                shutil.copyfile(s, d)


def _run_case(seed, tmp_path, sources=SOURCES):
    rng = random.Random(seed)
    src = rng.choice(sources)
    folder = tmp_path / f"case{seed}"
    _copy(src, folder)
    files = [os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs
             if f.endswith(".json") or (f.endswith(".safetensors") and os.path.getsize(os.path.join(r, f)) < 10**7)]
    target = os.path.join(folder, rng.choice(sorted(files)))
    (_mutate_safetensors if target.endswith(".safetensors") else _mutate_json)(rng, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = pyfff.load(folder, n_threads=1)
        except ACCEPTED:
            return "refused"
        try:                                                    # a file may also be found malformed in use
            model.hidden_states(np.ones((1, 4), np.int64))
            if model.tokenizer is not None:
                model.tokenize(["a short text"])
        except ACCEPTED:
            return "refused in use"
    return "loaded"


def test_mutated_checkpoints_fail_cleanly(tmp_path):
    outcomes = {"refused": 0, "refused in use": 0, "loaded": 0}
    sources = SOURCES + [pyfff.export(SOURCES[0], tmp_path / "export"),                   # pyfff exports too
                         pyfff.export(SOURCES[1], tmp_path / "export-int8", quantize="int8")]
    for seed in range(N_CASES):
        try:
            outcomes[_run_case(seed, tmp_path, sources)] += 1
        except Exception as exc:  # noqa: BLE001 -- the point: report what escaped, with its seed
            pytest.fail(f"seed {seed}: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # tokenizers' PanicException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            pytest.fail(f"seed {seed}: {type(exc).__name__}: {exc}")
        shutil.rmtree(tmp_path / f"case{seed}", ignore_errors=True)
    print(f"fuzzed {N_CASES} mutated checkpoints: {outcomes}")
    assert outcomes["refused"] > N_CASES // 4                          # the mutations do bite
