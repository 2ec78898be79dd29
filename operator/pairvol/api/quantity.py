"""Kubernetes resource quantities ("1Gi", "500M", "1e9", 1073741824) as integer bytes.

The CRD declares ``spec.size`` as int-or-string, exactly like ``resources.requests.storage``,
so users write what they are used to. The API server does not normalise the value for
custom resources, so we must parse it ourselves — strictly: a volume size that is not a
whole number of bytes is an error, not something to round.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact

from pairvol.errors import PairvolError

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}

_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)"
    r"|[eE](?P<exp>[+-]?\d+))?$"
)
_FRACTIONS = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3")}
_MAX_EXPONENT = 30  # the API server's own limit is higher; no byte count needs more
# Arithmetic that never rounds silently: a rounded huge value could pass as whole bytes.
_EXACT = Context(prec=120, traps=[Inexact])


class QuantityError(PairvolError, ValueError):
    """A value is not a valid Kubernetes quantity of whole bytes."""


def parse_quantity(text: str) -> Decimal:
    """The exact value of a Kubernetes quantity string, as ``resource.ParseQuantity`` reads it.

    Signed decimal, then one suffix: binary (``Ki`` .. ``Ei``), decimal (``n u m k M G T
    P E``) or an exponent (``e3``, ``E-2``). No whitespace. ``"1.5Ki"`` is 1536,
    ``"1e3"`` is 1000, ``"100m"`` is 0.1.
    """
    m = _QUANTITY.match(text)
    if not m:
        raise QuantityError(
            f"{text!r} is not a Kubernetes quantity; write e.g. '64Mi', '1Gi', '500M' or a plain number of bytes"
        )
    number = Decimal(m.group("num"))
    suffix, exp = m.group("suffix"), m.group("exp")
    if exp is not None and abs(int(exp)) > _MAX_EXPONENT:
        raise QuantityError(f"{text!r}: exponent out of range")
    try:
        if suffix in _FRACTIONS:
            return _EXACT.multiply(number, _FRACTIONS[suffix])
        if suffix in BINARY:
            return _EXACT.multiply(number, BINARY[suffix])
        if suffix is not None:
            return _EXACT.multiply(number, DECIMAL[suffix])
        if exp is not None:
            return _EXACT.scaleb(number, int(exp))
        return _EXACT.plus(number)
    except Inexact:
        raise QuantityError(f"{text!r} has too many digits") from None


def parse_bytes(value: object) -> int:
    """Parse a quantity into a whole, non-negative number of bytes.

    >>> parse_bytes("1Gi"), parse_bytes("1k"), parse_bytes(512), parse_bytes("1e3")
    (1073741824, 1000, 512, 1000)
    """
    if isinstance(value, bool):
        raise QuantityError(f"quantity must be a number or a string like '1Gi', not {value!r}")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, str):
        number = parse_quantity(value.strip())
    else:
        raise QuantityError(f"quantity must be a number or a string like '1Gi', not {value!r}")
    if number != number.to_integral_value():
        raise QuantityError(f"{value!r} is not a whole number of bytes")
    if number < 0:
        raise QuantityError(f"{value!r} is negative")
    return int(number)


def format_bytes(n: int) -> str:
    """The shortest exact binary-suffixed spelling: 1073741824 -> '1Gi'."""
    for suffix, factor in reversed(BINARY.items()):
        if n and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)
