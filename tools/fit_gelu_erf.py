"""Fits the rational approximation of erf used by the CPU GELU kernel (csrc/cpu/gemm/bias_gelu.cpp) and prints its
coefficients; a development tool, run by hand (needs numpy): ``python tools/fit_gelu_erf.py``.

erf(z) ~= z * P(s) / Q(s) with s = (z / Z)^2 on 0 <= z <= Z, P of degree 5, Q of degree 5 with Q(0) = 1. Beyond
Z = 3.925, erf(z) rounds to 1 in fp32, so the kernel clamps its argument there. The fit minimizes the largest
absolute error: linearized least squares (z P(s) - erf(z) Q(s) ~ 0, divided by the previous Q) with weights
reweighted towards the largest errors, repeated until they settle. The kernel evaluates erf(x / sqrt(2)), so the
printed P is divided by sqrt(2) and takes x clamped to +-Z * sqrt(2).
"""

import math

import numpy as np

Z = 3.925
P_DEGREE, Q_DEGREE = 5, 5


def fit(iterations: int = 80):
    z = np.linspace(0.0, Z, 6000)[1:]
    s = (z / Z) ** 2
    target = np.array([math.erf(v) for v in z])
    q_values, weights = np.ones_like(s), np.ones_like(s)
    for _ in range(iterations):
        columns = [z * s**k for k in range(P_DEGREE + 1)] + [-target * s**k for k in range(1, Q_DEGREE + 1)]
        system = np.stack(columns, 1) / q_values[:, None]
        solution, *_ = np.linalg.lstsq(system * weights[:, None], target / q_values * weights, rcond=None)
        p, q = solution[: P_DEGREE + 1], np.concatenate([[1.0], solution[P_DEGREE + 1 :]])
        q_values = np.polyval(q[::-1], s)
        error = np.abs(z * np.polyval(p[::-1], s) / q_values - target)
        weights = weights * np.sqrt(error / error.max() + 1e-4)
        weights /= weights.max()
    return p, q, error.max()


def main() -> None:
    p, q, max_error = fit()
    if np.any(np.polyval(q[::-1], np.linspace(0.0, 1.0, 1001)) <= 0):
        raise SystemExit("Q has a root in [0, 1]: refit with other degrees")
    print(f"// fit error (float64) {max_error:.2e} on [0, {Z}]")
    print(f"constexpr float kErfClamp = {Z * math.sqrt(2.0):.9g}f;  // Z * sqrt(2)")
    print(f"constexpr float kErfScale = {1.0 / (2.0 * Z * Z):.9g}f;  // s = x^2 / (2 Z^2)")
    print("P (times 1 / sqrt(2)):", ", ".join(f"{c / math.sqrt(2.0):.9g}f" for c in p))
    print("Q:", ", ".join(f"{c:.9g}f" for c in q))


if __name__ == "__main__":
    main()
