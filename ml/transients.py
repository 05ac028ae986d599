"""Transient localisation on reference/new pair cutouts (seed 002).

Two models share one interface, ``forward(x, target=None) -> (pred, loss)`` with
``x`` (B, 3, 64, 64) the normalised channels of :func:`pair_channels` and
``pred`` (B, 3) = (x, y, logit): the transient's position in cutout pixels and
the logit that the cutout holds one.

- :class:`TransientCNN`: seed 002's network: five blocks of 3x3 convolution,
  batch-norm, ReLU, 2x2 max-pool and dropout 0.2; a sigmoid spatial attention map
  multiplied into the features; global average pooling; dense 128; a linear head
  for (x, y) and the detection logit (the last is ours: scanning a quadrant needs
  a score to reject empty tiles).
- :class:`HeatmapNet`: a small U-Net that outputs a logit per pixel; the position
  is the soft-argmax of its spatial softmax and the detection logit is
  ``logsumexp(map) + b``.

Around them: dihedral augmentation that moves the labels with the image
(:func:`dihedral`), a training loop (:func:`train_localiser`), batched inference
(:func:`locate`), whole-quadrant scanning with overlapping tiles
(:func:`scan_quadrant`) and metrics (:func:`localisation_metrics`,
:func:`match_to_truth`).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from scipy.stats import median_abs_deviation
from torch import nn

from ml.device import best_device

CUTOUT_PX = 64


def pair_channels(images: np.ndarray, *, softening: float = 3.0) -> np.ndarray:
    """Network input from pair cutouts: reference, new and their difference.

    Each cutout is put in units of its own pixel noise (median sky removed,
    divided by the robust scatter of the difference over sqrt 2) and compressed
    with ``asinh(v / softening)``, so that a 5-sigma transient and a 14th-mag
    star are both in a range a network handles. (Seed 002 scaled each pair to
    0..1 by its brightest pixel, which flattens a faint transient next to a
    bright star to nothing.)

    Parameters
    ----------
    images : ndarray, shape (n, 2, h, w), e-
        Reference then new.
    softening : float
        Noise units where the compression turns from linear to logarithmic.

    Returns
    -------
    ndarray, shape (n, 3, h, w), float32
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 2:
        raise ValueError(f"images must have shape (n, 2, h, w), got {images.shape}")
    flat = images.reshape(len(images), 2, -1)
    sky = np.median(flat, axis=2)[:, :, None, None]  # (n, 2, 1, 1)
    ref, new = images[:, 0] - sky[:, 0], images[:, 1] - sky[:, 1]
    diff = new - ref
    scatter = median_abs_deviation(diff.reshape(len(images), -1), axis=1, scale="normal")
    sigma = np.maximum(scatter / np.sqrt(2.0), 1e-3)[:, None, None]
    out = np.stack([ref, new, diff], axis=1) / sigma[:, None]
    return np.arcsinh(out / softening).astype(np.float32)


def dihedral(images: torch.Tensor, xy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/rotations of square cutouts, with the labels moved along.

    Parameters
    ----------
    images : tensor, shape (..., s, s)
    xy : tensor, shape (..., 2), pixels
        (x, y) with pixel centres at integers; NaN labels stay NaN.
    k : int
        0..7: ``k % 4`` quarter turns (``torch.rot90`` over the last two axes),
        preceded by a left-right flip when ``k >= 4``.

    Returns
    -------
    images, xy : the transformed copies
    """
    if not 0 <= k < 8:
        raise ValueError(f"k must be in 0..7, got {k}")
    s = images.shape[-1]
    if images.shape[-2] != s:
        raise ValueError(f"cutouts must be square, got {tuple(images.shape[-2:])}")
    x, y = xy[..., 0], xy[..., 1]
    if k >= 4:
        images = images.flip(-1)
        x = (s - 1) - x
    for _ in range(k % 4):
        # rot90 over (rows, cols): new[r, c] = old[c, s - 1 - r], so a point at
        # (x, y) moves to (y, s - 1 - x).
        images = torch.rot90(images, 1, dims=(-2, -1))
        x, y = y, (s - 1) - x
    return images, torch.stack([x, y], dim=-1)


@dataclass(frozen=True)
class CNNConfig:
    """Seed 002's CNN (widths narrowed for CPU training; seed 002 does not give them)."""

    in_channels: int = 3
    widths: tuple[int, ...] = (16, 32, 64, 96, 128)
    dropout: float = 0.2
    dense: int = 128
    size: int = CUTOUT_PX


@dataclass(frozen=True)
class HeatmapConfig:
    """The heat-map U-Net: widths at full, half and quarter resolution."""

    in_channels: int = 3
    widths: tuple[int, int, int] = (12, 24, 48)
    size: int = CUTOUT_PX


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def _detection_loss(
    xy: torch.Tensor, logit: torch.Tensor, target: torch.Tensor, position_loss: torch.Tensor | None
) -> torch.Tensor:
    """BCE on presence plus a position loss over the cutouts that hold a transient.
    ``target`` (B, 3) = (x, y, present); ``position_loss`` (B,) or None for Huber on
    ``xy`` in pixels (1 px transition: a squared error for small misses, linear for
    the hopeless ones, which would otherwise dominate)."""
    present = target[:, 2]
    loss = nnf.binary_cross_entropy_with_logits(logit, present)
    pos = present > 0.5
    if pos.any():
        if position_loss is None:
            position_loss = nnf.smooth_l1_loss(
                xy, torch.nan_to_num(target[:, :2]), reduction="none"
            )
            position_loss = position_loss.sum(dim=1)
        loss = loss + position_loss[pos].mean()
    return loss


class TransientCNN(nn.Module):
    """Seed 002's convolutional localiser with a detection logit."""

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CNNConfig()
        layers: list[nn.Module] = []
        c = config.in_channels
        for w in config.widths:
            layers += [*_conv_bn(c, w), nn.MaxPool2d(2), nn.Dropout(config.dropout)]
            c = w
        self.features = nn.Sequential(*layers)
        self.attention = nn.Conv2d(c, 1, 3, padding=1)
        self.head = nn.Sequential(
            nn.Linear(c, config.dense),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.dense, 3),
        )
        # Start from 'the centre, no transient': Adam moves a weight by ~lr a step
        # and the position head is scaled by the cutout size, so a random start
        # costs hundreds of steps just to find the middle.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.features(x)  # (B, C, s/32, s/32)
        f = f * torch.sigmoid(self.attention(f))  # (B, 1, ...) weights
        out = self.head(f.mean(dim=(2, 3)))  # (B, 3)
        # Positions as fractions of the cutout keep the head's outputs O(1).
        xy = (out[:, :2] + 0.5) * (self.config.size - 1)
        logit = out[:, 2]
        pred = torch.cat([xy, logit[:, None]], dim=1)
        loss = None if target is None else _detection_loss(xy, logit, target, None)
        return pred, loss


class HeatmapNet(nn.Module):
    """U-Net heat-map localiser with a soft-argmax head."""

    def __init__(self, config: HeatmapConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or HeatmapConfig()
        w1, w2, w3 = config.widths
        self.enc1 = nn.Sequential(*_conv_bn(config.in_channels, w1), *_conv_bn(w1, w1))
        self.enc2 = nn.Sequential(*_conv_bn(w1, w2), *_conv_bn(w2, w2))
        self.enc3 = nn.Sequential(*_conv_bn(w2, w3), *_conv_bn(w3, w3))
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = nn.Sequential(*_conv_bn(2 * w2, w2))
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = nn.Sequential(*_conv_bn(2 * w1, w1))
        self.out = nn.Conv2d(w1, 1, 1)
        # Starts the detection logit near 0 for a flat map of s*s pixels.
        self.bias = nn.Parameter(torch.tensor(-2.0 * float(np.log(config.size))))
        grid = torch.arange(config.size, dtype=torch.float32)
        self.register_buffer("grid", grid, persistent=False)

    def heatmap(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits, shape (B, s, s)."""
        e1 = self.enc1(x)  # (B, w1, s, s)
        e2 = self.enc2(nnf.max_pool2d(e1, 2))  # (B, w2, s/2, s/2)
        e3 = self.enc3(nnf.max_pool2d(e2, 2))  # (B, w3, s/4, s/4)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)[:, 0]

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.heatmap(x)  # (B, s, s)
        b, s = logits.shape[0], logits.shape[-1]
        logp = nnf.log_softmax(logits.reshape(b, -1), dim=1).reshape(b, s, s)
        xy = self._expectation(logp.exp())  # (B, 2) soft-argmax
        logit = torch.logsumexp(logits.reshape(b, -1), dim=1) + self.bias
        pred = torch.cat([xy, logit[:, None]], dim=1)
        if target is None:
            return pred, None
        # Cross-entropy against the label split bilinearly over its 4 pixels: the
        # soft-argmax of that target is the label itself, and unlike a loss on
        # the soft-argmax alone it does not reward spreading the map.
        ce = -(self._bilinear_target(torch.nan_to_num(target[:, :2]), s) * logp).sum(dim=(1, 2))
        return pred, _detection_loss(xy, logit, target, ce)

    @staticmethod
    def _bilinear_target(xy: torch.Tensor, s: int) -> torch.Tensor:
        xy = xy.clamp(0, s - 1)
        i0 = xy.floor().clamp(max=s - 2)
        f = xy - i0  # (B, 2) fractional parts
        i0 = i0.long()
        t = torch.zeros(len(xy), s, s, device=xy.device)
        rows = torch.arange(len(xy), device=xy.device)
        for dy in (0, 1):
            for dx in (0, 1):
                w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                t[rows, i0[:, 1] + dy, i0[:, 0] + dx] += w
        return t

    def refine(self, x: torch.Tensor, *, half: int = 2) -> torch.Tensor:
        """Positions from a soft-argmax within ``half`` pixels of the map's peak,
        (B, 2): at inference a faint second bump elsewhere must not pull it."""
        logits = self.heatmap(x)
        b, s = logits.shape[0], logits.shape[-1]
        peak = logits.reshape(b, -1).argmax(dim=1)
        py, px = peak // s, peak % s
        dist_y = (self.grid[None, :] - py[:, None]).abs() <= half  # (B, s)
        dist_x = (self.grid[None, :] - px[:, None]).abs() <= half
        window = dist_y[:, :, None] & dist_x[:, None, :]
        w = torch.softmax(logits.masked_fill(~window, -torch.inf).reshape(b, -1), dim=1)
        return self._expectation(w.reshape(b, s, s))

    def _expectation(self, prob: torch.Tensor) -> torch.Tensor:
        """(x, y) expected under per-cutout pixel weights (B, s, s) that sum to 1."""
        return torch.stack(
            [(prob.sum(dim=1) * self.grid).sum(dim=1), (prob.sum(dim=2) * self.grid).sum(dim=1)],
            dim=1,
        )


Localiser = TransientCNN | HeatmapNet


@dataclass(frozen=True)
class TrainConfig:
    """Training of a localiser (Adam at seed 002's learning rate and batch size)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    augment: bool = True
    """A random flip/rotation per cutout and epoch."""


@dataclass(frozen=True)
class TrainHistory:
    """Mean training loss per epoch and the wall time."""

    loss: tuple[float, ...]
    seconds: float
    device: str


def _targets(xy: np.ndarray, present: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(
        np.column_stack([xy, np.asarray(present, dtype=np.float32)]), dtype=torch.float32
    )


def _augment(
    x: torch.Tensor, t: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ks = torch.randint(0, 8, (len(x),), generator=gen)
    x, t = x.clone(), t.clone()
    for k in range(8):
        sel = ks == k
        if sel.any():
            x[sel], t[sel, :2] = dihedral(x[sel], t[sel, :2], k)
    return x, t


def train_localiser(
    model: Localiser,
    inputs: np.ndarray,
    xy: np.ndarray,
    present: np.ndarray,
    *,
    config: TrainConfig | None = None,
    device: torch.device | None = None,
) -> TrainHistory:
    """Train ``model`` in place.

    Parameters
    ----------
    model : TransientCNN or HeatmapNet
    inputs : ndarray, shape (n, 3, s, s), float32
        From :func:`pair_channels`.
    xy : ndarray, shape (n, 2), pixels
        Labels in cutout pixels; NaN where there is no transient.
    present : ndarray, shape (n,), bool
    config : TrainConfig, optional
    device : torch.device, optional
        Default :func:`ml.device.best_device`.

    Returns
    -------
    TrainHistory
    """
    config = config or TrainConfig()
    device = device or best_device()
    n = len(inputs)
    if n == 0 or xy.shape != (n, 2) or len(present) != n:
        raise ValueError(
            f"inputs, xy and present must describe the same n > 0 cutouts, got "
            f"{inputs.shape}, {xy.shape}, {np.shape(present)}"
        )
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_all = torch.as_tensor(inputs, dtype=torch.float32)
    t_all = _targets(xy, present)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = time.perf_counter()
    history = []
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, config.batch_size):
            idx = order[i : i + config.batch_size]
            if len(idx) < 2:  # batch-norm needs two samples
                continue
            xb, tb = x_all[idx], t_all[idx]
            if config.augment:
                xb, tb = _augment(xb, tb, gen)
            _, loss = model(xb.to(device), tb.to(device))
            assert loss is not None  # a target was given
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / n)
    model.eval()
    return TrainHistory(
        loss=tuple(history), seconds=time.perf_counter() - start, device=str(device)
    )


@torch.no_grad()
def locate(
    model: Localiser,
    inputs: np.ndarray,
    *,
    device: torch.device | None = None,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and detection scores of cutouts.

    Parameters
    ----------
    model : TransientCNN or HeatmapNet
    inputs : ndarray, shape (n, 3, s, s), float32
    device : torch.device, optional
    batch_size : int

    Returns
    -------
    xy : ndarray, shape (n, 2), cutout pixels
    score : ndarray, shape (n,)
        Probability that the cutout holds a transient.
    """
    device = device or best_device()
    model.to(device).eval()
    xys, scores = [], []
    for i in range(0, len(inputs), batch_size):
        xb = torch.as_tensor(inputs[i : i + batch_size], dtype=torch.float32, device=device)
        pred, _ = model(xb)
        xy = model.refine(xb) if isinstance(model, HeatmapNet) else pred[:, :2]
        xys.append(xy.cpu().numpy())
        scores.append(torch.sigmoid(pred[:, 2]).cpu().numpy())
    if not xys:
        return np.zeros((0, 2)), np.zeros(0)
    return np.concatenate(xys).astype(np.float64), np.concatenate(scores).astype(np.float64)


def save_localiser(model: Localiser) -> bytes:
    """The model's weights and configuration, as bytes (to pass between workers)."""
    buf = io.BytesIO()
    torch.save(
        {
            "kind": type(model).__name__,
            "config": asdict(model.config),
            "state": {k: v.cpu() for k, v in model.state_dict().items()},
        },
        buf,
    )
    return buf.getvalue()


def load_localiser(blob: bytes) -> Localiser:
    """Inverse of :func:`save_localiser`; the model comes back in eval mode on CPU."""
    ckpt: dict[str, Any] = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    kinds: dict[str, tuple[type[Localiser], type]] = {
        "TransientCNN": (TransientCNN, CNNConfig),
        "HeatmapNet": (HeatmapNet, HeatmapConfig),
    }
    if ckpt.get("kind") not in kinds:
        raise ValueError(f"not a transient localiser checkpoint (kind {ckpt.get('kind')!r})")
    cls, cfg_cls = kinds[ckpt["kind"]]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    model = cls(cfg_cls(**cfg))
    model.load_state_dict(ckpt["state"])
    return model.eval()


def tile_starts(n: int, *, size: int = CUTOUT_PX, overlap: int = 10) -> np.ndarray:
    """Start offsets of tiles of ``size`` along an axis of ``n`` pixels, each
    overlapping the previous by ``overlap``; the last tile ends on the last pixel
    (overlapping more), so every pixel is covered."""
    if n < size:
        raise ValueError(f"the axis ({n} px) is shorter than a tile ({size} px)")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap}")
    starts = np.arange(0, n - size + 1, size - overlap)
    if starts[-1] + size < n:
        starts = np.append(starts, n - size)
    return starts


@dataclass(frozen=True)
class Detections:
    """Transients found in a quadrant, highest score first.

    Attributes
    ----------
    x, y : ndarray, shape (n,), pixels
    score : ndarray, shape (n,)
    """

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def merge_detections(
    x: np.ndarray, y: np.ndarray, score: np.ndarray, *, radius_px: float
) -> Detections:
    """Keep the highest-scoring detection of each group closer than ``radius_px``
    (greedy, by decreasing score)."""
    order = np.argsort(score)[::-1]
    x, y, score = x[order], y[order], score[order]
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        if keep[i]:
            close = (x[i + 1 :] - x[i]) ** 2 + (y[i + 1 :] - y[i]) ** 2 < radius_px**2
            keep[i + 1 :] &= ~close
    return Detections(x=x[keep], y=y[keep], score=score[keep])


def scan_quadrant(
    model: Localiser,
    ref: np.ndarray,
    new: np.ndarray,
    *,
    overlap: int = 10,
    threshold: float = 0.9,
    merge_radius_px: float = 5.0,
    device: torch.device | None = None,
    batch_size: int = 512,
) -> Detections:
    """Transients in a whole quadrant from overlapping 64x64 tiles.

    Each tile gives one position and a score; tiles scoring ``threshold`` or more
    whose position lies in the tile's core (not within half the overlap of an
    edge it shares with a neighbour) are kept, and detections of one transient
    from overlapping tiles are merged.

    Parameters
    ----------
    model : TransientCNN or HeatmapNet
    ref, new : ndarray, shape (ny, nx), e-
    overlap : int
        Pixels shared by neighbouring tiles.
    threshold : float
        Minimum detection score (0.9 keeps the heat-map's false detections near 2
        per million pixels; docs/transients.md).
    merge_radius_px : float
    device : torch.device, optional
    batch_size : int

    Returns
    -------
    Detections
    """
    if ref.shape != new.shape or ref.ndim != 2:
        raise ValueError(f"ref and new must be 2-D of one shape, got {ref.shape}, {new.shape}")
    size = model.config.size
    ys = tile_starts(ref.shape[0], size=size, overlap=overlap)
    xs = tile_starts(ref.shape[1], size=size, overlap=overlap)
    x0, y0 = (a.ravel() for a in np.meshgrid(xs, ys))
    cut = np.empty((len(x0), 2, size, size), dtype=np.float32)
    for i, (a, b) in enumerate(zip(x0, y0, strict=True)):
        cut[i, 0] = ref[b : b + size, a : a + size]
        cut[i, 1] = new[b : b + size, a : a + size]
    xy, score = locate(model, pair_channels(cut), device=device, batch_size=batch_size)
    xy = np.clip(xy, 0, size - 1)
    # A transient near a tile's inner edge is cut by it and badly placed; the
    # neighbouring tile sees it whole. Keep each tile's core: up to the middle of
    # the overlap (+1 px, so that two slightly different answers cannot both fall
    # out), and everything on the image's own border.
    lo, hi = overlap / 2 - 1.5, size + 0.5 - overlap / 2
    core = np.ones(len(score), dtype=bool)
    for k, (start, n) in enumerate(((x0, ref.shape[1]), (y0, ref.shape[0]))):
        core &= (start == 0) | (xy[:, k] >= lo)
        core &= (start + size == n) | (xy[:, k] <= hi)
    hit = (score >= threshold) & core
    return merge_detections(
        x0[hit] + xy[hit, 0], y0[hit] + xy[hit, 1], score[hit], radius_px=merge_radius_px
    )


@dataclass(frozen=True)
class LocalisationMetrics:
    """Distances between predicted and true positions, as seed 002 reports them."""

    n: int
    within_1px: float
    """Fraction within 1 px."""
    within_2px: float
    within_5px: float
    median_px: float
    mean_px: float
    max_px: float


def localisation_metrics(pred_xy: np.ndarray, true_xy: np.ndarray) -> LocalisationMetrics:
    """Seed 002's figures from (n, 2) predicted and true positions (pixels)."""
    pred_xy, true_xy = np.asarray(pred_xy, float), np.asarray(true_xy, float)
    if pred_xy.shape != true_xy.shape or pred_xy.ndim != 2 or len(pred_xy) == 0:
        raise ValueError(
            f"pred_xy and true_xy must both be (n > 0, 2), got {pred_xy.shape}, {true_xy.shape}"
        )
    d = np.hypot(*(pred_xy - true_xy).T)
    return LocalisationMetrics(
        n=len(d),
        within_1px=float(np.mean(d <= 1)),
        within_2px=float(np.mean(d <= 2)),
        within_5px=float(np.mean(d <= 5)),
        median_px=float(np.median(d)),
        mean_px=float(np.mean(d)),
        max_px=float(np.max(d)),
    )


def match_to_truth(
    det_x: np.ndarray,
    det_y: np.ndarray,
    true_x: np.ndarray,
    true_y: np.ndarray,
    *,
    radius_px: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Which true transients were found and which detections are false.

    Returns
    -------
    found : ndarray, shape (n_true,), bool
        A detection lies within ``radius_px``.
    false : ndarray, shape (n_det,), bool
        No true transient lies within ``radius_px``.
    """
    dx = np.asarray(det_x)[:, None] - np.asarray(true_x)[None, :]
    dy = np.asarray(det_y)[:, None] - np.asarray(true_y)[None, :]
    close = dx**2 + dy**2 <= radius_px**2  # (n_det, n_true)
    return close.any(axis=0), ~close.any(axis=1)
