"""``xlx_fast.caption``: write a caption for an image by Mask-Predict over words, fast.

Same arguments and result as :func:`xlx_fast.reference.caption.caption`, run on
:class:`xlx_fast.caption_engine.CaptionEngine` with ``slots = B``: each row's caption depends on
that row's image and parameters only. Per call the loop does the reference's arithmetic minus
the work that cannot change the answer (each saving is exact algebra, see
:mod:`xlx_fast.caption_plan`): the image stream (visual encoder and the 5 relational layers)
runs once per image instead of once per step; the last cross layer's visual half is never
computed; the masked-LM head returns (max probability, argmax) per word without a
[B, L, 30522] tensor; the next step's word embeddings are gathered by the sampler op.

Equality with the reference: the fused head and the fused linears round differently from the
eager modules, so probabilities agree to float rounding and words are equal wherever the best
and second-best word are further apart than that (SPEC §4); the tests sharpen the head and then
require exact equality.
"""
from __future__ import annotations


import torch

from .caption_engine import CaptionEngine, CaptionRequest
from .step_engine import run_requests
from .caption_io import DEFAULT_WORDS, MAX_WORDS, CaptionResult, check_image, check_lengths
from .generation import cached_engine, per_row
from .ops._common import cpu_gemm_rows
from .sampling_params import check_params

__all__ = ["caption"]


def _engine(model, b: int, words: int, cuda_graph: bool) -> CaptionEngine:
    """An engine of b slots whose text holds ``words``: the batch's longest caption (a wider
    text runs every layer over padding the reference never sees), or at batch 1 on a CPU at
    least 16 words, where GEMMs of fewer rows are slower (``ops._common.cpu_gemm_rows``).
    Cached like ``generate``'s (``generation.cached_engine``)."""
    return cached_engine(model, "_xlx_caption_engines", (b, words), cuda_graph,
                         lambda: CaptionEngine(model, slots=b, max_words=words,
                                               cuda_graph=cuda_graph, buckets=[b]))


@torch.no_grad()
def caption(model, features=None, cluster_ids=None, length=DEFAULT_WORDS, steps=None,
            strategy="mask_predict", temperature=0.0, seed=None, cuda_graph: bool | None = None,
            progress: bool = False) -> CaptionResult:
    """Caption images, fast.

    Args:
        model: ``XLxmertForImageGeneration`` with its masked-LM head (built with
            ``pretraining_heads=True``), in eval mode; ``optimize`` is applied in place.
        features: [B, n, F] grid features, or ``cluster_ids`` [B, n] (e.g. ``generate``'s
            ``ids``: "paint, then read back"), n = ``model.n_cells``, the cells of the model's
            grid. Exactly one.
        length: words per caption, 1..18: an int, or one per row.
        steps, strategy, temperature, seed: as for ``xlx_fast.generate``, over the caption's
            words (default steps: 4 for Mask-Predict, L for the AR orders); a scalar or one per
            row. ``temperature > 0`` samples each word from softmax(logits / temperature) with
            Philox noise keyed by (seed, step, word) -- not part of the reference.
        cuda_graph: capture the steps as CUDA graphs (default: on for CUDA models).
        progress: a progress bar over the steps.

    Returns :class:`xlx_fast.caption_io.CaptionResult` on the model's device. Raises ValueError
    naming the row when the sampler flags one (NaN probabilities).
    """
    if getattr(model, "cls", None) is None:
        raise ValueError("captioning needs the masked-LM head (cls.predictions): build the model "
                         "with pretraining_heads=True (from_default or from_checkpoint)")
    if model.training:
        raise ValueError("caption() runs inference only: call model.eval() first")
    image = check_image(model, features, cluster_ids)
    b = image.shape[0]
    lengths = check_lengths(length, b)
    columns = [per_row(name, value, b, kind) for name, value, kind in (
        ("strategy", strategy, str), ("steps", steps, int), ("temperature", temperature, float),
        ("seed", seed, int))]
    params = [check_params(st, k.item() if isinstance(k, torch.Tensor) else k, t,
                           0 if x is None else x, n, where=f"row {r}: ")
              for r, (st, k, t, x, n) in enumerate(zip(*columns, lengths))]
    device = model.centroids.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")

    # b rows of W words each: run W >= 16 on a CPU where a GEMM of fewer rows is slower
    words = min(MAX_WORDS, cpu_gemm_rows(b * max(lengths), model.centroids.device) // b)
    engine = _engine(model, b, max(words, max(lengths)), cuda_graph)
    requests = [CaptionRequest(features=image[r], length=n, seed=p.seed, steps=p.steps,
                               strategy=p.strategy.name, temperature=p.temperature)
                for r, (p, n) in enumerate(zip(params, lengths))]
    results = run_requests(engine, requests, max(p.steps for p in params) if progress else None,
                           "xlx_fast caption")
    width, k = max(lengths), max(p.steps for p in params)
    ids = torch.zeros(b, width, dtype=torch.int64)
    probs = torch.zeros(b, width, dtype=torch.float32)
    masks = torch.zeros(k, b, width, dtype=torch.bool)
    for r, f in enumerate(results):
        n = lengths[r]
        ids[r, :n], probs[r, :n] = f.ids, f.probs
        masks[:f.masks.shape[0], r, :n] = f.masks
    return CaptionResult(ids=ids.to(device), probs=probs.to(device), masks=masks.to(device),
                         lengths=torch.tensor(lengths, device=device))
