"""Order statistics for the bench: pure functions, no IO."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

#: Quantiles kept from each RR run for the latency-distribution plot.
CDF_POINTS = 64


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100), at least 1
    return float(sorted_values[min(int(rank), len(sorted_values)) - 1])


def cdf(sorted_values: Sequence[float], points: int = CDF_POINTS) -> list[float]:
    """``points`` values at evenly spaced quantiles 0..1 (min .. max): a compact CDF."""
    if not sorted_values:
        return []
    last = len(sorted_values) - 1
    return [float(sorted_values[round(last * i / (points - 1))]) for i in range(points)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median across runs: 0.05 means the runs agree within 5 %."""
    if not values:
        return 0.0
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else 0.0
