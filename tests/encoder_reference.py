"""Reference encoders: readable NumPy in float64, no tricks, used as ground truth.

Written straight from ``ultrafastbert-spec.md`` (crammedBERT) and from
HuggingFace's ``BertModel`` (BERT), reading the *upstream* tensor names of the
checkpoint (no kernel-ready layouts, no fused weights, no pyfff code). The
fast encoder in ``pyfff.encoder`` is tested against these functions.

Each forward also returns ``margin`` (B,): the smallest |FFF node logit| met on
any visited path of the sequence. FFF routing is a hard sign decision, so a
float32 implementation may legitimately take the other branch where the
float64 logit is within rounding of 0; tests only compare sequences whose
margin is clearly larger than that.
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)                       # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)        # (..., 1) biased
    return (x - mean) / np.sqrt(var + eps) * w + b              # (..., H)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _f64(tensors):
    return {k: np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
            for k, v in tensors.items()}


# --------------------------------------------------------------------------- crammedBERT
def fff(x, w_in, b_in, w_out, n_trees, depth):
    """FFF forward by walking each tree level by level (spec 1.3).

    x: (N, H); w_in: (T*n_nodes, H); b_in: (T*n_nodes,); w_out: (H, T*n_nodes) (torch layout)
    Returns y (N, H) and the smallest |logit| on each token's paths (N,).
    """
    N = x.shape[0]
    n_nodes = 2 ** (depth + 1) - 1
    y = np.zeros((N, w_out.shape[0]))                           # (N, H)
    margin = np.full(N, np.inf)                                 # (N,)
    for tree in range(n_trees):
        node = np.zeros(N, dtype=np.int64)                      # (N,) every token starts at the root
        for _level in range(depth + 1):
            row = tree * n_nodes + node                         # (N,) tree-major rows
            z = np.einsum("nh,nh->n", x, w_in[row]) + b_in[row]  # (N,) node logits
            y += gelu(z)[:, None] * w_out[:, row].T             # (N, H) column `row` of linear_out
            margin = np.minimum(margin, np.abs(z))
            node = 2 * node + 1 + (z > 0)                       # ties (z == 0) go left
    return y, margin


def sinusoid(n_pos, dim):
    pe = np.zeros((n_pos, dim))
    for p in range(n_pos):
        for i in range(dim // 2):
            w = math.exp(-(2 * i) * math.log(10000.0) / dim)
            pe[p, 2 * i] = math.sin(p * w)
            pe[p, 2 * i + 1] = math.cos(p * w)
    return pe


def crammed_encoder(tensors, config, input_ids, attention_mask=None):
    """crammedBERT encoder output (after the final norm), spec section 1.

    Returns hidden (B, S, H) float64 and margin (B,).
    """
    t = _f64({k.replace("_orig_mod.", "").replace("module.", ""): v for k, v in tensors.items()})
    a = config["arch"]
    H, NH, eps = a["hidden_size"], a["attention"]["num_attention_heads"], a["norm_eps"]
    HD = H // NH
    B, S = input_ids.shape
    E = t.get("encoder.embedding.word_embedding.weight", t.get("decoder.weight"))  # (V, H)

    # 1.1 additive key mask, finite -10000
    M = 0.0 if attention_mask is None else (1.0 - attention_mask)[:, None, None, :] * -10000.0  # (B, 1, 1, S)
    # 1.2 embedding
    pe = sinusoid(a["embedding"]["max_seq_length"], H)[:S]     # (S, H)
    x = E[input_ids] + t["encoder.embedding.pos_embedding.scale_factor"][0] * pe  # (B, S, H)
    if a["embedding"]["normalization"]:
        x = layer_norm(x, t["encoder.embedding.norm.weight"], t["encoder.embedding.norm.bias"], eps)
    margin = np.full(B, np.inf)
    # 1.3 pre-LN layers
    for i in range(a["num_transformer_layers"]):
        p = f"encoder.layers.{i}."
        h = layer_norm(x, t[p + "norm1.weight"], t[p + "norm1.bias"], eps)      # (B, S, H)
        qkv = h @ t[p + "attn.self_attention.query_key_value.weight"].T          # (B, S, 3H)
        if a["attention"]["qkv_bias"]:
            qkv = qkv + t[p + "attn.self_attention.query_key_value.bias"]
        qkv = qkv.reshape(B, S, NH, 3 * HD)                                      # per-head [q | k | v]
        q, k, v = qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:]          # (B, S, NH, HD) each
        norm_factor = float(t.get(p + "attn.self_attention.norm_factor", 1.0 / math.sqrt(HD)))
        scores = np.einsum("bind,bjnd->bnij", q, k) * norm_factor                # (B, NH, S, S)
        P = softmax(scores + M)                                                  # (B, NH, S, S)
        ctx = np.einsum("bnij,bjnd->bind", P, v).reshape(B, S, H)                # (B, S, H) heads concatenated
        attn = ctx @ t[p + "attn.dense.weight"].T                                # (B, S, H)
        if a["use_bias"]:
            attn = attn + t[p + "attn.dense.bias"]
        x = x + attn
        h2 = layer_norm(x, t[p + "norm2.weight"], t[p + "norm2.bias"], eps)      # (B, S, H)
        if a["intermed_type"] == "fff":
            y, m = fff(h2.reshape(B * S, H), t[p + "ffn.linear_in.weight"], t[p + "ffn.linear_in.bias"],
                       t[p + "ffn.linear_out.weight"], a["intermed_size"], a["intermed_depth"])
            margin = np.minimum(margin, m.reshape(B, S).min(axis=1))
            x = x + y.reshape(B, S, H)
        else:
            z = h2 @ t[p + "ffn.dense_in.weight"].T                              # (B, S, I)
            if a["use_bias"]:
                z = z + t[p + "ffn.dense_in.bias"]
            y = gelu(z) @ t[p + "ffn.dense_out.weight"].T                        # (B, S, H)
            if a["use_bias"]:
                y = y + t[p + "ffn.dense_out.bias"]
            x = x + y
    # 1.4 final norm
    if a["final_norm"]:
        x = layer_norm(x, t["encoder.final_norm.weight"], t["encoder.final_norm.bias"], eps)
    return x, margin


def crammed_mlm_logits(tensors, config, input_ids, attention_mask=None):
    """Tied decoder, no head transform: (B, S, V)."""
    h, margin = crammed_encoder(tensors, config, input_ids, attention_mask)
    t = _f64(tensors)
    E = t.get("encoder.embedding.word_embedding.weight", t.get("decoder.weight"))
    logits = h @ E.T                                                             # (B, S, V)
    if "decoder.bias" in t:
        logits = logits + t["decoder.bias"]
    return logits, margin


def crammed_classify(tensors, config, input_ids, attention_mask=None):
    """Pooler (zero_index / avg over all positions) + dense + tanh + head: (B, L)."""
    h, margin = crammed_encoder(tensors, config, input_ids, attention_mask)
    t = _f64(tensors)
    pooler = config["arch"]["classification_head"]["pooler"]
    pooled = h[:, 0] if pooler == "zero_index" else h.mean(axis=1)              # (B, H)
    p = np.tanh(pooled @ t["pooler.dense.weight"].T + t["pooler.dense.bias"])    # (B, D)
    return p @ t["head.weight"].T + t["head.bias"], margin                       # (B, L)


# --------------------------------------------------------------------------- BERT
def bert_encoder(tensors, config, input_ids, attention_mask=None, token_type_ids=None):
    """HF BertModel last_hidden_state (post-LN), float64: (B, S, H)."""
    pre = "" if "embeddings.word_embeddings.weight" in tensors else "bert."
    t = _f64({k[len(pre):] if k.startswith(pre) else k: v for k, v in tensors.items()})
    H, NH, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    HD = H // NH
    B, S = input_ids.shape
    tt = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    M = 0.0 if attention_mask is None else (1.0 - attention_mask)[:, None, None, :] * np.finfo(np.float32).min
    x = (t["embeddings.word_embeddings.weight"][input_ids] + t["embeddings.token_type_embeddings.weight"][tt]
         + t["embeddings.position_embeddings.weight"][:S])                       # (B, S, H)
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(name, z):
            return z @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        q = lin("attention.self.query", x).reshape(B, S, NH, HD)                 # (B, S, NH, HD)
        k = lin("attention.self.key", x).reshape(B, S, NH, HD)
        v = lin("attention.self.value", x).reshape(B, S, NH, HD)
        scores = np.einsum("bind,bjnd->bnij", q, k) / math.sqrt(HD)             # (B, NH, S, S)
        P = softmax(scores + M)
        ctx = np.einsum("bnij,bjnd->bind", P, v).reshape(B, S, H)               # (B, S, H)
        x = layer_norm(lin("attention.output.dense", ctx) + x, t[p + "attention.output.LayerNorm.weight"],
                       t[p + "attention.output.LayerNorm.bias"], eps)
        y = lin("output.dense", gelu(lin("intermediate.dense", x)))              # (B, S, H)
        x = layer_norm(y + x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    return x


def bert_mlm_logits(tensors, config, input_ids, attention_mask=None):
    h = bert_encoder(tensors, config, input_ids, attention_mask)
    t = _f64(tensors)
    z = gelu(h @ t["cls.predictions.transform.dense.weight"].T + t["cls.predictions.transform.dense.bias"])
    z = layer_norm(z, t["cls.predictions.transform.LayerNorm.weight"], t["cls.predictions.transform.LayerNorm.bias"],
                   config["layer_norm_eps"])
    return z @ t["bert.embeddings.word_embeddings.weight"].T + t["cls.predictions.bias"]  # (B, S, V)


def bert_classify(tensors, config, input_ids, attention_mask=None, token_type_ids=None):
    h = bert_encoder(tensors, config, input_ids, attention_mask, token_type_ids)
    t = _f64(tensors)
    pooled = np.tanh(h[:, 0] @ t["bert.pooler.dense.weight"].T + t["bert.pooler.dense.bias"])  # (B, H)
    return pooled @ t["classifier.weight"].T + t["classifier.bias"]                            # (B, L)


def sentence_embedding(hidden, mask, modes=("mean",), normalize=False):
    """sentence-transformers pooling (reference): (B, S, H) -> (B, D)."""
    m = mask[:, :, None].astype(np.float64)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, -np.inf).max(axis=1))
        elif mode == "mean":
            parts.append((hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9))
        elif mode == "mean_sqrt_len":
            parts.append((hidden * m).sum(1) / np.sqrt(np.maximum(m.sum(1), 1e-9)))
    out = np.concatenate(parts, axis=1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
