"""Memory sizes as the user writes them: 32GB (10^9 bytes), 24GiB (2^30), or a bare number of GB."""

from __future__ import annotations

import re

from quantlab.errors import UsageError

GB = 10**9
_UNITS = {"": GB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": GB, "t": 10**12}


def parse_size(text: str) -> int:
    """'32GB' -> 32e9 bytes (GB is 10^9; GiB is 2^30); a bare number is GB. A size under one byte (0, 0MiB)
    budgets nothing: refused."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise UsageError(f"'{text}' is not a memory size — write e.g. 32GB, 24GiB or 80")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise UsageError(f"'{text}' is no memory at all — give a positive size, e.g. 32GB, 24GiB or 80")
    return size
