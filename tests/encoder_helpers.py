"""Random checkpoints in the upstream formats, for the encoder tests and benchmarks.

``write_crammed`` writes what the upstream crammedBERT code saves (spec section 2:
upstream key names, the duplicated tied ``decoder.weight``, the ``norm_factor``
scalars, interleaved per-head QKV rows, ``linear_out`` as (H, n_trees * n_nodes));
``write_bert`` writes a HuggingFace ``BertModel`` / ``BertForMaskedLM`` /
``BertForSequenceClassification`` folder. Weights are seeded random numbers
scaled so that activations stay O(1) (every tensor matters, no tensor is
trivially 0 or 1).
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = os.path.join(DATA, "ultrafastbert-tiny")


def _tiny_config():
    with open(os.path.join(TINY, "mlm", "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def crammed_config(*, n_layers=2, hidden=48, n_heads=3, depth=2, n_trees=2, vocab=232, max_seq=32, head="mlm",
                   pooler="zero_index", head_dim=40, intermed_type="fff", d_ff=96, use_bias=False, qkv_bias=False,
                   final_norm=True, embedding_norm=True):
    """A crammedBERT config.json dict (nested ``arch``), starting from the golden tiny one."""
    cfg = copy.deepcopy(_tiny_config())
    cfg["architectures"] = ["ScriptableLMForPreTraining" if head == "mlm" else "ScriptableLMForSequenceClassification"]
    a = cfg["arch"]
    a.update(num_transformer_layers=n_layers, hidden_size=hidden, intermed_type=intermed_type,
             intermed_size=n_trees if intermed_type == "fff" else d_ff, intermed_depth=depth, use_bias=use_bias,
             final_norm=final_norm)
    a["embedding"].update(vocab_size=vocab, max_seq_length=max_seq, embedding_dim=hidden, normalization=embedding_norm)
    a["attention"].update(num_attention_heads=n_heads, qkv_bias=qkv_bias)
    a["classification_head"].update(pooler=pooler, head_dim=head_dim)
    a["num_labels"] = None if head == "mlm" else 3
    return cfg


def crammed_tensors(config, *, seed=0, num_labels=2, store_decoder=True, store_word_embedding=True,
                    store_norm_factor=True):
    """Random upstream-named tensors for a crammedBERT ``config`` (dict of name -> float32 array)."""
    rng = np.random.default_rng(seed)
    a = config["arch"]
    H, V, L = a["hidden_size"], a["embedding"]["vocab_size"], a["num_transformer_layers"]
    NH = a["attention"]["num_attention_heads"]

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(prefix, t):
        t[prefix + ".weight"] = 1.0 + normal(H, scale=0.1)
        t[prefix + ".bias"] = normal(H, scale=0.1)

    t = {}
    emb = normal(V, H)
    if store_word_embedding:
        t["encoder.embedding.word_embedding.weight"] = emb
    t["encoder.embedding.pos_embedding.scale_factor"] = np.array([0.8], np.float32) / np.float32(np.sqrt(H))
    if a["embedding"]["normalization"]:
        norm("encoder.embedding.norm", t)
    for i in range(L):
        p = f"encoder.layers.{i}."
        norm(p + "norm1", t)
        norm(p + "norm2", t)
        if store_norm_factor:
            t[p + "attn.self_attention.norm_factor"] = np.array(1.0 / np.sqrt(H // NH), np.float32)
        t[p + "attn.self_attention.query_key_value.weight"] = normal(3 * H, H, scale=1.5 / np.sqrt(H))
        if a["attention"]["qkv_bias"]:
            t[p + "attn.self_attention.query_key_value.bias"] = normal(3 * H, scale=0.1)
        t[p + "attn.dense.weight"] = normal(H, H, scale=1 / np.sqrt(H))
        if a["use_bias"]:
            t[p + "attn.dense.bias"] = normal(H, scale=0.1)
        if a["intermed_type"] == "fff":
            n_rows = a["intermed_size"] * (2 ** (a["intermed_depth"] + 1) - 1)
            t[p + "ffn.linear_in.weight"] = normal(n_rows, H, scale=1 / np.sqrt(H))
            t[p + "ffn.linear_in.bias"] = normal(n_rows, scale=0.3)
            t[p + "ffn.linear_out.weight"] = normal(H, n_rows, scale=0.5)
        else:
            d_ff = a["intermed_size"]
            t[p + "ffn.dense_in.weight"] = normal(d_ff, H, scale=1 / np.sqrt(H))
            t[p + "ffn.dense_out.weight"] = normal(H, d_ff, scale=1 / np.sqrt(d_ff))
            if a["use_bias"]:
                t[p + "ffn.dense_in.bias"] = normal(d_ff, scale=0.1)
                t[p + "ffn.dense_out.bias"] = normal(H, scale=0.1)
    if a["final_norm"]:
        norm("encoder.final_norm", t)
    if config["architectures"][0] == "ScriptableLMForPreTraining":
        if store_decoder:
            t["decoder.weight"] = emb.copy()
    else:
        D = a["classification_head"]["head_dim"]
        t["pooler.dense.weight"] = normal(D, H, scale=1 / np.sqrt(H))
        t["pooler.dense.bias"] = normal(D, scale=0.1)
        t["head.weight"] = normal(num_labels, D, scale=1 / np.sqrt(D))
        t["head.bias"] = normal(num_labels, scale=0.1)
    return t


def _write_folder(folder, config, tensors):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)
    save_file(tensors, os.path.join(folder, "model.safetensors"))


def write_crammed(folder, config=None, tensors=None, *, seed=0, tokenizer=True, **config_kw):
    """Write a crammedBERT checkpoint folder; returns (folder, config, tensors)."""
    config = config or crammed_config(**config_kw)
    tensors = tensors if tensors is not None else crammed_tensors(config, seed=seed)
    _write_folder(folder, config, tensors)
    if tokenizer:
        shutil.copyfile(os.path.join(TINY, "mlm", "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    return folder, config, tensors


# --------------------------------------------------------------------------- BERT
_BERT_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "capital", "of", "france", "paris", "fast",
               "feed", "forward", "network", "tree", "##s", "##ing", "##ed", ".", ",", "!", "?"]


def bert_vocab():
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + _BERT_WORDS


def write_bert_tokenizer(path):
    """A small BERT-style WordPiece tokenizer.json (uncased, [CLS] A [SEP] / [CLS] A [SEP] B [SEP])."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {tok: i for i, tok in enumerate(bert_vocab())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save(path)
    return len(vocab)


def bert_config(*, n_layers=2, hidden=36, n_heads=3, d_ff=80, vocab=None, max_pos=40, type_vocab=2,
                architecture="BertModel"):
    return {"architectures": [architecture], "model_type": "bert", "hidden_act": "gelu", "hidden_size": hidden,
            "num_attention_heads": n_heads, "num_hidden_layers": n_layers, "intermediate_size": d_ff,
            "vocab_size": vocab or len(bert_vocab()) + 3, "max_position_embeddings": max_pos,
            "type_vocab_size": type_vocab, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
            "pad_token_id": 0}


def bert_tensors(config, *, seed=0, num_labels=3):
    """Random HF BERT tensors (with the ``bert.`` prefix for the task models)."""
    rng = np.random.default_rng(seed)
    H, V, I = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    arch = config["architectures"][0]
    pre = "" if arch == "BertModel" else "bert."

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {}

    def linear(name, n_out, n_in):
        t[name + ".weight"] = normal(n_out, n_in, scale=1 / np.sqrt(n_in))
        t[name + ".bias"] = normal(n_out, scale=0.1)

    def norm(name):
        t[name + ".weight"] = 1.0 + normal(H, scale=0.1)
        t[name + ".bias"] = normal(H, scale=0.1)

    t[pre + "embeddings.word_embeddings.weight"] = normal(V, H)
    t[pre + "embeddings.position_embeddings.weight"] = normal(config["max_position_embeddings"], H, scale=0.5)
    t[pre + "embeddings.token_type_embeddings.weight"] = normal(config["type_vocab_size"], H, scale=0.5)
    t[pre + "embeddings.position_ids"] = np.arange(config["max_position_embeddings"], dtype=np.int64)[None]
    norm(pre + "embeddings.LayerNorm")
    for i in range(config["num_hidden_layers"]):
        p = f"{pre}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            linear(p + "attention.self." + n, H, H)
        linear(p + "attention.output.dense", H, H)
        norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", I, H)
        linear(p + "output.dense", H, I)
        norm(p + "output.LayerNorm")
    if arch == "BertForMaskedLM":
        linear("cls.predictions.transform.dense", H, H)
        norm("cls.predictions.transform.LayerNorm")
        t["cls.predictions.bias"] = normal(V, scale=0.1)
    else:
        linear(pre + "pooler.dense", H, H)
        if arch == "BertForSequenceClassification":
            linear("classifier", num_labels, H)
    return t


def write_bert(folder, config=None, tensors=None, *, seed=0, sentence_transformers=None, **config_kw):
    """Write a BERT folder; ``sentence_transformers`` = dict of Pooling flags (+ "normalize") or None."""
    config = config or bert_config(**config_kw)
    tensors = tensors if tensors is not None else bert_tensors(config, seed=seed)
    _write_folder(folder, config, tensors)
    write_bert_tokenizer(os.path.join(folder, "tokenizer.json"))
    if sentence_transformers is not None:
        st = dict(sentence_transformers)
        normalize = st.pop("normalize", False)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        with open(os.path.join(folder, "modules.json"), "w", encoding="utf-8") as fh:
            json.dump(modules, fh)
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w", encoding="utf-8") as fh:
            json.dump({"word_embedding_dimension": config["hidden_size"], **st}, fh)
    return folder, config, tensors


def random_batch(rng, batch, seq, vocab, *, pad_id=0, min_len=1, full=True):
    """Random ids (B, S) right-padded to random lengths.

    full: one sequence has no padding; else every sequence is padded (lengths < S).
    """
    lengths = rng.integers(min_len, seq + (1 if full else 0), size=batch)
    if full:
        lengths[rng.integers(batch)] = seq
    ids = rng.integers(0, vocab, size=(batch, seq))
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad_id).astype(np.int64)
    return ids, mask
