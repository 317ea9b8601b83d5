"""Pareto frontiers of quality against a cost: the recipes no other recipe beats on both."""

from __future__ import annotations


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated points, ordered by cost (x, lower is better).

    A point is dominated when another has cost ≤ and quality ≥ (≤ when lower is better), one of them
    strictly. Points with a missing coordinate (None) are never on the frontier.
    """
    valid = [i for i, (x, y) in enumerate(points) if x is not None and y is not None]

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    front = []
    for i in valid:
        xi, yi = points[i]
        dominated = any(
            points[j][0] <= xi and better_or_equal(points[j][1], yi) and (points[j][0] < xi or points[j][1] != yi)
            for j in valid if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1] if higher_is_better else points[i][1]))
