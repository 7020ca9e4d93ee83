"""Checkpoint folders -> (EncoderConfig, kernel-ready parameters).

Three folder formats are understood:

* crammedBERT / UltraFastBERT (``model_type: crammedBERT``, nested ``arch``;
  see ``ultrafastbert-spec.md``): MLM (``ScriptableLMForPreTraining``) and
  sequence classification (``ScriptableLMForSequenceClassification``), FFF or
  dense intermediate.
* standard HuggingFace BERT (``model_type: bert``; ``BertModel``,
  ``BertForMaskedLM``, ``BertForSequenceClassification``).
* a pyfff export (``config.json`` with ``"format": "pyfff-encoder"``), which
  already holds the kernel-ready parameters below.

Kernel-ready parameters (one flat dict, float32, names below; ``i`` = layer).
Every linear weight is stored ``(in, out)`` (PyTorch's weight transposed), so a
layer is ``x @ W + b`` on C-contiguous operands.

================================== ========================= ==============================
name                               shape                     notes
================================== ========================= ==============================
embeddings.word_embeddings         (V, H)                    also the tied MLM decoder
embeddings.position_embeddings     (P, H)                    crammedBERT: scale_factor * PE
embeddings.token_type_embeddings   (T, H)                    BERT only
embeddings.norm.weight / .bias     (H,)                      if the embedding is normalised
layers.i.norm1.weight / .bias      (H,)                      pre-LN: before attention;
                                                             post-LN: after attention
layers.i.attn.qkv.weight           (H, 3H)                   columns [Q | K | V],
                                                             head-major inside each
                                                             block; Q columns
                                                             pre-multiplied by the
                                                             attention scale
layers.i.attn.qkv.bias             (3H,)                     optional, same order/scale
layers.i.attn.out.weight / .bias   (H, H) / (H,)             bias optional
layers.i.norm2.weight / .bias      (H,)
layers.i.ffn.w_in / .b_in          (n_trees * n_nodes, H)/() FFF, tree-major rows
layers.i.ffn.w_out                 (n_trees * n_nodes, H)    FFF, node-major (transposed)
layers.i.ffn.dense_in.weight/.bias (H, I) / (I,)             dense FF; bias optional
layers.i.ffn.dense_out.weight/.bias (I, H) / (H,)            dense FF; bias optional
final_norm.weight / .bias          (H,)                      crammedBERT with final_norm
mlm.transform.weight / .bias       (H, H) / (H,)             BERT MLM head transform
mlm.norm.weight / .bias            (H,)                      BERT MLM head transform
mlm.decoder.bias                   (V,)                      optional
pooler.weight / .bias              (H, D) / (D,)             classifier pooler dense (+tanh)
head.weight / .bias                (D, L) / (L,)             classifier; L = num_labels
================================== ========================= ==============================
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..quantize import packed_shape
from ._safetensors import CheckpointError, read_safetensors, release_pages

__all__ = ["EncoderConfig", "FORMAT", "FORMAT_VERSION", "read_folder", "kernel_param_shapes", "quantized_weights",
           "param_dtype", "sinusoidal_table"]

FORMAT = "pyfff-encoder"
FORMAT_VERSION = 1
# HF BERT fills masked attention scores with the most negative float32
_F32_MIN = float(np.finfo(np.float32).min)


@dataclass
class EncoderConfig:
    """Everything the NumPy encoder needs, independent of the checkpoint format.

    Attributes mirror the upstream config values they come from; see
    ``docs/encoder.md`` for the mapping.
    """

    architecture: str                 # "crammedBERT" or "bert"
    head: str | None                  # "mlm", "classifier" or None (encoder only)
    n_layers: int
    d_model: int
    n_heads: int
    norm_eps: float
    pre_norm: bool                    # crammedBERT: pre-LN; BERT: post-LN
    final_norm: bool                  # crammedBERT: LayerNorm after the last layer
    embedding_norm: bool
    ffn_type: str                     # "fff" or "dense"
    vocab_size: int
    max_positions: int
    type_vocab_size: int = 0          # 0: no token-type embeddings
    ffn_depth: int | None = None      # FFF depth (levels - 1)
    ffn_n_trees: int | None = None    # FFF trees (crammedBERT intermed_size)
    d_ff: int | None = None           # dense intermediate width
    activation: str = "gelu"          # exact erf GELU everywhere
    mask_value: float = -10000.0      # additive score for padded keys
    attn_scale: float = 0.125         # folded into the Q rows of attn.qkv
    qkv_bias: bool = False
    attn_out_bias: bool = False
    ffn_bias: bool = False
    pooler: str | None = None         # classifier pooling: "zero_index" or "avg"
    num_labels: int | None = None
    head_dim: int | None = None       # classifier pooler width
    mlm_transform: bool = False       # BERT MLM head: dense + GELU + LayerNorm
    decoder_bias: bool = False
    pad_token: str | None = None
    mask_token: str | None = None
    max_length: int | None = None     # tokenizer truncation length
    sentence_pooling: list = field(default_factory=lambda: ["mean"])
    sentence_normalize: bool = False
    quantize: str | None = None       # None (float32) or "int8": dense projections stored packed int8
    labels: list | None = None        # classifier label names (config.json's id2label), index = label id

    @property
    def head_size(self):
        return self.d_model // self.n_heads

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, path="config.json"):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{path}: unknown pyfff export config keys {unknown} "
                                  "(written by a newer pyfff?)")
        try:
            cfg = cls(**d)
        except TypeError as exc:
            raise CheckpointError(f"{path}: incomplete pyfff export config: {exc}") from None
        cfg._validate(path)
        return cfg

    def _validate(self, path):
        """Values a pyfff export may hold (an edited or foreign config.json is rejected, naming the key)."""
        allowed = {"architecture": ("crammedBERT", "bert"), "head": ("mlm", "classifier", None),
                   "ffn_type": ("fff", "dense"), "activation": ("gelu",), "pooler": ("zero_index", "avg", None),
                   "quantize": (None, "int8")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise NotImplementedError(f"{path}: encoder.{key}={getattr(self, key)!r} is not implemented by pyfff "
                                          f"(supported: {values})")
        sizes = ["n_layers", "d_model", "n_heads", "vocab_size", "max_positions"]
        sizes += ["ffn_n_trees"] if self.ffn_type == "fff" else ["d_ff"]
        sizes += ["num_labels", "head_dim"] if self.head == "classifier" else []
        for key in sizes:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{path}: encoder.{key}={value!r} must be a positive integer")
        if self.ffn_type == "fff" and (not isinstance(self.ffn_depth, int) or isinstance(self.ffn_depth, bool)
                                       or self.ffn_depth < 0):
            raise CheckpointError(f"{path}: encoder.ffn_depth={self.ffn_depth!r} must be an integer >= 0")
        if (not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool)
                or self.type_vocab_size < 0):
            raise CheckpointError(f"{path}: encoder.type_vocab_size={self.type_vocab_size!r} must be an integer >= 0")
        if self.max_length is not None and (not isinstance(self.max_length, int) or isinstance(self.max_length, bool)
                                            or not 1 <= self.max_length <= self.max_positions):
            raise CheckpointError(f"{path}: encoder.max_length={self.max_length!r} must be an integer in "
                                  f"[1, max_positions={self.max_positions}]")
        for key in ("pre_norm", "final_norm", "embedding_norm", "qkv_bias", "attn_out_bias", "ffn_bias",
                    "mlm_transform", "decoder_bias", "sentence_normalize"):
            if not isinstance(getattr(self, key), bool):
                raise CheckpointError(f"{path}: encoder.{key}={getattr(self, key)!r} must be true or false")
        for key, low, high in (("norm_eps", 0.0, 1.0), ("attn_scale", 0.0, 1e6), ("mask_value", -math.inf, 0.0)):
            value = getattr(self, key)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or not low < value <= high):
                raise CheckpointError(f"{path}: encoder.{key}={value!r} must be a finite number in ({low}, {high}]")
        for key in ("pad_token", "mask_token"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise CheckpointError(f"{path}: encoder.{key}={getattr(self, key)!r} must be a string or null")
        modes = ("cls", "max", "mean", "mean_sqrt_len")
        if (not isinstance(self.sentence_pooling, list) or not self.sentence_pooling
                or not all(isinstance(m, str) and m in modes for m in self.sentence_pooling)):
            raise CheckpointError(f"{path}: encoder.sentence_pooling={self.sentence_pooling!r} must be a non-empty "
                                  f"list of {modes}")
        check_limits(self, path)
        if self.d_model % self.n_heads:
            raise CheckpointError(f"{path}: encoder.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.labels is not None and (not isinstance(self.labels, list) or len(self.labels) != self.num_labels
                                        or not all(isinstance(x, str) for x in self.labels)):
            raise CheckpointError(f"{path}: encoder.labels must be a list of {self.num_labels} label names")


# Largest config values pyfff accepts: checked before anything is allocated, so that an edited or hostile
# config.json fails at once with a clear error instead of growing memory until the process dies. Each is far
# above any published model of this family (BERT-large: 24 layers, 1024 wide, 512 positions; UltraFastBERT:
# depth 11).
LIMITS = {"n_layers": 1024, "d_model": 1 << 16, "n_heads": 1 << 12, "vocab_size": 1 << 24,
          "max_positions": 1 << 16, "ffn_depth": 24, "ffn_n_trees": 1 << 16, "d_ff": 1 << 20,
          "type_vocab_size": 1 << 10, "num_labels": 1 << 20, "head_dim": 1 << 16}


def check_limits(cfg, path):
    """Every size of ``cfg`` within LIMITS (CheckpointError naming the key otherwise)."""
    for key, limit in LIMITS.items():
        value = getattr(cfg, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise CheckpointError(f"{path}: config value {key}={value} is larger than pyfff accepts ({limit})")


# --------------------------------------------------------------------------- shapes
def kernel_param_shapes(cfg):
    """Required kernel-ready parameter names and shapes for ``cfg`` (dict name -> shape)."""
    H, V = cfg.d_model, cfg.vocab_size
    s = {"embeddings.word_embeddings": (V, H), "embeddings.position_embeddings": (cfg.max_positions, H)}
    if cfg.type_vocab_size:
        s["embeddings.token_type_embeddings"] = (cfg.type_vocab_size, H)
    if cfg.embedding_norm:
        s["embeddings.norm.weight"] = s["embeddings.norm.bias"] = (H,)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for n in ("norm1", "norm2"):
            s[p + n + ".weight"] = s[p + n + ".bias"] = (H,)
        s[p + "attn.qkv.weight"] = (H, 3 * H)
        if cfg.qkv_bias:
            s[p + "attn.qkv.bias"] = (3 * H,)
        s[p + "attn.out.weight"] = (H, H)
        if cfg.attn_out_bias:
            s[p + "attn.out.bias"] = (H,)
        if cfg.ffn_type == "fff":
            n_rows = cfg.ffn_n_trees * (2 ** (cfg.ffn_depth + 1) - 1)
            s[p + "ffn.w_in"] = (n_rows, H)
            s[p + "ffn.b_in"] = (n_rows,)
            s[p + "ffn.w_out"] = (n_rows, H)
        else:
            s[p + "ffn.dense_in.weight"] = (H, cfg.d_ff)
            s[p + "ffn.dense_out.weight"] = (cfg.d_ff, H)
            if cfg.ffn_bias:
                s[p + "ffn.dense_in.bias"] = (cfg.d_ff,)
                s[p + "ffn.dense_out.bias"] = (H,)
    if cfg.final_norm:
        s["final_norm.weight"] = s["final_norm.bias"] = (H,)
    if cfg.quantize == "int8":
        for name in quantized_weights(cfg):
            packed = packed_shape(*s.pop(name))
            s[name + ".q8"] = packed
            s[name + ".q8_scale"] = s[name + ".q8_colsum"] = (packed[0] * packed[2],)
    if cfg.head == "mlm":
        if cfg.mlm_transform:
            s["mlm.transform.weight"] = (H, H)
            s["mlm.transform.bias"] = s["mlm.norm.weight"] = s["mlm.norm.bias"] = (H,)
        if cfg.decoder_bias:
            s["mlm.decoder.bias"] = (V,)
    elif cfg.head == "classifier":
        s["pooler.weight"] = (H, cfg.head_dim)
        s["pooler.bias"] = (cfg.head_dim,)
        s["head.weight"] = (cfg.head_dim, cfg.num_labels)
        s["head.bias"] = (cfg.num_labels,)
    return s


def quantized_weights(cfg):
    """Names of the (K, N) float weights an int8 model stores quantized: the dense projections of every layer.

    Embeddings, LayerNorms, biases, the FFF layers, the vocabulary projection and the heads stay float32.
    """
    names = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names += [p + "attn.qkv.weight", p + "attn.out.weight"]
        if cfg.ffn_type == "dense":
            names += [p + "ffn.dense_in.weight", p + "ffn.dense_out.weight"]
    return names


def param_dtype(name):
    """The dtype a kernel-ready parameter is stored in (float32 but for the parts of int8 weights)."""
    if name.endswith(".q8"):
        return np.dtype(np.int8)
    if name.endswith(".q8_colsum"):
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def _check_tensors(path, tensors, expected):
    """Every expected tensor present with its shape; nothing unexplained left over."""
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected shape {shape})")
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, expected {tuple(shape)}")
        want = param_dtype(name)
        if tensors[name].dtype != want:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensors[name].dtype}, expected "
                                  f"{'a float' if want == np.float32 else want}")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"{path}: unexpected tensors {shown}: the config does not explain them "
                              "(a variant pyfff does not implement?)")


# --------------------------------------------------------------------------- helpers
def _read_json(path, kind=None):
    """A JSON file's content; with ``kind`` (dict or list), CheckpointError unless it is of that type."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if kind is not None and not isinstance(doc, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}, got "
                              f"{type(doc).__name__}")
    return doc


_MISSING = object()


def _get(cfg, dotted, path, default=_MISSING):
    """``cfg["a"]["b"]`` for ``dotted="a.b"``; CheckpointError naming the key when absent."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not _MISSING:
                return default
            raise CheckpointError(f"{path}: config key {dotted!r} is missing")
        node = node[part]
    return node


def _require(cfg, dotted, allowed, path, default=_MISSING):
    """Value of ``dotted``; NotImplementedError naming key and value unless it is in ``allowed``."""
    value = _get(cfg, dotted, path, default)
    if value not in allowed:
        raise NotImplementedError(f"{path}: config {dotted}={value!r} is not implemented by pyfff "
                                  f"(supported: {', '.join(repr(a) for a in allowed)})")
    return value


def _positive_number(cfg, dotted, path, default=_MISSING):
    value = _get(cfg, dotted, path, default)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not 0 < value < 1):
        raise CheckpointError(f"{path}: config {dotted}={value!r} must be a number between 0 and 1")
    return float(value)


def _positive_int(cfg, dotted, path):
    value = _get(cfg, dotted, path)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{path}: config {dotted}={value!r} must be a positive integer")
    return value


def sinusoidal_table(n_positions, dim):
    """crammedBERT's sinusoid table, computed in float32 as torch does.

    Returns
    -------
    pe : ndarray of shape (n_positions, dim), dtype=float32
        ``pe[p, 2i] = sin(p * w_i)``, ``pe[p, 2i+1] = cos(p * w_i)`` with
        ``w_i = exp(-(2i) * ln(10000) / dim)``.
    """
    position = np.arange(n_positions, dtype=np.float32)[:, None]                             # (P, 1)
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))  # (dim/2,)
    angles = position * div_term                                                             # (P, dim/2)
    pe = np.empty((n_positions, dim), dtype=np.float32)                                      # (P, dim)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)
    return pe


def _take(tensors, path, name, shape):
    """``tensors[name]``, checked: CheckpointError naming the key (and both shapes) when missing or misshapen."""
    if name not in tensors:
        raise CheckpointError(f"{path}: missing tensor {name!r} (expected shape {tuple(shape)})")
    arr = tensors[name]
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if arr.dtype != np.float32:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {arr.dtype}, expected a float")
    return arr


def _t(w):
    """PyTorch (out, in) weight -> kernel-ready (in, out), C-contiguous (one copy).

    BLAS could read the transposed view directly, but for the row blocks the encoder multiplies
    (64 to 512 tokens) OpenBLAS runs about 8% faster on the non-transposed operand.
    """
    return np.ascontiguousarray(w.T)


def _strip_prefixes(tensors, prefixes):
    out = {}
    for k, v in tensors.items():
        for pre in prefixes:
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def _reorder_heads(w, n_heads, scale):
    """Interleaved per-head [q|k|v] rows (Megatron layout) -> [Q; K; V] blocks, Q scaled.

    Parameters
    ----------
    w : ndarray of shape (3H, ...) - row ``n*3*HD + c``: head n, q (c<HD), k, v
    Returns ndarray of shape (3H, ...), a new float32 array.
    """
    rest = w.shape[1:]
    hd = w.shape[0] // (3 * n_heads)
    blocks = w.reshape((n_heads, 3, hd) + rest).swapaxes(0, 1)        # (3, NH, HD, ...)
    out = np.array(blocks, dtype=np.float32, order="C").reshape(w.shape)  # (3H, ...) always a copy: scaled below
    out[: n_heads * hd] *= np.float32(scale)
    return out


# --------------------------------------------------------------------------- crammedBERT
_CRAMMED_TOP = ("ScriptableLMForPreTraining", "ScriptableLMForSequenceClassification")


def _crammed_config(raw, path):
    top = raw.get("architectures") or []
    if len(top) != 1 or top[0] not in _CRAMMED_TOP:
        raise NotImplementedError(f"{path}: config architectures={top!r} is not implemented by pyfff "
                                  f"(supported: {list(_CRAMMED_TOP)})")
    head = "mlm" if top[0] == "ScriptableLMForPreTraining" else "classifier"
    if not isinstance(raw.get("arch"), dict):
        raise CheckpointError(f"{path}: crammedBERT config has no nested 'arch' dict")
    a = raw["arch"]
    _require(a, "architectures", (["ScriptableCrammedBERT"],), path, ["ScriptableCrammedBERT"])
    _require(a, "norm", ("LayerNorm",), path)
    _require(a, "nonlin", ("GELU",), path)
    _require(a, "ffn_layer_frequency", (1,), path, 1)
    ffn_type = _require(a, "intermed_type", ("fff", "ff"), path, "ff")
    use_bias = _require(a, "use_bias", (False, True), path)
    final_norm = _require(a, "final_norm", (True, False), path)
    _require(a, "embedding.pos_embedding", ("scaled-sinusoidal",), path)
    emb_norm = _require(a, "embedding.normalization", (True, False), path)
    _require(a, "embedding.stable_low_precision", (False,), path, False)
    _require(a, "attention.type", ("self-attention",), path)
    _require(a, "attention.causal_attention", (False,), path)
    _require(a, "attention.rotary_embedding", (False,), path)
    _require(a, "attention.sequence_op", ("torch-softmax",), path)
    _require(a, "attention.skip_output_projection", (False,), path)
    qkv_bias = _require(a, "attention.qkv_bias", (False, True), path)
    H = _positive_int(a, "hidden_size", path)
    if _get(a, "embedding.embedding_dim", path) != H:
        raise NotImplementedError(f"{path}: config embedding.embedding_dim={a['embedding']['embedding_dim']!r} "
                                  f"differs from hidden_size={H}: an embedding projection is not implemented")
    if H % 2:
        raise NotImplementedError(f"{path}: config hidden_size={H} is odd: the sinusoidal table needs an even size")
    n_heads = _positive_int(a, "attention.num_attention_heads", path)
    if H % n_heads:
        raise CheckpointError(f"{path}: config hidden_size={H} is not divisible by "
                              f"attention.num_attention_heads={n_heads}")
    eps = _positive_number(a, "norm_eps", path)
    depth = _get(a, "intermed_depth", path) if ffn_type == "fff" else None
    if ffn_type == "fff" and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 0):
        raise CheckpointError(f"{path}: config intermed_depth={depth!r} must be an integer >= 0")
    cfg = EncoderConfig(
        architecture="crammedBERT", head=head, n_layers=_positive_int(a, "num_transformer_layers", path),
        d_model=H, n_heads=n_heads, norm_eps=eps, pre_norm=True, final_norm=final_norm, embedding_norm=emb_norm,
        ffn_type="fff" if ffn_type == "fff" else "dense", vocab_size=_positive_int(a, "embedding.vocab_size", path),
        max_positions=_positive_int(a, "embedding.max_seq_length", path), mask_value=-10000.0,
        attn_scale=1.0 / math.sqrt(H // n_heads), qkv_bias=qkv_bias, attn_out_bias=use_bias, ffn_bias=use_bias,
    )
    if ffn_type == "fff":
        cfg.ffn_depth = depth
        cfg.ffn_n_trees = _positive_int(a, "intermed_size", path)
    else:
        cfg.d_ff = _positive_int(a, "intermed_size", path)
    if head == "mlm":
        _require(a, "objective_layout", ("MLM",), path)
        _require(a, "skip_head_transform", (True,), path)
        cfg.decoder_bias = _require(a, "decoder_bias", (False, True), path)
    else:
        _require(a, "classification_head.pooler", ("zero_index", "avg"), path)
        _require(a, "classification_head.include_ff_layer", (True,), path)
        _require(a, "classification_head.nonlin", ("Tanh",), path)
        cfg.pooler = a["classification_head"]["pooler"]
        cfg.head_dim = _positive_int(a, "classification_head.head_dim", path)
    return cfg


def _crammed_params(cfg, t, path):
    """Upstream crammedBERT tensors -> kernel-ready parameters (copies only where a layout changes)."""
    t = _strip_prefixes(t, ("module.", "_orig_mod."))
    H, V, NH = cfg.d_model, cfg.vocab_size, cfg.n_heads
    p = {}
    ignorable = set()
    take = functools.partial(_take, t, path)

    # the decoder is tied to the word embedding; the file usually stores both (spec section 2)
    if "encoder.embedding.word_embedding.weight" in t:
        p["embeddings.word_embeddings"] = take("encoder.embedding.word_embedding.weight", (V, H))
        ignorable.add("decoder.weight")
        if "decoder.weight" in t:
            take("decoder.weight", (V, H))  # shape check only; reading it would page in another V x H
    else:
        p["embeddings.word_embeddings"] = take("decoder.weight", (V, H))
    scale = take("encoder.embedding.pos_embedding.scale_factor", (1,))
    p["embeddings.position_embeddings"] = scale[0] * sinusoidal_table(cfg.max_positions, H)  # (P, H) float32
    if cfg.embedding_norm:
        p["embeddings.norm.weight"] = take("encoder.embedding.norm.weight", (H,))
        p["embeddings.norm.bias"] = take("encoder.embedding.norm.bias", (H,))
    for i in range(cfg.n_layers):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        for n in ("norm1", "norm2"):
            p[dst + n + ".weight"] = take(src + n + ".weight", (H,))
            p[dst + n + ".bias"] = take(src + n + ".bias", (H,))
        nf_name = src + "attn.self_attention.norm_factor"
        scale = cfg.attn_scale
        if nf_name in t:
            nf = take(nf_name, ())
            scale = float(nf)
            if not (math.isfinite(scale) and scale > 0):
                raise CheckpointError(f"{path}: tensor {nf_name!r} = {scale} must be a positive finite number")
            ignorable.add(nf_name)
        p[dst + "attn.qkv.weight"] = _t(_reorder_heads(take(src + "attn.self_attention.query_key_value.weight",
                                                            (3 * H, H)), NH, scale))
        if cfg.qkv_bias:
            p[dst + "attn.qkv.bias"] = _reorder_heads(take(src + "attn.self_attention.query_key_value.bias",
                                                           (3 * H,)), NH, scale)
        p[dst + "attn.out.weight"] = _t(take(src + "attn.dense.weight", (H, H)))
        if cfg.attn_out_bias:
            p[dst + "attn.out.bias"] = take(src + "attn.dense.bias", (H,))
        if cfg.ffn_type == "fff":
            n_rows = cfg.ffn_n_trees * (2 ** (cfg.ffn_depth + 1) - 1)
            p[dst + "ffn.w_in"] = take(src + "ffn.linear_in.weight", (n_rows, H))
            p[dst + "ffn.b_in"] = take(src + "ffn.linear_in.bias", (n_rows,))
            # (H, n_rows) -> node-major (n_rows, H): one copy, so each visited node is a contiguous row
            p[dst + "ffn.w_out"] = np.ascontiguousarray(take(src + "ffn.linear_out.weight", (H, n_rows)).T)
        else:
            p[dst + "ffn.dense_in.weight"] = _t(take(src + "ffn.dense_in.weight", (cfg.d_ff, H)))
            p[dst + "ffn.dense_out.weight"] = _t(take(src + "ffn.dense_out.weight", (H, cfg.d_ff)))
            if cfg.ffn_bias:
                p[dst + "ffn.dense_in.bias"] = take(src + "ffn.dense_in.bias", (cfg.d_ff,))
                p[dst + "ffn.dense_out.bias"] = take(src + "ffn.dense_out.bias", (H,))
    if cfg.final_norm:
        p["final_norm.weight"] = take("encoder.final_norm.weight", (H,))
        p["final_norm.bias"] = take("encoder.final_norm.bias", (H,))
    if cfg.head == "mlm":
        if cfg.decoder_bias:
            p["mlm.decoder.bias"] = take("decoder.bias", (V,))
    else:
        if "head.weight" not in t or t["head.weight"].ndim != 2:
            raise CheckpointError(f"{path}: missing or non-2-D tensor 'head.weight' (expected (num_labels, head_dim))")
        # the number of labels comes from head.weight, never from the config (spec section 1.5)
        cfg.num_labels = int(t["head.weight"].shape[0])
        p["pooler.weight"] = _t(take("pooler.dense.weight", (cfg.head_dim, H)))
        p["pooler.bias"] = take("pooler.dense.bias", (cfg.head_dim,))
        p["head.weight"] = _t(take("head.weight", (cfg.num_labels, cfg.head_dim)))
        p["head.bias"] = take("head.bias", (cfg.num_labels,))
    return p, ignorable, t


# --------------------------------------------------------------------------- BERT
_BERT_TOP = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")


def _bert_config(raw, path, t):
    top = raw.get("architectures") or []
    if top and (len(top) != 1 or top[0] not in _BERT_TOP):
        raise NotImplementedError(f"{path}: config architectures={top!r} is not implemented by pyfff "
                                  f"(supported: {list(_BERT_TOP)})")
    _require(raw, "hidden_act", ("gelu",), path)
    _require(raw, "position_embedding_type", ("absolute",), path, "absolute")
    _require(raw, "is_decoder", (False,), path, False)
    _require(raw, "add_cross_attention", (False,), path, False)
    H = _positive_int(raw, "hidden_size", path)
    n_heads = _positive_int(raw, "num_attention_heads", path)
    if H % n_heads:
        raise CheckpointError(f"{path}: config hidden_size={H} is not divisible by num_attention_heads={n_heads}")
    keys = set(_strip_prefixes(t, ("bert.",)))
    if any(k.startswith("cls.predictions.") for k in keys):
        head = "mlm"
    elif "classifier.weight" in keys:
        head = "classifier"
    else:
        head = None
    type_vocab = _get(raw, "type_vocab_size", path, 2)
    if not isinstance(type_vocab, int) or isinstance(type_vocab, bool) or type_vocab < 0:
        raise CheckpointError(f"{path}: config type_vocab_size={type_vocab!r} must be an integer >= 0")
    cfg = EncoderConfig(
        architecture="bert", head=head, n_layers=_positive_int(raw, "num_hidden_layers", path), d_model=H,
        n_heads=n_heads, norm_eps=_positive_number(raw, "layer_norm_eps", path, 1e-12), pre_norm=False,
        final_norm=False, embedding_norm=True, ffn_type="dense", vocab_size=_positive_int(raw, "vocab_size", path),
        max_positions=_positive_int(raw, "max_position_embeddings", path), type_vocab_size=int(type_vocab),
        d_ff=_positive_int(raw, "intermediate_size", path), mask_value=_F32_MIN,
        attn_scale=1.0 / math.sqrt(H // n_heads), qkv_bias=True, attn_out_bias=True, ffn_bias=True,
    )
    if head == "mlm":
        cfg.mlm_transform = True
        cfg.decoder_bias = True
    elif head == "classifier":
        cfg.pooler = "zero_index"
    return cfg


def _bert_params(cfg, t, path):
    t = _strip_prefixes(t, ("bert.",))
    H, V = cfg.d_model, cfg.vocab_size
    p = {}
    take = functools.partial(_take, t, path)

    p["embeddings.word_embeddings"] = take("embeddings.word_embeddings.weight", (V, H))
    p["embeddings.position_embeddings"] = take("embeddings.position_embeddings.weight", (cfg.max_positions, H))
    if cfg.type_vocab_size:
        p["embeddings.token_type_embeddings"] = take("embeddings.token_type_embeddings.weight",
                                                     (cfg.type_vocab_size, H))
    p["embeddings.norm.weight"] = take("embeddings.LayerNorm.weight", (H,))
    p["embeddings.norm.bias"] = take("embeddings.LayerNorm.bias", (H,))
    for i in range(cfg.n_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        qkv_w = [take(src + f"attention.self.{n}.weight", (H, H)) for n in ("query", "key", "value")]
        qkv_b = [take(src + f"attention.self.{n}.bias", (H,)) for n in ("query", "key", "value")]
        w = np.concatenate([q.T for q in qkv_w], axis=1)        # (H, 3H) columns [Q | K | V]
        b = np.concatenate(qkv_b, axis=0)                       # (3H,)
        w[:, :H] *= np.float32(cfg.attn_scale)
        b[:H] *= np.float32(cfg.attn_scale)
        p[dst + "attn.qkv.weight"], p[dst + "attn.qkv.bias"] = w, b
        p[dst + "attn.out.weight"] = _t(take(src + "attention.output.dense.weight", (H, H)))
        p[dst + "attn.out.bias"] = take(src + "attention.output.dense.bias", (H,))
        p[dst + "norm1.weight"] = take(src + "attention.output.LayerNorm.weight", (H,))
        p[dst + "norm1.bias"] = take(src + "attention.output.LayerNorm.bias", (H,))
        p[dst + "ffn.dense_in.weight"] = _t(take(src + "intermediate.dense.weight", (cfg.d_ff, H)))
        p[dst + "ffn.dense_in.bias"] = take(src + "intermediate.dense.bias", (cfg.d_ff,))
        p[dst + "ffn.dense_out.weight"] = _t(take(src + "output.dense.weight", (H, cfg.d_ff)))
        p[dst + "ffn.dense_out.bias"] = take(src + "output.dense.bias", (H,))
        p[dst + "norm2.weight"] = take(src + "output.LayerNorm.weight", (H,))
        p[dst + "norm2.bias"] = take(src + "output.LayerNorm.bias", (H,))
    ignorable = {"embeddings.position_ids"}
    if cfg.head == "mlm":
        p["mlm.transform.weight"] = _t(take("cls.predictions.transform.dense.weight", (H, H)))
        p["mlm.transform.bias"] = take("cls.predictions.transform.dense.bias", (H,))
        p["mlm.norm.weight"] = take("cls.predictions.transform.LayerNorm.weight", (H,))
        p["mlm.norm.bias"] = take("cls.predictions.transform.LayerNorm.bias", (H,))
        bias_name = "cls.predictions.bias" if "cls.predictions.bias" in t else "cls.predictions.decoder.bias"
        p["mlm.decoder.bias"] = take(bias_name, (V,))
        ignorable |= {"cls.predictions.bias", "cls.predictions.decoder.bias"}
        if "cls.predictions.decoder.weight" in t:
            take("cls.predictions.decoder.weight", (V, H))  # tied to the word embedding
            ignorable.add("cls.predictions.decoder.weight")
    elif cfg.head == "classifier":
        w = t["classifier.weight"]
        if w.ndim != 2:
            raise CheckpointError(f"{path}: tensor 'classifier.weight' has shape {w.shape}, expected (num_labels, {H})")
        cfg.num_labels, cfg.head_dim = int(w.shape[0]), H
        p["pooler.weight"] = _t(take("pooler.dense.weight", (H, H)))
        p["pooler.bias"] = take("pooler.dense.bias", (H,))
        p["head.weight"] = _t(take("classifier.weight", (cfg.num_labels, H)))
        p["head.bias"] = take("classifier.bias", (cfg.num_labels,))
    else:
        # BertModel's pooler is not used by hidden_states/embed
        ignorable |= {"pooler.dense.weight", "pooler.dense.bias"}
    return p, ignorable, t


# --------------------------------------------------------------------------- tokenizer side files
def _special_token(folder, key, candidates, vocab):
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = os.path.join(folder, fname)
        if os.path.isfile(f):
            value = _read_json(f, dict).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value in vocab:
                return value
    for c in candidates:
        if c in vocab:
            return c
    return None


def load_tokenizer(path):
    """``tokenizers.Tokenizer.from_file(path)``; CheckpointError for any file it cannot read.

    The Rust library raises plain Exception for most bad files, and a ``PanicException`` (a BaseException,
    which ``except Exception`` misses) for some malformed ones."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- see the docstring
        raise CheckpointError(f"{path}: cannot be read by tokenizers ({type(exc).__name__}: {exc})") from None


def _tokenizer_side(cfg, folder):
    """Fill pad/mask tokens, truncation length and sentence pooling from the folder's side files."""
    tok_path = os.path.join(folder, "tokenizer.json")
    max_length = cfg.max_positions
    tcfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tcfg):
        mml = _read_json(tcfg, dict).get("model_max_length")
        if isinstance(mml, int) and 0 < mml < max_length:
            max_length = mml
    sbert = os.path.join(folder, "sentence_bert_config.json")
    if os.path.isfile(sbert):
        msl = _read_json(sbert, dict).get("max_seq_length")
        if isinstance(msl, int) and 0 < msl < max_length:
            max_length = msl
    cfg.max_length = max_length
    if os.path.isfile(tok_path):
        vocab = load_tokenizer(tok_path).get_vocab(with_added_tokens=True)
        cfg.pad_token = _special_token(folder, "pad_token", ("<pad>", "[PAD]"), vocab)
        cfg.mask_token = _special_token(folder, "mask_token", ("<mask>", "[MASK]"), vocab)
    modules = os.path.join(folder, "modules.json")
    if os.path.isfile(modules):
        pooling, normalize = ["mean"], False
        for m in _read_json(modules, list):
            if not isinstance(m, dict) or not isinstance(m.get("type", ""), str) or not isinstance(m.get("path", ""),
                                                                                                   str):
                raise CheckpointError(f"{modules}: each module must be an object with string 'type' and 'path', "
                                      f"got {m!r:.80}")
            kind = m.get("type", "")
            if os.path.isabs(m.get("path", "")) or ".." in m.get("path", "").replace("\\", "/").split("/"):
                raise CheckpointError(f"{modules}: module path {m.get('path')!r} leaves the checkpoint folder")
            if kind.endswith("models.Pooling"):
                pcfg = _read_json(os.path.join(folder, m.get("path", ""), "config.json"), dict)
                modes = [name for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                                                ("pooling_mode_mean_tokens", "mean"),
                                                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"))
                         if pcfg.get(key)]
                for key in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"):
                    if pcfg.get(key):
                        raise NotImplementedError(f"{folder}: sentence-transformers pooling {key}=true is not "
                                                  "implemented by pyfff")
                if not modes:
                    raise CheckpointError(f"{folder}: the Pooling config enables no pooling mode")
                pooling = modes
            elif kind.endswith("models.Normalize"):
                normalize = True
            elif not kind.endswith("models.Transformer"):
                raise NotImplementedError(f"{modules}: sentence-transformers module {kind!r} is not implemented "
                                          "by pyfff")
        cfg.sentence_pooling, cfg.sentence_normalize = pooling, normalize


# --------------------------------------------------------------------------- entry point
def read_folder(folder):
    """Read a checkpoint folder.

    Returns
    -------
    cfg : EncoderConfig
    params : dict of str to ndarray
        Kernel-ready parameters (see the module docstring); memory-mapped
        views wherever the layout is unchanged.
    source_config : dict
        The folder's ``config.json`` as read.
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"no checkpoint at {folder!r}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is a file, not a checkpoint folder (a folder holding config.json "
                                "and model.safetensors)")
    cfg_path = os.path.join(folder, "config.json")
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    st_path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(st_path):
        raise FileNotFoundError(f"missing file {st_path!r} (only safetensors checkpoints are supported)")

    if raw.get("format") == FORMAT:
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{cfg_path}: pyfff export format_version {version!r} is not supported "
                                  f"(this pyfff reads version {FORMAT_VERSION})")
        cfg = EncoderConfig.from_dict(raw.get("encoder") or {}, cfg_path)
        tensors, _ = read_safetensors(st_path)
        _check_tensors(st_path, tensors, kernel_param_shapes(cfg))
        return cfg, tensors, raw

    model_type = raw.get("model_type")
    if model_type == "crammedBERT":
        cfg = _crammed_config(raw, cfg_path)
        check_limits(cfg, cfg_path)
        tensors, _ = read_safetensors(st_path)
        params, ignorable, t = _crammed_params(cfg, tensors, st_path)
    elif model_type == "bert":
        tensors, _ = read_safetensors(st_path)
        cfg = _bert_config(raw, cfg_path, tensors)
        check_limits(cfg, cfg_path)
        params, ignorable, t = _bert_params(cfg, tensors, st_path)
    else:
        raise NotImplementedError(f"{cfg_path}: model_type={model_type!r} is not implemented by pyfff "
                                  "(supported: 'crammedBERT', 'bert', or a pyfff export)")
    if cfg.head == "classifier":
        cfg.labels = _label_names(raw.get("id2label"), cfg.num_labels)
    used = _used_source_names(cfg, t, params)
    leftover = sorted(k for k in t if k not in used and k not in ignorable)
    if leftover:
        shown = ", ".join(repr(k) for k in leftover[:5]) + (" ..." if len(leftover) > 5 else "")
        raise CheckpointError(f"{st_path}: unexpected tensors {shown}: the config does not explain them "
                              "(a variant pyfff does not implement?)")
    _check_tensors(st_path, params, kernel_param_shapes(cfg))
    # the source pages of tensors that were copied into a new layout (fused QKV, node-major FFF output,
    # (in, out) weights) were read once; drop them so that RSS holds each weight once
    kept = list(params.values())
    release_pages([a for a in t.values() if not any(np.may_share_memory(a, k) for k in kept)])
    _tokenizer_side(cfg, folder)
    return cfg, params, raw


def _label_names(id2label, n_labels):
    """Label names from a config's ``id2label`` ({"0": "negative", ...}); None unless it names every label 0..n-1."""
    if not isinstance(id2label, dict) or len(id2label) != n_labels:
        return None
    try:
        names = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(names) != list(range(n_labels)) or not all(isinstance(v, str) for v in names.values()):
        return None
    return [names[i] for i in range(n_labels)]


def _used_source_names(cfg, t, params):
    """Source tensor names consumed by the converters (for the 'unexpected tensors' check)."""
    if cfg.architecture == "crammedBERT":
        used = {"encoder.embedding.word_embedding.weight", "decoder.weight",
                "encoder.embedding.pos_embedding.scale_factor", "encoder.embedding.norm.weight",
                "encoder.embedding.norm.bias", "encoder.final_norm.weight", "encoder.final_norm.bias",
                "decoder.bias", "pooler.dense.weight", "pooler.dense.bias", "head.weight", "head.bias"}
        for i in range(cfg.n_layers):
            s = f"encoder.layers.{i}."
            used |= {s + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                     "attn.self_attention.query_key_value.weight", "attn.dense.weight",
                                     "ffn.linear_in.weight", "ffn.linear_in.bias", "ffn.linear_out.weight",
                                     "ffn.dense_in.weight", "ffn.dense_out.weight")}
            if cfg.qkv_bias:
                used.add(s + "attn.self_attention.query_key_value.bias")
            if cfg.attn_out_bias:
                used |= {s + "attn.dense.bias", s + "ffn.dense_in.bias", s + "ffn.dense_out.bias"}
        if cfg.head != "mlm" or not cfg.decoder_bias:
            used.discard("decoder.bias")
        if cfg.head != "classifier":
            used -= {"pooler.dense.weight", "pooler.dense.bias", "head.weight", "head.bias"}
        if not cfg.embedding_norm:
            used -= {"encoder.embedding.norm.weight", "encoder.embedding.norm.bias"}
        if not cfg.final_norm:
            used -= {"encoder.final_norm.weight", "encoder.final_norm.bias"}
        return used
    used = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    for i in range(cfg.n_layers):
        s = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            used |= {s + f"attention.self.{n}.weight", s + f"attention.self.{n}.bias"}
        used |= {s + n for n in ("attention.output.dense.weight", "attention.output.dense.bias",
                                 "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
                                 "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight",
                                 "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias")}
    if cfg.head == "mlm":
        used |= {"cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                 "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}
    elif cfg.head == "classifier":
        used |= {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"}
    return used
