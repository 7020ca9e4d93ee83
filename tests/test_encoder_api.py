"""One encoder API for text or ids: every method takes a string, a list of strings or token ids (+ mask)."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

import pyfff
from encoder_helpers import TINY
from test_encoder import GOLDEN, MINILM, needs_minilm

MLM, CLASSIFIER = os.path.join(TINY, "mlm"), os.path.join(TINY, "classifier")
TEXTS = [str(t) for t in GOLDEN["texts"]]


@pytest.fixture(scope="module")
def mlm():
    return pyfff.load(MLM, n_threads=1)


@pytest.fixture(scope="module")
def classifier():
    return pyfff.load(CLASSIFIER, n_threads=1)


def test_text_equals_tokenized_ids(mlm):
    ids, mask = mlm.tokenize(TEXTS)
    assert np.array_equal(mlm.hidden_states(TEXTS), mlm.hidden_states(ids, mask))
    assert np.array_equal(mlm.mlm_logits(TEXTS), mlm.mlm_logits(ids, mask))
    one_ids, one_mask = mlm.tokenize(TEXTS[0])
    assert np.array_equal(mlm.hidden_states(TEXTS[0]), mlm.hidden_states(one_ids, one_mask))
    assert np.array_equal(mlm.hidden_states(np.array(TEXTS)), mlm.hidden_states(ids, mask))  # NumPy strings


def test_classify_text_pairs_and_labels(classifier, tmp_path):
    texts, pairs = [str(t) for t in GOLDEN["pair_texts"][:, 0]], [str(t) for t in GOLDEN["pair_texts"][:, 1]]
    logits = classifier.classify(texts, pairs=pairs)
    np.testing.assert_allclose(logits, GOLDEN["classifier_logits"], atol=1e-5)
    ids, mask, types = classifier.tokenize(texts, pairs, return_token_type_ids=True)
    assert np.array_equal(classifier.classify(ids, mask, types), logits)       # token types accepted, ignored
    same, labels = classifier.classify(texts, pairs=pairs, return_labels=True)
    assert np.array_equal(same, logits) and labels == [int(i) for i in logits.argmax(1)]
    # a config with id2label gives names
    folder = tmp_path / "named"
    shutil.copytree(CLASSIFIER, folder)
    with open(folder / "config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["id2label"] = {"0": "different", "1": "same"}
    with open(folder / "config.json", "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    named = pyfff.load(folder)
    assert named.config.labels == ["different", "same"]
    _, labels = named.classify(texts, pairs=pairs, return_labels=True)
    assert labels == [["different", "same"][i] for i in logits.argmax(1)]
    assert pyfff.load(pyfff.export(folder, tmp_path / "exported")).config.labels == ["different", "same"]


def test_input_errors(mlm, classifier):
    with pytest.raises(TypeError, match="inputs is None"):
        mlm.hidden_states(None)
    with pytest.raises(ValueError, match="inputs is empty"):
        mlm.hidden_states([])
    with pytest.raises(TypeError, match="texts must be strings, got int"):
        mlm.hidden_states(["a text", 3])
    with pytest.raises(ValueError, match="tokenizer makes attention_mask"):
        mlm.hidden_states(["a text"], attention_mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="pairs= goes with text inputs"):
        classifier.classify(np.ones((1, 3), np.int64), pairs=["x"])
    with pytest.raises(TypeError, match="texts is None"):
        mlm.tokenize(None)
    with pytest.raises(TypeError, match="texts must be a string or a list of strings, got int"):
        mlm.tokenize(5)


def test_truncation_warns_once_or_raises(mlm):
    long = "word " * 200
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlm.hidden_states([long, "short", long])
    assert len(caught) == 1 and "2 of 3 texts are longer" in str(caught[0].message)
    with pytest.raises(ValueError, match="truncate=False"):
        mlm.hidden_states([long], truncate=False)
    with warnings.catch_warnings(record=True) as caught:                 # embed: one warning for all windows
        warnings.simplefilter("always")
        mlm.embed([long] * 5 + ["short"] * 3, batch_size=1)
    assert len(caught) == 1 and "5 of 8 texts are longer" in str(caught[0].message)
    with pytest.raises(ValueError, match="truncate=False"):
        mlm.embed([long], truncate=False)


@needs_minilm
def test_embed_normalize_and_progress(capsys):
    model = pyfff.load(MINILM, n_threads=1)
    texts = ["a first sentence", "another one, a little longer than the first", "x"]
    default = model.embed(texts)                                          # MiniLM normalises
    np.testing.assert_allclose(np.linalg.norm(default, axis=1), 1, rtol=1e-6)
    raw = model.embed(texts, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), default, rtol=1e-5, atol=1e-6)
    assert np.array_equal(model.embed(texts, normalize=True), default)
    model.embed(texts, show_progress=True)
    assert "3" in capsys.readouterr().err                                # the bar or the plain line counts texts
    with pytest.raises(ValueError, match="normalize must be None, True or False"):
        model.embed(texts, normalize="yes")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        model.embed(texts, batch_size=0)


def test_progress_without_tqdm(monkeypatch, capsys, mlm):
    """Without tqdm, show_progress prints plain 'done/total texts (rate)' lines on stderr."""
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)                   # import tqdm.auto -> ImportError
    mlm.embed(["one text", "two texts", "three"], batch_size=1, show_progress=True)
    err = capsys.readouterr().err
    assert "3/3 texts (" in err and "texts/s)" in err


def _fake_hub_cache(root, repo_id, source):
    """A Hugging Face cache laid out as huggingface_hub lays it out: refs/main names a snapshot of the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_load_by_hub_id_from_the_cache(tmp_path, monkeypatch, mlm):
    pytest.importorskip("huggingface_hub", reason="the optional 'hub' extra (huggingface_hub) is not installed")
    snapshot = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-ufb", MLM)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)                                           # "someorg/tiny-ufb" is no local folder
    model = pyfff.load("someorg/tiny-ufb")
    assert os.path.samefile(model.path, snapshot)
    assert np.array_equal(model.hidden_states(TEXTS), mlm.hidden_states(TEXTS))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set and the local cache has no copy"):
        pyfff.load("someorg/not-cached")


def test_load_by_hub_id_without_huggingface_hub(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)             # as if not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"install huggingface_hub \(pip install 'pyfff\[hub\]'\)"):
        pyfff.load("someorg/some-model")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        pyfff.load("not/a/hub/id")                                        # not an id: the plain error
