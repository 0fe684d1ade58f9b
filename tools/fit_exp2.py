"""Fits the polynomial for 2^f used by the bf16 attention core's softmax (csrc/cpu/attention/attention_bf16.cpp) and prints its
coefficients; a development tool, run by hand (needs numpy): ``python tools/fit_exp2.py``.

2^f ~= P(f) on -1/2 <= f <= 1/2, P of degree 5; the kernel computes 2^t as P(t - round(t)) scaled by 2^round(t).
The fit minimizes the largest relative error: least squares weighted by 1 / 2^f, with the weights reweighted
towards the largest errors (Lawson's iteration) until they settle. Prints the coefficients rounded to fp32 and the
largest relative error of P evaluated in fp32 by Horner's rule.
"""

import numpy as np

DEGREE = 5


def fit(iterations: int = 200) -> np.ndarray:
    count = 4000
    f = 0.5 * np.cos(np.pi * (np.arange(count) + 0.5) / count)  # Chebyshev nodes: dense near the ends
    target = np.exp2(f)
    system = np.vander(f, DEGREE + 1, increasing=True) / target[:, None]
    weights = np.ones_like(f)
    for _ in range(iterations):
        coefficients, *_ = np.linalg.lstsq(system * np.sqrt(weights)[:, None], np.sqrt(weights), rcond=None)
        error = np.abs(system @ coefficients - 1.0)
        weights = weights * (error + 1e-30)
        weights /= weights.sum()
    return coefficients.astype(np.float32)


def fp32_relative_error(coefficients: np.ndarray) -> float:
    f = np.linspace(-0.5, 0.5, 400_001, dtype=np.float32)
    value = np.full_like(f, coefficients[-1])
    for c in coefficients[-2::-1]:
        value = (value * f + c).astype(np.float32)
    return float(np.max(np.abs(value.astype(np.float64) / np.exp2(f.astype(np.float64)) - 1.0)))


if __name__ == "__main__":
    coefficients = fit()
    print("coefficients (f^0 first):", ", ".join(f"{c!r}f" for c in coefficients.tolist()))
    print(f"largest relative error evaluated in fp32: {fp32_relative_error(coefficients):.3g}")
