"""``fused_linear`` against its float64 formula, every backend, dtype and epilogue, on awkward
sizes, with the output poisoned first (SPEC §4); the torch backend bit for bit against HF's own
modules; bad input refused naming the argument."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LxmertConfig
from transformers.models.lxmert.modeling_lxmert import (LxmertIntermediate, LxmertOutput,
                                                        LxmertPredictionHeadTransform)

from xlx_fast.ops import registry
from xlx_fast.ops.fused_linear import (feed_forward, fused_linear, linear_add_layernorm,
                                       linear_gelu, linear_gelu_layernorm)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (M, K, N): a batch-1 step's 64 rows at odd widths, a single row, a ragged block edge
SHAPES = ((64, 40, 24), (1, 33, 17), (37, 72, 96))
EPILOGUES = {  # name -> keyword arguments beyond x, W, b
    "bias": {},
    "gelu": {"activation": "gelu"},
    "add_layernorm": {"residual": True, "layernorm": True},
    "gelu_layernorm": {"activation": "gelu", "layernorm": True},
    "gelu_add": {"activation": "gelu", "residual": True},
}


def formula(x, w, b, residual=None, ln=None, activation="none", eps=1e-12):
    """The op's math in float64."""
    y = x.double() @ w.double().t() + b.double()
    if activation == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    if residual is not None:
        y = y + residual.double()
    if ln is not None:
        mean = y.mean(-1, keepdim=True)
        var = ((y - mean) ** 2).mean(-1, keepdim=True)
        y = (y - mean) / torch.sqrt(var + eps) * ln[0].double() + ln[1].double()
    return y


def inputs(m, k, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g)
    ln = (1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g))
    to = lambda t: t.to(device, dtype)  # noqa: E731
    return to(x), to(w), to(b), to(r), (to(ln[0]), to(ln[1]))


def _call(backend, epilogue, x, w, b, r, ln):
    kw = dict(EPILOGUES[epilogue])
    residual = r if kw.pop("residual", False) else None
    layernorm = kw.pop("layernorm", False)
    out = fused_linear(x, w, b, residual=residual, ln_weight=ln[0] if layernorm else None,
                       ln_bias=ln[1] if layernorm else None, eps=1e-5, backend=backend, **kw)
    ref = formula(x, w, b, residual, ln if layernorm else None, kw.get("activation", "none"), 1e-5)
    return out, ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_float64_formula(backend, epilogue, dtype, shape, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, w, b, r, ln = inputs(*shape, dtype, device)
    out, ref = _call(backend, epilogue, x, w, b, r, ln)
    assert out.dtype == dtype and out.shape == ref.shape
    err = ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()
    assert err <= registry.tolerance("fused_linear", backend, dtype), err


@pytest.mark.parametrize("layernorm", [False, True])
def test_every_element_is_written(layernorm, kernel_device):
    # each backend writes into the op's output buffer: poisoned with NaN, none may survive
    # (rows and columns that are not multiples of any block)
    x, w, b, r, ln = inputs(37, 72, 96, torch.float32, kernel_device, seed=3)
    for backend in ("triton", "torch"):
        impl = registry.select_impl("fused_linear", kernel_device, torch.float32, force=backend).impl
        out = torch.full((37, 96), float("nan"), device=kernel_device)
        g, beta = ln if layernorm else (None, None)
        impl(x, w, b, r, g, beta, "gelu", 1e-5, out)
        assert torch.isfinite(out).all(), backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_feed_forward_matches_the_float64_formula(backend, dtype, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, w_in, b_in, _, ln = inputs(37, 40, 72, dtype, device, seed=5)
    g = torch.Generator().manual_seed(6)
    w_out = (torch.randn(40, 72, generator=g) / math.sqrt(72)).to(device, dtype)
    b_out = torch.randn(40, generator=g).to(device, dtype)
    ln = tuple(t[:40] for t in inputs(37, 40, 40, dtype, device, seed=7)[4])
    out = feed_forward(x.view(1, 37, 40), w_in, b_in, w_out, b_out, *ln, 1e-5, backend=backend)
    h = formula(x, w_in, b_in, activation="gelu")
    ref = formula(h, w_out, b_out, residual=x, ln=ln, eps=1e-5)
    assert out.shape == (1, 37, 40) and out.dtype == dtype
    err = ((out.view(37, 40).double().cpu() - ref.cpu()).norm() / ref.norm()).item()
    assert err <= 2 * registry.tolerance("fused_linear", backend, dtype), err


def test_torch_backend_is_hf_bit_for_bit():
    # on a CPU the fused op replaces HF's modules inside the step: same arithmetic, same bits
    cfg = LxmertConfig(hidden_size=48, intermediate_size=80, num_attention_heads=2)
    torch.manual_seed(1)
    inter, output, head = LxmertIntermediate(cfg).eval(), LxmertOutput(cfg).eval(), \
        LxmertPredictionHeadTransform(cfg).eval()
    x = torch.randn(3, 11, 48)
    with torch.no_grad():
        h = inter(x)
        assert torch.equal(linear_gelu(x, inter.dense.weight, inter.dense.bias), h)
        assert torch.equal(
            linear_add_layernorm(h, output.dense.weight, output.dense.bias, x,
                                 output.LayerNorm.weight, output.LayerNorm.bias, output.LayerNorm.eps),
            output(h, x))
        assert torch.equal(
            feed_forward(x, inter.dense.weight, inter.dense.bias, output.dense.weight,
                         output.dense.bias, output.LayerNorm.weight, output.LayerNorm.bias,
                         output.LayerNorm.eps),
            output(h, x))
        assert torch.equal(
            linear_gelu_layernorm(x, head.dense.weight, head.dense.bias, head.LayerNorm.weight,
                                  head.LayerNorm.bias, head.LayerNorm.eps),
            head(x))


def test_is_a_custom_op_that_compiles_without_a_break():
    x, w, b, r, ln = inputs(5, 8, 6, torch.float32, "cpu")
    seen = []

    def backend(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(lambda x: linear_add_layernorm(x, w, b, r, ln[0], ln[1], 1e-5),
                       backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(x), linear_add_layernorm(x, w, b, r, ln[0], ln[1], 1e-5))
    assert "xlx_fast.fused_linear" in seen
    torch.library.opcheck(torch.ops.xlx_fast.fused_linear.default,
                          (x, w, b, r, ln[0], ln[1], "gelu", 1e-5, "torch"))


@pytest.mark.parametrize("call, match", [
    (lambda x, w, b: fused_linear(x.double(), w, b), "x must be float32"),
    (lambda x, w, b: fused_linear(x, w.half(), b), "weight must be float32"),
    (lambda x, w, b: fused_linear(x, w[:, :3], b), r"weight must have shape \[\*, 8\]"),
    (lambda x, w, b: fused_linear(x, w, b[:2]), r"bias must have shape \[6\]"),
    (lambda x, w, b: fused_linear(x, w.t().contiguous().t(), b), "weight's last dimension"),
    (lambda x, w, b: fused_linear(x, w, b, residual=torch.zeros(5, 5)), r"residual must have shape"),
    (lambda x, w, b: fused_linear(x, w, b, ln_weight=torch.ones(6)), "ln_weight and ln_bias"),
    (lambda x, w, b: fused_linear(x, w, b, activation="relu"), "activation must be one of"),
    (lambda x, w, b: fused_linear(x, w, b, eps=0.0), "eps must be a number > 0"),
    (lambda x, w, b: fused_linear(x[:0], w, b), "x must be non-empty"),
    (lambda x, w, b: fused_linear(x, w, b, backend="cuda"), "fused_linear backend must be one of"),
    (lambda x, w, b: feed_forward(x, w, b, w, b, b, b, 1e-5), r"w_out must have shape \[8, 6\]"),
    (lambda x, w, b: feed_forward(x, w, b, w.t().contiguous(), b, b, b, 1e-5), r"b_out must have shape \[8\]"),
])
def test_bad_input_names_the_argument(call, match):
    x, w, b, *_ = inputs(5, 8, 6, torch.float32, "cpu")
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, w, b)


def test_the_registry_explains_the_choice():
    cpu = registry.explain("fused_linear", "cpu", torch.float32)
    assert cpu["runs"] == "torch"
    triton_row = next(r for r in cpu["backends"] if r["backend"] == "triton")
    assert not triton_row["usable"] and triton_row["why_not"]
