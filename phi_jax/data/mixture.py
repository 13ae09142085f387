"""Weighted mixtures of shard directories, interleaved by a deterministic index map.

Global example i of a mixture comes from source `s(i)` at that source's own index `n_s(i)` = how many earlier
examples came from s. Both are pure functions of i (`Interleave`), so the loader's state stays one integer (the
step times the global batch) and a resume is exact, on any number of processes. Each source is shuffled on its
own and repeats with a fresh permutation whenever it runs out, so sources of any size mix at the given weights.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

from phi_jax.paths import user_path


def parse_weights(text: str) -> list[float]:
    """"0.8,0.2" -> [0.8, 0.2]; every weight a finite number > 0."""
    weights = []
    for item in text.split(","):
        try:
            w = float(item)
        except ValueError:
            raise ValueError(f"Mixture weight {item.strip()!r} in {text!r} is not a number: give one weight per "
                             "source, e.g. --config.data.mixture_weights=0.8,0.2.") from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"Mixture weight {w} in {text!r} must be a finite number > 0: drop a source by "
                             "removing it from --config.data.path and its weight.")
        weights.append(w)
    return weights


def parse_paths(text: str) -> list:
    """"a,b" -> [epath.Path(a), epath.Path(b)], each given once."""
    paths = [p.strip() for p in text.split(",")]
    if any(not p for p in paths):
        raise ValueError(f"--config.data.path={text!r} has an empty entry: give shard directories separated by "
                         "commas.")
    resolved = [user_path(p) for p in paths]  # local (made absolute) or gs://
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"--config.data.path={text!r} names a directory twice: give each source once and set "
                         "its share with --config.data.mixture_weights.")
    return resolved


def source_names(paths: list[Path]) -> list[str]:
    """Metric names of the sources: their directory names, made unique by a position prefix where they clash."""
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]


def integer_proportions(weights: list[float]) -> tuple[int, ...]:
    """The smallest integers in the weights' ratio (weights read as decimals: 0.8, 0.2 -> 4, 1)."""
    fractions = [Fraction(repr(w)).limit_denominator(10**6) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    g = math.gcd(*ints)
    return tuple(n // g for n in ints)


class Interleave:
    """A grain selection map: global index -> (source, index within that source), O(sources) per lookup.

    Source s supplies p_s of every sum(p) examples: over any prefix of k examples its count is within two of
    k * p_s / sum(p) (within one for two sources), so the sources stay interleaved rather than in runs. Sources
    are peeled off one by one: of the k first examples, source 0 takes k - floor(k * (P - p_0) / P), the rest are
    shared among the others the same way (the rule grain's own `MapDataset.mix` uses; here the counts are also
    exposed for metrics).
    """

    def __init__(self, proportions: tuple[int, ...]):
        if not proportions or min(proportions) <= 0:
            raise ValueError(f"Mixture proportions {proportions} must be positive integers.")
        self.proportions = tuple(int(p) for p in proportions)

    def counts(self, k: int) -> list[int]:
        """How many of the global examples [0, k) each source supplies."""
        remaining, out = sum(self.proportions), []
        for p in self.proportions:
            rest = k * (remaining - p) // remaining
            out.append(k - rest)
            k, remaining = rest, remaining - p
        return out

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        before, after = self.counts(index), self.counts(index + 1)
        source = next(s for s, (a, b) in enumerate(zip(before, after, strict=True)) if b > a)
        return source, before[source]
