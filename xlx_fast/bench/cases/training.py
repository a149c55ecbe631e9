"""Training: the pre-training loss heads (CCC over 10,000 clusters + MLM over 30,522 words) and the
whole loss step, eager reference vs ``xlx_fast.training``.

``training_loss_head`` (forward + backward of both heads, from the encoder's outputs):

- reference: the authors' eager heads: ``obj_predict_head`` on all B·64 visual rows →
  ``[B·64, 10000]`` logits → ``F.cross_entropy`` (unmasked cells -100), and
  ``cls.predictions`` on all B·20 tokens → ``[B·20, 30522]`` logits → ``F.cross_entropy``;
- fast: the masked rows only, through ``fused_linear_cross_entropy`` (no logits held).
  Labels: uniform masking (half the cells on average) and 15 % of the tokens, as in training.

  Peak memory is measured once per backend, outside the timed runs, as the highest point of the
  running sum of every allocation and free made during one forward + backward, above the level
  at its start (so weights and inputs that already exist do not count): on the CPU from the
  ``[memory]`` events of ``torch.profiler`` (``profile_memory=True``), on CUDA from
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. It is reported in the
  row's ``agreement_extra`` (``peak_mib``, ``reference_peak_mib``, ``peak_ratio``), with the
  bytes of the parameter gradients both paths must return (``param_grad_mib``: at batch 8 the
  30522×768 word-embedding gradient dominates) and the ratio of what lies beyond them
  (``peak_ratio_beyond_param_grads``: logits, softmax and their gradients in the eager path).

``training_step``: ``pretrain_loss`` forward + backward of the whole model on a vis_mask and a
word_mask batch (the two tasks with big heads), eager reference (HF attention, unfused heads)
vs fast (SDPA attention with its backward, fused heads); bf16 rows run under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import FAST, Agreement, Case, Prepared, Spec, TOLERANCE, fast_module, not_implemented, rel_error

BATCHES = {("cpu", True): (8,), ("cpu", False): (8,), ("cuda", True): (256,), ("cuda", False): (256,)}
WORDS, CELLS = 20, 64


def peak_bytes(fn, device: torch.device) -> int:
    """Peak of allocations minus frees during ``fn()``, above the level at its start (see the
    module docstring for the method)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, n in events:
        level += n
        peak = max(peak, level)
    return peak


def _model(spec: Spec, device, dtype):
    from xlx_fast.models import XLxmertForImageGeneration

    model = XLxmertForImageGeneration.from_default(seed=0, size=spec.size, with_generator=False,
                                                   pretraining_heads=True)
    for m in model.modules():  # dropout off: the two paths must agree
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device).train()


def _labels(B, model, device, gen):
    from xlx_fast.reference import pretrain as rp

    ids = torch.randint(0, model.n_clusters, (B, CELLS), generator=gen)
    vis = torch.tensor([rp.vis_mask_for(0, 0, i) for i in range(B)])
    words = torch.randint(1000, model.config.vocab_size, (B, WORDS), generator=gen)
    sel = torch.rand(B, WORDS, generator=gen) < 0.15
    sel[:, 0] = True  # at least one word per row
    return (torch.where(vis, ids, -100).to(device), torch.where(sel, words, -100).to(device))


def head_case(spec: Spec, dtype: torch.dtype, B: int) -> Case:
    device = spec.device

    def build() -> Prepared:
        tr = fast_module("xlx_fast.ops.fused_linear_cross_entropy")
        model = _model(spec, device, dtype)
        gen = torch.Generator().manual_seed(0)
        H = model.config.hidden_size
        vis_out = torch.randn(B, CELLS, H, generator=gen).to(device)
        lang_out = torch.randn(B, WORDS, H, generator=gen).to(device)
        vis_lab, word_lab = _labels(B, model, device, gen)
        params = [p for p in list(model.obj_predict_head.parameters()) + list(model.cls.predictions.parameters())
                  if p.requires_grad]
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else torch.autocast(device.type, enabled=False))

        def step(loss_fn):
            v, l_ = vis_out.clone().requires_grad_(), lang_out.clone().requires_grad_()
            with autocast:
                loss = loss_fn(v, l_)
            return loss.detach(), torch.autograd.grad(loss, [v, l_, *params])

        def run(loss_fn):
            loss, grads = step(loss_fn)
            return loss, torch.cat([g.flatten().float() for g in grads])

        def eager(v, l_):
            z = model.obj_predict_head(v)
            s = model.cls.predictions(l_)
            return (F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), vis_lab.reshape(-1))
                    + F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), word_lab.reshape(-1)))

        def fused(v, l_):
            head, pred = model.obj_predict_head, model.cls.predictions
            sv, sw = vis_lab != -100, word_lab != -100
            x = head.linear_feat(head.transform(v[sv]))
            y = pred.transform(l_[sw])
            return (tr.fused_linear_cross_entropy(x, head.out_cluster.weight, vis_lab[sv], head.out_cluster.bias)
                    + tr.fused_linear_cross_entropy(y, pred.decoder.weight, word_lab[sw], pred.bias))

        ref_fn, fast_fn = (lambda: run(eager)), (lambda: run(fused))
        # peaks of forward + backward alone; the parameter gradients both must return (the
        # 30522×768 word-embedding gradient is most of them) are reported apart
        grad_bytes = sum(p.numel() * p.element_size() for p in params)
        ref_peak = peak_bytes(lambda: step(eager), device)
        fast_peak = peak_bytes(lambda: step(fused), device) if tr is not None else None

        def compare(ref, out, _name) -> Agreement:
            err = max(rel_error(out[0], ref[0]), rel_error(out[1], ref[1]))
            return Agreement("rel err", err, TOLERANCE[dtype], err <= TOLERANCE[dtype],
                             extra={"peak_mib": fast_peak / 2 ** 20, "reference_peak_mib": ref_peak / 2 ** 20,
                                    "peak_ratio": fast_peak / ref_peak,
                                    "param_grad_mib": grad_bytes / 2 ** 20,
                                    "peak_ratio_beyond_param_grads": (fast_peak - grad_bytes) / (ref_peak - grad_bytes)})

        backends = {"xlx_fast": fast_fn if tr is not None
                    else not_implemented("xlx_fast/ops/fused_linear_cross_entropy.py")}
        return Prepared(reference=ref_fn, backends=backends, compare=compare)

    K, V = (97, 30522) if spec.size == "tiny" else (10_000, 30522)
    return Case(op="training_loss_head", shape=f"B={B} cells={CELLS} K={K} words={WORDS} V={V}",
                dtype=dtype, device=device, backends={"xlx_fast": FAST}, build=build)


def step_case(spec: Spec, dtype: torch.dtype, B: int) -> Case:
    device = spec.device

    def build() -> Prepared:
        training = fast_module("xlx_fast.training")
        from xlx_fast.reference import pretrain as rp

        # one model, its attentions switched between HF's eager class and the training class
        # before each call (a class switch, nothing copied): two full-size models and their
        # gradients would not fit a small CI machine
        model = _model(spec, device, dtype)
        gen = torch.Generator().manual_seed(1)
        caps = torch.randint(1000, model.config.vocab_size, (B, WORDS), generator=gen)
        caps[:, 0], caps[:, -1] = rp.CLS_ID, rp.SEP_ID
        ids = torch.randint(0, model.n_clusters, (B, CELLS), generator=gen)
        batches = [rp.make_batch(caps, ids, range(B), step, 0, model.config.vocab_size) for step in (0, 1)]
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else torch.autocast(device.type, enabled=False))

        # Agreement covers the losses and the gradients of the heads, mask_feat and the last cross
        # layer (the end of every backward path); all 208M gradients, kept for both paths at once
        # by the harness, would not fit a small CI machine. The timed work is the same either way.
        checked = [p for n, p in model.named_parameters() if p.requires_grad and (
            n.startswith(("obj_predict_head.", "cls.", "mask_feat", f"bert.encoder.x_layers.{model.config.x_layers - 1}."))
            and n != "cls.predictions.decoder.weight")]

        def run(switch, loss_fn):
            switch(model)
            losses, grads = [], []
            for b in batches:
                model.zero_grad(set_to_none=True)
                with autocast:
                    loss = loss_fn(model, b)
                loss.backward()
                grads.extend(p.grad.flatten().float() for p in checked if p.grad is not None)
                losses.append(loss.detach().float())
            model.zero_grad(set_to_none=True)
            return torch.stack(losses), torch.cat(grads)

        def compare(ref, out, _name) -> Agreement:
            err = max(rel_error(out[0], ref[0]), rel_error(out[1], ref[1]))
            return Agreement("rel err", err, TOLERANCE[dtype], err <= TOLERANCE[dtype])

        backends = {"xlx_fast": (lambda: run(training.prepare_for_training, training.pretrain_loss))
                    if training else not_implemented("xlx_fast/training")}
        eager = training.unprepare if training else (lambda m: m)
        return Prepared(reference=lambda: run(eager, rp.pretrain_loss), backends=backends, compare=compare)

    return Case(op="training_step", shape=f"B={B} tasks=vis_mask+word_mask", dtype=dtype, device=device,
                backends={"xlx_fast": FAST}, build=build)


def cases(spec: Spec):
    batches = (2,) if spec.size == "tiny" else BATCHES[(spec.device.type, spec.quick)]
    for dtype in spec.dtypes:
        for B in batches:
            yield head_case(spec, dtype, B)
            yield step_case(spec, dtype, B)
