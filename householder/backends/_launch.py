"""Host-side helpers of the Triton launchers: the interpreter flag and integer tile arithmetic.

In plain Python because the launchers run them on every call: Triton 3.9's triton.cdiv and
triton.next_power_of_2 are constexpr functions, about 15 us a call on the host (a delta-rule
forward made 8 such calls, against about 200 us of its launchers' Python in all on a 2-core CPU).
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Read once: Triton itself decides when its kernels are defined (at import), and the launchers
    ask on every call (reading the environment cost about 7 us each time on a 2-core CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()
