"""The "Paint" generator: a SPADE-ResBlock GAN that turns an N×N grid of 2048-d codes into an image.

Architecture (the authors' ``image_generator`` at base width 32, 8×8 → 256×256, ≈1.77M
parameters):

    codes [B, 2048, N, N]
      → bottleneck: 1×1 conv 2048→256, tanh                      (the "codebook_dim" space)
      → h = learned_init_conv(·)   (3×3 conv 256→32, groups 4, spectral norm)
        y = style_init_conv(·)     (same shape, its own weights): the SPADE modulation map
      → log2(S/N) residual blocks (five for the paper's 8×8 → 256×256), each ×2 bilinear
        upsampling:
            SPADE-IN(h | y) → noise → LeakyReLU(0.2) → up → conv3×3 →
            SPADE-IN(· | y) → noise → LeakyReLU(0.2) → conv3×3,  + (up → conv1×1)(h)
        after block i a 3×3 to-RGB conv, bilinearly resized to S×S (except the last,
        already S×S), summed over the blocks
      → tanh → (x + 1) / 2 clamped to [0, 1]

Grids (``GeneratorConfig.init_size`` = N, the picture S = ``target_size``). Every layer is a
convolution, so the authors' network generalises to an N×N grid by starting its upsampling
ladder at N: the picture keeps its size S (256×256 at the base size) and the ladder is
log2(S/N) blocks long, five at 8×8, four at 16×16, three at 32×32; each cell's code is the
bottleneck's input at its own position, so it paints the (S/N)×(S/N) square it sits on and its
neighbours' edges (the 3×3 convolutions' reach). Every block has the same shape (base width in
and out), so no weight depends on N except through the number of blocks: a checkpoint records
its grid only as its block count. ``GeneratorConfig.for_grid(N)`` is the config for another
grid: ``init_size`` N and the same picture size, or 2N where that is larger (a generator runs at
least one upsampling block; only the tiny test size, 32×32 pictures, reaches it, at 32×32
grids). ``S/N`` must be a power of two of at least 2; nothing is resized to fit.

SPADE-IN: ``instance_norm(x) * (1 + γ(y)) + β(y)`` with γ, β two 3×3 convs on a shared 3×3
conv + ReLU (hidden 128) of ``y`` resized bilinearly to ``x``'s size.

Noise injection adds ``weight · N(0, 1)`` per pixel (one noise map per sample, shared over
channels). The authors' sampler paints with noise on; here the noise comes from an explicit
``torch.Generator`` so a seed reproduces an image: one for the whole batch (its maps drawn for
all rows at once), or one per row (row r's maps drawn from its own, in the order painting it
alone would draw them, so a row's noise does not depend on its batch). Spectral norm uses
``torch.nn.utils.spectral_norm`` so the state-dict keys (``weight_orig``, ``weight_u``,
``weight_v``) are the authors'; in eval mode it applies the stored ``u, v`` without a power
iteration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

SN = nn.utils.spectral_norm


@dataclass(frozen=True)
class GeneratorConfig:
    emb_dim: int = 2048
    codebook_dim: int = 256
    base_dim: int = 32
    init_size: int = 8
    target_size: int = 256
    spade_hidden: int = 128

    def __post_init__(self):
        for name in ("emb_dim", "codebook_dim", "base_dim", "init_size", "target_size",
                     "spade_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GeneratorConfig.{name} must be a positive int, got {v!r}")
        ratio, rest = divmod(self.target_size, self.init_size)
        if rest or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"GeneratorConfig: target_size / init_size must be a power of two of "
                             f"at least 2 (one ×2 upsampling block or more), got {self.target_size}"
                             f" / {self.init_size}")

    @property
    def n_blocks(self) -> int:
        """The ×2 upsampling blocks from the N×N grid to the S×S picture: log2(S/N)."""
        return (self.target_size // self.init_size).bit_length() - 1

    def for_grid(self, grid: int) -> "GeneratorConfig":
        """This generator for an N×N grid: ``init_size`` N, the same picture size, or 2N where
        that is larger (at least one upsampling block). ``for_grid(self.init_size)`` is ``self``'s
        equal."""
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        return dataclasses.replace(self, init_size=grid,
                                   target_size=max(self.target_size, 2 * grid))


class SPADE(nn.Module):
    """Spatially-adaptive instance norm: ``IN(x) * (1 + γ(y)) + β(y)``."""

    def __init__(self, channels: int, mod_channels: int, hidden: int):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(mod_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        actv = self.shared(y)
        return self.param_free_norm(x) * (1 + self.gamma(actv)) + self.beta(actv)


Noise = torch.Generator | Sequence[torch.Generator] | None


class NoiseInjection(nn.Module):
    """``x + weight · noise`` with one N(0, 1) map per sample, drawn from ``generator`` (one
    for the batch, or one per row: see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, generator: Noise) -> torch.Tensor:
        if generator is None:
            return x
        b, _, h, w = x.shape
        if isinstance(generator, torch.Generator):
            noise = torch.randn(b, 1, h, w, generator=generator, device=generator.device,
                                dtype=torch.float32)
        else:
            noise = torch.cat([torch.randn(1, 1, h, w, generator=g, device=g.device,
                                           dtype=torch.float32) for g in generator])
        return x + self.weight * noise.to(device=x.device, dtype=x.dtype)


class GeneratorResidualBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, mod_dim: int, hidden: int):
        super().__init__()
        self.cbn1 = SPADE(n_in, mod_dim, hidden)
        self.relu1 = nn.LeakyReLU(0.2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv1 = SN(nn.Conv2d(n_in, n_out, 3, padding=1))
        self.noise1 = NoiseInjection()
        self.cbn2 = SPADE(n_out, mod_dim, hidden)
        self.relu2 = nn.LeakyReLU(0.2)
        self.conv2 = SN(nn.Conv2d(n_out, n_out, 3, padding=1))
        self.noise2 = NoiseInjection()
        self.res_branch = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            SN(nn.Conv2d(n_in, n_out, 1)),
        )

    def forward(self, x, y, generator):
        h = self.relu1(self.noise1(self.cbn1(x, y), generator))
        h = self.conv1(self.upsample(h))
        h = self.relu2(self.noise2(self.cbn2(h, y), generator))
        h = self.conv2(h)
        return h + self.res_branch(x)


class ToRGB(nn.Module):
    def __init__(self, channels: int, target_size: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 3, 3, padding=1)
        self.target_size = target_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.shape[-1] != self.target_size:
            h = F.interpolate(h, size=(self.target_size, self.target_size), mode="bilinear",
                              align_corners=False)
        return h


class Generator(nn.Module):
    """codes [B, N, N, emb] or [B, emb, N, N] → images [B, 3, S, S] in [0, 1] (N =
    ``config.init_size``, S = ``config.target_size``: 8 and 256 for the authors' generator)."""

    def __init__(self, config: GeneratorConfig = GeneratorConfig()):
        super().__init__()
        self.config = config
        c = config
        self.bottleneck_emb = nn.Sequential(nn.Conv2d(c.emb_dim, c.codebook_dim, 1), nn.Tanh())
        self.learned_init_conv = nn.Sequential(
            SN(nn.Conv2d(c.codebook_dim, c.base_dim, 3, padding=1, groups=4)))
        self.style_init_conv = nn.Sequential(
            SN(nn.Conv2d(c.codebook_dim, c.base_dim, 3, padding=1, groups=4)))
        self.resblocks = nn.ModuleList(
            GeneratorResidualBlock(c.base_dim, c.base_dim, c.base_dim, c.spade_hidden)
            for _ in range(c.n_blocks))
        self.to_RGB_blocks = nn.ModuleList(
            ToRGB(c.base_dim, c.target_size) for _ in range(c.n_blocks))
        self.last = nn.Sequential(nn.Tanh())

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Seeded random init (orthogonal matrices, zero biases; noise weights non-zero so the
        noise path is exercised by the embedded default)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:
                nn.init.orthogonal_(p, generator=generator)
            elif "noise" in name:
                nn.init.constant_(p, 0.1)
        # Re-seed the spectral-norm power-iteration vectors and converge them, as training would.
        for m in self.modules():
            if hasattr(m, "weight_u"):
                m.weight_u.normal_(generator=generator)
                m.weight_v.normal_(generator=generator)
        self.train()
        with torch.no_grad():
            for _ in range(10):
                for m in self.modules():
                    if hasattr(m, "weight_orig"):
                        _power_iterate(m)
        self.eval()

    def forward(self, codes: torch.Tensor, generator: Noise = None) -> torch.Tensor:
        """Paint ``codes``; noise injection is on iff ``generator`` is given: a
        ``torch.Generator`` for the batch, or a sequence of them, one per row (seeded noise)."""
        c = self.config
        if not (generator is None or isinstance(generator, torch.Generator)
                or len(generator) == codes.shape[0]):
            raise ValueError(f"generator: one per row ({codes.shape[0]}) or one for the batch, "
                             f"got {len(generator)}")
        if codes.dim() != 4:
            raise ValueError(f"codes must be [B, {c.init_size}, {c.init_size}, {c.emb_dim}] or "
                             f"[B, {c.emb_dim}, {c.init_size}, {c.init_size}], got {tuple(codes.shape)}")
        if codes.shape[1:] == (c.init_size, c.init_size, c.emb_dim):
            codes = codes.permute(0, 3, 1, 2)
        if codes.shape[1:] != (c.emb_dim, c.init_size, c.init_size):
            raise ValueError(f"codes must be [B, {c.init_size}, {c.init_size}, {c.emb_dim}] or "
                             f"[B, {c.emb_dim}, {c.init_size}, {c.init_size}], got {tuple(codes.shape)}")
        emb = self.bottleneck_emb(codes)
        h = self.learned_init_conv(emb)
        y = self.style_init_conv(emb)
        out = 0
        for block, to_rgb in zip(self.resblocks, self.to_RGB_blocks):
            h = block(h, y, generator)
            out = out + to_rgb(h)
        return ((self.last(out) + 1) / 2).clamp(0, 1)


def _power_iterate(module: nn.Module) -> None:
    w = module.weight_orig.flatten(1)
    v = F.normalize(w.t() @ module.weight_u, dim=0)
    u = F.normalize(w @ v, dim=0)
    module.weight_u.copy_(u)
    module.weight_v.copy_(v)
