"""pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", section 2.1) and standard errors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed as
    the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays exact in floating point for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(count)); None for fewer than two values,
    as lm-eval reports it."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        raise ValueError("No values to average.")
    if len(values) < 2:
        return float(values.mean()), None
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
