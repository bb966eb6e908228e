"""How reports write estimates: as many digits as the estimate's spread supports, intervals as [low, high], and a
KID below zero as what it is (estimator noise around 0, since the true squared MMD cannot be negative).

A spread is shown to two significant figures and the estimate to the same decimal place: 0.0362 ± 0.0203 reads
"0.036 ± 0.020", never "0.03621 ± 0.02" nor "0.1 ± 1e-16".
"""

from __future__ import annotations

import math

MINUS = "\u2212"
SIGNIFICANT = 2
# A spread this small against its value (or in absolute terms) is rounding error, not a spread worth writing.
NEGLIGIBLE_RELATIVE = 1e-9
NEGLIGIBLE_ABSOLUTE = 1e-12


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def decimals_for(spread: float, significant: int = SIGNIFICANT) -> int:
    """Decimal places that show `spread` to `significant` significant figures (at least 0)."""
    if not _finite(spread) or spread <= 0:
        raise ValueError(f"a spread must be a positive finite number, got {spread!r}")
    return max(0, significant - 1 - math.floor(math.log10(spread)))


def fixed(value: float, decimals: int, signed: bool = False) -> str:
    """`value` to `decimals` places with a typographic minus; a value that rounds to zero is '0.00', unsigned."""
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    if float(text) == 0:
        return f"{0.0:.{decimals}f}"
    return text.replace("-", MINUS)


def _negligible(value: float, spread: float) -> bool:
    return spread <= max(NEGLIGIBLE_ABSOLUTE, NEGLIGIBLE_RELATIVE * abs(value))


def plain(value, digits: int = 4) -> str:
    """A value with no spread to go by: `digits` significant figures."""
    if not _finite(value):
        return "–"
    return f"{value:.{digits}g}".replace("-", MINUS)


def mean_spread(mean, spread, significant: int = SIGNIFICANT) -> str:
    """'0.036 ± 0.020': the spread to `significant` figures, the mean to the same place; no '±' for no spread."""
    if not _finite(mean):
        return "–"
    if not _finite(spread) or _negligible(mean, abs(spread)):
        return plain(mean)
    decimals = decimals_for(abs(spread), significant)
    return f"{fixed(mean, decimals)} ± {fixed(abs(spread), decimals)}"


def kid_text(mean, std) -> str:
    """KID with its spread over subsets; a value within noise of 0 says so, a negative one reads as ≈ 0."""
    text = mean_spread(mean, std)
    if not _finite(mean):
        return text
    if not _finite(std) or _negligible(mean, abs(std)):
        text = f"{plain(mean, 2)}, one estimate: every subset held every image"
        return f"≈ 0 ({text}; below 0 only by estimator noise)" if mean < 0 else text
    if mean < 0:
        return f"≈ 0 ({text}, within estimator noise)"
    if _finite(std) and mean < 2 * std:
        return f"{text} (within estimator noise of 0)"
    return text


def interval_decimals(low, high, significant: int = SIGNIFICANT) -> int:
    """Decimal places for an estimate with interval [low, high]: its half-width to `significant` figures (3 places
    where the interval has no width)."""
    if not (_finite(low) and _finite(high)) or _negligible(max(abs(low), abs(high)), (high - low) / 2):
        return 3
    return decimals_for((high - low) / 2, significant)


def with_interval(mean, low, high, signed: bool = False, significant: int = SIGNIFICANT) -> str:
    """'0.23 [0.00, 0.74]'; the estimate alone (3 places) where there is no interval."""
    if not _finite(mean):
        return "–"
    if not (_finite(low) and _finite(high)):
        return fixed(mean, 3, signed)
    decimals = interval_decimals(low, high, significant)
    return f"{fixed(mean, decimals, signed)} [{fixed(low, decimals, signed)}, {fixed(high, decimals, signed)}]"


def p_text(value) -> str:
    if not _finite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"
