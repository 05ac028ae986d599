"""Training and prediction for AZP-RC (and the image-only CNN, which is AZP-RC
with two branches off).

Loss (seed 000 §3.3-3.4, plus the uncertainty head):

    L = MSE + lambda * ranking surrogate + Gaussian NLL of the log-variance head
        + cross-entropy of the domain discriminator behind a gradient reversal

The paper's ranking penalty counts discordant pairs, which has no gradient; the
surrogate replaces the indicator with ``sigmoid(-(p_i - p_j) sign(y_i - y_j) /
tau)`` over the pairs of a batch. The NLL term sees the mean detached, so the
uncertainty head learns the error of the prediction without pulling on it.
Offsets are handled in units of ``TARGET_SCALE_MAG`` (0.1 mag).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import optimize, stats
from torch.nn import functional as F

from ml.device import best_device
from ml.zp_features import INPUT_NAMES, TARGET_SCALE_MAG, FeatureSet, model_inputs
from ml.zp_model import AZPRC, ESTIMATES, AZPRCConfig


@dataclass(frozen=True)
class TrainConfig:
    """How a zero-point network is trained.

    Attributes
    ----------
    epochs : int
        Upper limit; training stops earlier when the validation loss has not
        improved for ``patience`` epochs, and the best epoch's weights are kept.
    batch_size : int
    learning_rate, weight_decay : float
        AdamW.
    ranking_lambda : float
        Weight of the ranking surrogate (paper: 0.1).
    ranking_tau_mag : float, mag
        Softness of the surrogate's sigmoid.
    dann_alpha : float
        Gradient-reversal strength (paper: 0.01); 0 switches domain adaptation off.
    nll_weight : float
        Weight of the uncertainty head's Gaussian NLL.
    context_weight : float
        Weight of the context estimate's own scaled MSE (deep supervision: it
        learns to attend to the clear-sky offset on clear nights and to the
        latest clouds on cloudy ones whether or not the gate uses it yet).
    patience : int
    clip_grad_norm : float
        Gradients are clipped to this norm (the gate and the correction head
        otherwise make the first epochs jumpy).
    seed : int
        Seeds weights, dropout and batch order: the same seed and data give the
        same model on the same device.
    device : str or None
        ``'cuda'``, ``'cpu'``, or None for the best available.
    """

    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    ranking_lambda: float = 0.1
    ranking_tau_mag: float = 0.01
    dann_alpha: float = 0.01
    nll_weight: float = 0.1
    context_weight: float = 0.3
    patience: int = 12
    clip_grad_norm: float = 1.0
    seed: int = 0
    device: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ranking_surrogate(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Smooth discordant-pair rate over all ordered pairs with different targets
    (0 when perfectly ordered by a wide margin, 0.5 for no information)."""
    dp = pred.unsqueeze(0) - pred.unsqueeze(1)  # (B, B)
    sign = torch.sign(target.unsqueeze(0) - target.unsqueeze(1))
    pairs = sign != 0
    if not bool(pairs.any()):
        return pred.sum() * 0.0
    return torch.sigmoid(-dp * sign / tau)[pairs].mean()


def discordant_pair_rate(pred: np.ndarray, target: np.ndarray) -> float:
    """The paper's ranking penalty itself: the fraction of pairs with different
    targets whose predicted order is wrong."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    dp = p[None, :] - p[:, None]
    dt = t[None, :] - t[:, None]
    pairs = dt != 0
    return float(np.mean((dp * dt)[pairs] < 0)) if pairs.any() else float("nan")


def _tensors(features: FeatureSet, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    arrays = model_inputs(features, rows)
    return [torch.from_numpy(arrays[name]).to(device) for name in INPUT_NAMES]


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    mse: float
    ranking: float
    nll: float
    domain: float


def error_scale(features: FeatureSet) -> np.ndarray:
    """Each exposure's scale in the loss [model units]: its classical error
    clipped to 3..30 mmag (30 without one). Squared errors over it make a
    millimagnitude won on a clear exposure count as much as ten lost on a
    clouded one: in plain MSE the few exposures with 50 mmag errors drown the
    many where the network can be precise, and it learns to trust nothing but
    the stars."""
    err = np.where(np.isfinite(features.catalog_zp_err_mag), features.catalog_zp_err_mag, 0.03)
    return np.clip(err, 0.003, 0.03) / TARGET_SCALE_MAG


def hybrid_loss(
    model: AZPRC,
    inputs: list[torch.Tensor],
    target: torch.Tensor,
    scale: torch.Tensor,
    domain: torch.Tensor,
    config: TrainConfig,
) -> LossParts:
    """The training loss of one batch (target and ``scale`` in model units;
    :func:`error_scale`)."""
    parts = model.forward_parts(*inputs)
    offset, log_var, latent, context = parts.offset, parts.log_var, parts.latent, parts.context
    mse = (((offset - target) / scale) ** 2).mean()
    with_context = torch.isfinite(context)
    if bool(with_context.any()):
        # Deep supervision of the context estimate, and its variance by its own
        # NLL (the estimate detached): the combination then weighs it rightly.
        c, t, v = context[with_context], target[with_context], parts.context_var[with_context]
        aux = ((c - t) / scale[with_context]) ** 2
        context_nll = 0.5 * (torch.log(v) + (c.detach() - t) ** 2 / v)
        mse = mse + config.context_weight * aux.mean() + config.nll_weight * context_nll.mean()
    rank = ranking_surrogate(offset, target, config.ranking_tau_mag / TARGET_SCALE_MAG)
    resid2 = (offset.detach() - target) ** 2
    nll = 0.5 * (log_var + resid2 * torch.exp(-log_var)).mean()
    total = mse + config.ranking_lambda * rank + config.nll_weight * nll
    dom = torch.zeros((), device=target.device)
    if config.dann_alpha > 0:
        dom = F.cross_entropy(model.domain_logits(latent, config.dann_alpha), domain)
        total = total + dom
    return LossParts(total, *(float(t.detach()) for t in (mse, rank, nll, dom)))


@dataclass
class TrainedModel:
    """A trained network and how training went (losses per epoch, in model
    units, the first entry, epoch -1, before any training; ``best_epoch`` is the
    one kept)."""

    model: AZPRC
    history: list[dict[str, float]]
    best_epoch: int
    seconds: float


def train_zp_network(
    model_config: AZPRCConfig,
    train: FeatureSet,
    val: FeatureSet,
    config: TrainConfig | None = None,
    *,
    calibration: FeatureSet | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainedModel:
    """Train AZP-RC on ``train``, keeping the weights of the best validation MSE.

    Rows with a NaN target are not used. Splits must be by night
    (ml/zp_features.split_by_night). The intervals are calibrated on
    ``calibration`` (default ``val``): the validation nights with their context
    made out of sample (ml/zp_context.attach_context_out_of_night), so that
    they see the clear-sky model as a scored night does. ``on_epoch(epoch)`` is
    called after each epoch (0-based), e.g. to report progress.
    """
    config = config or TrainConfig()
    train = train.select(np.isfinite(train.target_mag))
    val = val.select(np.isfinite(val.target_mag))
    if len(train) < 2 or len(val) < 1:
        raise ValueError(
            f"need >= 2 training and >= 1 validation rows, got {len(train)}, {len(val)}"
        )
    if int(train.domain.max()) >= model_config.n_domains:
        raise ValueError(f"domain {int(train.domain.max())} >= n_domains {model_config.n_domains}")
    device = torch.device(config.device) if config.device else best_device()
    torch.manual_seed(config.seed)
    model = AZPRC(model_config).to(device)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    shuffle = np.random.default_rng(config.seed)
    train_scale, val_scale = error_scale(train), error_scale(val)
    history = [{"epoch": -1, "val_mse": _val_mse(model, val, device, val_scale)}]  # untrained
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = shuffle.permutation(len(train))
        sums = np.zeros(4)
        for lo in range(0, len(order) - 1, config.batch_size):
            rows = order[lo : lo + config.batch_size]
            if len(rows) < 2:
                continue
            target = torch.from_numpy(train.target_mag[rows] / TARGET_SCALE_MAG).float().to(device)
            scale = torch.from_numpy(train_scale[rows]).float().to(device)
            domain = torch.from_numpy(train.domain[rows].astype(np.int64)).to(device)
            parts = hybrid_loss(model, _tensors(train, rows, device), target, scale, domain, config)
            optimiser.zero_grad(set_to_none=True)
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimiser.step()
            sums += np.array([parts.mse, parts.ranking, parts.nll, parts.domain]) * len(rows)
        val_mse = _val_mse(model, val, device, val_scale)
        train_means = sums / len(train)
        history.append(
            {"epoch": epoch, "val_mse": val_mse}
            | dict(zip(("mse", "ranking", "nll", "domain"), train_means.tolist(), strict=True))
        )
        if on_epoch is not None:
            on_epoch(epoch)
        if val_mse < best[0]:
            best = (val_mse, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    calibrate_uncertainty(model, val if calibration is None else calibration)
    return TrainedModel(model, history, best[1], time.perf_counter() - start)


def _val_mse(model: AZPRC, val: FeatureSet, device: torch.device, scale: np.ndarray) -> float:
    """The validation nights' scaled MSE (the training loss's first term)."""
    pred, _ = predict(model, val, device=device)
    return float(np.mean(((pred - val.target_mag) / TARGET_SCALE_MAG / scale) ** 2))


Z95 = 1.959964
"""Half-width of a Gaussian 95 % interval in sigmas."""


MIN_REGIME_EXPOSURES = 50
"""A regime with fewer validation exposures takes the pooled calibration."""


@torch.no_grad()
def calibrate_uncertainty(
    model: AZPRC, val: FeatureSet, *, domain: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split-conformal calibration on the validation nights, per domain and
    regime (the estimate that weighs most: the stars' classical or plane fit,
    the sparse mean, the night's context; Mondrian conformal): rescale the
    uncertainty so that 68.3 % of a regime's validation errors lie within 1
    sigma, and set its tail factor so that 95 % lie within 1.96 x tail x sigma
    (errors have heavier tails than a Gaussian: clouds, few stars). A clear
    night's errors and a clouded one's do not scale alike, nor do one
    instrument's and another's (on a domain no training night came from, the
    source domains' factors left 68 % intervals holding 45 %), and one factor
    for all would leave each wrong.

    Every domain gets the calibration of all of ``val`` pooled over domains; a
    domain with at least ``MIN_REGIME_EXPOSURES`` validation exposures gets its
    own. With ``domain``, only that domain's calibration is set, from its rows
    of ``val`` (labelled nights of an instrument added after training; the rest
    of the model is left as it is). Returns the per-regime (sigma_scale,
    tail_scale) of ``domain``, or of the pooled calibration."""
    n_domains = model.sigma_scale.shape[0]
    if domain is not None and not 0 <= domain < n_domains:
        raise ValueError(f"calibrate_uncertainty: domain {domain} not in 0..{n_domains - 1}")
    rows = slice(None) if domain is None else slice(domain, domain + 1)
    model.sigma_scale[rows] = 1.0
    model.tail_scale[rows] = 1.0
    pred, sigma, _, regime = _predict_all(model, val)
    ok = np.isfinite(val.target_mag) & (sigma > 0)
    if domain is not None:
        ok &= val.domain == domain
    z = np.abs(pred - val.target_mag) / np.where(ok, sigma, 1.0)
    domains = range(n_domains) if domain is None else [domain]
    # However few the validation exposures, their conformal quantiles beat the
    # head's uncalibrated sigma (found: 8 validation exposures left sigma as
    # trained, 10-25x below the errors on the survey's nights).
    pooled = _regime_table(z, regime, ok)
    for d in domains:
        mine = ok & (val.domain == d)
        table = _regime_table(z, regime, mine) if mine.sum() >= MIN_REGIME_EXPOSURES else pooled
        model.sigma_scale[d] = torch.from_numpy(table[0]).to(model.sigma_scale)
        model.tail_scale[d] = torch.from_numpy(table[1]).to(model.tail_scale)
    return pooled  # with ``domain``, ``ok`` holds its rows only and this is its table


def _regime_table(
    z: np.ndarray, regime: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per regime, the conformal (sigma_scale, tail_scale) of the scores ``z``
    of ``rows``; a regime with fewer than ``MIN_REGIME_EXPOSURES`` of them takes
    the factors of all of ``rows`` (1, 1 with none)."""
    pooled = _conformal(z[rows]) if rows.any() else (1.0, 1.0)
    scales = np.ones(len(ESTIMATES))
    tails = np.ones(len(ESTIMATES))
    for r in range(len(ESTIMATES)):
        mine = rows & (regime == r)
        scales[r], tails[r] = _conformal(z[mine]) if mine.sum() >= MIN_REGIME_EXPOSURES else pooled
    return scales, tails


def _conformal(z: np.ndarray) -> tuple[float, float]:
    """Conformal quantiles of the scores |error| / sigma, the ceil((n + 1) q)-th
    smallest: the 68.3 % one, and the 95 % one over 1.96 times it."""
    z = np.sort(z)
    n = len(z)
    scale = float(z[min(n - 1, int(np.ceil((n + 1) * 0.6827)) - 1)])
    tail = float(z[min(n - 1, int(np.ceil((n + 1) * 0.95)) - 1)]) / (Z95 * scale)
    return scale, tail


@dataclass(frozen=True)
class StarsConsistency:
    """How a night's network offsets agree with the same exposures' classical
    zero points: chi2 of their differences over ``dof`` exposures, its p-value,
    and the factor the network's intervals were widened by (1 when consistent)."""

    chi2: float
    dof: int
    p_value: float
    factor: float


def stars_consistency(
    offset: np.ndarray,
    sigma: np.ndarray,
    catalog: np.ndarray,
    catalog_err: np.ndarray,
    *,
    alpha: float = 0.01,
) -> StarsConsistency:
    """Check a night's predictions against its own stars, the one truth a scoring
    night has. The intervals are calibrated on the validation nights; on a night
    unlike them (another instrument, a model trained briefly) they can be far too
    narrow, and only the stars can say so. With d = offset - catalog and
    var(d) = sigma^2 + catalog_err^2 (the network reads the catalog, so their
    errors correlate positively and var(d) is overstated: the check is
    conservative), chi2 = sum (d^2 / var(d)) over the exposures the stars answer.
    Where chi2 exceeds its 1 - ``alpha`` quantile, the network's sigma is widened
    by the factor f that brings chi2 to its expectation (sum d^2 / (f^2 sigma^2 +
    catalog_err^2) = dof): the excess is laid on the network, whose calibration
    is in question, not on the stars'."""
    ok = np.isfinite(catalog) & (catalog_err > 0) & np.isfinite(offset) & (sigma > 0)
    dof = int(ok.sum())
    if dof == 0:
        return StarsConsistency(chi2=float("nan"), dof=0, p_value=float("nan"), factor=1.0)
    d2, s2, c2 = (offset[ok] - catalog[ok]) ** 2, sigma[ok] ** 2, catalog_err[ok] ** 2

    def excess(f: float) -> float:
        return float(np.sum(d2 / (f * f * s2 + c2))) - dof

    chi2 = excess(1.0) + dof
    p_value = float(stats.chi2.sf(chi2, dof))
    factor = 1.0
    if p_value < alpha:
        hi = 2.0
        while excess(hi) > 0:
            hi *= 2.0
        factor = float(optimize.brentq(excess, 1.0, hi, xtol=1e-6))
    return StarsConsistency(chi2=chi2, dof=dof, p_value=p_value, factor=factor)


def predict(
    model: AZPRC,
    features: FeatureSet,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted offset and its 1-sigma (68.3 %) uncertainty, both in mag, shape (n,)."""
    pred, sigma, _, _ = _predict_all(model, features, batch_size=batch_size, device=device)
    return pred, sigma


def predict_intervals(
    model: AZPRC,
    features: FeatureSet,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted offset, and the half-widths of its 68.3 % and 95 % intervals
    [mag], shape (n,) each."""
    pred, sigma, tail, _ = _predict_all(model, features, batch_size=batch_size, device=device)
    return pred, sigma, Z95 * tail * sigma


@torch.no_grad()
def _predict_all(
    model: AZPRC,
    features: FeatureSet,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offset and sigma [mag], tail factor and regime, shape (n,) each."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[np.ndarray]] = [[], [], [], []]
    for lo in range(0, len(features), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(features)))
        parts = model.forward_parts(*_tensors(features, rows, device))
        for k, t in enumerate(
            (parts.offset, torch.exp(0.5 * parts.log_var), parts.tail, parts.regime)
        ):
            out[k].append(t.cpu().numpy())
    model.train(was_training)
    if not out[0]:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    offset, sigma, tail, regime = (np.concatenate(o) for o in out)
    scale = TARGET_SCALE_MAG
    return (
        offset.astype(np.float64) * scale,
        sigma.astype(np.float64) * scale,
        tail.astype(np.float64),
        regime.astype(np.int64),
    )
