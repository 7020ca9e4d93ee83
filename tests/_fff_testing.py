"""Test helpers for the FFF layer: random layers and a route-aware comparator.

FFF routing is a hard sign decision, so two correct implementations that sum
a dot product in different orders may send a token down different subtrees
when a node's logit is within rounding of zero. ``compare_with_reference``
therefore checks a kernel's routes and outputs against
``pyfff.reference`` as follows:

* every route must be a root-to-leaf path (root 0, then children 2n+1/2n+2);
* at every level, the direction the kernel took from the node it was on must
  be the reference's direction (right iff logit > 0), computed with the
  reference's own arithmetic at that node, unless that logit is within
  rounding of zero (``logit_tolerance``);
* outputs are compared (per-dtype tolerance) only on the samples whose routes
  equal the reference's in every tree, and at most ``max_flip_fraction`` of
  the samples may take a different (justified) route.

The comparator is unit-tested in ``tests/test_fff_testing.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyfff import FFF, reference

# Output tolerance per dtype: |y - y_ref| <= atol + rtol * magnitude, where
# magnitude = sum over the visited nodes of |act(logit)| * |w_out[node]|, the
# natural scale of the rounding error of the output sum (no cancellation
# luck). The largest difference measured (widths 1-768, depth 3-12, 1-4 trees,
# every activation, 15 seeds) uses under a tenth of these.
TOLERANCES = {
    np.dtype(np.float32): {"rtol": 5e-5, "atol": 3e-6},
    np.dtype(np.float64): {"rtol": 2e-13, "atol": 3e-15},
}


def random_weights(rng, d_in, d_out, depth, *, n_trees=1, dtype=np.float32, bias=True):
    """(w_in, b_in, w_out) of a random FFF layer with O(1) logits and outputs."""
    n_rows = n_trees * (2 ** (depth + 1) - 1)
    w_in = (rng.standard_normal((n_rows, d_in)) / math.sqrt(d_in)).astype(dtype)
    b_in = (0.1 * rng.standard_normal(n_rows)).astype(dtype) if bias else None
    w_out = (rng.standard_normal((n_rows, d_out)) / math.sqrt(n_trees * (depth + 1))).astype(dtype)
    return w_in, b_in, w_out


def random_layer_and_x(seed, batch, d_in, d_out, depth, *, n_trees=1, dtype=np.float32, activation="gelu",
                       bias=True):
    """An FFF layer with random weights and a random (batch, d_in) input, both from ``seed``."""
    rng = np.random.default_rng(seed)
    w_in, b_in, w_out = random_weights(rng, d_in, d_out, depth, n_trees=n_trees, dtype=dtype, bias=bias)
    x = rng.standard_normal((batch, d_in)).astype(dtype)
    return FFF(w_in, b_in, w_out, n_trees=n_trees, activation=activation), x


def unaligned_copy(a, offset=1):
    """A C-contiguous copy of ``a`` whose data starts ``offset`` bytes off alignment."""
    u = np.ndarray(a.shape, dtype=a.dtype, buffer=bytearray(a.nbytes + offset), offset=offset)
    u[...] = a
    assert u.flags.c_contiguous and not u.flags.aligned
    return u


def logit_tolerance(x, w_rows, b_rows):
    """Largest logit whose sign two correct summation orders may disagree on.

    For a dot product of ``d`` terms, any summation order is within
    ``gamma = (d + 1) * eps * (sum |w * x| + |b|)`` of the exact value (the
    standard worst-case bound); two implementations may differ by twice that.

    Parameters
    ----------
    x, w_rows : ndarray of shape (n, d_in)
    b_rows : ndarray of shape (n,) or None

    Returns
    -------
    tol : ndarray of shape (n,), float64
    """
    eps = np.finfo(x.dtype).eps
    size = np.abs(x.astype(np.float64) * w_rows.astype(np.float64)).sum(axis=-1)
    if b_rows is not None:
        size = size + np.abs(b_rows.astype(np.float64))
    return 2.0 * (x.shape[-1] + 1) * eps * size


def _node_logits(x, layer, tree, nodes):
    """Reference logits of each sample at its own node ``nodes[i]`` of ``tree``.

    The same arithmetic as ``reference.fff_routes`` (gathered rows, einsum).
    """
    rows = tree * layer.n_nodes + nodes
    w = layer.w_in[rows]  # (n, d_in)
    z = np.einsum("nd,nd->n", x, w)
    b = None
    if layer.b_in is not None:
        b = layer.b_in[rows]
        z = z + b
    return z, logit_tolerance(x, w, b)


@dataclass
class Comparison:
    """What ``compare_with_reference`` found (its checks passed)."""

    agree: np.ndarray  # (n_samples,) bool: routes equal the reference's in every tree
    robust: np.ndarray  # (n_samples,) bool: agree, and every routing logit is beyond rounding of 0
    y_ref: np.ndarray  # (n_samples, d_out) reference output
    ref_nodes: np.ndarray  # (n_samples, n_trees, depth + 1)

    @property
    def n_flipped(self):
        return int((~self.agree).sum())


def _fail(msg, idx, limit=5):
    idx = np.flatnonzero(idx)
    raise AssertionError(f"{msg}: {idx.size} sample(s), first {idx[:limit].tolist()}")


def assert_outputs_close(y, y_ref, magnitude, dtype, rtol=None, atol=None, what="output"):
    """|y - y_ref| <= atol + rtol * magnitude elementwise; NaN must match NaN."""
    tol = TOLERANCES[np.dtype(dtype)]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    y = np.asarray(y, dtype=np.float64)
    y_ref = np.asarray(y_ref, dtype=np.float64)
    nan_ref = np.isnan(y_ref)
    with np.errstate(invalid="ignore"):
        ok = np.where(nan_ref, np.isnan(y), np.abs(y - y_ref) <= atol + rtol * magnitude)
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise AssertionError(
            f"{what} differs from the reference at {int((~ok).sum())} element(s); first [{i}, {j}]: "
            f"got {y[i, j]!r}, reference {y_ref[i, j]!r}, allowed |diff| "
            f"{atol + rtol * magnitude[i, j]:.3g} (rtol={rtol}, atol={atol})"
        )


def compare_with_reference(layer, x, *, y=None, routes=None, n_threads=None, max_flip_fraction=0.01, rtol=None,
                           atol=None):
    """Check ``layer``'s routes and output on ``x`` against ``pyfff.reference``.

    Parameters
    ----------
    layer : FFF
        Weights, dtype, n_trees and activation are read from it.
    x : array_like of shape (..., d_in)
    y : ndarray of shape (..., d_out), optional
        The output to check; default ``layer(x, n_threads)``.
    routes : ndarray of shape (..., n_trees, depth + 1), optional
        The routes to check; default ``layer.routes(x, n_threads)``.
    max_flip_fraction : float
        Routes that differ from the reference (each flip justified by a
        near-zero logit) are allowed on at most ``ceil(max_flip_fraction * n)``
        samples.

    Returns
    -------
    Comparison

    Raises
    ------
    AssertionError
        On a malformed or unjustified route, a wrong output, or too many flips.
    """
    x = np.asarray(x)
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, layer.d_in), dtype=layer.dtype)
    n = x2.shape[0]
    n_lev = layer.depth + 1
    if y is None:
        y = layer(x, n_threads=n_threads)
    if routes is None:
        routes = layer.routes(x, n_threads=n_threads)
    if y.shape != lead + (layer.d_out,):
        raise AssertionError(f"output shape {y.shape}, expected {lead + (layer.d_out,)}")
    if routes.shape != lead + (layer.n_trees, n_lev):
        raise AssertionError(f"routes shape {routes.shape}, expected {lead + (layer.n_trees, n_lev)}")
    if y.dtype != layer.dtype:
        raise AssertionError(f"output dtype {y.dtype}, expected {layer.dtype}")
    y2 = y.reshape(n, layer.d_out)
    r2 = np.asarray(routes).reshape(n, layer.n_trees, n_lev).astype(np.int64)

    ref_nodes, ref_logits = reference.fff_routes(x2, layer.w_in, layer.b_in, n_trees=layer.n_trees)
    margin_ok = np.ones(n, dtype=bool)  # every logit on the path is beyond rounding of zero
    for t in range(layer.n_trees):
        if not (r2[:, t, 0] == 0).all():
            _fail(f"tree {t}: route does not start at the root", r2[:, t, 0] != 0)
        for level in range(1, n_lev):
            prev, node = r2[:, t, level - 1], r2[:, t, level]
            bad = (node != 2 * prev + 1) & (node != 2 * prev + 2)
            if bad.any():
                _fail(f"tree {t}, level {level}: node is not a child of the previous one", bad)
    for t in range(layer.n_trees):
        for level in range(n_lev - 1):  # the decisions; a leaf's logit routes nothing
            node = r2[:, t, level]
            z, tol = _node_logits(x2, layer, t, node)
            margin_ok &= np.abs(z) > tol
            went_right = r2[:, t, level + 1] == 2 * node + 2
            with np.errstate(invalid="ignore"):
                ref_right = z > 0  # ties and NaN go left
                wrong = (went_right != ref_right) & ~(np.abs(z) <= tol)
            if wrong.any():
                i = np.flatnonzero(wrong)[0]
                raise AssertionError(
                    f"tree {t}, level {level}: unjustified turn at node {node[i]} of sample {i} "
                    f"({int(wrong.sum())} sample(s) in all): went {'right' if went_right[i] else 'left'}, "
                    f"reference logit {z[i]!r} is beyond rounding of zero (tol {tol[i]:.3g})"
                )

    agree = (r2 == ref_nodes).all(axis=(1, 2))
    n_flip = int((~agree).sum())
    allowed = math.ceil(max_flip_fraction * n)
    if n_flip > allowed:
        _fail(f"too many route flips ({n_flip} > {allowed} allowed), each near a zero logit", ~agree)

    acts = reference.apply_activation(ref_logits, layer.activation).astype(np.float64)  # (n, T, L)
    magnitude = np.zeros((n, layer.d_out))
    for t in range(layer.n_trees):
        for level in range(n_lev):
            w = layer.w_out[t * layer.n_nodes + ref_nodes[:, t, level]]  # (n, d_out)
            magnitude += np.abs(acts[:, t, level, None]) * np.abs(w)
    y_ref = reference.fff_forward(x2, layer.w_in, layer.b_in, layer.w_out, n_trees=layer.n_trees,
                                  activation=layer.activation)
    assert_outputs_close(y2[agree], y_ref[agree], magnitude[agree], layer.dtype, rtol, atol)
    return Comparison(agree=agree, robust=agree & margin_ok, y_ref=y_ref, ref_nodes=ref_nodes)
