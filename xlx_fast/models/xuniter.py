"""X-UNITER for image generation: a single-stream HF ``BertModel`` over [caption tokens; grid
cells] with UNITER's image embedding and X-LXMERT's visual-codebook head (issue 21, item 4).

The paper's claim of generality: its three changes (discrete CCC targets over a codebook,
uniform masking, aligned data) carry to a single-stream model. This is that model, built from
the same pieces as :class:`~xlx_fast.models.xlxmert.XLxmertForImageGeneration`:

- ``bert``: ``transformers.BertModel`` (no pooler) whose encoder reads the sequence
  [text embeddings; image embeddings] with the key mask [caption mask; ones for the cells];
- ``img_embeddings``: :class:`UniterImageEmbeddings`, UNITER's image embedding of a cell's
  feature f and its 7-d box p: ``LayerNorm(LN_img(img_linear(f)) + LN_pos(pos_linear(p)) + t)``,
  t the BERT token-type embedding of type 1 (UNITER adds it inside the shared LayerNorm);
- ``vis_emb`` (the codebook C, frozen), ``mask_feat``, ``obj_predict_head`` (out_cluster tied
  to C): the image model's, unchanged;
- ``grid``: the N×N grid of cells, row-major, cell (i, j) with the box
  ``(j/N, i/N, (j+1)/N, (i+1)/N)`` extended to UNITER's 7 numbers (x0, y0, x1, y1, w, h, w·h).

The text part is BERT's own embedding (word + position + token type 0, LayerNorm) of the
caption; the cells have no position embedding: their position is their box.

Pre-training heads (:meth:`XUniterForImageGeneration.add_pretraining_heads`, absent unless
asked for; generation never uses them), laid out as HF's ``BertForPreTraining``:

- ``bert.pooler``: ``BertPooler``, ``tanh(W·h_[CLS] + b)`` on the first (the [CLS]) position;
- ``cls.predictions``: the masked-LM head ``transform → decoder`` whose weight *is* the word
  embedding table and whose bias *is* ``cls.predictions.bias`` (both tied, as HF ties them);
- ``cls.seq_relationship``: the 2-way image-caption matching classifier on the pooled output.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertPooler, BertPreTrainingHeads

from ..grid import GRID, box_positions, check_grid
from .generator import Generator
from .sizes import SIZES
from .xlxmert import CodebookGridModel, ObjPredictHead, init_heads

__all__ = ["XUniterForImageGeneration", "UniterImageEmbeddings", "XUNITER_SIZES", "box7"]

# BERT sizes of the single stream; the codebook, feature width and generator are the image
# model's at the same size name (models.sizes.SIZES).
XUNITER_SIZES = {
    "base": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                 intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                 intermediate_size=128, max_position_embeddings=64),
}


def box7(grid: int = GRID, dtype=None, device=None) -> torch.Tensor:
    """UNITER's 7-d box of each cell, [1, N², 7]: (x0, y0, x1, y1, w, h, w·h)."""
    box = box_positions(grid, torch.float64)
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    out = torch.cat((box, w[:, None], h[:, None], (w * h)[:, None]), dim=1)
    return out.to(dtype=dtype or torch.get_default_dtype(), device=device).unsqueeze(0)


class UniterImageEmbeddings(nn.Module):
    """UNITER's ``UniterImageEmbeddings`` without the masking embedding (a masked cell reads
    ``mask_feat`` here, as in X-LXMERT)."""

    def __init__(self, config: BertConfig, feat_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(feat_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings):
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        embeddings = transformed_im + transformed_pos + type_embeddings
        return self.dropout(self.LayerNorm(embeddings))


class XUniterForImageGeneration(CodebookGridModel):
    """See the module docstring. ``config``: a ``BertConfig`` carrying ``visual_feat_dim`` (F,
    the codebook's feature width); ``n_clusters``: K."""

    def __init__(self, config: BertConfig, n_clusters: int, generator_config=None,
                 grid: int = GRID):
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if not isinstance(getattr(config, "visual_feat_dim", None), int):
            raise ValueError("config.visual_feat_dim (the codebook's feature width) must be set")
        grid = check_grid(grid)
        if generator_config is not None and generator_config.init_size != grid:
            g = generator_config.init_size
            raise ValueError(f"generator_config paints {g}×{g} codes but the model's grid is "
                             f"{grid}×{grid} (nothing is resized)")
        self.config = config
        self.n_clusters = n_clusters
        self._grid = grid
        self.bert = BertModel(config, add_pooling_layer=False)
        self.img_embeddings = UniterImageEmbeddings(config, config.visual_feat_dim)
        self.obj_predict_head = ObjPredictHead(config, n_clusters)
        self.mask_feat = nn.Parameter(torch.zeros(config.visual_feat_dim))
        self.vis_emb = nn.Embedding(n_clusters, config.visual_feat_dim)
        self.vis_emb.weight.requires_grad_(False)
        self.obj_predict_head.out_cluster.weight = self.vis_emb.weight
        self.generator = Generator(generator_config) if generator_config is not None else None
        self.cls = None
        self.eval()

    def add_pretraining_heads(self) -> "XUniterForImageGeneration":
        """Add the pre-training heads (``bert.pooler.*``, ``cls.predictions.*``,
        ``cls.seq_relationship.*``; see the module docstring) if absent; returns ``self``.

        The LM decoder's weight is the word-embedding table and its bias is
        ``cls.predictions.bias`` (tied, not copied), so it adds ``2·H² + 4·H + vocab + 2·H + 2``
        parameters (pooler H² + H, transform H² + 3·H, bias vocab, matching 2·H + 2), not another
        vocab×H matrix. Weights are HF's initialisation from the global generator."""
        if self.cls is None:
            ref = self.bert.embeddings.word_embeddings.weight
            pooler = BertPooler(self.config).to(device=ref.device, dtype=ref.dtype)
            heads = BertPreTrainingHeads(self.config).to(device=ref.device, dtype=ref.dtype)
            heads.predictions.decoder.weight = ref
            heads.predictions.decoder.bias = heads.predictions.bias
            pooler.train(self.training)
            heads.train(self.training)
            self.bert.pooler = pooler
            self.cls = heads
        return self

    @classmethod
    def from_default(cls, seed: int = 0, size: str = "base", with_generator: bool = True,
                     grid: int = GRID, pretraining_heads: bool = False) -> "XUniterForImageGeneration":
        """Seeded random weights and centroids at the real shapes (``size="tiny"``: test size),
        drawn as for ``XLxmertForImageGeneration.from_default`` (HF's init from the global
        generator under ``seed``, then the codebook, mask feature, head bias and a small
        ``linear_feat`` from a seeded generator). ``pretraining_heads=True`` adds
        :meth:`add_pretraining_heads`'s heads, drawn last from the seeded generator (LayerNorm
        weights 1, biases 0, other weights N(0, initializer_range²)) as X-LXMERT's are, so the
        rest of the model is the same with or without them."""
        if size not in XUNITER_SIZES:
            raise ValueError(f"size must be one of {sorted(XUNITER_SIZES)}, got {size!r}")
        grid = check_grid(grid)
        s = SIZES[size]
        feat_dim = s.lxmert.get("visual_feat_dim", 2048)
        config = BertConfig(**XUNITER_SIZES[size], visual_feat_dim=feat_dim,
                            attn_implementation="eager")
        gen = torch.Generator().manual_seed(seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = cls(config, s.n_clusters,
                        s.generator.for_grid(grid) if with_generator else None, grid=grid)
        finally:
            torch.random.set_rng_state(torch_state)
        with torch.no_grad():
            model.set_centroids(torch.randn(s.n_clusters, feat_dim, generator=gen))
            model.mask_feat.normal_(generator=gen)
            model.obj_predict_head.out_cluster.bias.normal_(0, 0.02, generator=gen)
            # as for the image model: probabilities spread over (0, 1), not saturated
            model.obj_predict_head.linear_feat.weight.normal_(0, 0.004, generator=gen)
        if model.generator is not None:
            model.generator.reset_parameters(gen)
        if pretraining_heads:
            torch_state = torch.random.get_rng_state()
            try:  # HF's init of the new modules must not move the caller's global generator
                model.add_pretraining_heads()
            finally:
                torch.random.set_rng_state(torch_state)
            heads = [("pooler." + n, p) for n, p in model.bert.pooler.named_parameters()]
            init_heads(heads + list(model.cls.named_parameters()), model.config.initializer_range, gen)
        return model.eval()

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BERT's embedding of the caption (token type 0), [B, L, H]."""
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def image_embeddings(self, code: torch.Tensor) -> torch.Tensor:
        """UNITER's embedding of the cells' features ``code`` [B, n, F], [B, n, H]."""
        pos = box7(self.grid, code.dtype, code.device).expand(code.shape[0], -1, -1)
        ones = torch.ones(code.shape[:2], dtype=torch.int64, device=code.device)
        return self.img_embeddings(code, pos, self.bert.embeddings.token_type_embeddings(ones))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               code: torch.Tensor) -> torch.Tensor:
        """The encoder's output at every position, [B, L + n, H]: the caption's L, then the
        cells' n (pre-training reads all three parts: words, cells and the [CLS] row).
        Raises ``ValueError`` for a caption longer than BERT's position table."""
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"captions of {input_ids.shape[1]} tokens exceed the model's "
                             f"{limit} text positions (max_position_embeddings)")
        x = torch.cat((self.text_embeddings(input_ids), self.image_embeddings(code)), dim=1)
        mask = torch.cat((attention_mask.bool(), torch.ones(code.shape[:2], dtype=torch.bool,
                                                            device=code.device)), dim=1)
        dtype = x.dtype
        ext = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return self.bert.encoder(x, attention_mask=ext, return_dict=True).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                code: torch.Tensor) -> torch.Tensor:
        """The encoder's output at the image positions, [B, n, H] (what the head reads)."""
        return self.encode(input_ids, attention_mask, code)[:, input_ids.shape[1]:]
