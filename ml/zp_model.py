"""AZP-RC: the zero-point network of seed 000 §3.2, with an uncertainty head.

Three branches read one exposure:

- a convolutional feature extractor (CFE) on an image patch,
- a recurrent catalog encoder (RCE) over the variable-length star list: a
  bidirectional GRU with masked attention pooling,
- a telemetry MLP (TM),

and a fusion MLP (128-64-32) ends in two heads, the zero-point offset and its
log-variance (heteroscedastic: the paper has no uncertainty). A gradient-reversal
layer and a discriminator on the fused 32-d latent give domain-adversarial
training (DANN).

The model knows nothing of data or training (ml/zp_train.py). Branches can be
switched off, which gives the image-only CNN baseline and the no-telemetry
ablation from the same code.

A GRU reads a sequence, so on its own it depends on the star order and, for the
backward direction, on how much padding follows. The encoder therefore reads the
stars in a canonical order (brightest reference magnitude first; ``topk``, which
exports to ONNX) and runs the backward direction over each list reversed within
its own length, so padding only ever follows the stars it pads: the answer is
the same whatever the padding and the order the stars came in.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

N_STAR_CHANNELS = 5
"""Star-tensor channels; see ml/zp_features.py ``STAR_CHANNELS``."""
N_SUMMARY = 3
"""Catalog zero-point summary; see ml/zp_features.py ``catalog_summary``."""


@dataclass(frozen=True)
class AZPRCConfig:
    """Shape of an AZP-RC network (saved with every checkpoint).

    Attributes
    ----------
    patch_px : int
        Side of the square image patch (256 on GPU as in the paper; smaller for
        CPU runs and tests).
    cnn_channels : (int, int)
        Filters of the two 3x3 convolutions (paper: 64, 128).
    cnn_out : int
        Width of the CFE's dense output (paper: 64).
    gru_hidden : int
        Hidden size of each GRU direction (paper: 64).
    catalog_out : int
        Width of the RCE output.
    telemetry_dim : int
        Length of the telemetry vector.
    telemetry_hidden : int
        Width of the telemetry MLP's layers (paper: 32).
    fusion : tuple of int
        The shared stack (paper: 128, 64, 32); its last width is the latent the
        discriminator sees.
    n_domains : int
        Survey domains the discriminator tells apart.
    dropout : float
        Dropout in the fusion stack.
    use_image, use_catalog, use_telemetry : bool
        Branches in use (baselines and ablations switch some off).
    """

    patch_px: int = 64
    cnn_channels: tuple[int, int] = (64, 128)
    cnn_out: int = 64
    gru_hidden: int = 64
    catalog_out: int = 64
    telemetry_dim: int = 7
    telemetry_hidden: int = 32
    fusion: tuple[int, ...] = (128, 64, 32)
    n_domains: int = 3
    dropout: float = 0.0
    use_image: bool = True
    use_catalog: bool = True
    use_telemetry: bool = True

    def __post_init__(self) -> None:
        if not (self.use_image or self.use_catalog or self.use_telemetry):
            raise ValueError("AZPRCConfig: at least one branch must be in use")
        if self.patch_px < 8:
            raise ValueError(f"patch_px must be >= 8, got {self.patch_px}")
        if not self.fusion:
            raise ValueError("fusion must have at least one layer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AZPRCConfig:
        d = dict(d)
        d["cnn_channels"] = tuple(d["cnn_channels"])
        d["fusion"] = tuple(d["fusion"])
        return cls(**d)


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-alpha`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.alpha * grad, None


def reverse_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return GradientReversal.apply(x, alpha)


class PatchEncoder(nn.Module):
    """CFE: conv-ReLU(64, 3x3) -> maxpool(2) -> conv-ReLU(128, 3x3) -> global
    average pool -> dense."""

    def __init__(self, config: AZPRCConfig) -> None:
        super().__init__()
        c1, c2 = config.cnn_channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.dense = nn.Linear(c2, config.cnn_out)

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        x = patch.unsqueeze(1)  # (B, 1, P, P)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))  # (B, C2, P/2, P/2)
        return F.relu(self.dense(x.mean(dim=(2, 3))))  # (B, cnn_out)


class CatalogEncoder(nn.Module):
    """RCE: a bidirectional GRU over the stars in canonical order, masked
    attention pooling, then the (log) star count and the catalog zero-point
    summary (the paper's "weighted average of catalog zero-point offsets";
    ml/zp_features.catalog_summary) appended, so the fusion stack knows what the
    stars say and how far to trust it."""

    def __init__(self, config: AZPRCConfig) -> None:
        super().__init__()
        h = config.gru_hidden
        self.forward_gru = nn.GRU(N_STAR_CHANNELS, h, batch_first=True)
        self.backward_gru = nn.GRU(N_STAR_CHANNELS, h, batch_first=True)
        self.score = nn.Linear(2 * h, 1)
        self.out = nn.Linear(2 * h + 1 + N_SUMMARY, config.catalog_out)

    def forward(
        self, stars: torch.Tensor, n_stars: torch.Tensor, summary: torch.Tensor
    ) -> torch.Tensor:
        B, S, _ = stars.shape
        steps = torch.arange(S, device=stars.device).expand(B, S)
        valid = steps < n_stars.unsqueeze(1)  # (B, S)
        # Canonical order: brightest first, padding last.
        key = torch.where(valid, stars[..., 0], torch.full_like(stars[..., 0], 1e9))
        order = torch.topk(key, k=S, dim=1, largest=False, sorted=True).indices
        x = torch.gather(stars, 1, order.unsqueeze(-1).expand(B, S, N_STAR_CHANNELS))
        # Backward direction: each list reversed within its own length.
        last = (n_stars.unsqueeze(1) - 1 - steps).clamp(min=0)
        rev = torch.where(valid, last, steps)  # an involution on 0..S-1
        x_rev = torch.gather(x, 1, rev.unsqueeze(-1).expand(B, S, N_STAR_CHANNELS))
        h_fwd, _ = self.forward_gru(x)  # (B, S, H)
        h_bwd, _ = self.backward_gru(x_rev)
        h_bwd = torch.gather(h_bwd, 1, rev.unsqueeze(-1).expand_as(h_bwd))
        h = torch.cat([h_fwd, h_bwd], dim=-1)  # (B, S, 2H)
        logits = self.score(h).squeeze(-1).masked_fill(~valid, -1e9)
        weights = torch.softmax(logits, dim=1) * valid  # empty lists pool to zero
        pooled = (weights.unsqueeze(-1) * h).sum(dim=1)  # (B, 2H)
        count = torch.log1p(n_stars.to(stars.dtype)).unsqueeze(1)
        return F.relu(self.out(torch.cat([pooled, count, summary], dim=1)))  # (B, catalog_out)


def _mlp(widths: list[int], *, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class AZPRC(nn.Module):
    """The zero-point network. Inputs are in the units ml/zp_features.py makes;
    the offset comes out in the model's target units (``target_scale_mag``
    magnitudes, see ml/zp_train.py)."""

    def __init__(self, config: AZPRCConfig) -> None:
        super().__init__()
        self.config = config
        width = 0
        if config.use_image:
            self.patch_encoder = PatchEncoder(config)
            width += config.cnn_out
        if config.use_catalog:
            self.catalog_encoder = CatalogEncoder(config)
            width += config.catalog_out
        if config.use_telemetry:
            t = config.telemetry_hidden
            self.telemetry_mlp = _mlp([config.telemetry_dim, t, t, t])
            width += t
        self.fusion = _mlp([width, *config.fusion], dropout=config.dropout)
        self.head = nn.Linear(config.fusion[-1], 2)
        # Set after training so that 68 % of validation errors fall within
        # 1 sigma (ml/zp_train.calibrate_uncertainty); saved with the weights.
        self.register_buffer("sigma_scale", torch.ones(()))
        # A learned skip from the catalog zero point to the offset: the stars'
        # median is already a good answer when there are enough of them, and
        # the network learns the correction (and what to do without them).
        self.catalog_skip = nn.Parameter(torch.ones(()) if config.use_catalog else torch.zeros(()))
        latent = config.fusion[-1]
        self.discriminator = nn.Sequential(
            nn.Linear(latent, latent), nn.ReLU(), nn.Linear(latent, config.n_domains)
        )

    def forward(
        self,
        patch: torch.Tensor,
        stars: torch.Tensor,
        n_stars: torch.Tensor,
        summary: torch.Tensor,
        telemetry: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``patch`` (B, P, P), ``stars`` (B, S, 5), ``n_stars`` (B,) int,
        ``summary`` (B, 3), ``telemetry`` (B, T) -> offset (B,), log-variance
        (B,), latent (B, L)."""
        parts = []
        if self.config.use_image:
            parts.append(self.patch_encoder(patch))
        if self.config.use_catalog:
            parts.append(self.catalog_encoder(stars, n_stars, summary))
        if self.config.use_telemetry:
            parts.append(self.telemetry_mlp(telemetry))
        latent = self.fusion(torch.cat(parts, dim=1))  # (B, L)
        out = self.head(latent)
        log_var = out[:, 1].clamp(-12.0, 8.0) + 2.0 * torch.log(self.sigma_scale)
        offset = out[:, 0]
        if self.config.use_catalog:
            offset = offset + self.catalog_skip * summary[:, 0] * summary[:, 2]
        return offset, log_var, latent

    def domain_logits(self, latent: torch.Tensor, alpha: float) -> torch.Tensor:
        """The discriminator's logits, behind a gradient-reversal layer: it
        learns to tell domains apart while the encoder learns not to let it."""
        return self.discriminator(reverse_gradient(latent, alpha))
