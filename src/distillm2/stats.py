"""The statistics of a method comparison: means with 95% intervals over seeds, and a paired
test of two methods over prompts.

With few seeds (3 here) the interval over seeds is Student's t interval of the mean. The paired
test compares two methods on the same prompts: per prompt the difference of their scores
(averaged over seeds), then a bootstrap over prompts (resampled with replacement) gives the 95%
interval of the mean difference and a two-sided p-value (twice the share of resampled means on
the far side of zero).
"""

from __future__ import annotations

import math

import torch

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% t interval (low = high = mean for one value)."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = (_T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_bootstrap(a: list[float], b: list[float], samples: int = 5000, seed: int = 0) -> dict:
    """Mean of a - b over paired items, its 95% bootstrap interval and a two-sided p-value."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: need two equally long non-empty lists, got {len(a)} and {len(b)}")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(0, len(diff), (samples, len(diff)), generator=gen)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    p = 2 * min(float((means <= 0).double().mean()), float((means >= 0).double().mean()))
    return {"mean_diff": float(diff.mean()), "ci95": [low, high], "p_value": min(1.0, p), "n": len(a)}
