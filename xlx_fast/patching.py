"""``optimize(model)``: route every HF ``LxmertAttention`` of a model through ``xlx_fast.ops.attention``,
and its output and feed-forward blocks through ``xlx_fast.ops.fused_linear``.

What is swapped. Each module whose type is exactly one of ``transformers``' LXMERT classes below
gets its class switched to a subclass that only overrides ``forward``:

- ``LxmertAttention`` → ``FusedLxmertAttention`` (the attention, below);
- ``LxmertAttentionOutput`` and ``LxmertOutput`` → ``FusedLxmertAddNorm``: LayerNorm(dense(x) +
  input) as one ``fused_linear`` (dense + bias + residual + LayerNorm);
- ``LxmertIntermediate`` with HF's exact GELU → ``FusedLxmertIntermediate``: GELU(dense(x)) as
  one ``fused_linear``.

Nothing else changes: no module is replaced, no parameter is added, renamed or rewritten, so
``state_dict()`` keys and values are those of the plain model and load into it strictly. For the
default ``LxmertConfig`` that is 9 language + 5 relational + 3·5 cross-layer attention modules =
29 (each cross layer's ``visual_attention`` serves both directions, so 34 attention calls per
forward). On a GPU a block's fused forward is one op (the Triton kernel or cuBLAS and its
epilogue, whichever the op's per-shape measurement found faster). On a CPU the op's torch backend
runs HF's ops in HF's order (same bits), which earns its ~25 µs of dispatch a call only where the
GEMM multiplies by a packed weight (a model frozen by ``xlx_fast.freeze``): elsewhere a CPU block
runs HF's forward itself (measured at the base size, B=1: 4 ms slower in all through the op,
unfrozen). Blocks also take HF's forward under the attention's rules (training, gradients,
float64) and when the LayerNorm is wider than the fused op holds
(``fused_linear.MAX_LAYERNORM_WIDTH``).

The fused forward:

- self-attention (``context is hidden_states``, as ``LxmertSelfAttentionLayer`` calls it): one
  GEMM against ``[W_q; W_k; W_v]`` and the attention kernel reads Q, K, V as column slices of
  its output;
- cross-attention: the query projection, then one GEMM against ``[W_k; W_v]`` (a row slice of
  the same fused matrix, no second copy);
- the mask is HF's extended ``[B, 1, 1, Lk]`` additive mask, built once per model forward by
  ``LxmertModel``; the CUDA kernel reads it in place, so it is never converted (the CPU path
  turns it into an fp32 bias per call: B·Lk elements).

The fused matrix is the storage of the projections: ``optimize`` concatenates them once and
rebinds each projection's ``weight``/``bias`` to a view (row slice) of it, so no copy exists that
could go stale: ``load_state_dict``, optimizer steps, ``p.data.copy_``, a ``p.detach()`` view
or a numpy view all write the fused matrix itself. No extra memory. If a parameter stops being
such a view (``.to()``, ``.half()``, assigning a new ``Parameter`` or ``.data``), which its data
pointer shows, the next call re-fuses it (one concatenation). Note: ``torch.save`` of a single
projection tensor writes the whole fused storage (saving the full state dict writes it once).

Eager path, per call: the HF forward runs unchanged when the call has ``output_attentions=True``
(the fused kernel never forms the probabilities; note that HF's cross layers call their
self-attentions and the visual->language cross-attention with ``output_attentions=False`` even
when the model was asked for attentions, so those calls stay fused), in training mode (dropout; no backward kernel), when
autograd would need a gradient (grad mode on and an input or parameter requires grad, the same
rule as torch's ``nn.MultiheadAttention`` fast path: wrap inference in ``torch.no_grad()`` or
``torch.inference_mode()``), and for inputs the fused op does not take (float64, a mask that is
not a ``[B, 1, 1, Lk]`` key padding mask). Modules with a head dim other than 32/64/128 are not
patched (a warning names them).

Backend: the registry's choice for the device (CUDA: the Triton kernel, CPU: SDPA; see
``xlx_fast.ops.attention`` and ``xlx-fast info``).
``force_backend("triton")`` runs the Triton kernel on CPU tensors too, for tests under
``TRITON_INTERPRET=1``.

Reversible: ``unoptimize(model)`` switches the classes back and drops the fused matrices.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
from torch import nn
import torch.nn.functional as F
from transformers.activations import GELUActivation
from transformers.models.lxmert.modeling_lxmert import (LxmertAttention, LxmertAttentionOutput,
                                                        LxmertIntermediate, LxmertOutput)

from xlx_fast.ops import attention as _attn
from xlx_fast.ops import registry as _registry
from xlx_fast.ops.frozen_weights import is_packed, linear
from xlx_fast.ops.fused_linear import MAX_LAYERNORM_WIDTH, linear_add_layernorm, linear_gelu

__all__ = ["optimize", "ensure_optimized", "unoptimize", "FusedLxmertAttention", "FusedLxmertAddNorm",
           "FusedLxmertIntermediate", "force_backend", "fused_attention"]

_forced_backend: contextvars.ContextVar = contextvars.ContextVar("xlx_fast_attention_backend", default=None)


@contextlib.contextmanager
def force_backend(name: str):
    """Run patched attentions on ``"triton"`` or ``"sdpa"`` whatever the device (tests, benchmarks).

    ``with force_backend("triton"): model(...)`` runs the Triton kernel on CPU tensors under
    ``TRITON_INTERPRET=1``. Outside the block the device decides (CUDA: Triton, CPU: SDPA).
    """
    if name not in _registry.backend_names("attention"):
        raise ValueError(f"backend must be one of {sorted(_registry.backend_names('attention'))}, got {name!r}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


def fused_attention(q, k, v, mask, num_heads):
    """The fused attention op on (B, L, H·d) projections, on the backend ``force_backend`` names
    (else the registry's choice): what every patched module and the step plan call."""
    return _attn.attention(q, k, v, mask, num_heads=num_heads, backend=_forced_backend.get())


def _is_slice(p: torch.Tensor, fused: torch.Tensor, row: int, n: int) -> bool:
    """p is rows [row, row + n) of fused (same storage, place, shape, dtype and strides)."""
    view = fused[row:row + n]
    return (p.data_ptr() == view.data_ptr() and p.shape == view.shape and p.dtype == view.dtype
            and p.stride() == view.stride() and p.device == view.device
            and p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr())


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inference(module: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether a call may take a fused forward: eval mode (no dropout), a float dtype the fused ops
    take, and no gradient needed (the fused ops have no backward), the rule of torch's
    ``nn.MultiheadAttention`` fast path."""
    if module.training or tensors[0].dtype not in _FUSED_DTYPES:
        return False
    return not (torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                             or any(p.requires_grad for p in module.parameters())))


class FusedLxmertAttention(LxmertAttention):
    """``LxmertAttention`` with a fused forward; made by ``optimize()`` by switching the class of an
    existing instance (never constructed directly). Parameters are those of the HF module."""

    def _projections(self):
        qkv = self.query.in_features == self.key.in_features  # else Q cannot share K/V's GEMM
        return (self.query, self.key, self.value) if qkv else (self.key, self.value)

    def _aliased(self) -> bool:
        """Whether every projection parameter is still its row slice of the fused storage.

        Fast check first (every forward asks, 34 times at the base size): each parameter is
        the object it was, at the address and shape it had when fused. While the fused matrix
        lives no other tensor can take those addresses, so that holds exactly when the full
        comparison below would (a ``.data`` reassignment moves the address or the shape;
        ``.to()`` drops the fused matrix)."""
        w, b = getattr(self, "_xlx_weight", None), getattr(self, "_xlx_bias", None)
        if w is None:
            return False
        seen, params = self.__dict__.get("_xlx_seen"), self._params()
        if seen is not None and len(seen) == len(params) and all(
                p is q and p.data_ptr() == ptr and p.shape == shape
                for p, (q, ptr, shape) in zip(params, seen)):
            return True
        row = 0
        for lin in self._projections():
            n = lin.out_features
            if not _is_slice(lin.weight, w, row, n):
                return False
            if lin.bias is not None and (b is None or not _is_slice(lin.bias, b, row, n)):
                return False
            row += n
        self._xlx_seen = [(p, p.data_ptr(), p.shape) for p in params]
        return True

    def _params(self) -> list:
        return [p for lin in self._projections() for p in (lin.weight, lin.bias) if p is not None]

    def _fused_weights(self):
        """``[W_q; W_k; W_v]`` (or ``[W_k; W_v]``) and bias: the storage the projections'
        parameters are views of (re-fused when one stopped being a view)."""
        if not self._aliased():
            lins = self._projections()
            with torch.no_grad():
                w = torch.cat([lin.weight for lin in lins])
                b = None
                if any(lin.bias is not None for lin in lins):
                    b = torch.cat([lin.bias if lin.bias is not None
                                   else lin.weight.new_zeros(lin.out_features) for lin in lins])
                row = 0
                for lin in lins:  # the parameters become views: nothing left to go stale
                    n = lin.out_features
                    lin.weight.data = w[row:row + n]
                    if lin.bias is not None:
                        lin.bias.data = b[row:row + n]
                    row += n
            self._xlx_weight, self._xlx_bias = w, b
        return self._xlx_weight, self._xlx_bias

    def _drop_fused(self):
        for name in ("_xlx_weight", "_xlx_bias", "_xlx_seen"):
            self.__dict__.pop(name, None)

    def _apply(self, *args, **kwargs):
        self._drop_fused()  # .to()/.half()/...: the old copy would be rebuilt anyway; free it now
        return super()._apply(*args, **kwargs)

    def _takes_fused_path(self, hidden_states, context, attention_mask, output_attentions):
        if output_attentions or hidden_states.dim() != 3 or context.dim() != 3:
            return False
        if attention_mask is not None and tuple(attention_mask.shape) != (context.shape[0], 1, 1, context.shape[1]):
            return False
        return _inference(self, hidden_states, context)

    def forward(self, hidden_states, context, attention_mask=None, output_attentions=False):
        if not self._takes_fused_path(hidden_states, context, attention_mask, output_attentions):
            return super().forward(hidden_states, context, attention_mask, output_attentions)
        w, b = self._fused_weights()
        width = self.head_size
        if context is hidden_states and w.shape[0] == 3 * width:
            q, k, v = linear(hidden_states, w, b).split(width, dim=-1)
        else:
            q = (linear(hidden_states, w[:width], None if b is None else b[:width])
                 if w.shape[0] == 3 * width else self.query(hidden_states))
            k, v = linear(context, w[-2 * width:], None if b is None else b[-2 * width:]).split(width, dim=-1)
        return (fused_attention(q, k, v, attention_mask, self.num_attention_heads),)


def _block_fuses(module: nn.Module, x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether an output or intermediate block takes its fused op (the module docstring: on a
    CPU only against a packed weight)."""
    return ((x.device.type != "cpu" or is_packed(module.dense.weight, x.numel() // x.shape[-1]))
            and _inference(module, x, *others))


class FusedLxmertAddNorm(LxmertAttentionOutput):
    """``LxmertAttentionOutput`` / ``LxmertOutput`` (the same forward): LayerNorm(dense(x) +
    input) as one ``fused_linear``. Made by ``optimize()`` by switching an instance's class."""

    def forward(self, hidden_states, input_tensor):
        if (not _block_fuses(self, hidden_states, input_tensor)
                or self.dense.out_features > MAX_LAYERNORM_WIDTH
                or input_tensor.shape[:-1] != hidden_states.shape[:-1]):
            return super().forward(hidden_states, input_tensor)
        ln = self.LayerNorm
        return linear_add_layernorm(hidden_states, self.dense.weight, self.dense.bias,
                                    input_tensor.contiguous(), ln.weight, ln.bias, ln.eps)


class FusedLxmertIntermediate(LxmertIntermediate):
    """``LxmertIntermediate`` with HF's exact (erf) GELU: GELU(dense(x)) as one ``fused_linear``.
    Made by ``optimize()`` by switching an instance's class."""

    def forward(self, hidden_states):
        if not _block_fuses(self, hidden_states):
            return super().forward(hidden_states)
        return linear_gelu(hidden_states, self.dense.weight, self.dense.bias)


def _exact_gelu(module: LxmertIntermediate) -> bool:
    act = module.intermediate_act_fn
    return isinstance(act, GELUActivation) and act.act is F.gelu


# plain HF class -> its fused subclass (the output blocks: both HF classes share one forward)
_BLOCKS = {LxmertAttentionOutput: FusedLxmertAddNorm, LxmertOutput: FusedLxmertAddNorm,
           LxmertIntermediate: FusedLxmertIntermediate}


def _check_backend_available(model: nn.Module):
    """A CUDA model needs an attention backend that runs there (the registry says which, or why
    none does): refused now, not at the first forward."""
    if any(p.is_cuda for p in model.parameters()):
        _registry.select_impl("attention", "cuda")


def optimize(model: nn.Module) -> nn.Module:
    """Patch every HF ``LxmertAttention``, output and intermediate block in ``model`` in place (see
    the module docstring); returns ``model``.

    Works on any module containing them: ``LxmertModel``, ``LxmertForPreTraining``,
    ``LxmertForQuestionAnswering``, ``XLxmertForImageGeneration``. Idempotent: modules already
    patched are left as they are. Weights and state-dict keys are untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_backend_available(model)
    for name, module in model.named_modules():
        block = _BLOCKS.get(type(module))
        if block is not None and (block is not FusedLxmertIntermediate or _exact_gelu(module)):
            module._xlx_plain_class = type(module)
            module.__class__ = block
            continue
        if type(module) is FusedLxmertAttention or not isinstance(module, LxmertAttention):
            continue
        if type(module) is not LxmertAttention:
            warnings.warn(f"{name}: {type(module).__name__} subclasses LxmertAttention and may override "
                          f"its forward; left unpatched", stacklevel=2)
            continue
        if module.attention_head_size not in _attn.SUPPORTED_HEAD_DIMS:
            warnings.warn(f"{name}: head dim {module.attention_head_size} is not supported by the fused "
                          f"attention (supported: {_attn.SUPPORTED_HEAD_DIMS}); left on the eager path",
                          stacklevel=2)
            continue
        module.__class__ = FusedLxmertAttention
        module._fused_weights()  # built now, not inside a first (possibly graph-captured) call
    model._xlx_fast_optimized = True
    return model


def ensure_optimized(model: nn.Module) -> nn.Module:
    """``optimize(model)`` unless it already ran on this model (and ``unoptimize`` did not undo
    it): what the per-call front ends (``answer``, ``generate``) apply. Walking every module
    and parameter again cost ~2 ms a call at the base size, 2-3% of a batch-1 answer on a CPU.
    A module added to the model after that first call is patched by an explicit
    ``optimize(model)``."""
    if model.__dict__.get("_xlx_fast_optimized", False):
        return model
    return optimize(model)


def unoptimize(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: patched modules get their HF classes back; returns ``model``."""
    for module in model.modules():
        if type(module) is FusedLxmertAttention:
            module._drop_fused()
            module.__class__ = LxmertAttention
        elif type(module) in (FusedLxmertAddNorm, FusedLxmertIntermediate):
            module.__class__ = module.__dict__.pop("_xlx_plain_class")
        module.__dict__.pop("_xlx_fast_optimized", None)
    return model
