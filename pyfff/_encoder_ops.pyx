"""Compiled float32 LayerNorm and attention for the encoder (private).

The C kernels are in src/encoder_ops.h; pyfff/encoder/_forward.py calls these
on its workers' row blocks and (sequence, head) groups with arrays it owns, so
the checks here only guard against crashes. The GIL is released while they run.
"""
from libc.stdlib cimport free, malloc

cimport numpy as cnp

cnp.import_array()

cdef extern from "encoder_ops.h" nogil:
    void eo_layer_norm_f32(const float *x, Py_ssize_t ldx, Py_ssize_t m, Py_ssize_t h, const float *w,
                           const float *b, float eps, float *out, Py_ssize_t ldo)
    size_t eo_attention_scratch(Py_ssize_t s, Py_ssize_t hd)
    void eo_attention_f32(const float *q, const float *k, const float *v, Py_ssize_t ld, Py_ssize_t s,
                          Py_ssize_t hd, const float *mask, float *ctx, Py_ssize_t ldc, float *scratch)


cdef inline void _check_rows(cnp.ndarray a, Py_ssize_t width, str name) except *:
    # strides of an axis of length <= 1 are never used (NumPy may report 0 there)
    if (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(a) != 2 or cnp.PyArray_DIM(a, 1) != width
            or (cnp.PyArray_DIM(a, 0) > 1 and (cnp.PyArray_STRIDE(a, 0) < 4 * width or cnp.PyArray_STRIDE(a, 0) % 4))
            or (cnp.PyArray_DIM(a, 0) > 0 and width > 1 and cnp.PyArray_STRIDE(a, 1) != 4)
            or not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_ISNOTSWAPPED(a)):
        raise ValueError(f"internal error: {name} must be a float32 (n, {width}) array with contiguous rows")


cdef inline void _check_vec(cnp.ndarray a, Py_ssize_t n, str name) except *:
    if (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_SIZE(a) != n
            or not cnp.PyArray_ISNOTSWAPPED(a)):
        raise ValueError(f"internal error: {name} must be a contiguous float32 array of {n} values")


def layer_norm(cnp.ndarray x,      # IN  (m, h) float32, rows contiguous
               cnp.ndarray weight, # IN  (h,)
               cnp.ndarray bias,   # IN  (h,)
               float eps,
               cnp.ndarray out):   # OUT (m, h), may be x
    """out = LayerNorm(x) row by row (biased variance, as torch.nn.LayerNorm)."""
    cdef Py_ssize_t h = cnp.PyArray_DIM(weight, 0) if cnp.PyArray_NDIM(weight) == 1 else -1
    _check_vec(weight, h, "weight")
    _check_vec(bias, h, "bias")
    _check_rows(x, h, "x")
    _check_rows(out, h, "out")
    cdef Py_ssize_t m = cnp.PyArray_DIM(x, 0)
    if cnp.PyArray_DIM(out, 0) != m or not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("internal error: out must be writeable with as many rows as x")
    if m == 0:
        return out
    with nogil:
        eo_layer_norm_f32(<const float *>cnp.PyArray_DATA(x), cnp.PyArray_STRIDE(x, 0) // 4 if m > 1 else h, m, h,
                          <const float *>cnp.PyArray_DATA(weight), <const float *>cnp.PyArray_DATA(bias), eps,
                          <float *>cnp.PyArray_DATA(out), cnp.PyArray_STRIDE(out, 0) // 4 if m > 1 else h)
    return out


def attention(cnp.ndarray qkv,       # IN  (B, S, 3 * H) float32 C-contiguous: [Q | K | V], heads of hd values
              object mask_add,       # IN  (B, S) float32 additive key scores, or None
              cnp.ndarray ctx,       # OUT (B, S, H) float32 C-contiguous
              Py_ssize_t n_heads, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t h0, Py_ssize_t h1):
    """Softmax attention for sequences b0..b1-1 and heads h0..h1-1 (Q pre-scaled)."""
    if (cnp.PyArray_TYPE(qkv) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(qkv) != 3 or not cnp.PyArray_IS_C_CONTIGUOUS(qkv)
            or cnp.PyArray_TYPE(ctx) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(ctx) != 3
            or not cnp.PyArray_IS_C_CONTIGUOUS(ctx) or not cnp.PyArray_ISWRITEABLE(ctx)):
        raise ValueError("internal error: qkv and ctx must be C-contiguous 3-D float32 arrays")
    cdef Py_ssize_t B = cnp.PyArray_DIM(ctx, 0), S = cnp.PyArray_DIM(ctx, 1), H = cnp.PyArray_DIM(ctx, 2)
    if (n_heads < 1 or H % n_heads or cnp.PyArray_DIM(qkv, 0) != B or cnp.PyArray_DIM(qkv, 1) != S
            or cnp.PyArray_DIM(qkv, 2) != 3 * H or not (0 <= b0 <= b1 <= B) or not (0 <= h0 <= h1 <= n_heads)):
        raise ValueError("internal error: inconsistent attention shapes or ranges")
    cdef const float *mask = NULL
    if mask_add is not None:
        _check_vec(mask_add, B * S, "mask_add")
        mask = <const float *>cnp.PyArray_DATA(mask_add)
    if S == 0 or b0 == b1 or h0 == h1:
        return ctx
    cdef Py_ssize_t hd = H // n_heads, b, h
    cdef const float *base = <const float *>cnp.PyArray_DATA(qkv)
    cdef float *out = <float *>cnp.PyArray_DATA(ctx)
    cdef float *scratch = <float *>malloc(eo_attention_scratch(S, hd) * sizeof(float))
    if scratch == NULL:
        raise MemoryError("could not allocate the attention kernel's scratch memory")
    with nogil:
        for b in range(b0, b1):
            for h in range(h0, h1):
                eo_attention_f32(base + b * S * 3 * H + h * hd, base + b * S * 3 * H + H + h * hd,
                                 base + b * S * 3 * H + 2 * H + h * hd, 3 * H, S, hd,
                                 mask + b * S if mask != NULL else NULL, out + b * S * H + h * hd, H, scratch)
    free(scratch)
    return ctx
