"""The reference pre-training step: the authors' X-LXMERT recipe in plain eager PyTorch.

This is what "same losses and gradients" means for ``xlx_fast.training`` (SPEC §6a). It follows
the authors' ``lxmert_pretrain.py`` run with ``--taskMaskLM --taskObjPredict --taskMatched
--visualLosses obj --vis_mask_predict --wordMaskRate 0.15 --clustering``:

Tasks. Step ``s`` trains one task, ``TASKS[s % 3]`` = vis_mask, word_mask, matched (the order
of the authors' ``MASK_MODALITY`` list; each batch carries one task and one loss):

- ``vis_mask`` (uniform masking, CCC): per example ``n = randint(1, N²)`` cells chosen uniformly
  without replacement are masked (N×N the model's grid: 64 cells at the paper's 8×8): their input feature ``C[id]`` is replaced by ``mask_feat``;
  ``loss = CE(obj_predict_head(visual_output), label)`` with ``label = id`` on masked cells and
  -100 elsewhere, averaged over the masked cells of the batch. The head is ``transform →
  linear_feat → out_cluster`` whose weight is the frozen centroid table C.
- ``word_mask`` (masked LM): each caption token other than [CLS], [SEP] and padding is selected
  with probability 0.15; a selected token becomes [MASK] with probability 0.8, a uniformly random
  word id with probability 0.1, and stays itself otherwise; ``loss = CE(cls.predictions(lang),
  label)`` over the 30,522 words (decoder tied to the word embeddings), label = the original id
  on selected tokens, -100 elsewhere. The image is not masked.
- ``matched``: with probability 0.5 the caption is replaced by another example's (label 0,
  else 1); ``loss = CE(cls.seq_relationship(pooled_output), label)``.

Where this differs from the authors' code, on purpose: (1) unselected word labels are -100 (the
authors write -1, an out-of-range target for ``F.cross_entropy``); (2) [CLS], [SEP] and padding
are never selected (the authors exclude the first and the last *column* of the padded batch,
which selects padding and the [SEP] of shorter captions, and makes a caption's masking depend
on its batch-mates' lengths); (3) randomness: every draw is a pure function of (seed, step,
example index, stream, position), see :func:`draw`, instead of Python's and torch's global
generators, so that a DDP rank that sees examples 8..15 draws exactly what a single process
sees for them, and the fast path can draw the same numbers on the device; (4) the swapped
caption of ``matched`` is another example's (index ``!= i``), not "another image's", because a
captions file need not name images.

Inputs are what any user has: cluster ids ``[B, N²]`` (or grid features ``[B, N², F]`` turned
into ids by :func:`nearest_ids`, a plain argmin) and tokenised captions ``[B, 20]`` (padding 0).

Optimiser: BERT-style AdamW (no weight decay on biases and LayerNorm weights), linear warm-up
over the first 5 % of the steps then linear decay to 0, gradient clipping at 1.0, optional
autocast (bf16 or fp16 with a grad scaler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grid import box_positions

__all__ = ["TASKS", "CLS_ID", "SEP_ID", "MASK_ID", "IGNORE_INDEX", "WORD_MASK_RATE", "draw",
           "task_for_step", "vis_mask_for", "word_mask_for", "matched_for", "make_batch",
           "nearest_ids", "pretrain_loss", "make_optimizer", "train_step", "Batch"]

TASKS = ("vis_mask", "word_mask", "matched")
CLS_ID, SEP_ID, MASK_ID = 101, 102, 103  # BERT-base-uncased WordPiece ids
IGNORE_INDEX = -100
WORD_MASK_RATE = 0.15
N_CELLS = 64

# Independent random streams per example (the ``stream`` argument of ``draw``).
S_VIS_COUNT, S_VIS_KEY, S_WORD_SELECT, S_WORD_KIND, S_WORD_RANDOM, S_MATCH, S_MATCH_OTHER = range(7)

_M32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A 32-bit integer hash (the "lowbias32" finaliser): a bijection on [0, 2^32) whose output
    bits each depend on every input bit."""
    x = (x + 0x9E3779B9) & _M32  # the offset keeps 0 from being a fixed point
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def draw(seed: int, step: int, index: int, stream: int, position: int) -> int:
    """A uniform 32-bit integer, a pure function of its arguments (each taken modulo 2^32).

    Everything random in the reference step is one of these: the example's ``index`` is its
    position in the dataset, so a draw does not depend on the batch or the process holding it.
    """
    h = _mix32(seed & _M32)
    for v in (step, index, stream, position):
        h = _mix32(h ^ (v & _M32))
    return h


def _below(h: int, p: float) -> bool:
    """True with probability ``p`` for a uniform 32-bit ``h`` (an integer threshold: exact)."""
    return h < int(p * 2 ** 32)


def task_for_step(step: int) -> str:
    return TASKS[step % len(TASKS)]


def vis_mask_for(seed: int, step: int, index: int, n_cells: int = N_CELLS) -> list[bool]:
    """Uniform masking of one example: ``n = 1 + draw % n_cells`` cells, the ``n`` with the
    smallest keys ``draw(..., S_VIS_KEY, cell)`` (ties broken by cell index): a uniformly random
    subset of size ``n``, i.e. ``randint(1, n_cells)`` cells without replacement (``n_cells``:
    the model's N², 64 at 8×8)."""
    n = 1 + draw(seed, step, index, S_VIS_COUNT, 0) % n_cells
    keys = [draw(seed, step, index, S_VIS_KEY, c) for c in range(n_cells)]
    chosen = sorted(range(n_cells), key=lambda c: (keys[c], c))[:n]
    mask = [False] * n_cells
    for c in chosen:
        mask[c] = True
    return mask


def word_mask_for(seed: int, step: int, index: int, ids: list[int], vocab_size: int
                  ) -> tuple[list[int], list[int]]:
    """BERT masking of one caption: returns (input ids, labels) as lists of ``len(ids)``."""
    inputs, labels = list(ids), [IGNORE_INDEX] * len(ids)
    for t, tok in enumerate(ids):
        if tok in (0, CLS_ID, SEP_ID):
            continue
        if not _below(draw(seed, step, index, S_WORD_SELECT, t), WORD_MASK_RATE):
            continue
        labels[t] = tok
        kind = draw(seed, step, index, S_WORD_KIND, t)
        if _below(kind, 0.8):
            inputs[t] = MASK_ID
        elif _below(kind, 0.9):
            inputs[t] = draw(seed, step, index, S_WORD_RANDOM, t) % vocab_size
    return inputs, labels


def matched_for(seed: int, step: int, index: int, n_examples: int) -> int:
    """The example whose caption example ``index`` shows: itself (label 1) with probability 0.5,
    else a uniformly chosen other example (label 0)."""
    if n_examples < 2 or not _below(draw(seed, step, index, S_MATCH, 0), 0.5):
        return index
    other = draw(seed, step, index, S_MATCH_OTHER, 0) % (n_examples - 1)
    return other + (other >= index)


@dataclass
class Batch:
    """One step's inputs, built by :func:`make_batch`.

    ``input_ids`` [B, L] (after word masking or caption swapping), ``cluster_ids`` [B, N²],
    ``vis_mask`` [B, N²] bool (all False unless task is vis_mask), ``labels``: [B, N²] cluster
    labels (vis_mask), [B, L] word labels (word_mask) or [B] matched labels (matched).
    """

    task: str
    input_ids: torch.Tensor
    cluster_ids: torch.Tensor
    vis_mask: torch.Tensor
    labels: torch.Tensor


def make_batch(captions: torch.Tensor, cluster_ids: torch.Tensor, indices, step: int, seed: int,
               vocab_size: int) -> Batch:
    """The batch of examples ``indices`` (dataset positions) for ``step``, one example at a time.

    ``captions`` [N, L] and ``cluster_ids`` [N, cells] are the whole dataset (the matched task
    may show any example's caption); uniform masking is over its ``cells`` (the model's N²).
    """
    indices = [int(i) for i in indices]
    task = task_for_step(step)
    n = captions.shape[0]
    ids = cluster_ids[indices].long().clone()
    vis_mask = torch.zeros(len(indices), ids.shape[1], dtype=torch.bool)
    if task == "vis_mask":
        words = captions[indices].long().clone()
        for b, i in enumerate(indices):
            vis_mask[b] = torch.tensor(vis_mask_for(seed, step, i, ids.shape[1]))
        labels = torch.where(vis_mask, ids, torch.full_like(ids, IGNORE_INDEX))
    elif task == "word_mask":
        rows, labs = [], []
        for i in indices:
            r, lab = word_mask_for(seed, step, i, captions[i].tolist(), vocab_size)
            rows.append(r)
            labs.append(lab)
        words, labels = torch.tensor(rows), torch.tensor(labs)
    else:
        shown = [matched_for(seed, step, i, n) for i in indices]
        words = captions[shown].long().clone()
        labels = torch.tensor([int(s == i) for s, i in zip(shown, indices)])
    return Batch(task, words, ids, vis_mask, labels)


def nearest_ids(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster id of each grid feature: ``argmin_k ||f - C_k||²`` in float64 (ties: lowest k)."""
    f = features.double()
    c = centroids.double()
    d = (f * f).sum(-1, keepdim=True) - 2 * f @ c.T + (c * c).sum(-1)
    return d.argmin(-1)


def masked_inputs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The words [B, L] and cell features [B, N², F] a pre-training forward reads, on the
    model's device: the codebook rows of ``batch.cluster_ids``, with the masked cells replaced
    by the mask feature for ``vis_mask`` (any image model with pre-training heads, a codebook
    ``vis_emb``, a ``mask_feat`` and a grid)."""
    if getattr(model, "cls", None) is None:
        raise ValueError("model has no pre-training heads: call model.add_pretraining_heads()")
    device = model.mask_feat.device
    ids = batch.cluster_ids.to(device)
    B, n = ids.shape
    if n != model.n_cells:
        raise ValueError(f"cluster_ids must be [B, {model.n_cells}] (the model's {model.grid}×"
                         f"{model.grid} grid), got {tuple(ids.shape)}")
    feats = model.vis_emb(ids)
    if batch.task == "vis_mask":
        mask = batch.vis_mask.to(device).view(B, n, 1)
        feats = torch.where(mask, model.mask_feat.view(1, 1, -1).to(feats.dtype), feats)
    return batch.input_ids.to(device), feats


def pretrain_loss(model, batch: Batch) -> torch.Tensor:
    """The authors' forward for ``batch.task``; returns that task's loss (a scalar).

    ``model`` is an ``XLxmertForImageGeneration`` with pre-training heads
    (``add_pretraining_heads``) whose attentions are HF's eager modules. The cells are the
    model's grid: ``cluster_ids`` [B, N²], boxes ``box_positions(model.grid)``.
    """
    words, feats = masked_inputs(model, batch)
    device, (B, n) = feats.device, feats.shape[:2]
    boxes = box_positions(model.grid).to(device=device, dtype=feats.dtype).expand(B, n, 4)
    out = model.bert(input_ids=words, visual_feats=feats, visual_pos=boxes,
                     attention_mask=words > 0, token_type_ids=torch.zeros_like(words))
    lang, visual, pooled = out[0], out[1], out[2]
    labels = batch.labels.to(device)
    # (under autocast F.cross_entropy runs in fp32, as the authors' amp run did)
    if batch.task == "vis_mask":
        logits = model.obj_predict_head(visual)
        return F.cross_entropy(logits.reshape(B * n, -1), labels.reshape(-1))
    scores, relationship = model.cls(lang, pooled)
    if batch.task == "word_mask":
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1))
    return F.cross_entropy(relationship, labels)


def make_optimizer(model, lr: float = 1e-4, weight_decay: float = 0.01, total_steps: int = 1000,
                   warmup_ratio: float = 0.05):
    """BERT-style AdamW (no decay for biases and LayerNorm weights) and a linear warm-up/decay
    schedule (``warmup = int(total · ratio)`` steps up to ``lr``, then linearly to 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm.weight" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model, optimizer, scheduler, batch: Batch, *, clip: float = 1.0,
               autocast_dtype: torch.dtype | None = None, scaler=None) -> float:
    """One update: loss, backward, clip the global gradient norm to ``clip``, step, schedule.

    Returns the loss. Raises ``FloatingPointError`` on a non-finite loss (nothing is updated).
    """
    return update_step(model, optimizer, scheduler, lambda: pretrain_loss(model, batch), batch.task,
                       clip=clip, autocast_dtype=autocast_dtype, scaler=scaler)


def update_step(model, optimizer, scheduler, loss_fn, what: str, *, clip: float,
                autocast_dtype: torch.dtype | None, scaler) -> float:
    """One update around ``loss_fn()`` (each task's ``train_step``): zero the gradients, the loss
    (under autocast when ``autocast_dtype`` is given), a non-finite one refused naming ``what``
    (nothing updated), then :func:`apply_update`. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    if autocast_dtype is not None:
        with torch.autocast(device.type, dtype=autocast_dtype):
            loss = loss_fn()
    else:
        loss = loss_fn()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite {what} loss {loss.item()}")
    apply_update(loss, model, optimizer, scheduler, scaler, clip)
    return loss.item()


def apply_update(loss, model, optimizer, scheduler, scaler, clip: float) -> None:
    """The authors' update after a loss: backward (through the fp16 loss scaler if any), clip the
    global gradient norm of the trainable parameters at ``clip``, optimizer and schedule steps."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
