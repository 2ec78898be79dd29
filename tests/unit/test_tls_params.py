"""The Diffie-Hellman parameters the agent writes for QEMU's TLS server credentials are
RFC 7919's ffdhe2048 group, recomputed here from the RFC's definition:
p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1, g = 2."""

from __future__ import annotations

import base64

from pairvol.qemu import recipes as r


def _floor_e_times_2_to(bits: int) -> int:
    """floor(e * 2^bits), exactly: the series sum of 1/k! in fixed point with guard bits."""
    guard = 64
    one = 1 << (bits + guard)
    total, term, k = 0, one, 0
    while term:
        total += term
        k += 1
        term //= k
    return total >> guard


def _der_integers(der: bytes) -> list[int]:
    """The INTEGERs of a DER SEQUENCE (enough DER for PKCS#3 DHParameter)."""

    def length(buf: bytes, i: int) -> tuple[int, int]:
        first = buf[i]
        if first < 0x80:
            return first, i + 1
        n = first & 0x7F
        return int.from_bytes(buf[i + 1 : i + 1 + n], "big"), i + 1 + n

    assert der[0] == 0x30
    end_len, i = length(der, 1)
    assert i + end_len == len(der)
    values = []
    while i < len(der):
        assert der[i] == 0x02
        n, i = length(der, i + 1)
        values.append(int.from_bytes(der[i : i + n], "big"))
        i += n
    return values


def test_the_dh_parameters_are_rfc7919_ffdhe2048() -> None:
    body = "".join(line for line in r.FFDHE2048_PEM.splitlines() if not line.startswith("-----"))
    lines = r.FFDHE2048_PEM.strip().splitlines()
    assert (lines[0], lines[-1]) == ("-----BEGIN DH PARAMETERS-----", "-----END DH PARAMETERS-----")
    p, g = _der_integers(base64.b64decode(body))
    expected = 2**2048 - 2**1984 + (_floor_e_times_2_to(1918) + 560316) * 2**64 - 1
    assert p == expected
    assert g == 2
