"""Timing helper of the GPU experiments in bench/dev: the best of several CUDA-event timings of one call."""


def best_us(fn, repeats=20):
    """Best time of ``fn()`` in microseconds, each call between two CUDA events, after one warm-up call."""
    import cupy as cp

    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) * 1e3)
    return best
