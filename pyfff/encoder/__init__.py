"""NumPy transformer encoder for UltraFastBERT (crammedBERT + FFF) and BERT checkpoints.

>>> import pyfff
>>> model = pyfff.load("UltraFastBERT-1x11-long/")          # doctest: +SKIP
>>> ids, mask = model.tokenize(["The capital of France is <mask>."])  # doctest: +SKIP
>>> h = model.hidden_states(ids, mask)                      # (B, S, H)  # doctest: +SKIP

The forward pass follows ``ultrafastbert-spec.md`` (crammedBERT) and
HuggingFace's ``BertModel`` (BERT). Dense parts run on NumPy's BLAS, FFF
layers on :class:`pyfff.FFF`. See ``docs/encoder.md``.
"""
from ._checkpoint import EncoderConfig
from ._model import Encoder, export, load
from ._safetensors import CheckpointError

__all__ = ["CheckpointError", "Encoder", "EncoderConfig", "export", "load"]
