"""xlx_fast.optimize(model): what it swaps, that outputs keep HF's values, and what it leaves alone."""
import copy
import io

import pytest
import torch
from torch import nn
from transformers import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from transformers.models.lxmert.modeling_lxmert import (LxmertAttention, LxmertAttentionOutput,
                                                        LxmertIntermediate, LxmertOutput)

import xlx_fast
from xlx_fast import patching
from xlx_fast.ops import _common
from xlx_fast.ops import frozen_weights
from xlx_fast.patching import (FusedLxmertAddNorm, FusedLxmertAttention, FusedLxmertIntermediate,
                               force_backend, unoptimize)

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

OUTPUTS = ("language_output", "vision_output", "pooled_output")


def tiny_config(**overrides):
    kw = dict(vocab_size=50, hidden_size=64, num_attention_heads=2, intermediate_size=96,
              l_layers=2, r_layers=1, x_layers=2, visual_feat_dim=32, num_qa_labels=5,
              num_object_labels=7, num_attr_labels=4, max_position_embeddings=32)
    kw.update(overrides)
    return LxmertConfig(**kw)


def make_inputs(config, B=2, L=7, V=9, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (B, L), generator=g)
    for b in range(1, B):
        ids[b, L - 2 * b:] = 0  # padded positions, a different number per row
    inputs = dict(input_ids=ids, attention_mask=ids > 0,
                  visual_feats=torch.randn(B, V, config.visual_feat_dim, generator=g),
                  visual_pos=torch.rand(B, V, config.visual_pos_dim, generator=g))
    return {k: v.to(device) for k, v in inputs.items()}


def build(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_outputs_close(out, ref, tol=1e-5, names=OUTPUTS):
    for name in names:
        assert rel_err(out[name], ref[name]) <= tol, name


def patched_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, FusedLxmertAttention))


class CallCounter:
    """Counts calls of the fused op (patching.fused_attention)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        inner = patching.fused_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(patching, "fused_attention", counted)


# ---------------------------------------------------------------------------------------------
# Whole model, full size (SDPA path on the CPU)

@pytest.fixture(scope="module")
def full_model():
    return build(LxmertModel, LxmertConfig())


@pytest.mark.slow
def test_full_size_default_model_matches_plain(full_model):
    config = full_model.config
    inputs = make_inputs(config, B=2, L=20, V=64)
    model = unoptimize(full_model)
    with torch.no_grad():
        ref = model(**inputs)
        assert xlx_fast.optimize(model) is model
        names = patched_names(model)
        # 9 language + 5 relational self-attentions, and per cross layer one shared cross-attention
        # plus two self-attentions; counted from the module tree, checked against the config.
        expected = [f"encoder.layer.{i}.attention.self" for i in range(config.l_layers)]
        expected += [f"encoder.r_layers.{i}.attention.self" for i in range(config.r_layers)]
        for i in range(config.x_layers):
            expected += [f"encoder.x_layers.{i}.{n}" for n in
                         ("visual_attention.att", "lang_self_att.self", "visn_self_att.self")]
        assert names == sorted(expected)
        assert len(names) == 9 + 5 + 3 * 5 == 29
        assert sum(isinstance(m, LxmertAttention) for m in model.modules()) == 29
        out = model(**inputs)
    assert_outputs_close(out, ref)
    unoptimize(model)


@pytest.mark.slow
def test_full_size_attention_calls_per_forward(full_model, monkeypatch):
    """Every one of the 9 + 5 + 4·5 = 34 attention calls of a forward runs the fused op."""
    model = xlx_fast.optimize(full_model)
    counter = CallCounter(monkeypatch)
    with torch.no_grad():
        model(**make_inputs(model.config, B=1, L=20, V=64))
    assert counter.calls == 9 + 5 + 4 * 5 == 34
    unoptimize(model)


# ---------------------------------------------------------------------------------------------
# Whole model, tiny config: the Triton kernel (under the interpreter without a GPU)

def test_tiny_model_triton_path_matches_plain(monkeypatch, kernel_device):
    config = tiny_config()
    model = build(LxmertModel, config).to(kernel_device)
    inputs = make_inputs(config, device=kernel_device)
    with torch.no_grad():
        ref = model(**inputs)
        xlx_fast.optimize(model)
        counter = CallCounter(monkeypatch)
        with force_backend("triton"):
            out = model(**inputs)
        with force_backend("sdpa"):
            sdpa = model(**inputs)
    assert counter.calls == 2 * (config.l_layers + config.r_layers + 4 * config.x_layers)
    assert_outputs_close(out, ref)
    assert_outputs_close(sdpa, ref)


def test_force_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        with force_backend("cuda"):
            pass


def test_tiny_model_with_visual_mask_and_triton(kernel_device):
    config = tiny_config(l_layers=1, x_layers=1)
    model = build(LxmertModel, config).to(kernel_device)
    inputs = make_inputs(config, device=kernel_device)
    vmask = torch.ones(2, 9, dtype=torch.long, device=kernel_device)
    vmask[1, 5:] = 0
    with torch.no_grad():
        ref = model(**inputs, visual_attention_mask=vmask)
        xlx_fast.optimize(model)
        with force_backend("triton"):
            out = model(**inputs, visual_attention_mask=vmask)
    assert_outputs_close(out, ref)


def test_bf16_model_close_to_float64(kernel_device):
    config = tiny_config(l_layers=1, x_layers=1)
    model = build(LxmertModel, config).to(kernel_device)
    inputs = make_inputs(config, device=kernel_device)
    with torch.no_grad():
        ref = model.double()(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
        model = xlx_fast.optimize(model.to(torch.bfloat16))
        bf16_inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
        with force_backend("sdpa"):
            out = model(**bf16_inputs)
        with force_backend("triton"):
            out_triton = model(**bf16_inputs)
    assert_outputs_close(out, ref, tol=2e-2)
    assert_outputs_close(out_triton, ref, tol=2e-2)


# ---------------------------------------------------------------------------------------------
# Patching: idempotence, state dict, reversibility, other heads

def test_idempotent():
    config = tiny_config()
    model = build(LxmertModel, config)
    inputs = make_inputs(config)
    xlx_fast.optimize(model)
    first = {n: m for n, m in model.named_modules() if isinstance(m, FusedLxmertAttention)}
    fused = {n: m._xlx_weight for n, m in first.items()}
    with torch.no_grad():
        out1 = model(**inputs)
    assert xlx_fast.optimize(model) is model
    second = {n: m for n, m in model.named_modules() if isinstance(m, FusedLxmertAttention)}
    assert first.keys() == second.keys() and all(first[n] is second[n] for n in first)
    assert all(type(m) is FusedLxmertAttention for m in second.values())
    assert all(second[n]._xlx_weight is fused[n] for n in first)  # not rebuilt
    with torch.no_grad():
        out2 = model(**inputs)
    for name in OUTPUTS:
        torch.testing.assert_close(out1[name], out2[name], rtol=0, atol=0)


def test_the_front_ends_optimize_a_model_once(monkeypatch):
    """``ensure_optimized`` (what ``answer``/``generate`` apply on every call) walks the model
    only the first time; after ``unoptimize`` it patches again."""
    model = build(LxmertModel, tiny_config())
    walks = []
    optimize = patching.optimize
    monkeypatch.setattr(patching, "optimize", lambda m: walks.append(m) or optimize(m))
    for _ in range(3):
        assert patching.ensure_optimized(model) is model
    assert len(walks) == 1 and patched_names(model)
    unoptimize(model)
    assert patched_names(model) == []
    patching.ensure_optimized(model)
    assert len(walks) == 2 and patched_names(model)


def test_state_dict_unchanged_and_loads_into_plain_model():
    config = tiny_config()
    model = build(LxmertModel, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xlx_fast.optimize(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert len(list(model.parameters())) == len(list(build(LxmertModel, config).parameters()))

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    plain = build(LxmertModel, config, seed=123)
    plain.load_state_dict(torch.load(buf), strict=True)
    inputs = make_inputs(config)
    with torch.no_grad():
        assert_outputs_close(model(**inputs), plain(**inputs))


def test_weights_loaded_after_optimize_are_used():
    """load_state_dict (in-place copies) after optimize() refreshes the fused projection."""
    config = tiny_config()
    model = xlx_fast.optimize(build(LxmertModel, config, seed=0))
    other = build(LxmertModel, config, seed=7)
    model.load_state_dict(other.state_dict())
    inputs = make_inputs(config)
    with torch.no_grad():
        assert_outputs_close(model(**inputs), other(**inputs))
        # and an in-place edit of a single projection
        other.encoder.layer[0].attention.self.value.weight.mul_(-0.5)
        model.encoder.layer[0].attention.self.value.weight.mul_(-0.5)
        assert_outputs_close(model(**inputs), other(**inputs))


def test_unoptimize_restores_plain_modules():
    config = tiny_config()
    model = build(LxmertModel, config)
    inputs = make_inputs(config)
    with torch.no_grad():
        ref = model(**inputs)
        xlx_fast.optimize(model)
        unoptimize(model)
        out = model(**inputs)
    assert patched_names(model) == []
    assert all(type(m) is LxmertAttention for m in model.modules() if isinstance(m, LxmertAttention))
    assert not any(hasattr(m, "_xlx_weight") for m in model.modules())
    for name in OUTPUTS:
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=0)


def test_dtype_change_after_optimize():
    config = tiny_config(l_layers=1, x_layers=1)
    model = xlx_fast.optimize(build(LxmertModel, config))
    plain = build(LxmertModel, config)
    inputs = make_inputs(config)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        # float64: the fused op does not take it, the eager path runs
        assert_outputs_close(model.double()(**inputs64), plain.double()(**inputs64), tol=0)
        model.float()
        plain.float()
        assert_outputs_close(model(**inputs), plain(**inputs))
        assert all(m._xlx_weight.dtype == torch.float32 for m in model.modules()
                   if isinstance(m, FusedLxmertAttention))


@pytest.mark.parametrize("cls,outputs", [
    (LxmertForPreTraining, ("prediction_logits", "cross_relationship_score", "question_answering_score")),
    (LxmertForQuestionAnswering, ("question_answering_score",)),
])
def test_heads_models_are_patched(cls, outputs):
    config = tiny_config()
    model = build(cls, config)
    inputs = make_inputs(config)
    with torch.no_grad():
        ref = model(**inputs)
        xlx_fast.optimize(model)
        assert len(patched_names(model)) == config.l_layers + config.r_layers + 3 * config.x_layers
        assert all(n.startswith("lxmert.") for n in patched_names(model))
        out = model(**inputs)
    assert_outputs_close(out, ref, names=outputs)


def test_any_module_containing_lxmert_is_patched():
    class ImageGenerator(nn.Module):  # the shape of XLxmertForImageGeneration: the LxmertModel at .bert
        def __init__(self, config):
            super().__init__()
            self.bert = LxmertModel(config)
            self.head = nn.Linear(config.hidden_size, 10)

        def forward(self, **inputs):
            return self.head(self.bert(**inputs).vision_output)

    config = tiny_config()
    torch.manual_seed(0)
    model = ImageGenerator(config).eval()
    inputs = make_inputs(config)
    with torch.no_grad():
        ref = model(**inputs)
        xlx_fast.optimize(model)
        out = model(**inputs)
    assert len(patched_names(model)) == config.l_layers + config.r_layers + 3 * config.x_layers
    assert rel_err(out, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Eager path for this call: output_attentions, training, gradients, unsupported inputs

def test_output_attentions_gives_hf_probs(monkeypatch):
    config = tiny_config()
    model = build(LxmertModel, config)
    inputs = make_inputs(config)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
        xlx_fast.optimize(model)
        counter = CallCounter(monkeypatch)
        out = model(**inputs, output_attentions=True)
    # HF asks for probabilities in every language, relational and lang->visual cross call; the
    # three other calls of each cross layer pass output_attentions=False and stay fused.
    assert counter.calls == 3 * config.x_layers
    assert_outputs_close(out, ref)
    for key in ("language_attentions", "vision_attentions", "cross_encoder_attentions"):
        assert len(out[key]) == len(ref[key]) > 0
        for a, b in zip(out[key], ref[key]):
            if key == "cross_encoder_attentions":  # its inputs went through fused calls
                torch.testing.assert_close(a, b)
            else:  # eager all the way: identical
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_mode_takes_eager_path(monkeypatch):
    config = tiny_config(attention_probs_dropout_prob=0.5)
    model = build(LxmertModel, config)
    inputs = make_inputs(config)
    plain = build(LxmertModel, config).train()
    xlx_fast.optimize(model).train()
    counter = CallCounter(monkeypatch)
    torch.manual_seed(3)
    out = model(**inputs)
    torch.manual_seed(3)
    ref = plain(**inputs)
    assert counter.calls == 0
    assert_outputs_close(out, ref, tol=0)  # same dropout draws: the eager path, op for op
    out.vision_output.sum().backward()     # and gradients flow
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_gradient_needed_takes_eager_path(monkeypatch):
    """Eval mode with grad enabled and parameters requiring grad: eager (the kernel has no backward)."""
    config = tiny_config(l_layers=1, x_layers=1)
    model = xlx_fast.optimize(build(LxmertModel, config))
    plain = build(LxmertModel, config)
    inputs = make_inputs(config)
    counter = CallCounter(monkeypatch)
    model(**inputs).pooled_output.sum().backward()
    plain(**inputs).pooled_output.sum().backward()
    assert counter.calls == 0
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    # with parameters frozen and no input requiring grad, the fused path runs even in grad mode
    model.requires_grad_(False)
    model(**inputs)
    assert counter.calls == 1 + 1 + 4


def test_mask_that_is_not_key_padding_takes_eager_path(monkeypatch):
    config = tiny_config()
    torch.manual_seed(0)
    plain = LxmertAttention(config).eval()
    fused = LxmertAttention(config).eval()
    fused.load_state_dict(plain.state_dict())
    xlx_fast.optimize(fused)
    assert type(fused) is FusedLxmertAttention
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 6, 64)
    full_mask = torch.zeros(2, 1, 5, 6)
    full_mask[..., 3:] = torch.finfo(torch.float32).min
    counter = CallCounter(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, ctx, full_mask)[0], plain(x, ctx, full_mask)[0], rtol=0, atol=0)
        assert counter.calls == 0
        key_mask = full_mask[:, :, :1]
        assert rel_err(fused(x, ctx, key_mask)[0], plain(x, ctx, key_mask)[0]) <= 1e-5
        assert rel_err(fused(x, x, key_mask[..., :5])[0], plain(x, x, key_mask[..., :5])[0]) <= 1e-5
        assert counter.calls == 2


def test_unsupported_head_dim_is_left_unpatched():
    config = tiny_config(hidden_size=48, num_attention_heads=2)  # head dim 24
    model = build(LxmertModel, config)
    with pytest.warns(UserWarning, match="head dim 24"):
        xlx_fast.optimize(model)
    assert patched_names(model) == []


def test_subclass_of_lxmert_attention_is_left_unpatched():
    class Custom(LxmertAttention):
        pass

    holder = nn.Sequential(Custom(tiny_config()))
    with pytest.warns(UserWarning, match="subclasses LxmertAttention"):
        xlx_fast.optimize(holder)
    assert type(holder[0]) is Custom


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        xlx_fast.optimize("LxmertModel")


def test_cuda_model_without_triton_is_refused(monkeypatch):
    class FakeCudaParam:
        is_cuda = True

    class Holder(nn.Module):
        def parameters(self, recurse=True):
            return iter([FakeCudaParam()])

    monkeypatch.setattr(_common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton"):
        xlx_fast.optimize(Holder())


# ---------------------------------------------------------------------------------------------
# GPU: whole model on CUDA through the compiled kernel

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_full_size_model_matches_plain(dtype):
    config = LxmertConfig()
    model = build(LxmertModel, config).cuda().to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v
              for k, v in make_inputs(config, B=64, L=20, V=64, device="cuda").items()}
    with torch.no_grad():
        ref = model(**inputs)
        xlx_fast.optimize(model)
        out = model(**inputs)
    assert_outputs_close(out, ref, tol=1e-5 if dtype == torch.float32 else 2e-2)


# ---------------------------------------------------------------------------------------------
# The output and feed-forward blocks: one fused_linear each

BLOCKS = (LxmertAttentionOutput, LxmertOutput, LxmertIntermediate)


def fused_block_calls(config) -> int:
    """fused_linear calls of one forward: a language or relational layer has an attention
    output, an intermediate and an output block; a cross layer has the cross-attention's output
    block for each stream, each stream's self-attention output block and each stream's FFN."""
    return 3 * (config.l_layers + config.r_layers) + 8 * config.x_layers


def count_block_ops(monkeypatch) -> list:
    calls = []
    for name in ("linear_add_layernorm", "linear_gelu"):
        inner = getattr(patching, name)
        monkeypatch.setattr(patching, name, lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k))
    return calls


needs_packing = pytest.mark.skipif(not frozen_weights.available(),
                                   reason="torch built without MKL's packed GEMMs")


@needs_packing
@pytest.mark.parametrize("block", BLOCKS, ids=lambda c: c.__name__)
def test_fused_blocks_equal_hf(block, monkeypatch):
    """A block takes its fused op on a CPU only against a packed (frozen) weight: unfrozen it is
    HF's forward, bit for bit; frozen it is the fused op, within fp32 rounding of float64; and
    HF's forward, with its gradients, when a gradient is needed."""
    config = tiny_config(hidden_size=40, intermediate_size=72, num_attention_heads=1)
    torch.manual_seed(5)
    plain = block(config).eval()
    fused = xlx_fast.optimize(copy.deepcopy(plain))
    assert type(fused) is {LxmertIntermediate: FusedLxmertIntermediate}.get(block, FusedLxmertAddNorm)
    width = config.intermediate_size if block is LxmertOutput else config.hidden_size
    x = torch.randn(3, 7, width)
    args = (x,) if block is LxmertIntermediate else (x, torch.randn(3, 7, config.hidden_size))
    calls = count_block_ops(monkeypatch)
    with torch.no_grad():
        assert torch.equal(fused(*args), plain(*args)) and not calls
        xlx_fast.freeze(fused)
        out = fused(*args)
        ref = copy.deepcopy(plain).double()(*(a.double() for a in args))
    assert len(calls) == 1 and rel_err(out, ref) <= 1e-6
    x.requires_grad_(True)  # grad mode and an input needing it: HF's forward, gradients flow
    fused(*args).sum().backward()
    assert len(calls) == 1 and x.grad is not None and fused.dense.weight.grad is not None


@needs_packing
def test_optimized_model_runs_every_block_fused(monkeypatch):
    """Every output and intermediate block of a frozen optimized model goes through
    fused_linear, and the model's outputs stay HF's within fp32 rounding; unoptimize gives the
    HF classes back."""
    config = tiny_config()
    model = xlx_fast.freeze(xlx_fast.optimize(build(LxmertModel, config)))
    plain = build(LxmertModel, config)
    calls = count_block_ops(monkeypatch)
    inputs = make_inputs(config)
    with torch.no_grad():
        assert_outputs_close(model(**inputs), plain(**inputs))
    assert len(calls) == fused_block_calls(config)
    unoptimize(model)
    assert sorted({type(m).__name__ for m in model.modules()}) == \
        sorted({type(m).__name__ for m in plain.modules()})


def test_an_intermediate_without_hf_gelu_is_left_as_it_is():
    config = tiny_config(hidden_act="relu")
    model = xlx_fast.optimize(build(LxmertModel, config))
    kinds = {type(m) for m in model.modules()}
    assert LxmertIntermediate in kinds and FusedLxmertIntermediate not in kinds
    assert FusedLxmertAddNorm in kinds


@needs_packing
def test_frozen_optimized_model_multiplies_every_block_by_packed_weights():
    """optimize + freeze: every block's dense weight (and the attention projections) runs
    packed, and the outputs stay within fp32 rounding of the float64 HF model."""
    config = tiny_config()
    plain = build(LxmertModel, config)
    model = xlx_fast.freeze(xlx_fast.optimize(copy.deepcopy(plain)))
    inputs = make_inputs(config, B=3, L=11, V=13)
    with torch.no_grad():
        out = model(**inputs)
        ref = plain.double()(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    assert_outputs_close(out, ref)
    table = frozen_weights._TABLES[model]
    packed = {key[:2] for key in table.packs}
    denses = [m.dense.weight for m in model.modules() if isinstance(m, (FusedLxmertAddNorm, FusedLxmertIntermediate))]
    assert len(denses) == fused_block_calls(config) - config.x_layers  # a cross layer's block serves both streams
    assert all((w.untyped_storage().data_ptr(), w.storage_offset()) in packed for w in denses)


def test_a_frozen_bf16_model_packs_its_blocks_where_this_cpu_multiplies_bf16(monkeypatch):
    """bfloat16, frozen: where oneDNN multiplies bf16 natively every block takes its fused op
    against packed weights; elsewhere the blocks stay HF's (nothing packed). Either way the
    outputs stay within bf16 rounding of the float64 HF model."""
    config = tiny_config()
    plain = build(LxmertModel, config)
    model = xlx_fast.freeze(xlx_fast.optimize(copy.deepcopy(plain).bfloat16()))
    inputs = make_inputs(config, B=2, L=11, V=13)
    calls = count_block_ops(monkeypatch)
    with torch.no_grad():
        out = model(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()})
        ref = plain.double()(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    assert_outputs_close(out, ref, tol=2e-2)
    packs = frozen_weights.available(torch.bfloat16)
    assert len(calls) == (fused_block_calls(config) if packs else 0)
    assert (frozen_weights.packed_count(model) > 0) == packs
