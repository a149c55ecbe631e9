"""End to end: captioning by Mask-Predict-4 over 12 words, reference loop vs ``xlx_fast.caption``.

The reference is :func:`xlx_fast.reference.caption.caption` (the eager loop on HF
``LxmertModel`` and its masked-LM head) in the row's dtype ("same dtype", SPEC §6); the fast
path is ``xlx_fast.caption`` on a separate copy of the same weights (the embedded default with
its pre-training heads). The images are seeded random cluster ids, B of them.

Agreement is the share of words equal to the same-dtype reference (a share, not equality, for
the reason :mod:`.generation` gives: the random-weight head is nearly flat; the tests sharpen it
and require equality). Rows in another dtype than fp32 also report the share of words equal to
the fp32 reference.

The peer is the same reference loop with its transformer under ``torch.compile`` (see
:mod:`.compiled`), in the full sweep.
"""
from __future__ import annotations

import copy

import torch

from ..harness import FAST, PEER, Agreement, Case, Prepared, Spec, fast_module, id_share, not_implemented
from . import compiled, frozen

STEPS, WORDS = 4, 12
MIN_SHARE = {torch.float32: 0.95, torch.bfloat16: 0.6, torch.float16: 0.6}
BATCHES = {
    ("cpu", True): (1,),
    ("cpu", False): (1, 8),
    ("cuda", True): (1, 64),
    ("cuda", False): (1, 64),
}

_MODELS: dict = {}
_FP32_IDS: dict = {}


def release() -> None:
    _MODELS.clear()
    _FP32_IDS.clear()


def model(size: str, dtype: torch.dtype, device: torch.device, role: str):
    """The default model with its masked-LM head, in ``dtype`` on ``device``; one copy per role."""
    from xlx_fast.models import XLxmertForImageGeneration

    key = (size, dtype, str(device), role)
    if key not in _MODELS:
        base_key = (size, torch.float32, "cpu", "base")
        if base_key not in _MODELS:
            _MODELS[base_key] = XLxmertForImageGeneration.from_default(
                seed=0, size=size, with_generator=False, pretraining_heads=True)
        _MODELS[key] = copy.deepcopy(_MODELS[base_key]).to(device=device, dtype=dtype).eval()
    return _MODELS[key]


def images(batch: int, n_clusters: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, n_clusters, (batch, 64), generator=g).to(device)


def make_case(spec: Spec, dtype: torch.dtype, batch: int) -> Case:
    device = spec.device

    def build() -> Prepared:
        from xlx_fast.reference.caption import caption as reference_caption

        captioning = fast_module("xlx_fast.captioning")
        ref_model = model(spec.size, dtype, device, "reference")
        ids = images(batch, ref_model.n_clusters, device)

        def run_reference():
            out = reference_caption(ref_model, cluster_ids=ids, length=WORDS, steps=STEPS).ids
            if dtype == torch.float32:
                _FP32_IDS.setdefault((spec.size, str(device), batch), out)
            return out

        if captioning is None:
            fast = not_implemented("xlx_fast/captioning.py")
        else:
            fast_model, fast_note = frozen.freeze(model(spec.size, dtype, device, "fast"))

            def fast():
                return captioning.caption(fast_model, cluster_ids=ids, length=WORDS, steps=STEPS).ids

        def compare(ref_ids, out_ids, _name) -> Agreement:
            share = id_share(out_ids, ref_ids)
            limit = MIN_SHARE[dtype]
            ok, extra = share >= limit, {}
            key = (spec.size, str(device), batch)
            if dtype != torch.float32 and key in _FP32_IDS:
                extra["fp32-ref agree"] = id_share(out_ids, _FP32_IDS[key])
                extra["ref-vs-fp32 agree"] = id_share(ref_ids, _FP32_IDS[key])
                ok = ok or extra["fp32-ref agree"] >= extra["ref-vs-fp32 agree"]
            return Agreement("word agree", share, limit, ok,
                             detail="" if ok else "words differ from the same-dtype reference",
                             extra=extra)

        peer = compiled.unavailable(spec, "caption", dtype)
        notes = {} if captioning is None else {"xlx_fast.caption": fast_note}
        if peer is None:
            compiled_model = compiled.compiled_copy(ref_model, "bert", spec)
            peer = compiled.FirstCallTimer(
                lambda: reference_caption(compiled_model, cluster_ids=ids, length=WORDS, steps=STEPS).ids,
                spec, freezing=frozen.peer_freezes(device, dtype))
            notes[compiled.NAME] = peer.note
        return Prepared(reference=run_reference,
                        backends={"xlx_fast.caption": fast, compiled.NAME: peer},
                        compare=compare, notes=notes)

    return Case(op="caption", shape=f"B={batch} MP-{STEPS} L={WORDS}", dtype=dtype, device=device,
                backends={"xlx_fast.caption": FAST, compiled.NAME: PEER}, build=build)


def cases(spec: Spec):
    batches = (1, 2) if spec.size == "tiny" else BATCHES[(spec.device.type, spec.quick)]
    for batch in batches:
        for dtype in spec.dtypes:
            yield make_case(spec, dtype, batch)
