"""Size limits of the FFF layer that are too big to build for real."""
import numpy as np
import pytest

from pyfff import FFF
from pyfff.fff import MAX_ROWS


def test_more_rows_than_int32_is_refused_before_any_copy():
    # A zero-stride view: 2**31 rows of width 1 without allocating them.
    w = np.broadcast_to(np.float32(0), (MAX_ROWS + 1, 1))
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS}"):
        FFF(w, None, w)
