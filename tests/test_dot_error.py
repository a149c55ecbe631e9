"""The tf32 rounding model (xlx_fast.ops.dot_error) against a float64 simulation of truncation.

The interpreter computes tf32 dots as IEEE fp32, so the tf32 part of the model is checked by
simulation: operands truncated to tf32 bit by bit, products and sums in float64 (exact for the
products; the fp32 accumulation is covered by the n·2^-23 term and checked on the GPU).
"""
import pytest
import torch

from xlx_fast.ops.dot_error import gamma, truncate_tf32


def test_truncation_clears_the_low_13_bits_toward_zero():
    x = torch.tensor([1.0, 1.0 + 2.0 ** -10, 1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11), 3.0 - 2.0 ** -22,
                      1e-30, -0.0], dtype=torch.float32)
    t = truncate_tf32(x)
    assert t.tolist()[:5] == [1.0, 1.0 + 2.0 ** -10, 1.0, -1.0, 3.0 - 2.0 ** -9]
    assert torch.all(t.abs() <= x.abs())
    rel = ((t.double() - x.double()).abs() / x.double().abs().clamp_min(1e-300))
    assert torch.all(rel < 2.0 ** -10)


def simulated_tf32_dot_error(a, b):
    """|a'·b' - a·b| / sum |a_i b_i| per row, a' and b' truncated to tf32, float64 arithmetic."""
    exact = (a.double() * b.double()).sum(-1)
    trunc = (truncate_tf32(a).double() * truncate_tf32(b).double()).sum(-1)
    return (trunc - exact).abs() / (a.double() * b.double()).abs().sum(-1)


@pytest.mark.parametrize("n", [1, 7, 768, 2048])
def test_random_operands_within_the_truncation_bound(n):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(256, n, generator=g), torch.randn(256, n, generator=g)
    err = simulated_tf32_dot_error(a, b)
    assert torch.all(err <= gamma(n, "tf32"))


def test_worst_case_operands_break_the_rounding_model():
    """Operands whose low 13 bits are all set lose almost 2^-10 each: the product's error is near
    2·2^-10, beyond round-to-nearest's 2·2^-11 + n·2^-23 and within the truncation bound."""
    n = 2048
    a = torch.full((1, n), 1.0 + (2.0 ** 13 - 1) * 2.0 ** -23)  # 1.0011111111111 (binary)
    err = simulated_tf32_dot_error(a, a).item()
    rounding_model = 2 * 2.0 ** -11 + n * 2.0 ** -23
    assert rounding_model < err <= gamma(n, "tf32")
    assert err > 0.99 * 2 * 2.0 ** -10


def test_gamma_grows_with_n_and_refuses_unknown_precision():
    assert gamma(2048, "ieee") == 2048 * 2.0 ** -23
    assert gamma(2048, "tf32") - gamma(1, "tf32") == pytest.approx(2047 * 2.0 ** -23)
    assert gamma(2048, "tf32") > 2e-3  # tf32 dots carry about 3 decimal digits
    with pytest.raises(ValueError, match="precision"):
        gamma(8, "bf16")


def round_tf32(x):
    """fp32 -> tf32 rounded to nearest, ties away from zero (PTX ``cvt.rna.tf32.f32``)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def simulated_tf32x3_dot_error(a, b, split):
    """|a_S' b_B + a_B b_S' + a_B b_B - a·b| / sum |a_i b_i|: each operand split into a tf32 part
    (``split``: round_tf32 as Triton 3.6 does, or truncate_tf32) and its exact fp32 remainder,
    which the MMA truncates to tf32 again; products and sums in float64."""
    def parts(x):
        big = split(x)
        return big.double(), truncate_tf32(x - big).double()  # x - big is exact in fp32
    (ab, as_), (bb, bs) = parts(a), parts(b)
    got = (as_ * bb + ab * bs + ab * bb).sum(-1)
    exact = (a.double() * b.double()).sum(-1)
    return (got - exact).abs() / (a.double() * b.double()).abs().sum(-1)


@pytest.mark.parametrize("split", [round_tf32, truncate_tf32])
@pytest.mark.parametrize("n", [1, 7, 768, 2048])
def test_tf32x3_products_are_fp32_accurate(split, n):
    """The three-product split loses at most 3·2^-20 per product: within gamma(n, "tf32x3") on
    random operands and on operands whose low bits are all set (the worst case of both splits),
    and far below plain tf32's error on the latter."""
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(256, n, generator=g), torch.randn(256, n, generator=g)
    assert torch.all(simulated_tf32x3_dot_error(a, b, split) <= 3 * 2.0 ** -20)
    worst = torch.full((1, n), 1.0 + (2.0 ** 13 - 1) * 2.0 ** -23)
    err = simulated_tf32x3_dot_error(worst, worst, split).item()
    assert err <= 3 * 2.0 ** -20 <= gamma(n, "tf32x3") - 3 * n * 2.0 ** -23
    assert err < simulated_tf32_dot_error(worst, worst).item() / 100


def test_tf32x3_bound_sits_between_ieee_and_tf32():
    for n in (1, 768, 2048):
        assert gamma(n, "ieee") < gamma(n, "tf32x3") < gamma(n, "tf32")
