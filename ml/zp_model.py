"""AZP-RC: the zero-point network of seed 000 §3.2, with an uncertainty head.

The paper's three branches read one exposure:

- a convolutional feature extractor (CFE) on an image patch,
- a recurrent catalog encoder (RCE) over the variable-length star list: a
  bidirectional GRU with masked attention pooling,
- a telemetry MLP (TM),

and two more read what the stars of one exposure cannot say:

- a summary encoder (SE) on the exposure-level estimates: the classical zero
  point of the stars, the plane fit's, the clear-sky offset (ml/zp_features
  ``SUMMARY_CHANNELS``), and their differences;
- a night-context encoder (NCE) on the exposures of the night before this one
  (ml/zp_context.py): a shared per-row MLP and attention pooling; a second
  attention reads the recent exposures' cloud residuals into an estimate of
  this one's, the *context estimate* ``clear sky + sum_j a_j residual_j``.

A fusion MLP (128-64-32) ends in three heads: the offset correction, its
log-variance (heteroscedastic: the paper has no uncertainty), and a gate over
the estimates. The offset is the gated mixture of the estimates the exposure
has (classical, plane, clear sky, context; a softmax over those present) plus
the correction: the network learns when to trust the stars, when the clear-sky
offset, when the night, and it passes a millimagnitude through without having to
rebuild it. A gradient-reversal layer and a discriminator on the fused 32-d
latent give domain-adversarial training (DANN).

The model knows nothing of data or training (ml/zp_train.py). Branches can be
switched off, which gives the image-only CNN baseline and the ablations from
the same code.

A GRU reads a sequence, so on its own it depends on the star order and, for the
backward direction, on how much padding follows. The encoder therefore reads the
stars in a canonical order (brightest reference magnitude first; ``topk``, which
exports to ONNX) and runs the backward direction over each list reversed within
its own length, so padding only ever follows the stars it pads: the answer is
the same whatever the padding and the order the stars came in.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

N_STAR_CHANNELS = 6
"""Star-tensor channels; see ml/zp_features.py ``STAR_CHANNELS``."""
N_SUMMARY = 11
"""Exposure-level estimates; see ml/zp_features.py ``SUMMARY_CHANNELS``."""
N_CONTEXT = 9
"""Night-context channels; see ml/zp_features.py ``CONTEXT_CHANNELS``."""
N_OWN = 7
"""The exposure's own pulls and flags the context encoder reads (``_own_pulls``)."""
# Positions in the summary and context rows (ml/zp_features.py).
(_CLASSICAL, _LOG_ERR, _HAS_CLASSICAL, _PLANE, _PLANE_LOG_ERR, _HAS_PLANE, _CLEAR, _HAS_CLEAR,
 _SPARSE, _SPARSE_LOG_ERR, _HAS_SPARSE) = range(11)  # fmt: skip
_RESIDUAL, _HAS_ZP, _VALID = 1, 3, 7
ESTIMATES = ("classical", "plane", "sparse", "context")
"""What the answer is a weighted mean of, in order (:meth:`AZPRC.gate_weights`)."""
_HEAD_CORRECTION, _HEAD_LOG_VAR, _HEAD_CONTEXT_LOG_VAR = 0, 1, 2
_CORRECTION_MAX = 0.1
"""The correction's bound in model units (10 mmag): the estimates carry the offset."""


@dataclass(frozen=True)
class ZPParts:
    """What :meth:`AZPRC.forward_parts` returns, per exposure (B,) unless said.

    offset, log_var : the answer and its log-variance (model units)
    latent : (B, 32), what the discriminator sees
    context, context_var : the context estimate (NaN where none) and its variance
    weights : (B, 4), how much each of :data:`ESTIMATES` counts
    regime : the estimate that weighs most (int64), which with the domain sets the
        interval calibration
    tail : the 95 % interval's half-width over 1.96 sigma
    """

    offset: torch.Tensor
    log_var: torch.Tensor
    latent: torch.Tensor
    context: torch.Tensor
    context_var: torch.Tensor
    weights: torch.Tensor
    regime: torch.Tensor
    tail: torch.Tensor


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
    summary_hidden : int
        Width of the summary encoder.
    context_hidden : int
        Width of the night-context encoder.
    n_domains : int
        Survey domains the discriminator tells apart.
    dropout : float
        Dropout in the fusion stack.
    use_image, use_stars, use_summary, use_telemetry, use_context : bool
        Branches in use (baselines and ablations switch some off). Without the
        summary the gate has no classical, plane or clear-sky estimate; without
        the context, no context estimate.
    """

    patch_px: int = 64
    cnn_channels: tuple[int, int] = (64, 128)
    cnn_out: int = 64
    gru_hidden: int = 64
    catalog_out: int = 64
    telemetry_dim: int = 7
    telemetry_hidden: int = 32
    summary_hidden: int = 32
    context_hidden: int = 32
    fusion: tuple[int, ...] = (128, 64, 32)
    n_domains: int = 3
    dropout: float = 0.0
    use_image: bool = True
    use_stars: bool = True
    use_summary: bool = True
    use_telemetry: bool = True
    use_context: bool = True

    def __post_init__(self) -> None:
        branches = (self.use_image, self.use_stars, self.use_summary, self.use_telemetry,
                    self.use_context)  # fmt: skip
        if not any(branches):
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
    attention pooling, then the (log) star count appended."""

    def __init__(self, config: AZPRCConfig) -> None:
        super().__init__()
        h = config.gru_hidden
        self.forward_gru = nn.GRU(N_STAR_CHANNELS, h, batch_first=True)
        self.backward_gru = nn.GRU(N_STAR_CHANNELS, h, batch_first=True)
        self.score = nn.Linear(2 * h, 1)
        self.out = nn.Linear(2 * h + 1, config.catalog_out)

    def forward(self, stars: torch.Tensor, n_stars: torch.Tensor) -> torch.Tensor:
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
        return F.relu(self.out(torch.cat([pooled, count], dim=1)))  # (B, catalog_out)


_STAR_ESTIMATES = (
    (_CLASSICAL, _LOG_ERR, _HAS_CLASSICAL),
    (_PLANE, _PLANE_LOG_ERR, _HAS_PLANE),
    (_SPARSE, _SPARSE_LOG_ERR, _HAS_SPARSE),
)


def _below_clear_sky(summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each star estimate lies below the clear-sky offset (model
    units), and the same over its error through asinh (a clear exposure sits
    within a few sigma of 0, a clouded one far below): two (B, 3), zero where
    either is missing."""
    clear, has_clear = summary[:, _CLEAR], summary[:, _HAS_CLEAR]
    below, pull = [], []
    for value, log_err, has in _STAR_ESTIMATES:
        b = (summary[:, value] - clear) * summary[:, has] * has_clear
        err = 0.1 * torch.pow(10.0, summary[:, log_err])  # 10 mmag = 0.1 model units
        below.append(b)
        pull.append(torch.asinh(b / err))
    return torch.stack(below, dim=1), torch.stack(pull, dim=1)


def _own_pulls(summary: torch.Tensor) -> torch.Tensor:
    """What the context encoder knows of the exposure itself: (B, N_OWN)."""
    _, pull = _below_clear_sky(summary)
    has = summary[:, [h for _, _, h in _STAR_ESTIMATES] + [_HAS_CLEAR]]
    return torch.cat([pull, has], dim=1)


class SummaryEncoder(nn.Module):
    """SE: the exposure-level estimates, the star count, and the star
    estimates relative to the clear-sky offset (what clouds took), as they are
    and over their errors."""

    def __init__(self, config: AZPRCConfig) -> None:
        super().__init__()
        h = config.summary_hidden
        self.mlp = _mlp([N_SUMMARY + 2 * len(_STAR_ESTIMATES) + 1, h, h])

    def forward(self, summary: torch.Tensor, n_stars: torch.Tensor) -> torch.Tensor:
        below, pull = _below_clear_sky(summary)
        count = torch.log1p(n_stars.to(summary.dtype)).unsqueeze(1)
        return self.mlp(torch.cat([summary, below, pull, count], dim=1))


class ContextEncoder(nn.Module):
    """NCE: the night's previous exposures, a shared row MLP, attention pooling
    over the real rows; a second attention makes the context estimate, the
    clear-sky offset plus the attended rows' residuals (model units). That
    attention has a null slot, residual 0, scored from the pooled rows and the
    exposure's own pulls: a clear night attends to it and the estimate is the
    clear-sky offset, a cloudy one to its latest clouds."""

    def __init__(self, config: AZPRCConfig) -> None:
        super().__init__()
        h = config.context_hidden
        self.row = _mlp([N_CONTEXT, h, h])
        self.pool_score = nn.Linear(h, 1)
        self.estimate_score = nn.Linear(h, 1)
        self.null_score = _mlp([h + 1 + N_OWN, h]).append(nn.Linear(h, 1))
        self.out = nn.Linear(h + 1, h)

    def forward(
        self, context: torch.Tensor, own: torch.Tensor, has_clear: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``context`` (B, L, 9), ``own`` (B, N_OWN) the exposure's pulls,
        ``has_clear`` (B,) -> features (B, h), residual estimate (B,), whether
        there is one (B,)."""
        valid = context[..., _VALID] > 0.5  # (B, L)
        with_zp = valid & (context[..., _HAS_ZP] > 0.5)
        h = self.row(context)  # (B, L, h)
        pooled = (_masked_softmax(self.pool_score(h).squeeze(-1), valid).unsqueeze(-1) * h).sum(1)
        count = valid.to(context.dtype).sum(1, keepdim=True) / context.shape[1]
        null = self.null_score(torch.cat([pooled, count, own], dim=1))  # (B, 1)
        logits = torch.cat([null, self.estimate_score(h).squeeze(-1)], dim=1)  # (B, 1 + L)
        mask = torch.cat([has_clear.unsqueeze(1) > 0.5, with_zp], dim=1)
        weights = _masked_softmax(logits, mask)[:, 1:]
        residual = (weights * context[..., _RESIDUAL]).sum(1)  # (B,)
        features = F.relu(self.out(torch.cat([pooled, count], dim=1)))
        return features, residual, mask.any(dim=1).to(context.dtype)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask``; all zeros where nothing is."""
    weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1)
    return weights * mask.to(weights.dtype)


def _mlp(widths: list[int], *, dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU layers through ``widths``."""
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
        if config.use_stars:
            self.catalog_encoder = CatalogEncoder(config)
            width += config.catalog_out
        if config.use_summary:
            self.summary_encoder = SummaryEncoder(config)
            width += config.summary_hidden
        if config.use_telemetry:
            t = config.telemetry_hidden
            self.telemetry_mlp = _mlp([config.telemetry_dim, t, t, t])
            width += t
        if config.use_context:
            self.context_encoder = ContextEncoder(config)
            width += config.context_hidden
        self.fusion = _mlp([width, *config.fusion], dropout=config.dropout)
        latent = config.fusion[-1]
        # Heads, all read the latent: a correction (bounded; the whole offset when
        # the exposure has no estimate), the log-variance of the answer and that of
        # the context estimate, and the logits choosing among the star estimates.
        self.head = nn.Linear(latent, 3)
        self.star_gate = nn.Linear(latent, len(_STAR_ESTIMATES))
        with torch.no_grad():
            for layer in (self.head, self.star_gate):
                layer.weight.zero_()
                layer.bias.zero_()
            self.head.bias[_HEAD_CONTEXT_LOG_VAR] = 2.0 * math.log(0.03)  # 3 mmag to start
        # Set after training from the validation nights (ml/zp_train.calibrate_uncertainty),
        # saved with the weights, one pair per domain and regime (the estimate that weighs
        # most): 68.3 % of the errors within sigma_scale * sigma, 95 % within 1.96 *
        # tail_scale * sigma_scale * sigma.
        shape = (config.n_domains, len(ESTIMATES))
        self.register_buffer("sigma_scale", torch.ones(shape))
        self.register_buffer("tail_scale", torch.ones(shape))
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
        context: torch.Tensor,
        domain: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``patch`` (B, P, P), ``stars`` (B, S, 6), ``n_stars`` (B,) int,
        ``summary`` (B, 11), ``telemetry`` (B, T), ``context`` (B, L, 9),
        ``domain`` (B,) int -> offset (B,), log-variance (B,), latent (B, 32).
        The domain only chooses the interval calibration; the offset does not
        depend on it."""
        parts = self.forward_parts(patch, stars, n_stars, summary, telemetry, context, domain)
        return parts.offset, parts.log_var, parts.latent

    def forward_parts(self, *inputs: torch.Tensor) -> ZPParts:
        """:meth:`forward` with what it is made of (training holds the context
        estimate to the target too; the report shows the weights)."""
        summary, domain = inputs[3], inputs[6].clamp(0, self.config.n_domains - 1)
        latent, context, has_context = self._encode(*inputs[:6])
        out = self.head(latent)
        stated, present = self._star_estimates(summary)  # (B, 3) each
        star_w = _masked_softmax(self._star_logits(latent, summary), present > 0.5)
        has_stars = present.amax(dim=1)
        stars_est = (star_w * stated[0]).sum(dim=1)
        stars_var = ((star_w * stated[1]).sum(dim=1)) ** 2 + (1.0 - has_stars)  # (B,)
        context_var = torch.exp(out[:, _HEAD_CONTEXT_LOG_VAR].clamp(-14.0, 6.0))
        # Precision weights; an estimate the exposure lacks weighs nothing.
        p_stars = has_stars / stars_var
        p_context = has_context / context_var
        total = p_stars + p_context
        anything = total > 0
        safe = torch.where(anything, total, torch.ones_like(total))
        combined = (p_stars * stars_est + p_context * torch.nan_to_num(context)) / safe
        correction = out[:, _HEAD_CORRECTION]
        offset = torch.where(
            anything,
            combined + _CORRECTION_MAX * torch.tanh(correction / _CORRECTION_MAX),
            correction,
        )
        log_var = torch.where(anything, -torch.log(safe), torch.zeros_like(safe))
        log_var = (log_var + out[:, _HEAD_LOG_VAR]).clamp(-14.0, 8.0)
        weights = torch.cat(
            [star_w * (p_stars / safe).unsqueeze(1), (p_context / safe).unsqueeze(1)], dim=1
        )
        regime = torch.argmax(weights, dim=1)
        log_var = log_var + 2.0 * torch.log(self.sigma_scale[domain, regime])
        return ZPParts(
            offset, log_var, latent, context, context_var, weights, regime,
            self.tail_scale[domain, regime],
        )  # fmt: skip

    def gate_weights(self, *inputs: torch.Tensor) -> torch.Tensor:
        """How much each of :data:`ESTIMATES` counts, (B, 4) (for the report)."""
        return self.forward_parts(*inputs).weights

    def _star_estimates(
        self, summary: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The star estimates (B, 3), their stated errors (B, 3) in model units,
        and which are there (B, 3; none without the summary branch)."""
        values = summary[:, [v for v, _, _ in _STAR_ESTIMATES]]
        errors = 0.1 * torch.pow(10.0, summary[:, [e for _, e, _ in _STAR_ESTIMATES]])
        present = summary[:, [h for _, _, h in _STAR_ESTIMATES]]
        if not self.config.use_summary:
            present = torch.zeros_like(present)
        return (values, errors), present

    def _star_logits(self, latent: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        # Inverse-variance weighting from the stated errors, and what the
        # network learns on top (a cloud's gradient favours the plane).
        log_err = summary[:, [e for _, e, _ in _STAR_ESTIMATES]] * math.log(10.0)
        return -2.0 * log_err + self.star_gate(latent)

    def _encode(
        self,
        patch: torch.Tensor,
        stars: torch.Tensor,
        n_stars: torch.Tensor,
        summary: torch.Tensor,
        telemetry: torch.Tensor,
        context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latent (B, 32), the context estimate (B,; NaN where none) and
        whether there is one (B,)."""
        parts = []
        nan = torch.full_like(summary[:, 0], torch.nan)
        estimate, has_context = nan, torch.zeros_like(nan)
        if self.config.use_image:
            parts.append(self.patch_encoder(patch))
        if self.config.use_stars:
            parts.append(self.catalog_encoder(stars, n_stars))
        if self.config.use_summary:
            parts.append(self.summary_encoder(summary, n_stars))
        if self.config.use_telemetry:
            parts.append(self.telemetry_mlp(telemetry))
        if self.config.use_context:
            has_clear = summary[:, _HAS_CLEAR]
            features, residual, has_context = self.context_encoder(
                context, _own_pulls(summary), has_clear
            )
            parts.append(features)
            # The residuals are relative to the clear-sky offset (or absolute without one).
            estimate = torch.where(
                has_context > 0.5, residual + summary[:, _CLEAR] * has_clear, nan
            )
        latent = self.fusion(torch.cat(parts, dim=1))  # (B, L)
        return latent, estimate, has_context

    def domain_logits(self, latent: torch.Tensor, alpha: float) -> torch.Tensor:
        """The discriminator's logits, behind a gradient-reversal layer: it
        learns to tell domains apart while the encoder learns not to let it."""
        return self.discriminator(reverse_gradient(latent, alpha))
