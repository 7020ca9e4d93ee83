"""The public encoder object, ``load`` and ``export``."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
import warnings

import numpy as np

from .._config import __version__
from .._openmp_helpers import _openmp_effective_n_threads
from ..fff import FFF
from ..quantize import QuantizedLinear, check_quantize, quantize_and_pack
from . import _forward
from ._checkpoint import FORMAT, FORMAT_VERSION, kernel_param_shapes, load_tokenizer, quantized_weights, read_folder
from ._safetensors import CheckpointError, write_safetensors

__all__ = ["Encoder", "load", "export", "quantize_params", "resolve"]

# sentence-transformers / tokenizer side files copied into an export when present
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@functools.lru_cache(maxsize=1)
def _threadpool_controller():
    """One lazily created controller: scanning the loaded libraries is the slow part of threadpoolctl."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS limited to one thread during a call made from the main thread; calls from other threads leave it alone.

    Why not from every thread: OpenBLAS (0.3.31, NumPy's) takes ``openblas_set_num_threads`` only from the main
    thread and ignores it elsewhere, so a limit set by one thread and restored by another (overlapping calls) could
    leave the whole process on one BLAS thread. A call from another thread runs with BLAS as the process has it
    (correct results; at worst its BLAS calls use more threads than the encoder's workers leave free).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _threadpool_controller().limit(limits=1, user_api="blas"):
        yield


class Encoder:
    """A transformer encoder (UltraFastBERT/crammedBERT or BERT) running on NumPy + pyfff kernels.

    Create it with :func:`pyfff.load`. Its methods take text or right-padded
    batches of token ids; they never modify the arrays passed in.

    Attributes
    ----------
    config : EncoderConfig
        Architecture, sizes and tokenizer settings (see ``docs/encoder.md``).
    tokenizer : tokenizers.Tokenizer or None
        The checkpoint's tokenizer, set to truncate at ``config.max_length``
        and to right-pad with the pad token. None if the folder has no
        ``tokenizer.json``.
    n_threads : int
        Threads of the forward pass: workers that each run single-threaded
        BLAS, int8 and FFF calls on their own block of tokens (or of attention
        heads); an int8 model called with fewer than 96 tokens gives them to
        the kernels instead (the int8 layers split their output channels).
    params : dict of str to ndarray
        Kernel-ready weights (memory-mapped views where possible); for an
        int8 model the dense projections are stored as ``<name>.q8`` (packed
        int8), ``<name>.q8_scale`` and ``<name>.q8_colsum``.
    quantize : None or "int8"
        How the dense projections run: float32 on NumPy's BLAS, or int8 on
        pyfff's kernels (``pyfff.quantize``).
    """

    def __init__(self, config, params, *, tokenizer=None, n_threads=None, path=None):
        if config.max_length is None:                         # no tokenizer side files said: the positions
            config.max_length = config.max_positions
        self.config = config
        self.params = params
        self.path = path
        self.n_threads = _openmp_effective_n_threads(n_threads)
        self.tokenizer = tokenizer
        self._ffns = [None] * config.n_layers
        if config.ffn_type == "fff":
            self._ffns = [
                FFF(params[f"layers.{i}.ffn.w_in"], params[f"layers.{i}.ffn.b_in"], params[f"layers.{i}.ffn.w_out"],
                    n_trees=config.ffn_n_trees, activation=config.activation)
                for i in range(config.n_layers)
            ]
        self._lin = _forward.linears(params, config, _quantized_linears(config, params))
        self._pad_id = self._mask_id = None
        if tokenizer is not None:
            cfg = config
            self._pad_id = tokenizer.token_to_id(cfg.pad_token) if cfg.pad_token else None
            self._mask_id = tokenizer.token_to_id(cfg.mask_token) if cfg.mask_token else None
            if tokenizer.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
                raise CheckpointError(f"{path}: the tokenizer has {tokenizer.get_vocab_size(True)} tokens but the "
                                      f"embedding only {cfg.vocab_size} rows")
            tokenizer.no_padding()
            tokenizer.no_truncation()
            tokenizer.enable_truncation(cfg.max_length)
            if self._pad_id is not None:
                tokenizer.enable_padding(direction="right", pad_id=self._pad_id, pad_token=cfg.pad_token)

    @property
    def quantize(self):
        """None (float32 model) or "int8" (dense projections on int8 kernels)."""
        return self.config.quantize

    def __repr__(self):
        c = self.config
        ffn = (f"fff(depth={c.ffn_depth}, n_trees={c.ffn_n_trees})" if c.ffn_type == "fff" else f"dense({c.d_ff})")
        return (f"Encoder({c.architecture}, head={c.head}, n_layers={c.n_layers}, d_model={c.d_model}, "
                f"n_heads={c.n_heads}, ffn={ffn}, vocab={c.vocab_size}, quantize={c.quantize!r}, "
                f"n_threads={self.n_threads})")

    # ------------------------------------------------------------------ threads
    def _blas_limit(self):
        """BLAS on one thread for one top-level call (set once per call, never per layer).

        The encoder parallelises itself: ``n_threads`` workers each run single-threaded BLAS and FFF
        calls on their own row block (see ``_forward``), so a multi-threaded BLAS would oversubscribe.
        """
        return _one_blas_thread()

    # ------------------------------------------------------------------ tokenizer
    def tokenize(self, texts, pairs=None, *, return_token_type_ids=False, truncate=True):
        """Encode texts (or text pairs) with the checkpoint's tokenizer.

        Parameters
        ----------
        texts : str or list of str
        pairs : str or list of str, optional
            Second segments (crammedBERT: ``<cls> A <sep> B <sep>``).
        return_token_type_ids : bool, default=False
            Also return the segment ids (BERT uses them for pairs).
        truncate : bool, default=True
            Texts longer than ``config.max_length`` tokens are cut to it with one warning per call;
            ``truncate=False`` raises ValueError instead.

        Returns
        -------
        input_ids : ndarray of shape (B, S), dtype=int64
            Right-padded with the pad token, truncated to ``config.max_length``.
        attention_mask : ndarray of shape (B, S), dtype=int64
        token_type_ids : ndarray of shape (B, S), dtype=int64 (only if asked)
        """
        ids, mask, types, n_cut = self._tokenize(texts, pairs, truncate)
        if n_cut:
            self._warn_truncated(n_cut, len(ids), "text pairs" if pairs is not None else "texts")
        return (ids, mask, types) if return_token_type_ids else (ids, mask)

    def _tokenize(self, texts, pairs, truncate):
        """(ids, mask, token types, number of texts cut to max_length); ValueError for a cut with truncate=False."""
        if self.tokenizer is None:
            raise RuntimeError(f"{self.path}: this checkpoint has no tokenizer.json; pass token ids instead")
        texts = self._texts(texts, "texts")
        # Texts are cut by characters first, so that tokenizing costs what the model can keep, not what it was
        # given (a 10 MB text took 1.8 GB and 13 s; a text pair's overflow bookkeeping grows with the square of
        # its length). A token covers at least one character, and English runs 4-6 per token.
        cap = (_CHARS_PER_POSITION_PAIR if pairs is not None else _CHARS_PER_POSITION) * self.config.max_length
        long_ = {i for i, t in enumerate(texts) if len(t) > cap}
        texts = [t[:cap] for t in texts]
        if pairs is not None:
            pairs = self._texts(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
            long_ |= {i for i, t in enumerate(pairs) if len(t) > cap}
            encs = self._encode_batch(list(zip(texts, [t[:cap] for t in pairs])))
        else:
            encs = self._encode_batch(texts)
        cut = sorted(long_ | {i for i, e in enumerate(encs) if e.overflowing})
        if cut and not truncate:
            raise ValueError(f"{len(cut)} of {len(encs)} {'text pairs' if pairs is not None else 'texts'} (the "
                             f"first: #{cut[0]}) are longer than the model's {self.config.max_length} tokens "
                             "(truncate=False)")
        lengths = {len(e.ids) for e in encs}
        if 0 in lengths:
            raise ValueError("a text encodes to zero tokens")
        if len(lengths) > 1 and self._pad_id is None:
            raise ValueError("texts of different lengths need padding, but the tokenizer has no pad token")
        ids = np.array([e.ids for e in encs], dtype=np.int64)                   # (B, S)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)       # (B, S)
        types = np.array([e.type_ids for e in encs], dtype=np.int64)            # (B, S)
        return ids, mask, types, len(cut)

    def _encode_batch(self, items):
        """``tokenizer.encode_batch``; a malformed tokenizer.json that panics in the Rust library (a BaseException
        ``except Exception`` misses) becomes a CheckpointError naming the file."""
        try:
            return self.tokenizer.encode_batch(items)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 -- tokenizers' PanicException
            if isinstance(exc, (TypeError, ValueError)) and not type(exc).__name__.endswith("PanicException"):
                raise
            raise CheckpointError(f"{os.path.join(str(self.path), 'tokenizer.json')}: tokenizers failed on this "
                                  f"input ({type(exc).__name__}: {exc})") from None

    def _warn_truncated(self, n_cut, n, what):
        warnings.warn(f"{n_cut} of {n} {what} are longer than the model's {self.config.max_length} tokens; "
                      "truncated (truncate=False raises instead)", stacklevel=3)

    @staticmethod
    def _texts(texts, name):
        if texts is None:
            raise TypeError(f"{name} is None: give a string or a list of strings")
        if isinstance(texts, str):
            texts = [texts]
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError(f"{name} must be a string or a list of strings, got {type(texts).__name__}") from None
        if not texts:
            raise ValueError(f"{name} is empty: give at least one text")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"{name} must be strings, got {type(t).__name__}")
        return texts

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        """Validated int64 (B, S) ids, mask (or None) and token types; never views of the caller's arrays
        that we write to (nothing here writes to them)."""
        cfg = self.config
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu" or ids.dtype == np.bool_:
            raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {ids.shape}")
        B, S = ids.shape
        if B == 0 or S == 0:
            raise ValueError(f"input_ids is empty (shape {ids.shape})")
        if S > cfg.max_positions:
            raise ValueError(f"sequence length {S} is longer than the model's {cfg.max_positions} positions "
                             "(tokenize truncates; truncate ids yourself)")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        ids = ids.astype(np.int64, copy=False)
        mask = None
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1 and np.asarray(input_ids).ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
            if mask.dtype.kind not in "biuf":
                raise TypeError(f"attention_mask must be 0/1 numbers or booleans, got dtype {mask.dtype}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
            mask = mask.astype(np.int64, copy=False)
        types = None
        if token_type_ids is not None:
            types = np.asarray(token_type_ids)
            if types.ndim == 1 and np.asarray(input_ids).ndim == 1:
                types = types[None]
            if types.shape != ids.shape:
                raise ValueError(f"token_type_ids has shape {types.shape} but input_ids has {ids.shape}")
            n_types = cfg.type_vocab_size or 2       # without token-type embeddings: segment ids 0/1, ignored
            if types.dtype.kind not in "iu" or types.min() < 0 or types.max() >= n_types:
                raise ValueError(f"token_type_ids must be integers in [0, {n_types})")
            types = types.astype(np.int64, copy=False) if cfg.type_vocab_size else None
        return ids, mask, types

    def _inputs(self, inputs, attention_mask, token_type_ids, pairs=None, truncate=True):
        """(ids, mask, types) of text (str, list of str: tokenized here) or token ids (+ mask, token types)."""
        if inputs is None:
            raise TypeError("inputs is None: give a text, a list of texts, or token ids")
        if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "UO":
            inputs = inputs.tolist()
        is_text = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and len(inputs) > 0
                                              and isinstance(inputs[0], str))
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            raise ValueError("inputs is empty: give at least one text or one sequence of token ids")
        if not is_text:
            if pairs is not None:
                raise ValueError("pairs= goes with text inputs; with token ids, encode the pairs into the ids")
            return self._check_inputs(inputs, attention_mask, token_type_ids)
        if attention_mask is not None or token_type_ids is not None:
            raise ValueError("with text inputs the tokenizer makes attention_mask and token_type_ids; "
                             "pass token ids (see tokenize) to give your own")
        ids, mask, types = self.tokenize(inputs, pairs, return_token_type_ids=True, truncate=truncate)
        return self._check_inputs(ids, mask, types)

    # ------------------------------------------------------------------ forward
    # Every method takes text (a string or a list of strings, tokenized with the checkpoint's tokenizer: padded,
    # truncated to config.max_length with a warning, or an error with truncate=False) or token ids with an
    # optional attention mask (and token types for BERT; models without token-type embeddings ignore them).

    def hidden_states(self, inputs, attention_mask=None, token_type_ids=None, *, truncate=True):
        """Final hidden states (after the final norm for crammedBERT; ``last_hidden_state`` for BERT).

        Parameters
        ----------
        inputs : str, list of str, or array_like of shape (B, S) or (S,) of token ids
            Text is tokenized (``tokenize``): padded positions then carry values too; ``tokenize`` gives the mask.
        attention_mask : array_like of shape (B, S) of 0/1, optional (ids only)
            None: every position attends to every other.
        token_type_ids : array_like of shape (B, S), optional (ids only)
        truncate : bool, default=True
            Text longer than the model takes: cut with a warning (True) or ValueError (False).

        Returns
        -------
        hidden : ndarray of shape (B, S, H), dtype=float32
        """
        ids, mask, types = self._inputs(inputs, attention_mask, token_type_ids, truncate=truncate)
        with self._blas_limit():
            return _forward.encode(self.params, self.config, self._ffns, self._lin, ids, mask, types, self.n_threads)

    def mlm_logits(self, inputs, attention_mask=None, token_type_ids=None, *, truncate=True):
        """Masked-language-model logits (tied decoder); inputs as :meth:`hidden_states`.

        Returns
        -------
        logits : ndarray of shape (B, S, V), dtype=float32
        """
        self._need_head("mlm")
        ids, mask, types = self._inputs(inputs, attention_mask, token_type_ids, truncate=truncate)
        with self._blas_limit():
            h = _forward.encode(self.params, self.config, self._ffns, self._lin, ids, mask, types, self.n_threads)
            B, S, H = h.shape
            return _forward.mlm_head(self.params, self.config, h.reshape(B * S, H), self.n_threads).reshape(B, S, -1)

    def classify(self, inputs, attention_mask=None, token_type_ids=None, *, pairs=None, return_labels=False,
                 truncate=True):
        """Sequence-classification logits (crammedBERT: pooler ``zero_index`` or ``avg``; BERT: [CLS] pooler).

        Parameters
        ----------
        inputs : str, list of str, or token ids (as :meth:`hidden_states`)
        pairs : str or list of str, optional
            Second texts of text pairs (with text inputs).
        return_labels : bool, default=False
            Also return the predicted label of each input: its name from the config's ``id2label`` when it has
            one (``config.labels``), else its index.

        Returns
        -------
        logits : ndarray of shape (B, num_labels), dtype=float32
        labels : list of str or int, only with ``return_labels``
        """
        self._need_head("classifier")
        ids, mask, types = self._inputs(inputs, attention_mask, token_type_ids, pairs=pairs, truncate=truncate)
        with self._blas_limit():
            h = _forward.encode(self.params, self.config, self._ffns, self._lin, ids, mask, types, self.n_threads)
            logits = _forward.classifier_head(self.params, self.config, h)
        if not return_labels:
            return logits
        best = logits.argmax(axis=1)
        names = self.config.labels
        return logits, [names[i] if names else int(i) for i in best]

    def _need_head(self, head):
        if self.config.head != head:
            raise ValueError(f"this checkpoint has no {head} head (head={self.config.head!r})")

    def embed(self, texts, *, batch_size=32, normalize=None, show_progress=False, truncate=True):
        """Sentence embeddings, pooled as the checkpoint's sentence-transformers files say.

        Default (no ``modules.json``): mean over unmasked tokens, no normalisation.

        Texts are batched by length (as sentence-transformers does): each window of
        ``16 * batch_size`` texts is tokenized once, sorted by token count, and cut into
        batches padded only to their own longest text, so little work goes into padding.
        A text's embedding does not depend on the texts batched with it.

        Parameters
        ----------
        texts : str or list of str
        batch_size : int, default=32
            Texts encoded per forward pass (bounds the memory used).
        normalize : bool or None, default=None
            L2-normalise the embeddings; None: as the checkpoint says (``config.sentence_normalize``).
        show_progress : bool, default=False
            Report progress on stderr: a tqdm bar when tqdm is installed (``pip install tqdm``), else a line
            every few seconds.
        truncate : bool, default=True
            Texts longer than the model takes: cut with one warning per call (True) or ValueError (False).

        Returns
        -------
        embeddings : ndarray of shape (B, D), dtype=float32, in the order of ``texts``
        """
        texts = self._texts(texts, "texts")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if normalize not in (None, True, False):
            raise ValueError(f"normalize must be None, True or False, got {normalize!r}")
        cfg = self.config
        norm = cfg.sentence_normalize if normalize is None else normalize
        out = None
        window = 16 * batch_size
        progress = _Progress(len(texts), "texts") if show_progress else None
        n_cut = 0
        for w0 in range(0, len(texts), window):
            ids, mask, _, cut = self._tokenize(texts[w0:w0 + window], None, truncate)  # (w, S) padded to the longest
            n_cut += cut
            lengths = mask.sum(axis=1)                                              # (w,)
            order = np.argsort(lengths, kind="stable")                              # (w,) shortest first
            for b0 in range(0, order.size, batch_size):
                rows = order[b0:b0 + batch_size]                                    # (b,)
                width = int(lengths[rows].max())
                h = self.hidden_states(ids[rows, :width], mask[rows, :width])      # (b, width, H)
                emb = _forward.sentence_pool(h, mask[rows, :width], cfg.sentence_pooling, norm)
                if out is None:
                    out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)    # (B, D)
                out[w0 + rows] = emb
                if progress:
                    progress.update(rows.size)
        if progress:
            progress.close()
        if n_cut:                                 # one warning for the whole call, however many windows
            self._warn_truncated(n_cut, len(texts), "texts")
        return out

    def fill_mask(self, text, top_k=5):
        """Most likely tokens for each mask token in ``text``.

        Parameters
        ----------
        text : str
            Must contain the mask token (``<mask>`` for UltraFastBERT,
            ``[MASK]`` for BERT).
        top_k : int, default=5

        Returns
        -------
        predictions : list (one per mask, in order) of lists of (token, probability)
        """
        self._need_head("mlm")
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty")
        if self._mask_id is None:
            raise ValueError("the tokenizer has no mask token")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        ids, mask = self.tokenize([text])
        positions = np.flatnonzero(ids[0] == self._mask_id)
        if positions.size == 0:
            raise ValueError(f"no {self.config.mask_token} token in the text (after truncation to "
                             f"{self.config.max_length} tokens)")
        with self._blas_limit():
            h = _forward.encode(self.params, self.config, self._ffns, self._lin, ids, mask, None, self.n_threads)
            logits = _forward.mlm_head(self.params, self.config, h[0, positions], self.n_threads)  # (M, V)
        logits = logits.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)                                   # (M, V)
        k = min(int(top_k), probs.shape[1])
        result = []
        for row in probs:
            best = np.argsort(-row, kind="stable")[:k]
            result.append([(self.tokenizer.id_to_token(int(i)), float(row[i])) for i in best])
        return result

    # ------------------------------------------------------------------ misc
    def n_parameters(self):
        """Stored weight elements (the tied decoder counted once)."""
        return int(sum(a.size for a in self.params.values()))


# characters kept per model position before tokenizing (single texts; each text of a pair)
_CHARS_PER_POSITION, _CHARS_PER_POSITION_PAIR = 64, 16


class _Progress:
    """Progress on stderr: tqdm's bar when tqdm is installed, else a plain line at most every 2 seconds."""

    def __init__(self, total, unit):
        self.total, self.unit, self.done, self.t0, self.shown = total, unit, 0, time.perf_counter(), 0.0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit=f" {unit}", file=sys.stderr)

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.shown >= 2.0 or self.done == self.total:
            self.shown = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"{self.done}/{self.total} {self.unit} ({rate:.0f} {self.unit}/s)", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _quantized_linears(cfg, params):
    """name -> QuantizedLinear for the int8 weights of an int8 model (None for a float model)."""
    if cfg.quantize is None:
        return None
    shapes = kernel_param_shapes(dataclasses.replace(cfg, quantize=None))
    out = {}
    for name in quantized_weights(cfg):
        K, N = shapes[name]
        bias = params.get(name[:-len("weight")] + "bias")
        out[name] = QuantizedLinear(params[name + ".q8"], params[name + ".q8_scale"], params[name + ".q8_colsum"],
                                    bias, K, N)
    return out


def quantize_params(cfg, params, quantize):
    """(cfg, params) of the model quantized as asked: "int8" replaces each float weight of
    ``quantized_weights(cfg)`` by its packed int8 form; an int8 model stays int8; None changes nothing."""
    if quantize is None or cfg.quantize == quantize:
        return cfg, params
    params = dict(params)
    for name in quantized_weights(cfg):
        packed, scale, colsum = quantize_and_pack(params.pop(name))
        params.update({name + ".q8": packed, name + ".q8_scale": scale, name + ".q8_colsum": colsum})
    return dataclasses.replace(cfg, quantize=quantize), params


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# what a checkpoint folder holds that pyfff reads (config, weights, tokenizer, sentence-transformers pooling)
_HUB_FILES = ["*.json", "*.safetensors", "vocab.txt"]


def resolve(path):
    """A checkpoint folder for ``path``: the folder itself, or a Hugging Face Hub model id ("org/name") resolved
    through ``huggingface_hub`` (its local cache first; ``HF_HUB_OFFLINE=1`` never touches the network)."""
    path = os.fspath(path)
    if os.path.exists(path) or not _HUB_ID.match(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"no checkpoint folder at {path!r}; to load it as a Hugging Face Hub model id, "
                                "install huggingface_hub (pip install 'pyfff[hub]')") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else None)
    try:
        return snapshot_download(path, allow_patterns=_HUB_FILES, cache_dir=cache, local_files_only=offline)
    except Exception as exc:  # offline without a cached copy, unknown id, network errors: one clear message
        how = ("HF_HUB_OFFLINE is set and the local cache has no copy: download it where there is network "
               f"(huggingface-cli download {path}) and copy the cache, or pass a folder") if offline else (
               "check the id and the network, or pass a local folder")
        raise FileNotFoundError(f"no checkpoint folder at {path!r}, and the Hugging Face Hub model {path!r} could not "
                                f"be fetched ({type(exc).__name__}: {exc}); {how}") from None


def load(path, *, n_threads=None, quantize=None):
    """Load a checkpoint folder or a pyfff export.

    Parameters
    ----------
    path : str or os.PathLike
        A HuggingFace-format folder (``config.json`` + ``model.safetensors``
        [+ ``tokenizer.json``, ``modules.json``, ``1_Pooling/config.json``]) of
        a crammedBERT/UltraFastBERT or BERT model, a folder written by
        :func:`pyfff.export`, or a Hugging Face Hub model id such as
        ``"sentence-transformers/all-MiniLM-L6-v2"`` (needs ``huggingface_hub``:
        ``pip install 'pyfff[hub]'``; its cache is used, and ``HF_HUB_OFFLINE=1``
        uses only the cache).
    n_threads : int or None, default=None
        Threads of the forward pass (FFF kernels and BLAS together; BLAS is
        limited to one thread per worker during each call). None: all usable
        cores (honours OMP_NUM_THREADS and threadpoolctl limits); k > 0: k
        threads; -1: all CPUs.
    quantize : None or "int8", default=None
        "int8": quantize the dense projections (fused QKV, attention output,
        dense feed-forward) to int8 while loading (symmetric per output
        channel; activations are quantized per token at run time). A folder
        written by ``export(..., quantize="int8")`` is int8 whatever this says.
        FFF layers, embeddings, LayerNorm, attention scores and the heads stay
        float32.

    Returns
    -------
    model : Encoder

    Raises
    ------
    FileNotFoundError
        Missing folder or files.
    CheckpointError (a ValueError)
        Corrupt or truncated files, missing or misshapen tensors.
    NotImplementedError
        A config value pyfff does not implement (the message names the key).
    ValueError
        An unknown ``quantize`` value.
    """
    check_quantize(quantize)
    path = resolve(path)
    cfg, params, _ = read_folder(path)
    cfg, params = quantize_params(cfg, params, quantize)
    tokenizer = None
    tok_path = os.path.join(os.fspath(path), "tokenizer.json")
    if os.path.isfile(tok_path):
        tokenizer = load_tokenizer(tok_path)
    return Encoder(cfg, params, tokenizer=tokenizer, n_threads=n_threads, path=os.fspath(path))


def _new_file(parent, prefix, suffix, *, folder=False):
    """Create an empty file (or, with ``folder=True``, a folder) of a fresh name in ``parent``, with the
    permissions of the user's other new files (0666 / 0777 less the umask; ``tempfile.mkstemp`` and ``mkdtemp``
    would make them private, unreadable to others once renamed into place)."""
    while True:
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            if folder:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def export(src, dst, *, overwrite=False, quantize=None):
    """Write a kernel-ready copy of a checkpoint: ``model.safetensors`` + ``config.json`` (+ tokenizer files).

    The weights are stored in the layouts the encoder uses (fused QKV in
    [Q; K; V] blocks with the attention scale folded into Q, FFF output
    weights node-major, the sinusoid table precomputed, the tied decoder
    stored once), so :func:`load` maps them without per-tensor copies.

    Parameters
    ----------
    src : str or os.PathLike
        Anything :func:`load` reads.
    dst : str or os.PathLike
        Output folder; created. It must not exist or be empty unless
        ``overwrite`` is true.
    overwrite : bool, default=False
    quantize : None or "int8", default=None
        "int8": store the dense projections quantized and packed (about 4x
        smaller than float32; the model loads as int8). An int8 source stays
        int8.

    Returns
    -------
    dst : str
    """
    check_quantize(quantize)
    src, dst = resolve(src), os.fspath(dst)
    cfg, params, raw = read_folder(src)
    cfg, params = quantize_params(cfg, params, quantize)
    if os.path.islink(dst):
        raise FileExistsError(f"{dst!r} is a symbolic link: give the folder itself")
    if os.path.exists(dst):
        if os.path.realpath(dst) == os.path.realpath(src):
            raise ValueError("export destination is the source folder")
        if not os.path.isdir(dst):
            raise FileExistsError(f"{dst!r} exists and is not a folder")
        if os.listdir(dst) and not overwrite:
            raise FileExistsError(f"{dst!r} is not empty (pass overwrite=True, or --overwrite to pyfff export, to "
                                  "replace its files)")
    source = raw.get("source") if raw.get("format") == FORMAT else {"path": os.path.abspath(src), "config": raw}
    out_cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "pyfff_version": __version__,
               "encoder": cfg.to_dict(), "source": source}
    # Everything is written into a fresh folder beside dst, which then takes dst's place in one rename (an
    # atomic exchange with an existing dst where the OS has one): a crash at any point leaves the old export or
    # the new one, complete, under dst; nothing is written through symbolic links inside an old dst, and files
    # of an old export that the new one does not have go with it.
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = _new_file(parent, f".{os.path.basename(os.path.abspath(dst))}.pyfff-export-", "", folder=True)
    try:
        weights = _new_file(tmp, "model.", ".safetensors")
        write_safetensors(weights, params, {"format": FORMAT, "format_version": FORMAT_VERSION})
        os.replace(weights, os.path.join(tmp, "model.safetensors"))
        with open(_new_file(tmp, "config", ".json"), "w", encoding="utf-8") as fh:
            json.dump(out_cfg, fh, indent=1)
            fh.write("\n")
            name = fh.name
        os.replace(name, os.path.join(tmp, "config.json"))
        for side in _SIDE_FILES:
            f = os.path.join(src, side)
            if os.path.isfile(f):
                shutil.copyfile(f, os.path.join(tmp, side))
        _move_into_place(tmp, dst)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _exchange(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_into_place(new, dst):
    """Put folder ``new`` at ``dst``, replacing whatever folder is there."""
    if not os.path.exists(dst):
        os.rename(new, dst)                                   # atomic
        return
    if _exchange(new, dst):                                   # dst is the new export; new holds the old one
        shutil.rmtree(new, ignore_errors=True)
        return
    old = os.path.join(os.path.dirname(os.path.abspath(dst)),
                       f".{os.path.basename(os.path.abspath(dst))}.pyfff-old-{secrets.token_hex(8)}")
    os.rename(dst, old)                                       # without an exchange: a short window with no dst
    os.rename(new, dst)
    shutil.rmtree(old, ignore_errors=True)

