"""The allocation solver: exact on small hand-made cases, never over the budget, refusing what cannot fit."""

from __future__ import annotations

import itertools

import pytest

from quantlab.errors import UsageError
from quantlab.fit.allocate import Option, Unit, allocate, smallest_budget

W4, W8, FP = "gptq-w4-g64", "gptq-w8", "fp"


def _units(rows):
    return [Unit(f"u{i}", tuple(Option(f, b, k) for f, b, k in opts)) for i, opts in enumerate(rows)]


def _brute(units, budget, fixed):
    """Every combination, by enumeration."""
    best = None
    for combo in itertools.product(*(u.options for u in units)):
        size = fixed + sum(o.bytes for o in combo)
        kld = sum(o.kld for o in combo)
        if size <= budget and (best is None or kld < best[0] - 1e-12):
            best = (kld, size)
    return best


def test_hand_made_case_picks_the_sensitive_unit_for_more_bits():
    # two units of 100 bytes at 4 bits / 200 at 8; u0 is ten times as sensitive. 300 bytes fit one at 8 bits:
    # u0's (KLD 0.1 + 0.05) beats u1's (1.0 + 0.005).
    units = _units([[(W4, 100, 1.0), (W8, 200, 0.1)], [(W4, 100, 0.05), (W8, 200, 0.005)]])
    a = allocate(units, 300)
    assert a.formats == {"u0": W8, "u1": W4} and a.bytes == 300 and a.kld == pytest.approx(0.15)
    assert allocate(units, 399).formats == {"u0": W8, "u1": W4}  # one byte short of both at 8 bits
    assert allocate(units, 400).formats == {"u0": W8, "u1": W8}


@pytest.mark.parametrize("seed", range(12))
def test_the_solver_is_exact_and_never_over_the_budget(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(int(rng.integers(2, 6))):
        n4, n8 = (int(x) for x in rng.integers(50_000, 5_000_000, 2))
        k4 = float(rng.exponential(0.1))
        rows.append([(W4, n4, k4), (W8, n4 + n8, k4 * float(rng.uniform(0.01, 0.3))), (FP, 4 * (n4 + n8), 0.0)])
    units, fixed = _units(rows), int(rng.integers(0, 10_000_000))
    low, high = smallest_budget(units, fixed), fixed + sum(o.bytes for u in units for o in u.options if o.format == FP)
    for budget in np.linspace(low, high, 7).astype(int):
        a = allocate(units, int(budget), fixed)
        kld, _ = _brute(units, int(budget), fixed)
        assert a.bytes <= budget and a.kld == pytest.approx(kld, abs=1e-12)
        assert a.bytes == fixed + sum(next(o.bytes for o in u.options if o.format == a.formats[u.name]) for u in units)


def test_at_a_uniform_recipes_bytes_the_fit_is_no_worse_than_it():
    units = _units([[(W4, 100, 0.3), (W8, 180, 0.01)], [(W4, 300, 0.1), (W8, 540, 0.02)],
                    [(W4, 50, 0.9), (W8, 90, 0.05)]])
    for fmt in (W4, W8):
        size = 7 + sum(o.bytes for u in units for o in u.options if o.format == fmt)
        uniform = sum(o.kld for u in units for o in u.options if o.format == fmt)
        a = allocate(units, size, fixed_bytes=7)
        assert a.bytes <= size and a.kld <= uniform + 1e-12
    assert allocate(units, 7 + 100 + 300 + 50 + 40, 7).formats["u2"] == W8  # 40 spare bytes: the cheap, sensitive unit


def test_a_budget_no_allocation_meets_is_refused_with_the_smallest_that_can_be():
    units = _units([[(W4, 100, 1.0), (W8, 200, 0.1)], [(W4, 100, 0.05), (W8, 200, 0.005)]])
    assert smallest_budget(units, 10) == 210
    with pytest.raises(UsageError, match="No allocation fits 209 bytes: the smallest that can be met is 210 bytes"):
        allocate(units, 209, fixed_bytes=10)
    assert allocate(units, 210, fixed_bytes=10).bytes == 210
