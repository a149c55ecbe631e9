"""X-LXMERT for image generation: HF ``LxmertModel`` + the visual-codebook head (SPEC §1).

Attribute names (``bert``, ``obj_predict_head.{transform,linear_feat,out_cluster}``,
``mask_feat``, ``vis_emb``) are the authors' so their state dicts load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LxmertConfig, LxmertModel
from transformers.models.lxmert.modeling_lxmert import (LxmertPredictionHeadTransform,
                                                        LxmertPreTrainingHeads)

from ..grid import GRID, N_CELLS, check_grid  # noqa: F401  (re-exported: the default grid)
from .generator import Generator, GeneratorConfig
from .sizes import SIZES, Sizes  # noqa: F401  (re-exported: the sizes this model is built at)

MAX_TEXT_LENGTH = 20


@torch.no_grad()
def init_heads(named_parameters, std: float, gen: torch.Generator) -> None:
    """HF's initialisation of pre-training heads, drawn from ``gen``: LayerNorm weights 1,
    biases 0, other weights N(0, std²); the word decoder is skipped (tied to the word
    embeddings)."""
    for name, p in named_parameters:
        if name.endswith("LayerNorm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif name != "predictions.decoder.weight":
            p.normal_(0, std, generator=gen)


class ObjPredictHead(nn.Module):
    """``transform`` (Linear, GELU, LayerNorm) → ``linear_feat`` (H→F) → ``out_cluster`` (F→K).

    ``out_cluster.weight`` is the centroid table itself (tied to ``vis_emb.weight``); its bias
    is its own.
    """

    def __init__(self, config: LxmertConfig, n_clusters: int):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.linear_feat = nn.Linear(config.hidden_size, config.visual_feat_dim)
        self.out_cluster = nn.Linear(config.visual_feat_dim, n_clusters)

    def forward(self, visual_output: torch.Tensor) -> torch.Tensor:
        return self.out_cluster(self.linear_feat(self.transform(visual_output)))


class CodebookGridModel(nn.Module):
    """What every image-generation model here shares with the samplers: the frozen codebook
    ``vis_emb`` (its centroid table C, which the head's output weight is tied to) and the N×N
    grid of cells it paints (``self._grid``). X-LXMERT and X-UNITER both build on it."""

    def set_centroids(self, centroids) -> None:
        """Install the centroid table C (also the head's output weight, which is tied to it)."""
        import numpy as np

        if isinstance(centroids, np.ndarray):
            centroids = torch.from_numpy(centroids)
        if not isinstance(centroids, torch.Tensor):
            raise TypeError(f"centroids must be a tensor or numpy array, got {type(centroids).__name__}")
        want = tuple(self.vis_emb.weight.shape)
        if tuple(centroids.shape) != want:
            raise ValueError(f"centroids must have shape {want}, got {tuple(centroids.shape)}")
        if not torch.isfinite(centroids).all():
            raise ValueError("centroids contain NaN or Inf")
        with torch.no_grad():
            self.vis_emb.weight.copy_(centroids)

    # -- the pieces the samplers share ----------------------------------------------------------

    @property
    def grid(self) -> int:
        """N of the model's N×N grid of cells."""
        return self._grid

    @property
    def n_cells(self) -> int:
        """The cells the model paints, N² (row-major: cell (i, j) is index i·N + j)."""
        return self._grid * self._grid

    @property
    def centroids(self) -> torch.Tensor:
        return self.vis_emb.weight

    @property
    def feat_dim(self) -> int:
        return self.config.visual_feat_dim

    def extra_repr(self) -> str:
        return f"n_clusters={self.n_clusters}, grid={self.grid}x{self.grid}"


class XLxmertForImageGeneration(CodebookGridModel):
    """The X-LXMERT image-generation model (SPEC §1).

    - ``bert``: ``transformers.LxmertModel``
    - ``vis_emb``: frozen ``nn.Embedding`` whose table is the centroid matrix C [K, F]
    - ``mask_feat``: learned F-vector standing in for a masked grid cell
    - ``obj_predict_head``: :class:`ObjPredictHead`, ``out_cluster.weight`` tied to C
    - ``generator``: optional :class:`~xlx_fast.models.generator.Generator`; its
      ``init_size`` must be the model's grid (it paints N×N codes; nothing is resized)
    - ``cls``: optional pre-training heads (HF ``LxmertPreTrainingHeads``: ``cls.predictions``,
      the masked-LM head whose decoder weight is tied to the word embeddings, and
      ``cls.seq_relationship``, the 2-way image-caption matching classifier), present after
      :meth:`add_pretraining_heads`; generation never uses them.

    ``grid``: the model paints an N×N grid of ``n_cells`` = N² cells (8 in the paper; 16 and 32
    are the finer grids the paper names as future work; at most ``grid.MAX_GRID``). No weight
    depends on it (the visual stream has no position table: a cell's position is its box,
    ``box_positions(grid)``), so it is configuration, fixed at construction: ``model.grid``.
    """

    def __init__(self, config: LxmertConfig, n_clusters: int,
                 generator_config: GeneratorConfig | None = None, grid: int = GRID):
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        grid = check_grid(grid)
        if generator_config is not None and generator_config.init_size != grid:
            g = generator_config.init_size
            raise ValueError(f"generator_config paints {g}×{g} codes but the model's grid is "
                             f"{grid}×{grid} (GeneratorConfig.for_grid({grid}) is the generator "
                             f"for it; nothing is resized)")
        self.config = config
        self.n_clusters = n_clusters
        self._grid = grid
        self.bert = LxmertModel(config)
        self.obj_predict_head = ObjPredictHead(config, n_clusters)
        self.mask_feat = nn.Parameter(torch.zeros(config.visual_feat_dim))
        self.vis_emb = nn.Embedding(n_clusters, config.visual_feat_dim)
        self.vis_emb.weight.requires_grad_(False)
        self.obj_predict_head.out_cluster.weight = self.vis_emb.weight
        self.generator = Generator(generator_config) if generator_config is not None else None
        self.cls = None
        self.eval()

    def add_pretraining_heads(self) -> "XLxmertForImageGeneration":
        """Add the authors' pre-training heads (``cls.predictions.*``, ``cls.seq_relationship.*``)
        if absent; returns ``self``. The LM decoder weight *is* the word-embedding table (tied),
        so it adds ``2·H² + 5·H + vocab + 2·H + 2`` parameters, not another vocab×H matrix."""
        if self.cls is None:
            ref = self.bert.embeddings.word_embeddings.weight
            heads = LxmertPreTrainingHeads(self.config).to(device=ref.device, dtype=ref.dtype)
            heads.predictions.decoder.weight = ref
            heads.train(self.training)
            self.cls = heads
        return self

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_default(cls, seed: int = 0, size: str = "base", with_generator: bool = True,
                     pretraining_heads: bool = False, grid: int = GRID) -> "XLxmertForImageGeneration":
        """The embedded default: the real architecture with seeded random weights and centroids.

        Its pictures are garbage, but every shape and cost is the real one. ``size="tiny"`` is
        the same code at test size. ``pretraining_heads=True`` adds :meth:`add_pretraining_heads`'s
        heads (HF's initialisation, drawn after everything else so the rest is unchanged).

        ``grid``: the model's N×N grid (see the class). The generator is the size's, built for
        the grid (``GeneratorConfig.for_grid``: log2(256/N) upsampling blocks to the same 256×256
        picture at the base size). The transformer's weights do not depend on the grid: the
        same seed gives the same transformer, codebook and head at every grid (the generator's
        weights are drawn after them); at 8×8 the generator is the paper's.
        """
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        grid = check_grid(grid)
        s = SIZES[size]
        gen = torch.Generator().manual_seed(seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # HF's own init draws from the global generator
        try:
            model = cls(LxmertConfig(**s.lxmert), s.n_clusters,
                        s.generator.for_grid(grid) if with_generator else None, grid=grid)
        finally:
            torch.random.set_rng_state(torch_state)
        with torch.no_grad():
            model.set_centroids(torch.randn(s.n_clusters, model.config.visual_feat_dim,
                                            generator=gen))
            model.mask_feat.normal_(generator=gen)
            model.obj_predict_head.out_cluster.bias.normal_(0, 0.02, generator=gen)
            # HF's 0.02 here gives logits with a spread of ~25 against 2048-d unit centroids, so
            # every cell's max probability saturates at 1.0 and cells tie; Mask-Predict's choice
            # of cells would then hang on float rounding. 0.004 spreads the probabilities over
            # (0, 1), as a trained model's are.
            model.obj_predict_head.linear_feat.weight.normal_(0, 0.004, generator=gen)
        if model.generator is not None:
            model.generator.reset_parameters(gen)
        if pretraining_heads:
            model.add_pretraining_heads()
            init_heads(model.cls.named_parameters(), model.config.initializer_range, gen)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, lxmert_path, centroids_path, generator_path=None, *,
                        strict: bool = True, size: str = "base", pretraining_heads: bool = False,
                        grid: int = GRID) -> "XLxmertForImageGeneration":
        """Load the authors' files; see :func:`xlx_fast.models.checkpoint.load_xlxmert`.
        ``grid``: the model's N×N grid; a generator file made for another grid (its count of
        upsampling blocks is not this grid's) is a ``CheckpointError`` naming both grids."""
        from .checkpoint import load_xlxmert

        return load_xlxmert(cls, lxmert_path, centroids_path, generator_path, strict=strict,
                            size=size, pretraining_heads=pretraining_heads, grid=grid)
