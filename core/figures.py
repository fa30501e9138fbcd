"""How a figure in the target's units (an MAE, an error) is written for people, whatever its scale."""

from __future__ import annotations

import math

SIGNIFICANT_DIGITS = 3


def figure(value: float, digits: int = SIGNIFICANT_DIGITS) -> str:
    """At least `digits` significant digits, thousands separated, never an exponent: an apartment price's
    MAE reads 8,148 and a rate's 0.0834, where a fixed number of decimals showed the rate's as 0 or 0.1."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"
