"""The step plan of captioning: the forward of one Mask-Predict step over a caption's words.

What a captioning step computes, on the image model's own parameters (the masked-LM head
``cls.predictions`` must be present), written once for the caption engine:

- :func:`image_stream` -- the visual feature encoder and the relational layers: they never see
  the caption, so they run once per image, not once per step (5 of the 19 layers over the
  image's cells: 64 rows on the 8×8 grid);
- :func:`text_embeddings` -- BERT's embedding sum ``LN((words + position) + type)``, from the
  word embeddings the sampler gathered;
- :func:`language_step` -- the language layers, the cross layers, and in the last cross layer
  only the language half (:func:`xlx_fast.step_plan.language_half`): the visual stream's half
  feeds nothing;
- :func:`lm_transform` and :func:`word_bias` -- the masked-LM head as ``codebook_head`` reads it:
  transform (dense, GELU, LayerNorm) fused into one op, the decoder's weight (the word
  embeddings, tied) scored without a [B, L, 30522] tensor, BERT's special tokens at -inf.

Each is exact algebra on the reference's modules (SPEC §2); the tests compare with
:mod:`xlx_fast.reference.caption` and with HF's streams.
"""
from __future__ import annotations

import torch

from .caption_io import SPECIAL_IDS
from .grid import box_positions
from .step_plan import language_half, layer, prediction_transform, x_layer

__all__ = ["image_stream", "text_embeddings", "language_step", "lm_transform", "word_bias"]


def image_stream(model, features: torch.Tensor) -> torch.Tensor:
    """``LxmertVisualFeatureEncoder`` then the relational layers: [B, n, F] -> [B, n, H], n the
    cells of the model's grid (boxes ``box_positions(model.grid)``)."""
    enc = model.bert.encoder
    pos = box_positions(model.grid, features.dtype, features.device).expand(features.shape[0], -1, -1)
    visual = enc.visn_fc(features, pos)
    for r_layer in enc.r_layers:
        visual = layer(r_layer, visual, None)
    return visual


def text_embeddings(model, words: torch.Tensor) -> torch.Tensor:
    """``LxmertEmbeddings`` from the word embeddings [B, T, H] at positions 0..T-1 (token type
    0), in HF's order of additions: bit for bit its output for the same tokens."""
    emb = model.bert.embeddings
    t = words.shape[1]
    return emb.LayerNorm(words + emb.position_embeddings.weight[:t]
                         + emb.token_type_embeddings.weight[0])


def language_step(model, lang: torch.Tensor, ext_mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Language layers and cross layers over the embedded caption and the image stream; the
    language output (the last cross layer's visual half is skipped)."""
    enc = model.bert.encoder
    for l_layer in enc.layer:
        lang = layer(l_layer, lang, ext_mask)
    for xl in enc.x_layers[:-1]:
        lang, visual = x_layer(xl, lang, ext_mask, visual)
    return language_half(enc.x_layers[-1], lang, ext_mask, visual)


def lm_transform(model, h: torch.Tensor) -> torch.Tensor:
    """``cls.predictions.transform`` (dense, GELU, LayerNorm): the features the word head scores."""
    return prediction_transform(model.cls.predictions.transform, h)


def word_bias(model, special: torch.Tensor) -> torch.Tensor:
    """The decoder's bias in float32 with BERT's special tokens (``special``, int64 on the
    model's device: ``SPECIAL_IDS``) at -inf: they are never written. Read live each step."""
    return model.cls.predictions.bias.float().index_fill(0, special, float("-inf"))


def special_ids(device) -> torch.Tensor:
    return torch.tensor(SPECIAL_IDS, dtype=torch.int64, device=device)
