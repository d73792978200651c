"""Host-side launch arithmetic shared by the Triton op modules, in plain Python: newer
Triton versions wrap `triton.cdiv` / `triton.next_power_of_2` as constexpr functions that
cost microseconds per call on the launch path. No kernels and no torch work here."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
