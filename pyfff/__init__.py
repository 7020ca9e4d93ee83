"""pyfff: fast feedforward (FFF) network inference on the CPU.

>>> import numpy as np
>>> from pyfff import FFF
>>> layer = FFF.random(768, 768, depth=11)
>>> y = layer(np.zeros((4, 768), np.float32))      # (4, 768)
"""
from ._config import __version__, show_config
from .fff import FFF
from .encoder import load, export

__all__ = ["FFF", "__version__", "export", "load", "show_config"]
