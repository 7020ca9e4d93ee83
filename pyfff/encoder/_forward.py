"""The fast NumPy encoder forward pass (picoGPT style, kernel-ready parameters).

Contract: ``encode(params, cfg, ffns, ids, mask, token_type_ids)`` returns the
final hidden states in float32 for already validated inputs. Parameter names
are those of ``_checkpoint`` (kernel-ready: fused QKV with the attention scale
folded into the Q rows, FFF output weights node-major). Dense work runs on
NumPy's BLAS, FFF layers on ``pyfff.FFF``. There is no Python loop over tokens
or heads: attention is one batched matmul over (batch, heads). Inputs are
never modified; every in-place operation works on buffers allocated here.

Shapes: B batch, S sequence, N = B*S tokens, H model width, NH heads,
HD = H // NH head width, I dense intermediate width, V vocabulary.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

from .. import _encoder_ops

__all__ = ["encode", "Linear", "linears", "layer_norm_", "gelu_", "softmax_", "attention_reference", "mlm_head",
           "classifier_head", "sentence_pool"]

# Elementwise chains (GELU) run over row blocks of about this many float32
# values: 64 Ki floats = 256 KiB, which stays in the L2 cache between the
# passes, so a 10-pass formula costs about one pass over main memory.
_CHUNK = 1 << 16


def layer_norm_(x, weight, bias, eps, out=None):
    """LayerNorm over the last axis, into ``out`` (may be ``x`` itself).

    Parameters
    ----------
    x : ndarray of shape (N, H), dtype=float32
    weight, bias : ndarray of shape (H,), dtype=float32
    eps : float
    out : ndarray of shape (N, H), dtype=float32, optional

    Returns
    -------
    out : ndarray of shape (N, H), dtype=float32
        ``(x - mean) / sqrt(var + eps) * weight + bias`` with the biased
        variance, as ``torch.nn.LayerNorm``. Five passes: mean, centre,
        sum of squares (einsum, no temporary), scale, affine.
    """
    H = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)                    # (N, 1)
    out = np.subtract(x, mean, out=out)                      # (N, H) centred
    var = np.einsum("ij,ij->i", out, out)                    # (N,) sum of squares
    var *= np.float32(1.0 / H)
    var += np.float32(eps)
    rstd = np.sqrt(var, out=var)                             # (N,)
    np.reciprocal(rstd, out=rstd)
    out *= rstd[:, None]                                     # (N, H)
    out *= weight                                            # (N, H)
    out += bias                                              # (N, H)
    return out


# Abramowitz & Stegun 7.1.26: erf(u) = 1 - P(t) exp(-u^2), t = 1/(1 + p u), u >= 0,
# |error| <= 1.5e-7, i.e. at float32 rounding level for the GELU.
_AS_P = 0.3275911
_AS_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5..a1


def gelu_(x, bias=None):
    """Exact (erf) GELU in place, ``0.5 z (1 + erf(z / sqrt(2)))`` with ``z = x + bias``.

    Parameters
    ----------
    x : ndarray of shape (N, I), dtype=float32, C-contiguous; overwritten.
    bias : ndarray of shape (I,), dtype=float32, optional
        Added first, block by block (saves a pass over ``x``).

    Returns
    -------
    x : the same array.

    NumPy has no erf; this evaluates A&S 7.1.26 (absolute error of erf
    <= 1.5e-7) block of rows by block of rows so that the intermediate
    passes stay in cache. With a = |z| and q = 0.5 P(t) exp(-a^2/2), t from a:
    gelu(z) = z (1 - q) for z >= 0 and z q for z < 0, i.e. max(z, 0) - a q.
    """
    x2 = x.reshape(-1, x.shape[-1])
    n_rows, width = x2.shape
    step = max(1, _CHUNK // width)                            # rows per block
    shape = (min(step, n_rows), width)
    a, t, h = (np.empty(shape, dtype=np.float32) for _ in range(3))
    c = np.float32(_AS_P / math.sqrt(2.0))
    coefs = [np.float32(0.5 * v) for v in _AS_A]              # the 0.5 of q folded into P
    for start in range(0, n_rows, step):
        z = x2[start:start + step]                            # (k, I) view into x
        k = z.shape[0]
        aa, tt, hh = a[:k], t[:k], h[:k]
        if bias is not None:
            z += bias
        np.abs(z, out=aa)                                     # a = |z|
        np.multiply(aa, c, out=tt)
        tt += np.float32(1.0)
        np.reciprocal(tt, out=tt)                             # t = 1 / (1 + p a / sqrt(2))
        np.multiply(tt, coefs[0], out=hh)                     # Horner: 0.5 P(t) = t (a1' + t (a2' + ... t a5'))
        for coef in coefs[1:]:
            hh += coef
            hh *= tt
        np.multiply(aa, aa, out=tt)                           # reuse t for exp(-a^2 / 2)
        tt *= np.float32(-0.5)
        np.exp(tt, out=tt)
        hh *= tt                                              # q = 0.5 (1 - erf(a / sqrt(2)))
        hh *= aa                                              # a q
        np.maximum(z, np.float32(0.0), out=z)                 # max(z, 0)
        z -= hh                                               # max(z, 0) - a q
    return x


def softmax_(scores):
    """Softmax over the last axis, in place (max-subtracted, as torch does).

    Parameters
    ----------
    scores : ndarray of shape (..., S), dtype=float32, C-contiguous; overwritten.
    """
    m = scores.max(axis=-1, keepdims=True)                   # (..., 1)
    scores -= m
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)               # (..., 1)
    np.reciprocal(total, out=total)
    scores *= total
    return scores


def _linear(x, weight, bias=None, out=None):
    """``x @ weight + bias`` with a kernel-ready weight in (in, out) layout.

    x : (N, in) -> (N, out)
    """
    y = np.matmul(x, weight, out=out)                         # (N, out)
    if bias is not None:
        y += bias
    return y


class Linear:
    """A float32 dense layer ``x @ weight + bias`` on NumPy's BLAS.

    Same call as :class:`pyfff.quantize.QuantizedLinear`, its int8 counterpart, so the forward pass runs either:
    ``layer(x, out=None, *, gelu=False, accumulate=False, n_threads=1)``; x : (n, in) -> (n, out).
    """

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias                 # (in, out), (out,) or None

    def __call__(self, x, out=None, *, gelu=False, accumulate=False, n_threads=1):
        # n_threads is the int8 layer's; BLAS runs on the threads the caller allows
        if accumulate:                                        # residual: out += x W + b
            out += _linear(x, self.weight, self.bias)
            return out
        y = np.matmul(x, self.weight, out=out)                # (n, out)
        if gelu:
            return gelu_(y, self.bias)                        # bias added inside, in cache
        if self.bias is not None:
            y += self.bias
        return y


def linears(p, cfg, quantized=None):
    """The dense projections of every layer, by name (``layers.{i}.attn.qkv`` ...): float or int8.

    p : kernel-ready parameters; quantized : dict of weight name -> QuantizedLinear for int8 models.
    """
    names = ["attn.qkv", "attn.out"] + (["ffn.dense_in", "ffn.dense_out"] if cfg.ffn_type == "dense" else [])
    out = {}
    for i in range(cfg.n_layers):
        for name in names:
            key = f"layers.{i}.{name}"
            if quantized is not None and key + ".weight" in quantized:
                out[key] = quantized[key + ".weight"]
            else:
                out[key] = Linear(p[key + ".weight"], p.get(key + ".bias"))
    return out


# --------------------------------------------------------------------------- threads
# One pool of n_threads workers runs every parallel step of the forward pass: row blocks of
# tokens for the per-token work (LayerNorm, projections, FFF, GELU) and (batch, head) groups for
# attention. BLAS is limited to 1 thread around the whole call (once, by the caller) and the FFF
# kernel gets n_threads=1 inside a worker, so exactly n_threads threads compute at any time: no
# nested pools, no BLAS threads spinning while the OpenMP kernel runs (and vice versa), and one
# synchronisation per step instead of one per BLAS call (attention alone makes B * NH small GEMMs).
_POOLS = {}
_POOLS_LOCK = threading.Lock()


def _pool(n_workers):
    """The shared executor with ``n_workers`` threads (a fresh one in a forked child, whose copy has no threads)."""
    key = (os.getpid(), n_workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            from concurrent.futures import ThreadPoolExecutor

            _POOLS[key] = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="pyfff-encoder")
        return _POOLS[key]


def _run(tasks, n_workers):
    """Run ``tasks`` (callables): the first on the calling thread, the others in the pool; errors propagate."""
    if n_workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    futures = [_pool(n_workers - 1).submit(task) for task in tasks[1:]]
    try:
        tasks[0]()
    finally:
        for future in futures:
            future.result()


# below this many tokens per block the per-call overheads outweigh a second thread
_MIN_ROWS = 16
# int8 models called with fewer tokens than this run every step on the calling thread and give the threads to
# the kernels instead (the int8 projections split their output channels, the FFF kernel its tokens): with few
# tokens the weights, not the tokens, are what costs, and row blocks would have every core read all of them.
# Measured on 2 cores (docs/performance.md): 1 x 32 tokens 1.0x one core with row blocks, 1.4x this way; 64 tokens
# 10 % faster this way, 128 tokens 15-20 % slower (attention and LayerNorm then run on one core).
_FEW_TOKENS = 96


def _split(n, parts):
    """``parts`` (at most n) contiguous slices covering range(n)."""
    parts = max(1, min(parts, n))
    return [slice(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def _row_blocks(n_rows, n_workers):
    """Contiguous token-row slices, one per worker (fewer when blocks would be tiny)."""
    return _split(n_rows, min(n_workers, max(1, n_rows // _MIN_ROWS)))


def _attention_groups(B, n_heads, n_workers):
    """(batch slice, head slice) groups: whole sequences when the batch allows, else head slices."""
    if B >= n_workers:
        return [(b, slice(None)) for b in _split(B, n_workers)]
    per_seq = -(-n_workers // B)                              # ceil: head groups per sequence
    return [(slice(b, b + 1), hs) for b in range(B) for hs in _split(n_heads, per_seq)]


def attention_reference(qkv5, ctx, mask_add, bs, hs):
    """Scores, mask, softmax and context for one (batch slice, head slice) group, in NumPy.

    The readable reference of the compiled kernel (``pyfff._encoder_ops.attention``, src/encoder_ops.h)
    that :func:`encode` runs; mask_add is (B, 1, 1, S) here.

    qkv5 : (B, S, 3, NH, HD) view of the fused projection (Q pre-scaled)
    ctx : (B, S, NH, HD) output, written in place
    """
    q = qkv5[bs, :, 0, hs].transpose(0, 2, 1, 3)              # (b, h, S, HD) strided view, BLAS reads it
    k_t = qkv5[bs, :, 1, hs].transpose(0, 2, 3, 1)            # (b, h, HD, S)
    v = qkv5[bs, :, 2, hs].transpose(0, 2, 1, 3)              # (b, h, S, HD)
    scores = np.matmul(q, k_t)                                # (b, h, S, S) batched GEMM over (b, h)
    if mask_add is not None:
        scores += mask_add[bs]                                # (b, 1, 1, S) keys only
    softmax_(scores)                                          # (b, h, S, S)
    # P @ v written straight into the (B, S, NH, HD) layout: heads end up concatenated per token
    np.matmul(scores, v, out=ctx[bs, :, hs].transpose(0, 2, 1, 3))


def _feed_forward(h, lin, prefix, ffn, kt):
    """FFF (``ffn``, a ``pyfff.FFF``) or dense GELU feed-forward, with ``kt`` threads inside each kernel call.

    h : (n, H) -> (n, H)
    """
    if ffn is not None:
        return ffn(h, n_threads=kt)                           # (n, H) conditional execution
    a = lin[prefix + "ffn.dense_in"](h, gelu=True, n_threads=kt)  # (n, I) GELU(h W1 + b1)
    return lin[prefix + "ffn.dense_out"](a, n_threads=kt)     # (n, H)


def embed(p, cfg, ids, token_type_ids):
    """Token + position (+ token type) embeddings, normalised.

    ids : (B, S) int64 -> (N, H) float32 (a new array)
    """
    B, S = ids.shape
    x = p["embeddings.word_embeddings"][ids]                  # (B, S, H) gather = the one copy
    if cfg.type_vocab_size:
        tt = np.zeros_like(ids) if token_type_ids is None else token_type_ids
        x += p["embeddings.token_type_embeddings"][tt]        # (B, S, H)
    x += p["embeddings.position_embeddings"][:S]              # (B, S, H) positions 0..S-1
    x = x.reshape(B * S, cfg.d_model)                         # (N, H)
    if cfg.embedding_norm:
        _encoder_ops.layer_norm(x, p["embeddings.norm.weight"], p["embeddings.norm.bias"], cfg.norm_eps, x)
    return x


def encode(p, cfg, ffns, lin, ids, mask, token_type_ids=None, n_threads=1):
    """Final hidden states.

    Parameters
    ----------
    p : dict of kernel-ready parameters
    cfg : EncoderConfig
    ffns : list of pyfff.FFF or None (dense layers), one per layer
    lin : dict of name -> Linear or QuantizedLinear (see :func:`linears`)
    ids : ndarray of shape (B, S), dtype=int64, validated
    mask : ndarray of shape (B, S) of 0/1 or None
    token_type_ids : ndarray of shape (B, S) or None
    n_threads : int
        Threads: workers on blocks of tokens, or (int8 models, few tokens) threads inside the kernels. The
        caller limits BLAS to one thread around this call.

    Returns
    -------
    hidden : ndarray of shape (B, S, H), dtype=float32
    """
    B, S = ids.shape
    N, H, NH, eps = B * S, cfg.d_model, cfg.n_heads, cfg.norm_eps
    mask_add = None
    if mask is not None and not mask.all():
        # additive key mask (crammedBERT: -10000, finite; BERT: float32 min); skipped when nothing is
        # padded, which is exact: adding 0 changes no score
        mask_add = (1 - mask).astype(np.float32) * np.float32(cfg.mask_value)  # (B, S)
    x = embed(p, cfg, ids, token_type_ids)                    # (N, H) residual stream, owned here
    h = np.empty_like(x)                                      # (N, H) normed activations
    qkv = np.empty((N, 3 * H), dtype=np.float32)              # (N, 3H) fused projection, reused per layer
    qkv3 = qkv.reshape(B, S, 3 * H)                           # (B, S, 3H) view: [Q | K | V], heads inside
    ctx = np.empty((B, S, H), dtype=np.float32)               # (B, S, H) attention output, heads concatenated
    ctx2 = ctx.reshape(N, H)                                  # (N, H) view
    if n_threads > 1 and cfg.quantize is not None and N < _FEW_TOKENS:
        workers, kt = 1, n_threads                            # one block, threads inside the kernels
    else:
        workers, kt = n_threads, 1                            # blocks of tokens on the workers
    rows = _row_blocks(N, workers)
    groups = [bs.indices(B)[:2] + hs.indices(NH)[:2] for bs, hs in _attention_groups(B, NH, workers)]

    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        qkv_proj, out_proj = lin[pre + "attn.qkv"], lin[pre + "attn.out"]
        n1w, n1b, n2w, n2b = (p[pre + "norm1.weight"], p[pre + "norm1.bias"], p[pre + "norm2.weight"],
                              p[pre + "norm2.bias"])
        ffn = ffns[i]

        if cfg.pre_norm:                                      # crammedBERT: x + f(LN(x))
            def project(r):                                   # rows r: LN1, fused QKV
                _encoder_ops.layer_norm(x[r], n1w, n1b, eps, h[r])  # (n, H)
                qkv_proj(h[r], out=qkv[r], n_threads=kt)      # (n, 3H) one GEMM

            def finish(r):                                    # rows r: out-proj, residual, LN2, FF, residual
                xr = x[r]
                out_proj(ctx2[r], out=xr, accumulate=True, n_threads=kt)  # (n, H) x += ctx Wo (+ bo)
                _encoder_ops.layer_norm(xr, n2w, n2b, eps, h[r])  # (n, H)
                xr += _feed_forward(h[r], lin, pre, ffn, kt)  # (n, H)
        else:                                                 # BERT: LN(x + f(x))
            def project(r):
                qkv_proj(x[r], out=qkv[r], n_threads=kt)      # (n, 3H)

            def finish(r):
                xr = x[r]
                a = out_proj(ctx2[r], n_threads=kt)           # (n, H)
                a += xr
                _encoder_ops.layer_norm(a, n1w, n1b, eps, xr)  # (n, H)
                f = _feed_forward(xr, lin, pre, ffn, kt)      # (n, H)
                f += xr
                _encoder_ops.layer_norm(f, n2w, n2b, eps, xr)  # (n, H)

        _run([lambda r=r: project(r) for r in rows], workers)
        _run([lambda g=g: _encoder_ops.attention(qkv3, mask_add, ctx, NH, *g) for g in groups], workers)
        _run([lambda r=r: finish(r) for r in rows], workers)
    if cfg.final_norm:
        _run([lambda r=r: _encoder_ops.layer_norm(x[r], p["final_norm.weight"], p["final_norm.bias"], eps, x[r])
              for r in rows], workers)
    return x.reshape(B, S, H)


def mlm_head(p, cfg, h, n_threads=1):
    """MLM logits with the tied decoder, row blocks in parallel.

    h : (M, H) -> (M, V)
    """
    M = h.shape[0]
    logits = np.empty((M, cfg.vocab_size), dtype=np.float32)  # (M, V)

    def rows(r):
        z = h[r]
        if cfg.mlm_transform:                                 # BERT: LN(GELU(W h + b))
            z = gelu_(_linear(z, p["mlm.transform.weight"], p["mlm.transform.bias"]))  # (n, H)
            z = layer_norm_(z, p["mlm.norm.weight"], p["mlm.norm.bias"], cfg.norm_eps, out=z)
        np.matmul(z, p["embeddings.word_embeddings"].T, out=logits[r])            # (n, V) tied decoder
        if cfg.decoder_bias:
            logits[r] += p["mlm.decoder.bias"]

    _run([lambda r=r: rows(r) for r in _row_blocks(M, n_threads)], n_threads)
    return logits


def classifier_head(p, cfg, hidden):
    """Pool, dense + tanh, then the label head.

    hidden : (B, S, H) -> (B, L)
    """
    if cfg.pooler == "zero_index":
        pooled = hidden[:, 0]                                 # (B, H)
    else:                                                     # "avg": over all S positions, padding included
        pooled = hidden.mean(axis=1)                          # (B, H)
    z = np.tanh(_linear(pooled, p["pooler.weight"], p["pooler.bias"]))  # (B, D)
    return _linear(z, p["head.weight"], p["head.bias"])      # (B, L)


def sentence_pool(hidden, mask, modes, normalize):
    """sentence-transformers pooling over unmasked tokens (modes concatenated in order).

    hidden : (B, S, H), mask : (B, S) -> (B, len(modes) * H)
    """
    m = mask.astype(np.float32)[:, :, None]                   # (B, S, 1)
    count = np.maximum(m.sum(axis=1), np.float32(1e-9))       # (B, 1) as sentence-transformers clamps
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])                        # (B, H)
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1))  # (B, H)
        elif mode == "mean":
            parts.append((hidden * m).sum(axis=1) / count)    # (B, H)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * m).sum(axis=1) / np.sqrt(count))  # (B, H)
        else:
            raise NotImplementedError(f"sentence pooling mode {mode!r} is not implemented")
    out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # (B, D)
    if normalize:
        norm = np.linalg.norm(out, axis=1, keepdims=True)    # (B, 1)
        out = out / np.maximum(norm, np.float32(1e-12))      # as torch.nn.functional.normalize
    return np.ascontiguousarray(out, dtype=np.float32)
