"""xlx_fast.ops.attention against HF's eager LxmertAttention formula evaluated in float64.

The Triton kernel runs through the interpreter on CPU tensors (conftest sets TRITON_INTERPRET),
with 16x16 tiles so that the short test lengths still span several query and key tiles.
"""
import math

import pytest
import torch

from xlx_fast.ops import _common
from xlx_fast.ops import attention as attn_mod
from xlx_fast.ops.registry import select_impl, tolerance
from xlx_fast.ops.attention import attention, attention_sdpa, attention_triton
from xlx_fast.ops.dot_error import gamma, truncate_tf32

FP32_MIN = torch.finfo(torch.float32).min
# The interpreter's numpy warns where the kernel relies on IEEE overflow (huge bias · log2 e -> -inf,
# then clamped) and about its own scalar conversions.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# what both backends declare in the registry (SPEC §4)
TOL = {dt: max(tolerance("attention", b, dt) for b in ("triton", "sdpa")) for dt in DTYPES}


def reference(q, k, v, mask, num_heads):
    """HF LxmertAttention.forward's math in float64 (extended mask added to the scaled scores)."""
    B, Lq, width = q.shape
    d = width // num_heads

    def heads(t):
        return t.double().unflatten(-1, (num_heads, d)).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        if mask.dtype.is_floating_point:
            ext = mask.double().clamp_min(FP32_MIN)
        else:  # HF: (1 - mask) * finfo.min, in fp32
            ext = (1.0 - (mask != 0).double()[:, None, None, :]) * FP32_MIN
        scores = scores + ext
    out = torch.softmax(scores, dim=-1) @ heads(v)
    return out.transpose(1, 2).flatten(2)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_inputs(B, H, d, Lq, Lk, dtype, *, fused, mask_kind, seed=0, device="cpu"):
    """q, k, v (column slices of one fused projection output when ``fused``) and a mask with a
    different number of padded keys in every batch row (row 0 keeps all keys)."""
    g = torch.Generator().manual_seed(seed)
    width = H * d
    if fused:  # self-attention layout: q, k, v are column slices of one (B, L, 3·H·d) GEMM output
        assert Lq == Lk
        qkv = torch.randn(B, Lq, 3 * width, generator=g).to(dtype)
        q, k, v = qkv.split(width, dim=-1)
    else:  # cross layout: q from one GEMM, k/v column slices of another
        q = torch.randn(B, Lq, width, generator=g).to(dtype)
        kv = torch.randn(B, Lk, 2 * width, generator=g).to(dtype)
        k, v = kv.split(width, dim=-1)
    keep = torch.ones(B, Lk, dtype=torch.bool)
    for b in range(1, B):
        keep[b, max(1, Lk - (b * Lk) // B):] = False  # at least one key left per row
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool":
        mask = keep
    elif mask_kind == "int":
        mask = keep.to(torch.int64)
    elif mask_kind == "extended":  # exactly what LxmertModel.forward builds, in the model dtype
        mask = (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    else:
        raise AssertionError(mask_kind)
    q, k, v = (t.to(device) for t in (q, k, v))
    return q, k, v, (None if mask is None else mask.to(device))


# (B, H, d, Lq, Lk, fused QKV layout, mask kind): every listed length appears; odd B·H exercises
# the tail of the several-(b, h)-pairs-per-program loop.
CASES = [
    (2, 2, 32, 20, 20, True, "bool"),
    (3, 1, 64, 64, 64, True, "extended"),
    (1, 3, 32, 65, 65, True, None),
    (2, 1, 32, 7, 130, False, "int"),
    (2, 2, 32, 63, 20, False, "extended"),
    (1, 1, 128, 1, 7, False, "bool"),
    (2, 1, 32, 130, 1, False, "extended"),
    (3, 2, 32, 1, 1, True, "int"),
    (2, 1, 32, 130, 130, True, "bool"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}d{}_{}x{}_{}_{}".format(
    *c[:5], "fused" if c[5] else "cross", c[6]))
def test_triton_matches_eager_formula(case, dtype, kernel_device):
    B, H, d, Lq, Lk, fused, mask_kind = case
    q, k, v, mask = make_inputs(B, H, d, Lq, Lk, dtype, fused=fused, mask_kind=mask_kind, device=kernel_device)
    # Poisoned output, itself a column slice of a wider buffer: an unwritten element stays NaN and
    # a write outside the slice would turn the sentinel columns into numbers.
    buf = torch.full((B, Lq, H * d + 8), float("nan"), dtype=dtype, device=kernel_device)
    out = buf[..., 4:4 + H * d]
    res = attention_triton(q, k, v, mask, num_heads=H, out=out)
    assert res is out
    assert not out.isnan().any()
    assert buf[..., :4].isnan().all() and buf[..., 4 + H * d:].isnan().all()
    assert rel_err(out, reference(q, k, v, mask, H)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}d{}_{}x{}_{}_{}".format(
    *c[:5], "fused" if c[5] else "cross", c[6]))
def test_sdpa_path_matches_eager_formula(case, dtype):
    B, H, d, Lq, Lk, fused, mask_kind = case
    q, k, v, mask = make_inputs(B, H, d, Lq, Lk, dtype, fused=fused, mask_kind=mask_kind)
    out = torch.full((B, Lq, H * d), float("nan"), dtype=dtype)
    attention_sdpa(q, k, v, mask, num_heads=H, out=out)
    assert not out.isnan().any()
    assert rel_err(out, reference(q, k, v, mask, H)) <= TOL[dtype]
    fresh = attention(q, k, v, mask, num_heads=H)  # CPU dispatch, allocating
    assert fresh.dtype == dtype and fresh.shape == (B, Lq, H * d) and fresh.is_contiguous()
    torch.testing.assert_close(fresh, out, rtol=0, atol=0)


@pytest.mark.parametrize("mask_kind", ["bool", "extended"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_fully_masked_row_averages_values(backend, mask_kind, kernel_device):
    """A row with every key padded gets HF's answer, the mean of V over all keys, never NaN."""
    device = kernel_device if backend == "triton" else "cpu"
    q, k, v, _ = make_inputs(2, 2, 32, 5, 9, torch.float32, fused=False, mask_kind=None, device=device)
    keep = torch.ones(2, 9, dtype=torch.bool, device=device)
    keep[1] = False
    mask = keep if mask_kind == "bool" else (1.0 - keep[:, None, None, :].float()) * FP32_MIN
    fn = attention_triton if backend == "triton" else attention_sdpa
    out = fn(q, k, v, mask, num_heads=2)
    ref = reference(q, k, v, mask, 2)
    torch.testing.assert_close(out[1].double(), v[1].double().mean(0).expand(5, -1), rtol=1e-5, atol=1e-6)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_minus_inf_additive_mask_is_clamped(backend, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    q, k, v, _ = make_inputs(2, 1, 32, 3, 6, torch.float32, fused=False, mask_kind=None, device=device)
    mask = torch.zeros(2, 1, 1, 6, device=device)
    mask[0, ..., 4:] = float("-inf")
    mask[1] = float("-inf")
    for fn in (attention_triton if backend == "triton" else attention_sdpa,):
        out = fn(q, k, v, mask, num_heads=1)
        assert not out.isnan().any()
        assert rel_err(out, reference(q, k, v, mask, 1)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_autotune_config_is_correct(dtype, kernel_device, monkeypatch):
    """Each tile shape the GPU autotuner may pick for the dtype gives the same answer (logic, not
    speed)."""
    monkeypatch.setenv(attn_mod.TUNING_ENV, "full")
    q, k, v, mask = make_inputs(3, 1, 32, 33, 70, dtype, fused=False, mask_kind="extended",
                                device=kernel_device)
    ref = reference(q, k, v, mask, 1)
    configs = attn_mod._prune(attn_mod._CONFIGS, {"Q": q, "Lq": 4096, "Lk": 4096, "BH": 4096},
                              HEAD_DIM=32)
    assert len(configs) == len(attn_mod._FP32_CONFIGS if dtype == torch.float32
                               else attn_mod._HALF_CONFIGS)
    for cfg in configs:
        out = torch.full((3, 33, 32), float("nan"), dtype=dtype, device=kernel_device)
        attn_mod._launch(q, k, v, mask, out, 1, 32, config=cfg)
        assert rel_err(out, ref) <= TOL[dtype], cfg


def _kept(lq, lk, bh, d, dtype=torch.bfloat16):
    q = torch.empty(0, dtype=dtype)
    return attn_mod._prune(attn_mod._CONFIGS, {"Q": q, "Lq": lq, "Lk": lk, "BH": bh}, HEAD_DIM=d)


def test_autotune_pruning(monkeypatch):
    monkeypatch.setenv(attn_mod.TUNING_ENV, "full")
    for lq, lk, bh in [(20, 20, 12), (64, 64, 3072), (20, 64, 96), (64, 20, 768), (1, 1, 1), (4096, 4096, 1)]:
        for d in (32, 64, 128):
            for dtype in DTYPES:
                kept = _kept(lq, lk, bh, d, dtype)
                assert kept, (lq, lk, bh, d, dtype)
                # only the dtype's own configs (the fp32 ones are sized for 32-bit operands)
                own = attn_mod._FP32_CONFIGS if dtype == torch.float32 else attn_mod._HALF_CONFIGS
                assert all(any(c is o for o in own) for c in kept)
    # L = 20: no 64-row tiles; few (b, h) pairs: one pair per program
    assert {c.kwargs["BLOCK_M"] for c in _kept(20, 20, 12, 64)} == {32}
    assert {c.kwargs["ROWS"] for c in _kept(20, 20, 12, 64)} == {1}
    assert max(c.kwargs["ROWS"] for c in _kept(20, 20, 3072, 64)) > 1
    assert max(c.kwargs["BLOCK_M"] for c in _kept(4096, 4096, 1, 64)) == 128
    assert max(c.kwargs["BLOCK_M"] for c in _kept(4096, 4096, 1, 64, torch.float32)) <= 32


def test_test_tuning_keeps_one_config(monkeypatch):
    monkeypatch.setenv(attn_mod.TUNING_ENV, "test")
    for lq, lk, bh in [(20, 20, 12), (64, 64, 3072), (4096, 4096, 1)]:
        for dtype in DTYPES:
            assert len(_kept(lq, lk, bh, 64, dtype)) == 1
    monkeypatch.setenv(attn_mod.TUNING_ENV, "fast")
    with pytest.raises(ValueError, match="XLX_FAST_TUNING"):
        _kept(20, 20, 12, 64)


def test_cpu_dispatch_never_uses_the_interpreter(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("CPU tensors must go to SDPA")

    monkeypatch.setattr(attn_mod, "attention_triton", boom)
    q, k, v, mask = make_inputs(1, 2, 32, 4, 4, torch.float32, fused=True, mask_kind="bool")
    attention(q, k, v, mask, num_heads=2)


def test_dispatch_rules(monkeypatch):
    assert select_impl("attention", torch.device("cpu")).backend == "sdpa"
    assert select_impl("attention", torch.device("cuda", 0)).backend == "triton"
    with pytest.raises(ValueError, match="CUDA and CPU"):
        select_impl("attention", torch.device("meta"))
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton"):
        select_impl("attention", torch.device("cuda", 0))
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, torch.float32, fused=True, mask_kind=None)
    with pytest.raises(RuntimeError, match="triton"):
        attention_triton(q, k, v, num_heads=1)


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(attn_mod, "interpreting", lambda: False)
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, torch.float32, fused=True, mask_kind=None)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attention_triton(q, k, v, num_heads=1)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, on both paths.

def _good(B=2, Lq=3, Lk=5, H=2, d=32, dtype=torch.float32):
    return (torch.randn(B, Lq, H * d, dtype=dtype), torch.randn(B, Lk, H * d, dtype=dtype),
            torch.randn(B, Lk, H * d, dtype=dtype))


BAD = [
    ("q not a tensor", lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, "q must be a torch.Tensor"),
    ("k rank", lambda q, k, v: ((q, k[0], v), {}), ValueError, "k must have shape"),
    ("q rank", lambda q, k, v: ((q.unflatten(-1, (2, 32)), k, v), {}), ValueError, "q must have shape"),
    ("float64", lambda q, k, v: ((q.double(), k.double(), v.double()), {}), TypeError, "q must be float32"),
    ("mixed dtypes", lambda q, k, v: ((q, k.half(), v), {}), TypeError, "share one dtype"),
    ("heads not dividing", lambda q, k, v: ((q, k, v), {"num_heads": 3}), ValueError, "not a multiple of num_heads"),
    ("num_heads zero", lambda q, k, v: ((q, k, v), {"num_heads": 0}), ValueError, "num_heads"),
    ("num_heads float", lambda q, k, v: ((q, k, v), {"num_heads": 2.0}), ValueError, "num_heads"),
    ("head dim 16", lambda q, k, v: ((q, k, v), {"num_heads": 4}), ValueError, "head dim 16"),
    ("k width", lambda q, k, v: ((q, k[..., :32], v), {}), ValueError, "k and v must have q's width"),
    ("v length", lambda q, k, v: ((q, k, v[:, :4]), {}), ValueError, "one Lk"),
    ("batch mismatch", lambda q, k, v: ((q, k[:1], v[:1]), {}), ValueError, "k and v must have shape"),
    ("empty batch", lambda q, k, v: ((q[:0], k[:0], v[:0]), {}), ValueError, "empty input"),
    ("empty keys", lambda q, k, v: ((q, k[:, :0], v[:, :0]), {}), ValueError, "empty input"),
    ("bool mask shape", lambda q, k, v: ((q, k, v, torch.ones(2, 4, dtype=torch.bool)), {}),
     ValueError, r"bool/int key_padding_mask must have shape \(B, Lk\)"),
    ("bool mask 4d", lambda q, k, v: ((q, k, v, torch.ones(2, 1, 1, 5, dtype=torch.bool)), {}),
     ValueError, "bool/int key_padding_mask"),
    ("float mask 2d", lambda q, k, v: ((q, k, v, torch.zeros(2, 5)), {}),
     ValueError, r"floating \(additive\) key_padding_mask must have shape \(B, 1, 1, Lk\)"),
    ("complex mask", lambda q, k, v: ((q, k, v, torch.zeros(2, 1, 1, 5, dtype=torch.complex64)), {}),
     TypeError, "key_padding_mask must be bool, integer or floating"),
    ("mask not a tensor", lambda q, k, v: ((q, k, v, [[1] * 5] * 2), {}), TypeError, "key_padding_mask must be"),
    ("mask on meta", lambda q, k, v: ((q, k, v, torch.ones(2, 5, dtype=torch.bool, device="meta")), {}),
     ValueError, "key_padding_mask is on meta"),
    ("k on meta", lambda q, k, v: ((q, k.to("meta"), v), {}), ValueError, "one device"),
    ("out shape", lambda q, k, v: ((q, k, v), {"out": torch.empty(2, 3, 32)}), ValueError, "out must be"),
    ("out dtype", lambda q, k, v: ((q, k, v), {"out": torch.empty(2, 3, 64, dtype=torch.half)}), ValueError, "out must be"),
]


@pytest.mark.parametrize("fn", [attention, attention_sdpa, attention_triton], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name,build,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(fn, name, build, exc, msg):
    args, kwargs = build(*_good())
    kwargs.setdefault("num_heads", 2)
    with pytest.raises(exc, match=msg):
        fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel (autotuned) at LXMERT shapes against SDPA and the float64 formula.

LXMERT_SHAPES = [(20, 20), (64, 64), (20, 64), (64, 20)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 8, 64, 256])
@pytest.mark.parametrize("lq,lk", LXMERT_SHAPES)
def test_gpu_lxmert_shapes(B, lq, lk, dtype):
    H, d = 12, 64
    q, k, v, mask = make_inputs(B, H, d, lq, lk, dtype, fused=lq == lk, mask_kind="extended", seed=B,
                                device="cuda")
    out = torch.full((B, lq, H * d), float("nan"), dtype=dtype, device="cuda")
    attention(q, k, v, mask, num_heads=H, out=out)  # CUDA dispatch -> Triton
    ref = reference(q, k, v, mask, H)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= TOL[dtype]
    # torch SDPA on the same device and dtype, as a second opinion
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.unflatten(-1, (H, d)).transpose(1, 2), k.unflatten(-1, (H, d)).transpose(1, 2),
        v.unflatten(-1, (H, d)).transpose(1, 2), attn_mask=mask.to(dtype)).transpose(1, 2).flatten(2)
    assert rel_err(sdpa, ref) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("lq,lk", [(1, 1), (7, 130), (130, 7), (65, 65), (513, 257)])
def test_gpu_odd_shapes(lq, lk, d, dtype):
    H = 4
    for mask_kind in ("bool", "int", "extended", None):
        q, k, v, mask = make_inputs(3, H, d, lq, lk, dtype, fused=lq == lk, mask_kind=mask_kind, device="cuda")
        out = torch.full((3, lq, H * d), float("nan"), dtype=dtype, device="cuda")
        attention_triton(q, k, v, mask, num_heads=H, out=out)
        assert not out.isnan().any()
        assert rel_err(out, reference(q, k, v, mask, H)) <= TOL[dtype]


def tf32_bound(q, k, v, mask, num_heads):
    """Elementwise bound on |out - reference| with tf32 products (xlx_fast.ops.dot_error): a score
    s_ij errs by at most eps_ij = gamma(d) sum_l |q_il k_jl| / sqrt(d), which moves every softmax
    weight by a factor within e^(+-2 max_j eps_ij); P·V then adds gamma(Lk) sum_j p_ij |v_jc|.
    So |o_ic - ref_ic| <= (e^(2 eps_i) - 1 + gamma(Lk) + 1e-5) sum_j p_ij |v_jc|, the 1e-5 being
    what the fp32 path (exp2, rescaling, division) is held to."""
    B, Lq, width = q.shape
    d, lk = width // num_heads, k.shape[1]

    def heads(t):
        return t.double().unflatten(-1, (num_heads, d)).transpose(1, 2)

    eps = gamma(d, "tf32") * (heads(q).abs() @ heads(k).abs().transpose(-1, -2)) / math.sqrt(d)
    ref_p = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)
                          + (0 if mask is None else (1.0 - (mask != 0).double()[:, None, None, :]) * FP32_MIN),
                          dim=-1)
    weight = ref_p @ heads(v).abs()  # sum_j p_ij |v_jc|
    factor = torch.expm1(2 * eps.amax(-1, keepdim=True)) + gamma(lk, "tf32") + 1e-5
    return (factor * weight).transpose(1, 2).flatten(2)


def test_tf32_bound_covers_simulated_truncation():
    """On the CPU: attention computed in float64 from tf32-truncated q, k, v and probabilities
    (what the tensor cores see) stays within tf32_bound of the exact result."""
    q, k, v, mask = make_inputs(3, 2, 64, 20, 37, torch.float32, fused=False, mask_kind="bool")
    d = 64

    def heads(t):
        return truncate_tf32(t).double().unflatten(-1, (2, d)).transpose(1, 2)

    s = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)
    s = s + (1.0 - (mask != 0).double()[:, None, None, :]) * FP32_MIN
    p = truncate_tf32(torch.softmax(s, -1).float()).double()
    out = (p @ heads(v)).transpose(1, 2).flatten(2)
    ref = reference(q, k, v, mask, 2)
    err = (out - ref).abs()
    bound = tf32_bound(q, k, v, mask, 2)
    assert torch.all(err <= bound)
    assert err.max() > 1e-5 * ref.abs().max()  # the simulation does move the result


@pytest.mark.gpu
def test_gpu_tf32_switch():
    q, k, v, mask = make_inputs(8, 12, 64, 64, 64, torch.float32, fused=True, mask_kind="bool", device="cuda")
    ref = reference(q, k, v, mask, 12)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        out = attention_triton(q, k, v, mask, num_heads=12)
        assert torch.all((out.double() - ref).abs() <= tf32_bound(q, k, v, mask, 12))
        torch.set_float32_matmul_precision("highest")
        assert rel_err(attention_triton(q, k, v, mask, num_heads=12), ref) <= 1e-5
    finally:
        torch.set_float32_matmul_precision(prev)
