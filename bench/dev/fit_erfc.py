"""Fit (and check) the erfc polynomial of the vectorised float32 GELU in src/fff_kernels.h.

    erfc(a) = t * exp(P(2t - 1) - a**2),   t = 1 / (1 + a/2),   a >= 0

P is a Chebyshev least-squares fit of log(erfcx(a) / t) on t in (0, 1]
(erfcx(a) = exp(a**2) erfc(a) has no underflow).  The script prints P's
monomial coefficients in u = 2t - 1, highest first (the order of the C
table), then runs the C code's steps in NumPy float64 on float32 logits and
reports how many GELU values round to the same float as the float64
reference 0.5 z erfc(-z / sqrt 2), and the largest distance in ulps.

    python bench/dev/fit_erfc.py [--degree 14]
"""
import argparse
import math

import numpy as np
from scipy.special import erfc, erfcx


def fit(degree, n=4000):
    u = np.cos(np.pi * (np.arange(n) + 0.5) / n)  # Chebyshev nodes in (-1, 1)
    t = (u + 1) / 2
    a = 2 * (1 / t - 1)
    cheb = np.polynomial.chebyshev.chebfit(u, np.log(erfcx(a) / t), degree)
    return np.polynomial.chebyshev.cheb2poly(cheb)[::-1]  # highest degree first


def gelu_like_c(z, coef):
    """The C code's steps (float64 lanes), z a float64 array of float32 values."""
    x = z * 0.70710678118654752440
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * a)
    u = 2.0 * t - 1.0
    p = u * coef[0] + coef[1]
    for c in coef[2:]:
        p = p * u + c
    y = p - a * a
    tiny = y < -708.0
    y = np.where(tiny, -708.0, y)
    shifter = 6755399441055744.0
    kd = (y * 1.44269504088896340736 + shifter) - shifter
    r = (y - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10
    e = r * (1.0 / 39916800) + 1.0 / 3628800
    for c in (1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        e = e * r + c
    erfc_a = np.where(tiny, 0.0, t * e * np.exp2(kd))
    return 0.5 * z * np.where(x < 0, erfc_a, 2.0 - erfc_a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--degree", type=int, default=14)
    args = ap.parse_args()
    coef = fit(args.degree)
    print("P, highest degree first:")
    print(",\n".join(f"{c:.17e}" for c in coef))

    a = np.linspace(0, 26, 200001)
    t = 1 / (1 + 0.5 * a)
    u = 2 * t - 1
    rel = np.abs(t * np.exp(np.polyval(coef, u) - a * a) / erfc(a) - 1)
    print(f"max relative error of erfc on [0, 26]: {rel.max():.2e}")

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.uniform(-12, 12, 2_000_000), rng.uniform(-40, -30, 100_000)]).astype(np.float32)
    z64 = z.astype(np.float64)
    want = (0.5 * z64 * erfc(-z64 / math.sqrt(2.0))).astype(np.float32)
    got = gelu_like_c(z64, coef).astype(np.float32)
    ulps = np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want)).astype(np.float64)
    print(f"float32 GELU: {np.mean(got == want):.4%} equal to the float64 reference rounded, max {ulps.max():.0f} ulp")


if __name__ == "__main__":
    main()
