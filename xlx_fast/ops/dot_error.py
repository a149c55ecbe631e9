"""Worst-case error of a dot product as the Triton kernels compute it, per input precision.

Rounding model. A kernel computes ``a·b = sum_i a_i b_i`` over ``n`` terms with fp32 accumulation:

- ``"ieee"`` (fp32 operands, FMA units) and fp16/bf16 operands (tensor cores): every product is
  exact in fp32 (11x11 or 8x8 significand bits fit in 24), so the only error is the accumulation.
- ``"tf32"`` (fp32 operands on tensor cores): Triton hands the raw fp32 registers to the tf32 MMA
  (its PTX has no ``cvt.rna.tf32.f32``), and the hardware ignores the low 13 significand bits:
  each operand is TRUNCATED to 10 explicit bits, ``a' = a (1 - d_a)`` with ``0 <= d_a < 2^-10``
  (not ``|d_a| <= 2^-11`` as round-to-nearest would give). The product of two tf32 values is
  exact in fp32, so ``a'b' = ab (1 - d)`` with ``0 <= d < 2^-9 + 2^-20``.
- ``"tf32x3"`` (fp32 operands, three tf32 MMAs): Triton splits each operand into a tf32 "big"
  part and the exact fp32 remainder, ``a = a_B + a_S``, and sums ``a_S b_B + a_B b_S + a_B b_B``
  (dropping ``a_S b_S``). Triton 3.6 rounds ``a_B`` to nearest (``cvt.rna.tf32.f32``), so
  ``|a_S| <= 2^-11 |a|``; the bound below allows truncation (``|a_S| < 2^-10 |a|``) as well, so it
  holds whichever way a Triton version splits. The MMA truncates ``a_S`` again (relative
  ``2^-10`` of ``a_S``): the dropped ``a_S b_S`` and the two truncations give at most
  ``3 · 2^-20 |ab|`` per product, about fp32's own rounding, at three times tf32's work.

Accumulation: tensor-core adders align to the largest exponent and truncate, so each addition is
charged the round-toward-zero unit ``2^-23`` (twice fp32's round-to-nearest ``u = 2^-24``, which
bounds the FMA path); ``n`` terms summed in any order then give at most ``n · 2^-23`` relative to
``sum_i |a_i b_i|`` (first order; the ``O(n^2 u^2)`` term is far below it for n < 10^6).

Bound. ``|fl(a·b) - a·b| <= gamma(n, precision) · sum_i |a_i b_i|`` with::

    gamma(n, "ieee") = n · 2^-23
    gamma(n, "tf32") = 2·2^-10 + 2^-20 + n · 2^-23
    gamma(n, "tf32x3") = 3·2^-20 + 3n · 2^-23 · (1 + 2^-9)

For n = 2048 (a codebook feature) tf32 gives 2.2e-3 of ``sum |a_i b_i|``, of which the operand
truncation is 1.95e-3: tf32 dot products are accurate to about 3 decimal digits, not 4. tf32x3
gives 7.3e-4 (the worst case of three times as many additions; its products are as good as
fp32's), against 2.4e-4 for IEEE fp32.
"""
from __future__ import annotations

__all__ = ["PRECISIONS", "TF32_TRUNCATION", "ACCUMULATION_UNIT", "gamma", "truncate_tf32"]

PRECISIONS = ("ieee", "tf32", "tf32x3")  # what tl.dot takes for fp32 operands

TF32_TRUNCATION = 2.0 ** -10   # relative error of one operand truncated to tf32
ACCUMULATION_UNIT = 2.0 ** -23  # per fp32 addition, round toward zero (covers nearest, too)


def gamma(n: int, precision: str) -> float:
    """Coefficient of ``sum_i |a_i b_i|`` bounding the error of an n-term dot product."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    acc = n * ACCUMULATION_UNIT
    t = TF32_TRUNCATION
    if precision == "ieee":
        return acc
    if precision == "tf32x3":
        return 3 * t * t + 3 * acc * (1 + 2 * t)  # 3·2^-20 + 3n·2^-23·(1 + 2^-9)
    return 2 * t + t * t + acc


def truncate_tf32(x):
    """fp32 tensor -> the tf32 value the tensor cores use (low 13 significand bits cleared),
    returned as float32: a reference for what a tf32 MMA sees."""
    import torch

    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)
