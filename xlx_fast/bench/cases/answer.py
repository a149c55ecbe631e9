"""The answer task end to end: the eager reference vs ``xlx_fast.answer`` (VQA and NLVR2).

The model is ``XLxmertForQuestionAnswering.from_default`` (the real architecture with seeded
random weights; ``size="tiny"`` for tests of the machinery). Inputs: B questions of typical VQA
length (6 to 12 tokens with [CLS] and [SEP], hashed by the fallback tokenizer, padded to 20 as
the authors feed them) about B seeded random grids of 64 features (NLVR2: two grids each).

Reference (the timed baseline): ``reference.answer.answer_logits``, the authors' forward on HF's
eager ``LxmertModel`` plus the answer head, in the row's dtype ("same dtype", SPEC §6). Fast:
``xlx_fast.answer`` on a separate copy of the same weights (it optimizes its model in place),
top-k answers included. Peer: the reference with its ``bert`` under ``torch.compile`` (see
:mod:`.compiled`).

Agreement: the norm-wise relative error of the logits against the same-dtype reference (SPEC §4
bound for the dtype); the share of rows whose best answer is the reference's is listed beside it.
A half-precision reference is itself ~1.5% from the fp32 logits at the base size (bf16 rounds
after every op), so two bf16 runs sit near the 2e-2 bound by rounding alone: a half row also
passes when it is no further from the fp32 reference than the same-dtype reference is (both
distances are listed), as the generation rows do with their ids.

FLOPs: the reference's GEMMs (:func:`.model_forward.forward_flops` at the padded length 20, over
B x images grids) plus the pooler and the answer head. The fast path does fewer (no padding, no
visual half and only the [CLS] row in the last cross layer), so its TFLOP/s is an effective rate.
"""
from __future__ import annotations

import copy

import torch

from ..harness import FAST, PEER, TOLERANCE, Agreement, Case, Prepared, Spec, rel_error
from . import compiled, frozen
from .model_forward import forward_flops

TEXT_LENGTH, CELLS = 20, 64
QUESTIONS = (
    "what color is the bus?",
    "how many people are in the picture?",
    "is there a dog on the couch?",
    "what is the man holding in his right hand?",
    "where is the cat?",
    "what sport is being played?",
    "are the lights on?",
    "what is on the plate next to the fork?",
)
STATEMENTS = (
    "the left image contains two dogs.",
    "there is a red bus in one of the images.",
)
# (device type, quick) -> task -> batches. SPEC §6: B = 1 and 8 on the CPU, 1 and 64 on GPUs.
# The quick CPU sweep (the README's main command, about two minutes on 2 cores) takes one row.
BATCHES = {
    ("cpu", True): {"vqa": (1,)},
    ("cpu", False): {"vqa": (1, 8), "nlvr2": (1, 8)},
    ("cuda", True): {"vqa": (1, 64)},
    ("cuda", False): {"vqa": (1, 64), "nlvr2": (1, 64)},
}
TINY = {"vqa": (1, 2), "nlvr2": (1,)}
FAST_NAME = "xlx_fast.answer"

_MODELS: dict = {}
_FP32_LOGITS: dict = {}


def release() -> None:
    _MODELS.clear()
    _FP32_LOGITS.clear()


def model(task: str, size: str, dtype: torch.dtype, device: torch.device, role: str):
    """The seeded default model of ``task``; one copy per (dtype, device, role)."""
    from xlx_fast.models import XLxmertForQuestionAnswering

    key = (task, size, dtype, str(device), role)
    if key not in _MODELS:
        base_key = (task, size, torch.float32, "cpu", "base")
        if base_key not in _MODELS:
            _MODELS[base_key] = XLxmertForQuestionAnswering.from_default(task, seed=0, size=size)
        _MODELS[key] = copy.deepcopy(_MODELS[base_key]).to(device=device, dtype=dtype).eval()
    return _MODELS[key]


def make_inputs(task: str, feat_dim: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    from xlx_fast.text import CaptionTokenizer

    texts = STATEMENTS if task == "nlvr2" else QUESTIONS
    ids, mask = CaptionTokenizer.fallback()([texts[i % len(texts)] for i in range(batch)], TEXT_LENGTH)
    gen = torch.Generator().manual_seed(batch)
    lead = (batch, 2) if task == "nlvr2" else (batch,)
    feats = torch.randn(*lead, CELLS, feat_dim, generator=gen)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                features=feats.to(device, dtype))


def answer_flops(cfg, task: str, batch: int, n_answers: int) -> float:
    images = 2 if task == "nlvr2" else 1
    h = cfg.hidden_size
    head_in, head_hid = images * h, (2 * h if images == 1 else images * h)
    head = 2 * batch * (head_in * head_hid + head_hid * n_answers)
    return forward_flops(cfg, batch * images, TEXT_LENGTH, CELLS) + head  # forward_flops has the pooler


def make_case(spec: Spec, task: str, dtype: torch.dtype, batch: int) -> Case:
    from transformers import LxmertConfig

    from xlx_fast.models.answering import TASKS
    from xlx_fast.models.sizes import SIZES

    device = spec.device
    cfg = LxmertConfig(**SIZES[spec.size].lxmert)

    def build() -> Prepared:
        import xlx_fast
        from xlx_fast.reference.answer import answer_logits

        ref_model = model(task, spec.size, dtype, device, "reference")
        fast_model, fast_note = frozen.freeze(model(task, spec.size, dtype, device, "fast"))
        inputs = make_inputs(task, ref_model.feat_dim, batch, dtype, device)

        fp32_key = (task, spec.size, str(device), batch)

        def reference():
            with torch.no_grad():
                out = answer_logits(ref_model, **inputs)
            if dtype == torch.float32:  # the fp32 logits of the other dtypes' rows, for free
                _FP32_LOGITS.setdefault(fp32_key, out)
            return out

        def fp32_logits():
            if fp32_key not in _FP32_LOGITS:
                ref32 = model(task, spec.size, torch.float32, device, "reference")
                with torch.no_grad():
                    _FP32_LOGITS[fp32_key] = answer_logits(
                        ref32, **make_inputs(task, ref32.feat_dim, batch, torch.float32, device))
            return _FP32_LOGITS[fp32_key]

        def fast():
            return xlx_fast.answer(fast_model, **inputs).logits

        def compare(ref, out, _name) -> Agreement:
            err, limit = rel_error(out, ref), TOLERANCE[dtype]
            top1 = (out.argmax(1).cpu() == ref.argmax(1).cpu()).double().mean().item()
            extra, ok = {"top-1 agree": top1}, err <= limit
            if dtype != torch.float32:
                extra["fp32-ref err"] = rel_error(out, fp32_logits())
                extra["ref-vs-fp32 err"] = rel_error(ref, fp32_logits())  # the reference's own drift
                ok = ok or extra["fp32-ref err"] <= extra["ref-vs-fp32 err"]
            return Agreement("rel err", err, limit, ok,
                             detail="" if ok else "logits outside the bound", extra=extra)

        peer = compiled.unavailable(spec, "answer", dtype)
        notes = {FAST_NAME: fast_note}
        if peer is None:
            compiled_model = compiled.compiled_copy(ref_model, "bert", spec)

            def peer_call():
                with torch.no_grad():
                    return answer_logits(compiled_model, **inputs)

            peer = compiled.FirstCallTimer(peer_call, spec, freezing=frozen.peer_freezes(device, dtype))
            notes[compiled.NAME] = peer.note
        return Prepared(reference=reference, backends={FAST_NAME: fast, compiled.NAME: peer},
                        compare=compare, notes=notes)

    return Case(op="answer", shape=f"{task} B={batch} Lt<={TEXT_LENGTH} Lv={CELLS} H={cfg.hidden_size}",
                dtype=dtype, device=device, backends={FAST_NAME: FAST, compiled.NAME: PEER},
                build=build, flops=answer_flops(cfg, task, batch, TASKS[task].n_answers),
                bound="compute")


def cases(spec: Spec):
    table = TINY if spec.size == "tiny" else BATCHES[(spec.device.type, spec.quick)]
    for task, batches in table.items():
        for batch in batches:
            for dtype in spec.dtypes:
                yield make_case(spec, task, dtype, batch)
