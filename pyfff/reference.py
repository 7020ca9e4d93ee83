"""Reference FFF forward pass: readable NumPy, no tricks, used as ground truth.

Every fast path in pyfff (the Cython/OpenMP CPU kernels, the CuPy kernels) is
tested against :func:`fff_forward`. It walks the tree level by level for the
whole batch with fancy indexing; it is not meant to be fast.

Tree layout (the layout of UltraFastBERT's ``ffn.linear_in`` and of the
transposed ``ffn.linear_out``):

* ``n_nodes = 2**(depth + 1) - 1`` neurons per tree, heap order: node ``n`` has
  children ``2n + 1`` (left) and ``2n + 2`` (right); the leaves are nodes
  ``2**depth - 1 .. n_nodes - 1``.
* Row ``t * n_nodes + n`` of ``w_in`` / ``b_in`` / ``w_out`` belongs to node
  ``n`` of tree ``t`` (tree-major).
* A token goes right when the node's logit ``w_in[n] . x + b_in[n]`` is
  strictly greater than zero; a logit of exactly 0 goes left (upstream tests
  ``logits > 0``).
* Output = sum over trees and over the ``depth + 1`` visited nodes of
  ``act(logit) * w_out[node]``. There is no output bias.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["ACTIVATIONS", "apply_activation", "depth_from_rows", "fff_forward", "fff_routes", "masked_dense_forward"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def apply_activation(z: np.ndarray, name: str) -> np.ndarray:
    """Apply the named activation elementwise, in the dtype of ``z``.

    ``gelu`` is the exact, erf-based GELU (``torch.nn.GELU()``), evaluated in
    float64 as ``0.5 z erfc(-z / sqrt 2)``: the same function as
    ``0.5 z (1 + erf(z / sqrt 2))`` without that form's cancellation for z < 0.
    ``gelu_tanh`` is the tanh approximation (``approximate="tanh"``).
    """
    z = np.asarray(z)
    if name == "gelu":
        erfc = np.vectorize(math.erfc, otypes=[np.float64])
        z64 = z.astype(np.float64)
        return (0.5 * z64 * erfc(-z64 / math.sqrt(2.0))).astype(z.dtype)
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        z64 = z.astype(np.float64)
        return (0.5 * z64 * (1.0 + np.tanh(c * (z64 + 0.044715 * z64**3)))).astype(z.dtype)
    if name == "relu":
        return np.maximum(z, 0).astype(z.dtype)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def depth_from_rows(n_rows: int, n_trees: int) -> int:
    """Depth of a tree whose ``n_trees`` copies hold ``n_rows`` neurons in all.

    Raises ``ValueError`` unless ``n_rows == n_trees * (2**(depth+1) - 1)``.
    """
    if n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    if n_rows % n_trees:
        raise ValueError(f"{n_rows} neuron rows cannot be split into n_trees={n_trees} equal trees")
    n_nodes = n_rows // n_trees
    depth = (n_nodes + 1).bit_length() - 2
    if n_nodes < 1 or 2 ** (depth + 1) - 1 != n_nodes:
        raise ValueError(
            f"each tree has {n_nodes} neuron rows ({n_rows} rows / {n_trees} trees); "
            "a balanced tree needs 2**(depth+1) - 1 rows (1, 3, 7, 15, ...)"
        )
    return depth


def fff_routes(x, w_in, b_in, *, n_trees=1):
    """Visited nodes and their logits.

    Parameters
    ----------
    x : ndarray of shape (n_samples, d_in)
    w_in : ndarray of shape (n_trees * n_nodes, d_in)
    b_in : ndarray of shape (n_trees * n_nodes,) or None
    n_trees : int

    Returns
    -------
    nodes : ndarray of shape (n_samples, n_trees, depth + 1), dtype=int64
        Node index within its tree, level by level.
    logits : ndarray of shape (n_samples, n_trees, depth + 1), dtype of x
    """
    x = np.asarray(x)
    depth = depth_from_rows(w_in.shape[0], n_trees)
    n_nodes = 2 ** (depth + 1) - 1
    n = x.shape[0]
    nodes = np.zeros((n, n_trees, depth + 1), dtype=np.int64)
    logits = np.zeros((n, n_trees, depth + 1), dtype=x.dtype)
    rows = np.arange(n)
    for t in range(n_trees):
        node = np.zeros(n, dtype=np.int64)  # (n,) current node of every sample
        for level in range(depth + 1):
            w = w_in[t * n_nodes + node]  # (n, d_in) one weight row per sample
            z = np.einsum("nd,nd->n", x, w)  # (n,)
            if b_in is not None:
                z = z + b_in[t * n_nodes + node]
            nodes[rows, t, level] = node
            logits[rows, t, level] = z
            node = 2 * node + 1 + (z > 0)  # ties (z == 0) go left
    return nodes, logits


def fff_forward(x, w_in, b_in, w_out, *, n_trees=1, activation="gelu"):
    """FFF layer output, the ground truth for every kernel.

    Parameters
    ----------
    x : ndarray of shape (n_samples, d_in)
    w_in : ndarray of shape (n_trees * n_nodes, d_in)
    b_in : ndarray of shape (n_trees * n_nodes,) or None
    w_out : ndarray of shape (n_trees * n_nodes, d_out)
        Node-major output weights (row = node), i.e. ``linear_out.weight.T``.
    n_trees : int
    activation : {"gelu", "gelu_tanh", "relu"}

    Returns
    -------
    y : ndarray of shape (n_samples, d_out), dtype of x
    """
    x = np.asarray(x)
    depth = depth_from_rows(w_in.shape[0], n_trees)
    n_nodes = 2 ** (depth + 1) - 1
    nodes, logits = fff_routes(x, w_in, b_in, n_trees=n_trees)
    acts = apply_activation(logits, activation)  # (n, n_trees, depth + 1)
    y = np.zeros((x.shape[0], w_out.shape[1]), dtype=x.dtype)  # (n, d_out)
    for t in range(n_trees):
        for level in range(depth + 1):
            y += acts[:, t, level, None] * w_out[t * n_nodes + nodes[:, t, level]]
    return y


def masked_dense_forward(x, w_in, b_in, w_out, *, n_trees=1, activation="gelu"):
    """The upstream training formulation: all logits, a 0/1 mask on the path.

    A second, independent reference (``training/cramming/architectures/fff.py``):
    compute every node's logit with one matrix product, mark the nodes on each
    sample's root-to-leaf path, and multiply the masked activations by the
    whole output matrix.
    """
    x = np.asarray(x)
    depth = depth_from_rows(w_in.shape[0], n_trees)
    n_nodes = 2 ** (depth + 1) - 1
    n = x.shape[0]
    z = x @ w_in.T  # (n, n_trees * n_nodes)
    if b_in is not None:
        z = z + b_in
    z = z.reshape(n, n_trees, n_nodes)  # (n, T, N)
    mask = np.zeros_like(z)
    rows = np.arange(n)
    for t in range(n_trees):
        node = np.zeros(n, dtype=np.int64)
        for _ in range(depth + 1):
            mask[rows, t, node] = 1
            node = 2 * node + 1 + (z[rows, t, node] > 0)
    h = (apply_activation(z, activation) * mask).reshape(n, n_trees * n_nodes)  # (n, T*N)
    return h @ w_out  # (n, d_out)

