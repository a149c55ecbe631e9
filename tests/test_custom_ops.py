"""Every public op is a torch.library custom op with a fake implementation, and a function calling
it through its Python entry point is traced by ``torch.compile(fullgraph=True)`` with the op in
the graph (no graph break, no trace into the kernels). Also the registry's rules.
"""
import pytest
import torch

from xlx_fast.ops import _common, backends_lines, backends_report, load_all, registry
from xlx_fast.ops import sampler_step as S
from xlx_fast.ops.attention import attention
from xlx_fast.ops.codebook_head import codebook_head
from xlx_fast.ops.fused_linear import feed_forward  # noqa: F401 (registers fused_linear, feed_forward)
from xlx_fast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from xlx_fast.ops.nearest import nearest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _attention_args():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 64, generator=g) for _ in range(3))
    mask = torch.rand(2, 5, generator=g) < 0.8
    mask[:, 0] = True
    return q, k, v, mask


def _head_args():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)


def _nearest_args():
    g = torch.Generator().manual_seed(2)
    return torch.randn(7, 6, generator=g), torch.randn(13, 6, generator=g)


# -- registered, with fakes --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["attention", "attention_out", "codebook_head", "nearest", "sampler_step",
                                  "fused_linear", "feed_forward", "fused_linear_cross_entropy"])
def test_registered_with_a_fake(name):
    op = getattr(torch.ops.xlx_fast, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or \
        torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd")
    from torch._library.simple_registry import singleton
    assert singleton.find(op.name()).fake_impl.kernel is not None, name


def test_opcheck_attention():
    q, k, v, mask = _attention_args()
    torch.library.opcheck(torch.ops.xlx_fast.attention.default, (q, k, v, mask, 2, ""))
    torch.library.opcheck(torch.ops.xlx_fast.attention.default, (q, k, v, None, 1, "sdpa"))
    torch.library.opcheck(torch.ops.xlx_fast.attention_out.default,
                          (q, k, v, mask, torch.empty(2, 5, 64), 2, ""))


def test_opcheck_codebook_head():
    h, w, b = _head_args()
    h2 = h.reshape(-1, 8)
    torch.library.opcheck(torch.ops.xlx_fast.codebook_head.default,
                          (h2, w, b, None, 0.0, None, 0, "ieee", ""))
    seeds = torch.arange(6, dtype=torch.int64)
    torch.library.opcheck(torch.ops.xlx_fast.codebook_head.default,
                          (h2, w, b, torch.full((6,), 0.5), 0.0, seeds, 3, "ieee", "torch"))


def test_opcheck_nearest():
    x, c = _nearest_args()
    torch.library.opcheck(torch.ops.xlx_fast.nearest.default, (x, c, None, "ieee", 4, ""))
    torch.library.opcheck(torch.ops.xlx_fast.nearest.default, (x, c, (c * c).sum(1), "ieee", 2048, "torch"))


def _cross_entropy_args():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 6, generator=g, requires_grad=True)
    weight = torch.randn(13, 6, generator=g, requires_grad=True)
    bias = torch.randn(13, generator=g, requires_grad=True)
    target = torch.randint(0, 13, (9,), generator=g)
    target[2] = -100
    return hidden, weight, bias, target


def test_opcheck_fused_linear_cross_entropy():
    hidden, weight, bias, target = _cross_entropy_args()
    with torch.no_grad():
        args = (hidden.detach(), weight.detach(), bias.detach(), target)
        for needs in ((True, True, True), (True, False, False), (False, True, False)):
            torch.library.opcheck(torch.ops.xlx_fast.fused_linear_cross_entropy.default,
                                  (*args, -100, 4, "", *needs),
                                  test_utils=("test_schema", "test_faketensor"))


def test_compile_fused_linear_cross_entropy_with_its_gradients():
    # the custom op and its autograd formula: compiled, the loss and all three gradients are
    # the eager op's
    hidden, weight, bias, target = _cross_entropy_args()

    def f(hidden, weight, bias, target):
        return fused_linear_cross_entropy(hidden, weight, target, bias) * 3.0

    rec, loss = _compiled(f, hidden, weight, bias, target)
    assert rec.graphs == 1 and rec.has("xlx_fast.fused_linear_cross_entropy"), rec.targets
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_loss = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target) * 3.0
    want = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    torch.testing.assert_close(loss, ref_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# -- torch.compile sees the ops ----------------------------------------------------------------

class Recorder:
    """A torch.compile backend that records the ops of every graph it is given and runs it."""

    def __init__(self):
        self.targets = []
        self.graphs = 0

    def has(self, op: str) -> bool:
        return op in self.targets or op + ".default" in self.targets

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward


def _compiled(fn, *args):
    torch._dynamo.reset()
    rec = Recorder()
    out = torch.compile(fn, fullgraph=True, backend=rec)(*args)
    return rec, out


def test_compile_attention():
    q, k, v, mask = _attention_args()

    def f(q, k, v, mask):
        return attention(q, k, v, mask, num_heads=2) * 2

    rec, out = _compiled(f, q, k, v, mask)
    assert rec.graphs == 1 and rec.has("xlx_fast.attention"), rec.targets
    torch.testing.assert_close(out, f(q, k, v, mask), rtol=0, atol=0)


def test_compile_codebook_head():
    h, w, b = _head_args()

    def f(h, w, b):
        prob, ids = codebook_head(h, w, b, check_nan=False)
        return prob + 1, ids

    rec, (prob, ids) = _compiled(f, h, w, b)
    assert rec.graphs == 1 and rec.has("xlx_fast.codebook_head"), rec.targets
    p_ref, i_ref = f(h, w, b)
    assert torch.equal(ids, i_ref) and torch.equal(prob, p_ref) and prob.shape == (2, 3)


def test_compile_nearest():
    x, c = _nearest_args()

    def f(x, c):
        return nearest(x, c, return_distance=True)

    rec, (ids, dist) = _compiled(f, x, c)
    assert rec.graphs == 1 and rec.has("xlx_fast.nearest"), rec.targets
    ids_ref, dist_ref = f(x, c)
    assert torch.equal(ids, ids_ref) and torch.allclose(dist, dist_ref)


def test_compile_sampler_step():
    table, mask_row = torch.randn(11, 6), torch.randn(6)
    prob = torch.rand(2, 64)
    pred_id = torch.randint(0, 11, (2, 64))
    count = torch.tensor([48, 10], dtype=torch.int32)

    def f(state, prob, pred_id, count):
        S.sampler_step(prob, pred_id, state, table, mask_row, "mask_predict", count=count)
        return state.ids.clone()

    torch._dynamo.reset()
    rec = Recorder()
    state = S.init_state(2, mask_row)
    ids = torch.compile(f, fullgraph=True, backend=rec)(state, prob, pred_id, count)
    assert rec.graphs == 1 and rec.has("xlx_fast.sampler_step"), rec.targets
    assert torch.equal(ids, f(S.init_state(2, mask_row), prob, pred_id, count))


# -- the registry ------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["attention", "codebook_head", "nearest", "fused_linear_cross_entropy"])
def test_every_op_explains_its_choice(op):
    load_all()
    e = registry.explain(op, "cpu", torch.float32)
    assert e["runs"] is not None and e["runs"] != "triton"
    assert [b["backend"] for b in e["backends"]] == registry.backend_names(op)
    triton = next(b for b in e["backends"] if b["backend"] == "triton")
    assert triton["rank"] == 0 and triton["why_not"]  # the preferred kernel says why not here
    assert registry.select_impl(op, "cuda").backend == "triton"


def test_forced_backend_runs_or_says_why(monkeypatch):
    assert registry.select_impl("attention", "cpu", force="triton").backend == "triton"  # interpreter
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.select_impl("attention", "cpu", force="cuda")
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton not installed"):
        registry.select_impl("nearest", "cpu", force="triton")
    with pytest.raises(RuntimeError, match="no codebook_head backend can run on cuda.*triton not installed"):
        registry.select_impl("codebook_head", "cuda")
    q, k, v, mask = _attention_args()
    with pytest.raises(RuntimeError, match="triton not installed"):
        attention(q, k, v, mask, num_heads=2, backend="triton")


def test_interpreter_only_when_named(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        registry.select_impl("codebook_head", "cpu", force="triton")


def test_dtype_capability():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        registry.select_impl("nearest", "cpu", torch.float64)


def test_chooser_hook_picks_among_usable_ones():
    # a chooser sees what can run here (plus the stock backends that compete by measurement on
    # that device), and only when the caller offers a trial of the call
    seen = []

    def chooser(op, candidates, device, dtype, key, trial):
        seen.append([i.backend for i in candidates])
        return candidates[-1]

    previous = registry._CHOOSERS.get("attention")
    registry.set_chooser("attention", chooser)
    try:
        assert registry.select_impl("attention", "cpu", key=1, trial=lambda impl: None).backend == "sdpa"
        assert registry.select_impl("attention", "cuda", key=1, trial=lambda impl: None).backend == "sdpa"
        assert registry.select_impl("attention", "cuda").backend == "triton"  # no trial: the rank
    finally:
        registry.set_chooser("attention", previous)
    assert seen == [["sdpa"], ["triton", "sdpa"]]


def test_tolerances_come_from_the_registry():
    for op in ("attention", "codebook_head", "nearest"):
        for impl in registry.implementations(op):
            assert set(impl.tolerances) == set(_common.FLOAT_DTYPES), (op, impl.backend)
    assert registry.tolerance("attention", "sdpa", torch.float16) == 2e-2


def test_info_lists_every_op():
    rows = backends_report()
    ops = {r["op"] for r in rows}
    assert {"attention", "codebook_head", "nearest", "fused_linear_cross_entropy"} <= ops
    text = "\n".join(backends_lines(rows))
    assert "attention on cpu" in text and "sdpa" in text and "needs CUDA" in text
    # an op whose CPU choice depends on the dtype gets a line per dtype, each with its own answer
    nearest_cpu = {r.get("dtype"): r["runs"] for r in rows if r["op"] == "nearest" and r["device"] == "cpu"}
    from xlx_fast.ops.nearest_screen import BF16_DOT

    if BF16_DOT.available():
        assert nearest_cpu == {"float32": "torch", "float16": "torch", "bfloat16": "screened"}
        assert "nearest on cpu (bfloat16)" in text
    else:
        assert nearest_cpu == {None: "torch"}
