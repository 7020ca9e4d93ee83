"""Bad input to pyfff.load / pyfff.export / the model methods, one case at a time.

Every case must raise a specific, explanatory exception: never a crash, never
a silent wrong answer.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import encoder_helpers as eh
import pyfff
from pyfff.encoder import CheckpointError

MLM = os.path.join(eh.TINY, "mlm")
CLASSIFIER = os.path.join(eh.TINY, "classifier")


@pytest.fixture(scope="module")
def model():
    return pyfff.load(MLM)


def _copy(tmp_path, src=MLM):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_header(folder, edit):
    """Rewrite model.safetensors with ``edit(header)`` applied to its JSON header (the data bytes unchanged)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _edit_config(folder, edit):
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    edit(cfg)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)


# --------------------------------------------------------------------------- paths and files
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pyfff.load(tmp_path / "nope")


def test_path_is_a_file():
    with pytest.raises(FileNotFoundError, match="is a file"):
        pyfff.load(os.path.join(MLM, "config.json"))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file_in_folder(tmp_path, name):
    folder = _copy(tmp_path)
    os.remove(folder / name)
    with pytest.raises(FileNotFoundError, match=name):
        pyfff.load(folder)


def test_config_not_json(tmp_path):
    folder = _copy(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pyfff.load(folder)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000, -4])
def test_truncated_safetensors(tmp_path, keep):
    folder = _copy(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        pyfff.load(folder)


def test_corrupt_safetensors_header(tmp_path):
    folder = _copy(tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"@@@@"  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pyfff.load(folder)


def test_corrupt_safetensors_offsets(tmp_path):
    """A header whose sizes disagree with dtype x shape is rejected before any tensor is used."""
    folder = _copy(tmp_path)
    name = "encoder.final_norm.bias"

    def edit(header):
        header[name]["shape"] = [header[name]["shape"][0] + 1]

    _edit_header(folder, edit)
    with pytest.raises(CheckpointError, match=name):
        pyfff.load(folder)


def test_unreadable_tokenizer(tmp_path):
    folder = _copy(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(CheckpointError, match="tokenizer"):
        pyfff.load(folder)


# --------------------------------------------------------------------------- tensors
def _drop(name):
    return lambda t: t.pop(name)


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


TENSOR_CASES = {
    "missing": (_drop("encoder.layers.1.ffn.linear_in.bias"),
                r"missing tensor 'encoder\.layers\.1\.ffn\.linear_in\.bias'"),
    "misshapen": (_set("encoder.layers.0.attn.dense.weight", np.ones((48, 40), np.float32)),
                  r"'encoder\.layers\.0\.attn\.dense\.weight' has shape \(48, 40\), expected \(48, 48\)"),
    # a bias the config does not announce (qkv_bias=false) would otherwise be silently ignored
    "unexpected": (_set("encoder.layers.0.attn.self_attention.query_key_value.bias", np.ones(144, np.float32)),
                   "unexpected tensors 'encoder.layers.0.attn.self_attention"),
    "integer": (_set("encoder.final_norm.weight", np.ones(48, np.int64)), "final_norm.weight' has dtype int64"),
    "no-head-weight": (_drop("head.weight"), "head.weight"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensor_is_named(tmp_path, case):
    edit, match = TENSOR_CASES[case]
    config = eh.crammed_config(head="classifier" if case == "no-head-weight" else "mlm")
    tensors = eh.crammed_tensors(config)
    edit(tensors)
    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", config, tensors)
    with pytest.raises(CheckpointError, match=match):
        pyfff.load(folder)


def test_fff_rows_that_do_not_match_the_depth(tmp_path):
    config = eh.crammed_config(depth=2, n_trees=2)
    config["arch"]["intermed_depth"] = 3  # the file holds depth-2 trees
    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", config, eh.crammed_tensors(eh.crammed_config()))
    with pytest.raises(CheckpointError, match=r"linear_in\.weight' has shape \(14, 48\), expected \(30, 48\)"):
        pyfff.load(folder)


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize("key, value", [
    ("nonlin", "ReLU"),
    ("norm", "RMSNorm"),
    ("intermed_type", "moe"),
    ("skip_head_transform", False),
    ("embedding.pos_embedding", "learned"),
    ("attention.type", "pytorch"),
    ("attention.causal_attention", True),
    ("attention.rotary_embedding", True),
    ("attention.sequence_op", "torch-norm"),
    ("attention.skip_output_projection", True),
    ("ffn_layer_frequency", 2),
])
def test_unimplemented_crammed_config_values_are_named(tmp_path, key, value):
    folder = _copy(tmp_path)

    def edit(cfg):
        node = cfg["arch"]
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value

    _edit_config(folder, edit)
    with pytest.raises(NotImplementedError, match=rf"{key}={value!r}"):
        pyfff.load(folder)


@pytest.mark.parametrize("key, value", [("pooler", "lse"), ("include_ff_layer", False), ("nonlin", "ReLU")])
def test_unimplemented_classification_head_values(tmp_path, key, value):
    folder = _copy(tmp_path, CLASSIFIER)
    _edit_config(folder, lambda cfg: cfg["arch"]["classification_head"].__setitem__(key, value))
    with pytest.raises(NotImplementedError, match=rf"classification_head\.{key}"):
        pyfff.load(folder)


def test_unknown_model_type(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, lambda cfg: cfg.__setitem__("model_type", "gpt2"))
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        pyfff.load(folder)


def test_unknown_crammed_architecture(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, lambda cfg: cfg.__setitem__("architectures", ["ScriptableLMForTokenClassification"]))
    with pytest.raises(NotImplementedError, match="ScriptableLMForTokenClassification"):
        pyfff.load(folder)


def test_missing_config_key_is_named(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, lambda cfg: cfg["arch"]["attention"].pop("num_attention_heads"))
    with pytest.raises(CheckpointError, match="attention.num_attention_heads"):
        pyfff.load(folder)


def test_heads_must_divide_hidden(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, lambda cfg: cfg["arch"]["attention"].__setitem__("num_attention_heads", 3))
    with pytest.raises(CheckpointError, match="not divisible"):
        pyfff.load(folder)


@pytest.mark.parametrize("key, value", [("hidden_act", "relu"), ("position_embedding_type", "relative_key"),
                                        ("is_decoder", True)])
def test_unimplemented_bert_config_values(tmp_path, key, value):
    folder, config, _ = eh.write_bert(tmp_path / "ckpt")
    _edit_config(folder, lambda cfg: cfg.__setitem__(key, value))
    with pytest.raises(NotImplementedError, match=rf"{key}={value!r}"):
        pyfff.load(folder)


def test_export_format_version_mismatch(tmp_path):
    out = pyfff.export(MLM, tmp_path / "export")
    _edit_config(out, lambda cfg: cfg.__setitem__("format_version", 99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        pyfff.load(out)


def test_export_with_missing_tensor(tmp_path):
    out = pyfff.export(MLM, tmp_path / "export")
    _edit_config(out, lambda cfg: cfg["encoder"].__setitem__("n_layers", 3))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.2."):
        pyfff.load(out)


def test_export_refuses_non_empty_destination(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        pyfff.export(MLM, tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "x"
    pyfff.export(MLM, tmp_path / "dst", overwrite=True)
    assert (tmp_path / "dst" / "model.safetensors").is_file()


def test_export_refuses_its_own_source(tmp_path):
    out = pyfff.export(MLM, tmp_path / "export")
    with pytest.raises(ValueError, match="source"):
        pyfff.export(out, out, overwrite=True)


# --------------------------------------------------------------------------- model inputs
def test_ids_out_of_vocabulary(model):
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=f"input id {V} is outside the vocabulary"):
        model.hidden_states(np.array([[1, 2, V]]))
    with pytest.raises(ValueError, match="input id -1 is outside"):
        model.hidden_states(np.array([[1, -1, 2]]))


def test_sequence_longer_than_positions(model):
    P = model.config.max_positions
    with pytest.raises(ValueError, match=f"sequence length {P + 1} is longer than the model's {P} positions"):
        model.hidden_states(np.ones((1, P + 1), np.int64))


def test_tokenize_truncates_instead(model):
    with pytest.warns(UserWarning, match=r"1 of 1 texts are longer than the model's \d+ tokens; truncated"):
        ids, mask = model.tokenize(["word " * 200])
    assert ids.shape == (1, model.config.max_positions)
    model.hidden_states(ids, mask)
    with pytest.raises(ValueError, match=r"1 of 2 texts \(the first: #1\) are longer .*truncate=False"):
        model.tokenize(["word", "word " * 200], truncate=False)


def test_mismatched_mask_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input_ids has \(2, 5\)"):
        model.hidden_states(np.ones((2, 5), np.int64), np.ones((2, 4), np.int64))


def test_mask_values_must_be_0_or_1(model):
    with pytest.raises(ValueError, match="only 0"):
        model.hidden_states(np.ones((1, 3), np.int64), np.array([[1, 2, 0]]))


@pytest.mark.parametrize("ids", [np.ones((1, 3), np.float32), np.array([[True, False]]), np.array([["a"]])])
def test_ids_must_be_integers(model, ids):
    with pytest.raises(TypeError, match="integers"):
        model.hidden_states(ids)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0), (1, 2, 3)])
def test_empty_or_wrong_rank_ids(model, shape):
    with pytest.raises(ValueError, match="input_ids"):
        model.hidden_states(np.ones(shape, np.int64))


def test_empty_texts(model):
    with pytest.raises(ValueError, match="empty"):
        model.tokenize([])
    with pytest.raises(ValueError, match="empty"):
        model.embed([])
    with pytest.raises(ValueError, match="empty"):
        model.fill_mask("")
    with pytest.raises(TypeError, match="strings"):
        model.tokenize([b"bytes"])


def test_pairs_must_match_texts(model):
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        model.tokenize(["a", "b"], ["c"])


def test_fill_mask_without_mask_token(model):
    with pytest.raises(ValueError, match="no <mask> token"):
        model.fill_mask("no mask here")


def test_wrong_head(model):
    with pytest.raises(ValueError, match="no classifier head"):
        model.classify(np.ones((1, 3), np.int64))
    with pytest.raises(ValueError, match="no mlm head"):
        pyfff.load(CLASSIFIER).mlm_logits(np.ones((1, 3), np.int64))


def test_token_types_on_crammed_model(model):
    """crammedBERT has no token-type embeddings: segment ids (from tokenize(..., return_token_type_ids=True)) are
    accepted and ignored; anything else is still refused."""
    ids = np.ones((1, 3), np.int64)
    same = model.hidden_states(ids, token_type_ids=np.array([[0, 1, 1]]))
    assert np.array_equal(same, model.hidden_states(ids))
    with pytest.raises(ValueError, match=r"token_type_ids must be integers in \[0, 2\)"):
        model.hidden_states(ids, token_type_ids=np.array([[0, 2, 1]]))
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model.hidden_states(ids, token_type_ids=np.zeros((1, 4), np.int64))


@pytest.mark.parametrize("key, value, error, match", [
    ("ffn_type", "moe", NotImplementedError, "encoder.ffn_type='moe'"),
    ("n_heads", 0, CheckpointError, "encoder.n_heads=0"),
    ("ffn_depth", -1, CheckpointError, "encoder.ffn_depth=-1"),
    ("n_heads", 3, CheckpointError, "not divisible"),
])
def test_export_config_values_are_validated(tmp_path, key, value, error, match):
    out = pyfff.export(MLM, tmp_path / "export")
    _edit_config(out, lambda cfg: cfg["encoder"].__setitem__(key, value))
    with pytest.raises(error, match=match):
        pyfff.load(out)


def test_tokenizer_larger_than_the_embedding(tmp_path):
    """Ids the tokenizer can produce must all have an embedding row."""
    folder, _, _ = eh.write_crammed(tmp_path / "ckpt", vocab=100)  # the copied tokenizer has 232 tokens
    with pytest.raises(CheckpointError, match="tokenizer has 232 tokens but the embedding only 100 rows"):
        pyfff.load(folder)


def test_byte_count_check_does_not_wrap(tmp_path):
    """A shape whose element count overflows int64 (2**62 + 1 rows of 4 bytes stored in 16 bytes) is refused."""
    folder = _copy(tmp_path)
    name = "encoder.final_norm.bias"

    def edit(header):
        begin = header[name]["data_offsets"][0]
        header[name]["shape"] = [2 ** 62 + 1, 4]
        header[name]["data_offsets"] = [begin, begin + 16]

    _edit_header(folder, edit)
    with pytest.raises(CheckpointError, match=rf"{name}.*16 bytes stored"):
        pyfff.load(folder)


@pytest.mark.parametrize("key,value,match", [
    ("num_transformer_layers", 10 ** 7, "n_layers=10000000 is larger than pyfff accepts"),
    ("intermed_depth", 2 ** 31, "ffn_depth=2147483648 is larger than pyfff accepts"),
    ("embedding.max_seq_length", 10 ** 7, "max_positions=10000000 is larger than pyfff accepts"),
])
def test_huge_config_values_fail_fast(tmp_path, key, value, match):
    """Config sizes are checked before anything is allocated (unchecked, these took minutes and gigabytes)."""
    folder = _copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    node = cfg["arch"]
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        pyfff.load(folder)


def test_huge_export_config_values_fail_fast(tmp_path):
    out = pyfff.export(MLM, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg["encoder"]["n_layers"] = 10 ** 7
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="n_layers=10000000 is larger than pyfff accepts"):
        pyfff.load(out)


def test_concurrent_calls_restore_blas_threads():
    """Encoder calls overlapping in 8 threads leave NumPy's BLAS thread count as it was (each call limits BLAS to
    one thread while it runs; overlapping limits used to be restored out of order)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    model = pyfff.load(MLM, n_threads=1)
    ids = np.ones((2, 8), np.int64)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(model.hidden_states, ids) for _ in range(400)]
        for _ in range(50):                                      # the main thread's calls overlap them
            model.hidden_states(ids)
        for f in futures:
            f.result()
    assert blas_threads() == before


def test_long_texts_are_cut_before_tokenizing(model):
    """Texts are cut to what the model can keep before tokenizing: a pair of 100,000-character texts (which used to
    exhaust memory in the tokenizer's overflow bookkeeping) and a 10 MB text stay within a few tens of MB."""
    import resource
    import warnings

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss            # KiB on Linux
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, _ = model.tokenize("x " * 50_000, "y " * 50_000)
        single, _ = model.tokenize("word " * 2_000_000)
    assert ids.shape == single.shape == (1, model.config.max_length)
    assert len(caught) == 2 and all("truncated" in str(w.message) for w in caught)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 * 1024
    with pytest.raises(ValueError, match="truncate=False"):
        model.tokenize("word " * 2_000_000, truncate=False)


def test_export_replaces_the_folder_whole(tmp_path):
    """overwrite=True replaces the destination folder as a whole: stale files of an old export go, symbolic links
    inside it are not written through, and no temporary folder is left beside it."""
    dst = tmp_path / "dst"
    pyfff.export(MLM, dst)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (dst / "config.json").unlink()
    (dst / "config.json").symlink_to(victim)                      # a link where the export writes
    (dst / "stale.json").write_text("{}")                          # a file the new export does not have
    pyfff.export(MLM, dst, overwrite=True)
    assert victim.read_text() == "keep me"
    assert not (dst / "config.json").is_symlink() and not (dst / "stale.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "victim.txt"]
    assert pyfff.load(dst).config.n_layers == 2


def test_export_failure_keeps_the_old_export(tmp_path, monkeypatch):
    """A failure while writing leaves the old export as it was, and no temporary folder."""
    from pyfff.encoder import _model

    dst = tmp_path / "dst"
    pyfff.export(MLM, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_model, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        pyfff.export(MLM, dst, overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_export_refuses_a_symlinked_destination(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(FileExistsError, match="symbolic link"):
        pyfff.export(MLM, tmp_path / "link")


class PanicException(BaseException):
    """Stands in for tokenizers' PanicException (a BaseException), which some malformed tokenizer.json files
    raise at load and others only when encoding (the fuzzer found both)."""


def test_tokenizer_panics_become_checkpoint_errors(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    model = pyfff.load(MLM)

    class Panicking:
        def encode_batch(self, items):
            raise PanicException("index out of bounds: the len is 25 but the index is 25")

    monkeypatch.setattr(model, "tokenizer", Panicking())
    with pytest.raises(CheckpointError, match=r"tokenizer.json: tokenizers failed on this input \(PanicException"):
        model.tokenize("a text")

    def panic(path):
        raise PanicException("bad normalizer")

    monkeypatch.setattr(Tokenizer, "from_file", staticmethod(panic))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: cannot be read by tokenizers \(PanicException"):
        pyfff.load(MLM)
