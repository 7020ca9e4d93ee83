"""The fast encoder against the float64 reference on random upstream-format checkpoints.

Checkpoints are written by ``encoder_helpers`` in the exact upstream formats
(crammedBERT with interleaved QKV and torch-layout FFF weights; HF BERT) and
loaded both directly and through ``pyfff.export``. The reference
(``encoder_reference``) reads the upstream tensors with plain float64 NumPy,
so the two share no code.

FFF routing is a hard sign decision: where a node logit is within float32
rounding of 0 the fast path may go the other way, and that changes the whole
sequence (attention mixes tokens). ``assert_close_by_margin`` compares only
sequences whose smallest |logit| on the reference paths exceeds MARGIN, and
requires most sequences to be compared. Contract: passes for any
``global_random_seed`` in 0-99.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import encoder_helpers as eh
import encoder_reference as ref
import pyfff

MARGIN = 3e-5        # float32 logits are accurate to ~1e-6 here; 30x headroom
RTOL, ATOL = 1e-4, 1e-4


def assert_close_by_margin(fast, want, margin, *, min_fraction=0.75):
    """Per sequence (axis 0): allclose where margin > MARGIN; most sequences must be compared.

    Returns the boolean array of compared sequences.
    """
    fast, want = np.asarray(fast, np.float64), np.asarray(want, np.float64)
    assert fast.shape == want.shape
    compared = margin > MARGIN
    assert compared.mean() >= min_fraction, f"only {compared.sum()} of {compared.size} sequences have a safe margin"
    np.testing.assert_allclose(fast[compared], want[compared], rtol=RTOL, atol=ATOL)
    return compared


def test_comparator_accepts_route_flips_only_below_margin():
    want = np.zeros((4, 3))
    fast = want.copy()
    fast[1] += 1.0                                   # a sequence that differs a lot
    margin = np.array([1.0, 1e-7, 1.0, 1.0])         # ... whose reference path passed a logit near 0
    compared = assert_close_by_margin(fast, want, margin)
    assert compared.tolist() == [True, False, True, True]
    with pytest.raises(AssertionError):
        assert_close_by_margin(fast, want, np.ones(4))            # same difference, safe margin: caught
    with pytest.raises(AssertionError, match="safe margin"):
        assert_close_by_margin(want, want, np.full(4, 1e-7))      # nothing compared: not a pass


def _models(folder, tmp_path):
    return {"direct": pyfff.load(folder), "export": pyfff.load(pyfff.export(folder, tmp_path / "export"))}


CRAMMED_CASES = {
    # several trees, odd head count, batch 64, every sequence padded, MLM
    "trees3-heads3-b64-mlm": dict(kw=dict(n_trees=3, depth=2, n_heads=3, hidden=48), batch=64, seq=24, full=False),
    # depth 0 (one neuron per tree), 5 heads, avg pooler (padding included), batch 1
    "depth0-heads5-b1-avg": dict(kw=dict(n_trees=2, depth=0, n_heads=5, hidden=40, head="classifier",
                                         pooler="avg"), batch=1, seq=9, full=True),
    # deeper single tree, 7 heads, zero_index pooler, mixed padding
    "depth4-heads7-cls": dict(kw=dict(n_trees=1, depth=4, n_heads=7, hidden=56, head="classifier"),
                          batch=7, seq=32, full=True),
    # dense intermediate with biases everywhere (use_bias, qkv_bias), no final norm
    "dense-bias-mlm": dict(kw=dict(intermed_type="ff", d_ff=72, use_bias=True, qkv_bias=True, final_norm=False,
                                   n_heads=4, hidden=32), batch=5, seq=16, full=False),
}


@pytest.mark.parametrize("case", list(CRAMMED_CASES))
def test_crammed_random_checkpoint_matches_reference(case, tmp_path, global_random_seed):
    spec = CRAMMED_CASES[case]
    kw = spec["kw"]
    folder, config, tensors = eh.write_crammed(tmp_path / "ckpt", seed=global_random_seed, **kw)
    rng = np.random.default_rng(global_random_seed)
    ids, mask = eh.random_batch(rng, spec["batch"], spec["seq"], config["arch"]["embedding"]["vocab_size"],
                                full=spec["full"])
    head = kw.get("head", "mlm")
    if head == "mlm":
        want, margin = ref.crammed_mlm_logits(tensors, config, ids, mask)
        want_h, _ = ref.crammed_encoder(tensors, config, ids, mask)
    else:
        want, margin = ref.crammed_classify(tensors, config, ids, mask)
        want_h, _ = ref.crammed_encoder(tensors, config, ids, mask)
    for kind, model in _models(folder, tmp_path).items():
        assert model.config.n_heads == kw["n_heads"], kind
        assert_close_by_margin(model.hidden_states(ids, mask), want_h, margin)
        got = model.mlm_logits(ids, mask) if head == "mlm" else model.classify(ids, mask)
        assert_close_by_margin(got, want, margin)


def test_crammed_without_mask_equals_all_ones_mask(tmp_path):
    folder, config, tensors = eh.write_crammed(tmp_path / "ckpt", seed=3)
    model = pyfff.load(folder)
    ids, _ = eh.random_batch(np.random.default_rng(3), 4, 12, 232)
    np.testing.assert_array_equal(model.hidden_states(ids), model.hidden_states(ids, np.ones_like(ids)))


def test_crammed_padding_does_not_change_unpadded_tokens(tmp_path):
    """Right padding only masks keys: the real tokens' states equal those of the unpadded sequence."""
    folder, config, tensors = eh.write_crammed(tmp_path / "ckpt", seed=5)
    model = pyfff.load(folder)
    ids, _ = eh.random_batch(np.random.default_rng(5), 1, 10, 232)
    padded = np.concatenate([ids, np.zeros((1, 6), np.int64)], axis=1)
    mask = np.concatenate([np.ones((1, 10), np.int64), np.zeros((1, 6), np.int64)], axis=1)
    np.testing.assert_allclose(model.hidden_states(padded, mask)[:, :10], model.hidden_states(ids),
                               rtol=1e-5, atol=1e-5)


def test_crammed_decoder_only_and_no_norm_factor(tmp_path):
    """word_embedding missing -> decoder.weight is used; norm_factor scalars are optional (spec section 2)."""
    config = eh.crammed_config()
    tensors = eh.crammed_tensors(config, seed=11, store_word_embedding=False, store_norm_factor=False)
    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", config, tensors)
    ids, mask = eh.random_batch(np.random.default_rng(11), 6, 20, 232)
    want, margin = ref.crammed_mlm_logits(tensors, config, ids, mask)
    assert_close_by_margin(pyfff.load(folder).mlm_logits(ids, mask), want, margin)


def test_crammed_prefixed_keys_are_accepted(tmp_path):
    """``_orig_mod.`` / ``module.`` prefixes (torch.compile, DDP) are stripped."""
    config = eh.crammed_config()
    tensors = eh.crammed_tensors(config, seed=2)
    prefixed = {"_orig_mod." + k: v for k, v in tensors.items()}
    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", config, prefixed)
    ids, mask = eh.random_batch(np.random.default_rng(2), 3, 10, 232)
    np.testing.assert_array_equal(pyfff.load(folder).hidden_states(ids, mask),
                                  pyfff.load(eh.write_crammed(tmp_path / "plain", config, tensors)[0])
                                  .hidden_states(ids, mask))


BERT_ARCHS = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"]


@pytest.mark.parametrize("arch", BERT_ARCHS)
def test_bert_random_checkpoint_matches_reference(arch, tmp_path, global_random_seed):
    folder, config, tensors = eh.write_bert(tmp_path / "ckpt", architecture=arch, seed=global_random_seed,
                                            n_heads=3, hidden=36)
    rng = np.random.default_rng(global_random_seed)
    ids, mask = eh.random_batch(rng, 9, 20, config["vocab_size"], full=False)
    types = (rng.random(ids.shape) < 0.3).astype(np.int64)
    want_h = ref.bert_encoder(tensors, config, ids, mask, types)
    for kind, model in _models(folder, tmp_path).items():
        np.testing.assert_allclose(model.hidden_states(ids, mask, types), want_h, rtol=RTOL, atol=ATOL, err_msg=kind)
        if arch == "BertForMaskedLM":
            np.testing.assert_allclose(model.mlm_logits(ids, mask), ref.bert_mlm_logits(tensors, config, ids, mask),
                                       rtol=RTOL, atol=ATOL, err_msg=kind)
        if arch == "BertForSequenceClassification":
            assert model.config.num_labels == 3
            np.testing.assert_allclose(model.classify(ids, mask, types),
                                       ref.bert_classify(tensors, config, ids, mask, types),
                                       rtol=RTOL, atol=ATOL, err_msg=kind)


@pytest.mark.parametrize("pooling", [
    dict(pooling_mode_mean_tokens=True, normalize=True),
    dict(pooling_mode_cls_token=True, pooling_mode_max_tokens=True, pooling_mode_mean_sqrt_len_tokens=True),
])
def test_bert_sentence_transformers_pooling(pooling, tmp_path):
    folder, config, tensors = eh.write_bert(tmp_path / "ckpt", seed=4, sentence_transformers=pooling)
    texts = ["the cat sat on the mat.", "paris!", "", "a fast feed forward network is a tree"]
    for kind, model in _models(folder, tmp_path).items():
        ids, mask = model.tokenize(texts)
        modes = [m for key, m in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                                  ("pooling_mode_mean_tokens", "mean"),
                                  ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len")) if pooling.get(key)]
        want = ref.sentence_embedding(ref.bert_encoder(tensors, config, ids, mask), mask, modes,
                                      pooling.get("normalize", False))
        np.testing.assert_allclose(model.embed(texts, batch_size=3), want, rtol=RTOL, atol=ATOL, err_msg=kind)


def test_bert_pair_tokenization_sets_token_types(tmp_path):
    folder, _, _ = eh.write_bert(tmp_path / "ckpt")
    model = pyfff.load(folder)
    ids, mask, types = model.tokenize(["the cat"], ["a dog"], return_token_type_ids=True)
    cls, sep = model.tokenizer.token_to_id("[CLS]"), model.tokenizer.token_to_id("[SEP]")
    assert ids[0, 0] == cls and list(ids[0]).count(sep) == 2
    assert types[0].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_bert_fill_mask_uses_bracket_mask(tmp_path):
    folder, _, _ = eh.write_bert(tmp_path / "ckpt", architecture="BertForMaskedLM")
    model = pyfff.load(folder)
    preds = model.fill_mask("the [MASK] sat on the mat", top_k=3)
    assert len(preds) == 1 and len(preds[0]) == 3
    assert sum(p for _, p in preds[0]) <= 1.0 + 1e-9


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_other_float_dtypes_are_converted(dtype, tmp_path):
    """Half, bfloat16 and double checkpoints load (converted to float32 once) and compute the same model."""
    config = eh.crammed_config()
    tensors32 = eh.crammed_tensors(config, seed=8)
    if dtype == "bfloat16":
        # bfloat16 = the top 16 bits of float32; written as raw uint16 with the BF16 dtype code
        rounded = {k: np.asarray(v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
                   for k, v in tensors32.items()}
        folder, _, _ = eh.write_crammed(tmp_path / "ckpt", config, rounded)
        _rewrite_dtype_code(folder / "model.safetensors", rounded)
        want_tensors = rounded
    else:
        stored = {k: v.astype(dtype) for k, v in tensors32.items()}
        folder, _, _ = eh.write_crammed(tmp_path / "ckpt", config, stored)
        want_tensors = {k: v.astype(np.float32) for k, v in stored.items()}
    ids, mask = eh.random_batch(np.random.default_rng(8), 4, 16, 232)
    want, margin = ref.crammed_mlm_logits(want_tensors, config, ids, mask)
    assert_close_by_margin(pyfff.load(folder).mlm_logits(ids, mask), want, margin)


def _rewrite_dtype_code(path, tensors):
    """Rewrite a float32 safetensors file as BF16 (keeping the upper halves of the words)."""
    from pyfff.encoder._safetensors import read_safetensors

    arrays, _ = read_safetensors(path)
    header, offset, chunks = {}, 0, []
    for name in tensors:
        a = np.array(arrays[name], order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        hi = (a.view(np.uint32) >> 16).astype("<u2")
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + hi.nbytes]}
        offset += hi.nbytes
        chunks.append(hi.tobytes())
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = len(raw).to_bytes(8, "little") + raw + b"".join(chunks)
    del arrays
    path.write_bytes(data)


@pytest.mark.parametrize("n_threads", [2, 3, 5])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_worker_split_does_not_change_results(tmp_path, n_threads, batch):
    """Row blocks and (sequence, head) groups of any count give what one thread gives."""
    folder, config, tensors = eh.write_crammed(tmp_path / "ckpt", seed=6, n_heads=3, hidden=48,
                                               head="classifier", pooler="avg")
    ids, mask = eh.random_batch(np.random.default_rng(batch), batch, 32, 232)
    one = pyfff.load(folder, n_threads=1)
    many = pyfff.load(folder, n_threads=n_threads)
    assert many.n_threads == n_threads
    np.testing.assert_allclose(many.hidden_states(ids, mask), one.hidden_states(ids, mask), rtol=0, atol=2e-6)
    np.testing.assert_allclose(many.classify(ids, mask), one.classify(ids, mask), rtol=0, atol=2e-6)


def test_blas_threads_are_restored_after_a_call(tmp_path):
    from threadpoolctl import threadpool_info

    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", seed=1)
    model = pyfff.load(folder, n_threads=2)
    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    model.hidden_states(np.ones((2, 8), np.int64))
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_worker_pool(tmp_path):
    """A child forked after the pool started inherits no worker threads; it must not wait for them forever."""
    import multiprocessing

    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", seed=9)
    model = pyfff.load(folder, n_threads=2)
    ids = np.ones((4, 16), np.int64)
    want = model.hidden_states(ids)                 # starts the pool in the parent
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(model.hidden_states, (ids,)).get(timeout=60)
    np.testing.assert_array_equal(got, want)
