"""Fused linear + cross-entropy against F.cross_entropy of the float64 formula."""
import pytest
import torch
import torch.nn.functional as F

from xlx_fast.ops.fused_linear_cross_entropy import default_chunk_rows, fused_linear_cross_entropy
from xlx_fast.ops.registry import tolerance


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make(N, H, V, dtype=torch.float32, ignored=(), seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignored)] = -100
    return h, w, b, t


def reference(h, w, b, t):
    """F.cross_entropy of the float64 formula; gradients by autograd."""
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(hd, wd, bd), t.cpu().to(hd.device))
    loss.backward()
    return loss, hd.grad, wd.grad, None if bd is None else bd.grad


def run(h, w, b, t, **kw):
    loss = fused_linear_cross_entropy(h, w, t, b, **kw)
    loss.backward()
    return loss, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("N,H,V,ignored,chunk", [
    (1, 8, 5, (), None), (37, 16, 97, (0, 5, 36), None), (37, 16, 97, (3,), 1),
    (64, 24, 1000, tuple(range(0, 64, 3)), 7), (130, 33, 10, (129,), 64), (5, 7, 1, (), 2)])
def test_fp32_matches_cross_entropy(N, H, V, ignored, chunk):
    h, w, b, t = make(N, H, V, ignored=ignored)
    got = run(h, w, b, t, chunk_rows=chunk)
    want = reference(h, w, b, t)
    for name, x, y in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert x.dtype == torch.float32
        assert rel(x, y) <= 1e-5, name


def test_ignored_rows_get_zero_gradient_and_do_not_count():
    h, w, b, t = make(9, 8, 13, ignored=(2, 4))
    loss, gh, _, _ = run(h, w, b, t, chunk_rows=4)
    assert torch.equal(gh[[2, 4]], torch.zeros(2, 8))
    keep = t != -100
    sub = F.cross_entropy(F.linear(h[keep].double(), w.double(), b.double()), t[keep])
    assert rel(loss, sub) <= 1e-6


def test_all_ignored_is_zero_loss_and_zero_grads_where_torch_gives_nan():
    h, w, b, t = make(6, 8, 13, ignored=range(6))
    loss, gh, gw, gb = run(h, w, b, t)
    assert loss.item() == 0.0
    assert not gh.any() and not gw.any() and not gb.any()
    assert torch.isnan(F.cross_entropy(F.linear(h, w, b), t))  # the documented difference


def test_frozen_weight_gets_no_gradient_and_others_are_right():
    h, w, b, t = make(20, 12, 31, ignored=(1,))
    w.requires_grad_(False)
    loss, gh, gw, gb = run(h, w, b, t, chunk_rows=6)
    assert gw is None
    ref = reference(h, w, b, t)
    assert rel(gh, ref[1]) <= 1e-5 and rel(gb, ref[3]) <= 1e-5


def test_no_bias_and_upstream_gradient_scaling():
    h, w, _, t = make(11, 8, 17, bias=False)
    loss = fused_linear_cross_entropy(h, w, t)
    (3.5 * loss).backward()
    ref = reference(h, w, None, t)
    assert rel(h.grad, 3.5 * ref[1]) <= 1e-5 and rel(w.grad, 3.5 * ref[2]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_spec_bounds(dtype):
    h, w, b, t = make(40, 32, 300, dtype=dtype, ignored=(0, 7))
    got = run(h, w, b, t, chunk_rows=16)
    want = reference(h, w, b, t)
    for name, x, y in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert x.dtype == (torch.float32 if name == "loss" else dtype)
        assert rel(x, y) <= 2e-2, name


def test_autocast_bf16_casts_like_linear():
    h, w, b, t = make(24, 16, 50, ignored=(3,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, t, b)
    loss.backward()
    ref = reference(h, w, b, t)
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert rel(loss, ref[0]) <= 2e-2 and rel(h.grad, ref[1]) <= 2e-2 and rel(w.grad, ref[2]) <= 2e-2


@pytest.mark.parametrize("N,H,V,ignored", [(9, 16, 37, (4,)), (5, 8, 150, ()), (4, 8, 64, (0, 1, 2, 3))])
def test_triton_kernel_matches_float64(kernel_device, N, H, V, ignored):
    h, w, b, t = make(N, H, V, ignored=ignored, seed=3)
    h, w, b = (x.detach().to(kernel_device).requires_grad_() for x in (h, w, b))
    t = t.to(kernel_device)
    got = run(h, w, b, t, chunk_rows=3, backend="triton")
    if len(ignored) == N:
        assert got[0].item() == 0 and not got[1].any() and not got[2].any()
        return
    want = reference(h, w, b, t)
    for name, x, y in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert rel(x.cpu(), y.cpu()) <= 1e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_size_heads(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    for N, H, V in ((256 * 64 // 2, 2048, 10_000), (256 * 3, 768, 30_522)):
        h, w, b, t = make(N, H, V, dtype=dtype, ignored=range(0, N, 5))
        h, w, b = (x.detach().cuda().requires_grad_() for x in (h, w, b))
        got = run(h, w, b, t.cuda())
        want = reference(h, w, b, t.cuda())
        for x, y in zip(got, want):
            assert rel(x, y) <= (1e-5 if dtype == torch.float32 else 2e-2)


# --- V = 65,536 ---------------------------------------------------------------------------------

BIG_V = 65_536


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,H,chunk", [(1, 48, None), (3, 33, None), (37, 48, None), (37, 33, 16)])
def test_65536_classes_match_cross_entropy(N, H, chunk, dtype):
    """Loss and every gradient against F.cross_entropy in float64 at V = 65,536, within the
    tolerance the op declares; targets at both ends of the vocabulary, some rows ignored."""
    h, w, b, t = make(N, H, BIG_V, dtype=dtype, ignored=(1, 30) if N > 30 else (), seed=N + H)
    t[0] = BIG_V - 1
    if N > 2:
        t[2] = 0
    got = run(h, w, b, t, chunk_rows=chunk)
    want = reference(h, w, b, t)
    tol = tolerance("fused_linear_cross_entropy", "torch", dtype)
    for name, x, y in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert x.dtype == (torch.float32 if name == "loss" else dtype)
        assert rel(x, y) <= tol, name


def test_triton_kernel_at_65536_classes(kernel_device):
    """The row sweep at V = 65,536: 16 blocks of 4096 classes a row, on a GPU and under the
    interpreter alike."""
    h, w, b, t = make(3, 8, BIG_V, ignored=(1,), seed=9)
    t[0] = BIG_V - 1
    h, w, b = (x.detach().to(kernel_device).requires_grad_() for x in (h, w, b))
    got = run(h, w, b, t.to(kernel_device), backend="triton")
    want = reference(h, w, b, t)
    tol = tolerance("fused_linear_cross_entropy", "triton", torch.float32)
    for name, x, y in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert rel(x.cpu(), y.cpu()) <= tol, name


def test_default_chunk_logits_stay_bounded_at_65536_classes():
    """rows × V <= max(256·V, N·H + V): the logits of a chunk never grow with N·V."""
    for n in (1, 37, 256, 5120, 256 * 64):
        for hidden in (33, 768, 2048):
            rows = default_chunk_rows(n, BIG_V, hidden)
            assert 1 <= rows <= n and rows * BIG_V <= max(256 * BIG_V, n * hidden + BIG_V)


def test_bad_input_raises_naming_the_argument():
    h, w, b, t = make(4, 8, 13)
    bad = t.clone()
    bad[2] = 13
    with pytest.raises(ValueError, match=r"target\[2\] = 13 is out of range"):
        fused_linear_cross_entropy(h, w, bad, b)
    bad[2] = -5
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy(h, w, bad, b)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(h, w[:, :5], t, b)
    with pytest.raises(ValueError, match="target must have shape"):
        fused_linear_cross_entropy(h, w, t[:3], b)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(h, w, t, b[:4])
    with pytest.raises(TypeError, match="target"):
        fused_linear_cross_entropy(h, w, t.float(), b)
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_cross_entropy(h.double(), w, t, b)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(h, w, t, b, chunk_rows=0)


def test_default_chunk_holds_about_as_much_as_hidden_but_at_least_256_rows():
    n = 256 * 64
    assert default_chunk_rows(n, 10_000, 2048) * 10_000 <= 2 * n * 2048  # logits ~ hidden's size
    assert default_chunk_rows(n, 10_000, 2048) >= 256
    assert default_chunk_rows(512, 30522, 768) == 256  # few rows: the floor (weight-grad traffic)
    assert default_chunk_rows(35, 30522, 768) == 35
    assert default_chunk_rows(1, 10_000, 2048) == 1
