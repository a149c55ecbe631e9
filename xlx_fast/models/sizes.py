"""The architecture sizes a model can be built at: everything that fixes its shapes.

Its own module so that building a model (``xlxmert``) and loading a checkpoint into one
(``checkpoint``) both read it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

from .generator import GeneratorConfig


@dataclass(frozen=True)
class Sizes:
    """Everything that fixes the architecture's shapes."""

    lxmert: dict
    n_clusters: int
    generator: GeneratorConfig


SIZES = {
    # HF LxmertConfig defaults: hidden 768, 12 heads, 9/5/5 layers, visual_feat_dim 2048.
    "base": Sizes(lxmert={}, n_clusters=10_000, generator=GeneratorConfig()),
    # Same code paths at a size the Triton interpreter and CPU tests can afford. Head dim 32
    # (the smallest the fused attention supports), odd cluster count.
    "tiny": Sizes(
        lxmert=dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, l_layers=2,
                    r_layers=1, x_layers=2, visual_feat_dim=48, vocab_size=30522,
                    max_position_embeddings=64),
        n_clusters=97,
        generator=GeneratorConfig(emb_dim=48, codebook_dim=16, base_dim=8, target_size=32,
                                  spade_hidden=16),
    ),
}
