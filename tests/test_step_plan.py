"""The step plan: one sampling step as few operations as its math allows, and the same numbers
as HF's modules.

The count is what a step costs in dispatches at batch 1 (on a GPU, roughly in kernel launches):
every operation the engine's ``step()`` dispatches, counted with a ``TorchDispatchMode`` at the
base size, views excluded (they move no data), a ``torch.library`` custom op counting once.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xlx_fast
from xlx_fast.engine import Engine, Request
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.step_plan import extended_mask, head_transform, language, vision

MAX_OPS_PER_STEP = 100  # SPEC §6: "kernels a sampling step at batch 1", CPU row


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(engine: Engine) -> collections.Counter:
    with _Count() as c:
        engine.step()
    return c.ops


@pytest.mark.slow
def test_a_step_at_batch_1_dispatches_at_most_100_operations():
    model = XLxmertForImageGeneration.from_default(seed=0, with_generator=False).eval()
    engine = Engine(model, slots=1)
    engine.admit([Request(input_ids=torch.randint(1000, 2000, (12,)), steps=4)])
    engine.step()  # the first step builds nothing the others do not, but count a steady one
    ops = count_step(engine)
    total = sum(ops.values())
    assert total <= MAX_OPS_PER_STEP, f"{total} operations a step: {ops.most_common()}"
    # the structure behind the number: every linear of the 5 relational and 5 cross layers is a
    # fused op (its bias, GELU, residual and LayerNorm inside), each FFN one op
    cfg = model.config
    assert ops["xlx_fast.feed_forward"] == cfg.r_layers + 2 * (cfg.x_layers - 1) + 1
    assert ops["xlx_fast.codebook_head"] == ops["xlx_fast.sampler_step"] == 1
    assert not {"aten.native_layer_norm", "aten.gelu", "aten.bmm", "aten._softmax"} & set(ops)


@pytest.fixture(scope="module")
def tiny():
    return XLxmertForImageGeneration.from_default(seed=3, size="tiny", with_generator=False).eval()


@torch.no_grad()
def test_the_fused_step_equals_hf_modules(tiny):
    # the optimized model (fused attention, fused QKV storage): the plan's fused linears and its
    # shared cross-attention projections against HF's own forward of the same layers
    fast = xlx_fast.optimize(copy.deepcopy(tiny))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 13), generator=g)
    ids[1, 7:] = 0
    mask = ids > 0
    visual = torch.randn(3, 64, tiny.config.hidden_size, generator=g)
    ext = extended_mask(tiny, mask)

    enc = tiny.bert.encoder
    want_lang = tiny.bert.embeddings(ids, torch.zeros_like(ids))
    for layer in enc.layer:
        want_lang = layer(want_lang, ext)[0]
    lang = language(fast, ids, extended_mask(fast, mask))
    torch.testing.assert_close(lang, want_lang, rtol=1e-5, atol=1e-5)

    want, l_in = visual, want_lang
    for layer in enc.r_layers:
        want = layer(want, None)[0]
    for x_layer in enc.x_layers:
        l_in, want = x_layer(l_in, ext, want, None)
    got = vision(fast, lang, extended_mask(fast, mask), visual)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # on a CPU the head's transform is HF's arithmetic, bit for bit
    assert torch.equal(head_transform(fast, got), tiny.obj_predict_head.transform(got))


@torch.no_grad()
def test_weights_are_read_live(tiny):
    # no copy of a weight can go stale: an in-place edit of an FFN and of an attention
    # projection changes the next forward exactly as it changes HF's
    fast = xlx_fast.optimize(copy.deepcopy(tiny))
    ref = copy.deepcopy(tiny)
    for m in (fast, ref):
        m.bert.encoder.r_layers[0].intermediate.dense.weight.data.mul_(1.5)
        m.bert.encoder.x_layers[0].visual_attention.att.key.weight.data.add_(0.25)
    ids = torch.randint(1000, 30000, (2, 9))
    ext = extended_mask(ref, ids > 0)
    visual = torch.randn(2, 64, tiny.config.hidden_size)
    want_lang = language(ref, ids, ext)
    want = visual
    for layer in ref.bert.encoder.r_layers:
        want = layer(want, None)[0]
    l_in = want_lang
    for x_layer in ref.bert.encoder.x_layers:
        l_in, want = x_layer(l_in, ext, want, None)
    torch.testing.assert_close(vision(fast, language(fast, ids, ext), ext, visual), want,
                               rtol=1e-5, atol=1e-5)
