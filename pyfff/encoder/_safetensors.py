"""Memory-mapped, validating safetensors reader and a plain writer.

Contract: :func:`read_safetensors` never copies a float32 tensor: every array
it returns is a read-only view of one read-only ``mmap`` of the file, so loading a
checkpoint costs page-table entries, not RAM, until the pages are touched.
Other float dtypes (float16, bfloat16, float64) are widened/narrowed to
float32 (the only copies). Any inconsistency of the file (truncated, a header
that is not JSON, offsets outside the data, overlapping tensors, a size that
does not match dtype x shape) raises :class:`CheckpointError` naming the file
and the tensor, before any tensor is handed out.

Why not ``safetensors.numpy.load_file``: it reads every tensor into a fresh
array (a full copy of the file in RAM). ``safe_open(..., framework="numpy")``
also copies on ``get_tensor``. The format is simple enough to map directly:
8 bytes little-endian header length N, N bytes of JSON, then the raw data.
"""
from __future__ import annotations

import json
import math
import mmap
import os

import numpy as np

__all__ = ["CheckpointError", "read_safetensors", "release_pages", "write_safetensors"]

# safetensors dtype codes we can turn into float32 (int tensors are accepted too:
# BERT checkpoints carry an int64 ``position_ids`` buffer we simply ignore)
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # reinterpreted below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
          np.dtype("<i4"): "I32", np.dtype("i1"): "I8"}
# a header larger than this is certainly corrupt (the safetensors library uses 100 MB)
_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file or folder is corrupt, truncated, or does not match its config."""


def _fail(path, msg):
    raise CheckpointError(f"{path}: {msg}")


def read_safetensors(path):
    """Map a ``.safetensors`` file and return its tensors and metadata.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    tensors : dict of str to ndarray
        Float tensors as float32 (read-only views of the mapped file when they
        are stored as float32, else converted copies); integer/bool tensors as
        stored (views).
    metadata : dict of str to str
        The ``__metadata__`` entry of the header (empty if absent).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is truncated or corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    size = os.path.getsize(path)
    if size < 8:
        _fail(path, f"file is {size} bytes, too short for a safetensors header (truncated?)")
    with open(path, "rb") as fh:
        n_header = int.from_bytes(fh.read(8), "little")
        if n_header > min(_MAX_HEADER, size - 8):
            _fail(path, f"header claims {n_header} bytes but the file has {size - 8} after the length field "
                        "(truncated or not a safetensors file)")
        raw = fh.read(n_header)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(path, f"header is not valid JSON ({exc}); not a safetensors file or corrupt")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n_header
    data_size = size - data_start

    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            _fail(path, f"tensor {name!r}: header entry must have dtype, shape and data_offsets, got {info!r}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _DTYPES:
            _fail(path, f"tensor {name!r}: unsupported dtype {code!r}")
        if (not isinstance(shape, list) or len(shape) > 32
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            _fail(path, f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            _fail(path, f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            _fail(path, f"tensor {name!r} ends at byte {end} of the data section but the file holds only "
                        f"{data_size} data bytes (truncated file)")
        itemsize = _DTYPES[code].itemsize
        n_bytes = math.prod(shape) * itemsize          # Python ints: no wrap-around (np.prod's int64 would)
        if end - begin != n_bytes:
            _fail(path, f"tensor {name!r}: {end - begin} bytes stored but dtype {code} x shape {tuple(shape)} "
                        f"needs {n_bytes}")
        entries.append((begin, end, name, code, tuple(shape)))
    entries.sort()
    for (b0, e0, n0, *_), (b1, e1, n1, *_) in zip(entries, entries[1:]):
        if b1 < e0:
            _fail(path, f"tensors {n0!r} and {n1!r} overlap in the data section (corrupt header)")

    tensors = {}
    if not entries:
        return tensors, metadata
    with open(path, "rb") as fh:
        # read-only shared mapping; np.frombuffer views of it are read-only arrays whose base
        # chain ends in the mmap object (release_pages uses that)
        mm = np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8, offset=data_start)
    for begin, end, name, code, shape in entries:
        if end == begin:
            dt = np.float32 if code in ("F64", "F32", "F16", "BF16") else _DTYPES[code]
            tensors[name] = np.zeros(shape, dtype=dt)
            continue
        raw = mm[begin:end]
        if code == "BF16":
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        elif code == "F32":
            arr = raw.view("<f4").reshape(shape)
            if not arr.flags.aligned:  # only for files written without the usual 8-byte header padding
                arr = arr.copy()
        elif code in ("F64", "F16"):
            arr = raw.view(_DTYPES[code]).astype(np.float32).reshape(shape)
        else:
            arr = raw.view(_DTYPES[code]).reshape(shape)
        tensors[name] = arr
    return tensors, metadata


def _mapping_of(arr):
    """The ``mmap.mmap`` an array views, or None."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
        return base.obj
    return None


def release_pages(arrays):
    """Drop the resident pages of mapped tensors that are no longer needed (e.g. copied into a new layout).

    Only whole pages inside each array are released, so neighbouring tensors keep theirs; the data stay
    valid (a later read faults the pages back in from the file). Arrays that are not views of a mapping
    are ignored. No-op where ``madvise`` is unavailable.
    """
    if not hasattr(mmap.mmap, "madvise"):
        return
    page = mmap.PAGESIZE
    for arr in arrays:
        mm = _mapping_of(arr)
        if mm is None or arr.size == 0:
            continue
        start_addr = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
        begin = arr.ctypes.data - start_addr
        end = begin + arr.nbytes
        begin = -(-begin // page) * page
        end = end // page * page
        if end > begin:
            mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def write_safetensors(path, tensors, metadata=None):
    """Write ``tensors`` (dict of name to ndarray) as a safetensors file.

    Tensors are written in the order given, one after the other; the header
    is padded with spaces to a multiple of 64 bytes so that every float32
    tensor starts 4-byte aligned once the file is mapped (mmap pages are
    aligned, so the data section starts at a 64-byte boundary).
    """
    header = {}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">" or arr.dtype not in _CODES:
            raise TypeError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        n_bytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 64)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for arr in arrays:
            # tofile of a C-contiguous array writes its buffer without an extra copy
            np.ascontiguousarray(arr).tofile(fh)
