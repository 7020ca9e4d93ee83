"""int8 models (``pyfff.load(..., quantize="int8")``, ``pyfff.export(..., quantize="int8")``) against float32.

Accuracy contract (docs/encoder.md, "int8 models"): against the float32 model of the same checkpoint, sentence
embeddings have cosine >= 0.99 per sentence, final hidden states cosine >= 0.99 per token, and fill-mask's top
prediction is the same. Checked on the shipped checkpoints (tiny UltraFastBERT, all-MiniLM-L6-v2) and on random
checkpoints of the real widths (UltraFastBERT-1x11: 768 wide, 12 heads, FFF depth 11; BERT-base: 768 wide,
12 heads, dense 3072), with fewer layers than the full models to keep the suite fast. For FFF models the
per-token contract holds where int8 does not change a routing decision (see the UltraFastBERT test).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import encoder_helpers as eh
import pyfff
from encoder_helpers import TINY
from test_encoder import GOLDEN, MINILM, needs_minilm

MIN_COSINE = 0.99


def _cosines(a, b):
    """Cosine of matching rows (last axis) of a and b."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _pair(path, **kw):
    return pyfff.load(path, **kw), pyfff.load(path, quantize="int8", **kw)


@pytest.fixture(scope="module")
def tiny_mlm():
    return _pair(os.path.join(TINY, "mlm"))


def test_tiny_hidden_states_and_logits(tiny_mlm):
    f, q = tiny_mlm
    assert f.quantize is None and q.quantize == "int8" and "quantize='int8'" in repr(q)
    ids, mask = GOLDEN["input_ids"], GOLDEN["attention_mask"]
    hq = q.hidden_states(ids, mask)
    assert hq.dtype == np.float32 and hq.shape == GOLDEN["last_hidden_state"].shape
    keep = mask.astype(bool).ravel()
    assert _cosines(hq, f.hidden_states(ids, mask))[keep].min() >= MIN_COSINE
    assert _cosines(hq, GOLDEN["last_hidden_state"])[keep].min() >= MIN_COSINE
    top_q = q.mlm_logits(ids, mask).argmax(-1)
    assert np.array_equal(top_q[mask == 1], f.mlm_logits(ids, mask).argmax(-1)[mask == 1])


def test_tiny_fill_mask_top1(tiny_mlm):
    f, q = tiny_mlm
    for text in GOLDEN["texts"]:
        words = str(text).split()
        masked = " ".join(words[:-1] + ["<mask>"])          # the last word masked
        assert q.fill_mask(masked, top_k=1)[0][0][0] == f.fill_mask(masked, top_k=1)[0][0][0], masked


def test_tiny_classifier():
    f, q = _pair(os.path.join(TINY, "classifier"))
    ids, mask = GOLDEN["pair_input_ids"], GOLDEN["pair_attention_mask"]
    lf, lq = f.classify(ids, mask), q.classify(ids, mask)
    assert lq.shape == lf.shape == GOLDEN["classifier_logits"].shape
    np.testing.assert_allclose(lq, lf, atol=0.05 * np.abs(lf).max())
    assert np.array_equal(lq.argmax(1), lf.argmax(1))


@needs_minilm
def test_minilm_embeddings():
    f, q = _pair(MINILM)
    sentences = [str(s) for s in GOLDEN_MINILM["sentences"]]
    eq = q.embed(sentences)
    assert eq.shape == (len(sentences), 384) and eq.dtype == np.float32
    assert _cosines(eq, f.embed(sentences)).min() >= MIN_COSINE
    assert _cosines(eq, GOLDEN_MINILM["sentence_embedding"]).min() >= MIN_COSINE
    ids, mask = GOLDEN_MINILM["input_ids"], GOLDEN_MINILM["attention_mask"]
    keep = mask.astype(bool).ravel()
    assert _cosines(q.hidden_states(ids, mask), GOLDEN_MINILM["last_hidden_state"])[keep].min() >= MIN_COSINE


GOLDEN_MINILM = np.load(os.path.join(eh.DATA, "minilm_l6_v2.npz"))


def test_bert_base_width_random_checkpoint(tmp_path, global_random_seed):
    """BERT-base widths (768, 12 heads, dense 3072), 3 layers, a padded batch: cosine >= 0.99 per token."""
    rng = np.random.default_rng(global_random_seed)
    src, cfg, _ = eh.write_bert(tmp_path / "m", n_layers=3, hidden=768, n_heads=12, d_ff=3072, max_pos=64,
                                seed=global_random_seed)
    f, q = _pair(src, n_threads=1)
    ids, mask = eh.random_batch(rng, 3, 40, cfg["vocab_size"])
    cos = _cosines(q.hidden_states(ids, mask), f.hidden_states(ids, mask))[mask.astype(bool).ravel()]
    assert cos.min() >= MIN_COSINE, (cos.min(), np.median(cos))


class _RecordInputs:
    """Wraps an FFF layer of an encoder and keeps the inputs it was called with."""

    def __init__(self, layer):
        self.layer, self.inputs = layer, []

    def __call__(self, h, **kw):
        self.inputs.append(h.copy())
        return self.layer(h, **kw)


def test_ultrafastbert_width_random_checkpoint(tmp_path, global_random_seed):
    """UltraFastBERT-1x11 widths (768, 12 heads, FFF depth 11), 2 layers, 24 sequences of 6 tokens.

    int8 changes the FFF layers' inputs by about 1 %, so a token whose node logit is that close to 0 takes the
    other branch (in float32 too, any rounding change can do that), and with these random weights a changed
    branch changes the token's FFF output entirely (docs/encoder.md, "int8 models"). So: every routing decision
    that differs must be one whose float32 logit is near 0, and every token of a sequence in which no decision
    differs has cosine >= 0.99."""
    rng = np.random.default_rng(global_random_seed)
    src, _, _ = eh.write_crammed(tmp_path / "m", n_layers=2, hidden=768, n_heads=12, depth=11, n_trees=1,
                                 vocab=512, max_seq=64, seed=global_random_seed)
    f, q = _pair(src, n_threads=1)
    for model in (f, q):
        model._ffns = [_RecordInputs(layer) for layer in model._ffns]
    ids = rng.integers(0, 512, size=(24, 6))
    cos = _cosines(q.hidden_states(ids), f.hidden_states(ids)).reshape(24, 6)
    differs = np.zeros((24, 6), bool)
    for rf, rq in zip(f._ffns, q._ffns):
        layer = rf.layer
        route_f, route_q = layer.routes(rf.inputs[0]), layer.routes(rq.inputs[0])      # (N, 1, 12) node ids
        token = (route_f != route_q).any(axis=(1, 2))                                      # (N,)
        differs |= token.reshape(24, 6)
        if rf is f._ffns[0]:                                    # the first layer sees int8 error only
            first = (route_f != route_q).argmax(axis=2)[:, 0]                                # first differing level
            node = route_f[token, 0, np.maximum(first[token] - 1, 0)]                       # the node that decided
            logit = np.einsum("nh,nh->n", rf.inputs[0][token], layer.w_in[node]) + layer.b_in[node]
            assert (np.abs(logit) < 0.1).all(), logit           # logits are O(1): only near-ties flip
    clean = ~differs.any(axis=1)
    assert clean.sum() >= 3, clean.sum()
    assert cos[clean].min() >= MIN_COSINE, cos[clean].min()


def test_export_int8(tmp_path):
    src = os.path.join(TINY, "mlm")
    f32 = pyfff.export(src, tmp_path / "f32")
    i8 = pyfff.export(src, tmp_path / "i8", quantize="int8")
    again = pyfff.export(i8, tmp_path / "again")                      # an int8 source stays int8
    m = pyfff.load(i8)
    assert m.quantize == "int8" and pyfff.load(again).quantize == "int8"
    assert pyfff.load(i8, quantize="int8").quantize == "int8"
    ids, mask = GOLDEN["input_ids"], GOLDEN["attention_mask"]
    at_load = pyfff.load(src, quantize="int8")
    assert np.array_equal(m.hidden_states(ids, mask), at_load.hidden_states(ids, mask))
    assert np.array_equal(pyfff.load(f32, quantize="int8").hidden_states(ids, mask), at_load.hidden_states(ids, mask))
    with open(os.path.join(i8, "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["encoder"]["quantize"] == "int8"
    # the dense projections are stored 4x smaller (the rest of the tiny model is float32 as before)
    q8 = {k: v for k, v in m.params.items() if k.endswith(".q8")}
    assert q8 and all(v.dtype == np.int8 for v in q8.values())
    size = {name: os.path.getsize(os.path.join(folder, "model.safetensors")) for name, folder in (("i8", i8), ("f32", f32))}
    assert size["i8"] < size["f32"]
    assert not any(k.endswith("attn.qkv.weight") for k in m.params)


def test_export_int8_corrupt_dtype(tmp_path):
    """An int8 export whose packed weights were rewritten as float is refused, naming the tensor."""
    from pyfff.encoder._safetensors import read_safetensors, write_safetensors

    i8 = pyfff.export(os.path.join(TINY, "mlm"), tmp_path / "i8", quantize="int8")
    tensors, meta = read_safetensors(os.path.join(i8, "model.safetensors"))
    tensors = dict(tensors)
    tensors["layers.0.attn.qkv.weight.q8"] = tensors["layers.0.attn.qkv.weight.q8"].astype(np.float32)
    write_safetensors(os.path.join(tmp_path, "tmp.safetensors"), tensors, meta)
    os.replace(os.path.join(tmp_path, "tmp.safetensors"), os.path.join(i8, "model.safetensors"))
    with pytest.raises(pyfff.encoder.CheckpointError, match=r"layers.0.attn.qkv.weight.q8.*expected int8"):
        pyfff.load(i8)


@pytest.mark.parametrize("bad", ["int4", "INT8", "", 8, True])
def test_unknown_quantize_value(tmp_path, bad):
    with pytest.raises(ValueError, match=r"accepted: None, 'int8'"):
        pyfff.load(os.path.join(TINY, "mlm"), quantize=bad)
    with pytest.raises(ValueError, match=r"accepted: None, 'int8'"):
        pyfff.export(os.path.join(TINY, "mlm"), tmp_path / "x", quantize=bad)
    assert not (tmp_path / "x").exists()


def test_int8_bad_inputs_same_errors(tiny_mlm):
    f, q = tiny_mlm
    for args, exc in [((np.array([[1.5]]),), TypeError), ((np.array([[10 ** 6]]),), ValueError),
                      ((np.zeros((1, 33), np.int64),), ValueError)]:
        with pytest.raises(exc) as ef:
            f.hidden_states(*args)
        with pytest.raises(exc) as eq:
            q.hidden_states(*args)
        assert str(ef.value) == str(eq.value)


def test_cli_export_quantize_and_info(tmp_path):
    dst = tmp_path / "i8"
    run = [sys.executable, "-m", "pyfff"]
    out = subprocess.run(run + ["export", os.path.join(TINY, "mlm"), str(dst), "--quantize", "int8"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = subprocess.run(run + ["info", str(dst), "--json"], capture_output=True, text=True)
    assert json.loads(info.stdout)["summary"]["quantize"] == "int8"
    bad = subprocess.run(run + ["export", os.path.join(TINY, "mlm"), str(tmp_path / "b"), "--quantize", "int4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "int8" in bad.stderr


@needs_minilm
def test_embed_does_not_depend_on_batching():
    """embed sorts texts by length into batches: a text's embedding must not depend on its batch (bitwise for
    int8, whose kernels compute each token alone; float32 BLAS may round differently for other batch shapes)."""
    f, q = _pair(MINILM, n_threads=1)
    texts = [str(s) for s in GOLDEN_MINILM["sentences"]] + ["a b c d e f g h", "x"] * 3
    for model, exact in ((q, True), (f, False)):
        whole = model.embed(texts, batch_size=4)
        alone = np.concatenate([model.embed([t]) for t in texts])
        reversed_ = model.embed(texts[::-1], batch_size=32)[::-1]
        for other in (alone, reversed_):
            if exact:
                assert np.array_equal(whole, other)
            else:
                np.testing.assert_allclose(whole, other, atol=1e-6)


@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 30), (2, 64)])
def test_int8_thread_counts_bitwise(batch, seq):
    """Few tokens: the threads work inside the kernels; more: on blocks of tokens. Same bits for every count."""
    src = os.path.join(TINY, "mlm")
    rng = np.random.default_rng(batch * seq)
    ids = rng.integers(5, 200, size=(batch, min(seq, 32)))
    ref = pyfff.load(src, quantize="int8", n_threads=1).hidden_states(ids)
    for n in (2, 3, 8):
        assert np.array_equal(pyfff.load(src, quantize="int8", n_threads=n).hidden_states(ids), ref)
