"""Classical transient detection: PSF-matched difference image, matched-filter
detection and the magnitude difference by aperture photometry (seed 002,
"Magdiff"); the baseline of the transient CNN (docs/transients.md).

The steps:

1. Background-subtract both images (:func:`calib.photometry.estimate_background`).
2. Fit a convolution kernel that turns the sharper image into the broader one, on
   stamps around bright isolated stars, with a delta-function basis (one free
   value per kernel pixel plus a constant background, as in Bramich 2008, the
   non-parametric form of Alard & Lupton 1998). The kernel absorbs the PSF
   difference whatever the PSF's shape, the photometric scale (its sum) and a
   sub-pixel misregistration.
3. Difference ``D = new - ref`` at the common PSF, on the new image's flux scale,
   and its variance from the images' photon and read noise propagated through the
   kernel, plus a floor proportional to the star light for the kernel's residual
   mismatch (which grows with the flux, while the noise grows with its root).
4. Matched-filter S/N ``S = (D * P) / sqrt(V * P^2)`` with ``P`` the empirical PSF
   of the matched images (the optimal statistic for a point source on a
   background-limited difference; ZOGY's ``S`` reduces to it when one image's noise
   dominates), peaks above a threshold in ``|S|`` (fading sources are negative),
   sub-pixel positions from a parabola through the peak.
5. Aperture photometry of the PSF-matched reference, new and difference images at
   each position, aperture-corrected with the empirical PSF, and magnitudes with
   the exposure's zero point: ``m = -2.5 log10(F) + zp``; ``delta_mag = m_new -
   m_ref`` where both fluxes are significant, and the magnitude of the flux change
   (what a difference image measures) always.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.stats import median_abs_deviation

from calib.photometry import aperture_sums, estimate_background, measure_fwhm

__all__ = [
    "DifferenceImage",
    "Magdiff",
    "TransientCandidates",
    "detect_transients",
    "measure_magdiff",
    "subtract_images",
]


@dataclass(frozen=True)
class DifferenceImage:
    """A PSF-matched difference of a reference/new pair.

    Attributes
    ----------
    diff : ndarray, shape (ny, nx), float32, e-
        New minus reference at the common PSF, on the new image's flux scale.
    variance : ndarray, shape (ny, nx), float32, e-^2
        Variance of ``diff`` (noise of both images and the mismatch floor).
    score : ndarray, shape (ny, nx), float32
        Matched-filter signal-to-noise of a point source at each pixel, signed;
        zero within the kernel's half-width of the border.
    ref_matched, new_matched : ndarray, shape (ny, nx), float32, e-
        Background-subtracted images at the common PSF and flux scale.
    variance_ref, variance_new : ndarray, shape (ny, nx), float32, e-^2
        Their variances.
    psf : ndarray, shape (2 s + 1, 2 s + 1)
        Empirical PSF of the matched images, normalised to sum 1.
    kernel : ndarray, shape (2 k + 1, 2 k + 1)
        The fitted kernel (correlation form: ``broad[y, x] = sum K[j, i]
        sharp[y + j - k, x + i - k]``); its sum is the flux ratio broad/sharp.
    convolved : {'ref', 'new'}
        Which image the kernel was applied to (the sharper one).
    fwhm_ref_px, fwhm_new_px : float
        Measured PSF widths.
    n_kernel_stars : int
        Stars that constrained the kernel after clipping.
    """

    diff: np.ndarray
    variance: np.ndarray
    score: np.ndarray
    ref_matched: np.ndarray
    new_matched: np.ndarray
    variance_ref: np.ndarray
    variance_new: np.ndarray
    psf: np.ndarray
    kernel: np.ndarray
    convolved: Literal["ref", "new"]
    fwhm_ref_px: float
    fwhm_new_px: float
    n_kernel_stars: int

    @property
    def fwhm_matched_px(self) -> float:
        """FWHM of the common PSF (the broader of the two)."""
        return max(self.fwhm_ref_px, self.fwhm_new_px)


@dataclass(frozen=True)
class TransientCandidates:
    """Peaks of the matched-filter S/N image, strongest first.

    Attributes
    ----------
    x, y : ndarray, shape (n,), pixels
        Sub-pixel positions (0-based, pixel centres at integers).
    snr : ndarray, shape (n,)
        Matched-filter S/N at the peak; negative for fading sources.
    """

    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Magdiff:
    """Aperture photometry of transients on the PSF-matched images.

    Attributes
    ----------
    flux_ref_e, flux_new_e, flux_diff_e : ndarray, shape (n,), e-
        Aperture-corrected fluxes in the reference, the new image and the
        difference (new minus reference).
    flux_ref_err_e, flux_new_err_e, flux_diff_err_e : ndarray, shape (n,), e-
    mag_ref, mag_new : ndarray, shape (n,), mag
        NaN where the flux is below ``min_snr`` times its error (a new source has
        no reference magnitude; a vanished one no new magnitude).
    delta_mag : ndarray, shape (n,), mag
        ``mag_new - mag_ref`` (negative when brightening); NaN where either is.
    delta_mag_err : ndarray, shape (n,), mag
    mag_change : ndarray, shape (n,), mag
        Magnitude of ``|flux_diff_e|``.
    mag_change_err : ndarray, shape (n,), mag
    """

    flux_ref_e: np.ndarray
    flux_ref_err_e: np.ndarray
    flux_new_e: np.ndarray
    flux_new_err_e: np.ndarray
    flux_diff_e: np.ndarray
    flux_diff_err_e: np.ndarray
    mag_ref: np.ndarray
    mag_new: np.ndarray
    delta_mag: np.ndarray
    delta_mag_err: np.ndarray
    mag_change: np.ndarray
    mag_change_err: np.ndarray


def _kernel_stars(
    sharp: np.ndarray, rms: np.ndarray, *, half: int, min_peak_snr: float, max_stars: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integer (y, x) of bright stars that are the brightest pixel of their stamp
    and far enough from the edge for a full stamp plus kernel, brightest first."""
    peaks = (sharp == ndimage.maximum_filter(sharp, size=2 * half + 1)) & (
        sharp > min_peak_snr * rms
    )
    peaks[:half, :] = peaks[-half:, :] = False
    peaks[:, :half] = peaks[:, -half:] = False
    y, x = np.nonzero(peaks)
    order = np.argsort(sharp[y, x])[::-1][:max_stars]
    return y[order], x[order]


def _stamps(image: np.ndarray, y: np.ndarray, x: np.ndarray, half: int) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) stamps centred on integer pixels."""
    offs = np.arange(-half, half + 1)
    return image[y[:, None, None] + offs[None, :, None], x[:, None, None] + offs[None, None, :]]


def _fit_kernel(
    sharp: np.ndarray,
    broad: np.ndarray,
    broad_var: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    *,
    kernel_half: int,
    stamp_half: int,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Weighted least-squares delta-basis kernel and background on the given
    stamps, with one pass rejecting stamps whose chi^2 is an outlier (variable
    stars, transients, neighbours). Returns (kernel, background, stars kept)."""
    k, s = kernel_half, stamp_half
    # (n, 2s+2k+1, 2s+2k+1) sharp regions -> (n, 2s+1, 2s+1, 2k+1, 2k+1) windows:
    # window[y, x, j, i] = sharp[y + j - k, x + i - k].
    regions = _stamps(sharp, y, x, s + k)
    windows = sliding_window_view(regions, (2 * k + 1, 2 * k + 1), axis=(1, 2))
    n, m = len(y), (2 * s + 1) ** 2
    design = np.concatenate(
        [windows.reshape(n, m, (2 * k + 1) ** 2), np.ones((n, m, 1))], axis=2
    )  # (n, m, p)
    target = _stamps(broad, y, x, s).reshape(n, m)
    weight = 1.0 / np.sqrt(_stamps(broad_var, y, x, s).reshape(n, m))
    keep = np.ones(n, dtype=bool)
    for _ in range(2):
        a = (design[keep] * weight[keep, :, None]).reshape(-1, design.shape[2])
        b = (target[keep] * weight[keep]).ravel()
        # Normal equations: the (p, p) system is tiny next to the stamp pixels and
        # well conditioned with tens of stars; an SVD of ``a`` costs ~50x more.
        coef = np.linalg.solve(a.T @ a, a.T @ b)
        chi2 = np.sum(((design @ coef - target) * weight) ** 2, axis=1) / m
        med = np.median(chi2[keep])
        spread = median_abs_deviation(chi2[keep], scale="normal")
        clip = chi2 <= med + 3.0 * max(spread, 0.05 * med)
        if np.array_equal(clip & keep, keep) or (clip & keep).sum() < 5:
            break
        keep &= clip
    return coef[:-1].reshape(2 * k + 1, 2 * k + 1), float(coef[-1]), keep


def subtract_images(
    ref: np.ndarray,
    new: np.ndarray,
    *,
    read_noise_e: float,
    kernel_half_px: int = 5,
    stamp_half_px: int = 10,
    min_peak_snr: float = 20.0,
    max_stars: int = 80,
    mismatch_fraction: float = 0.02,
    background_box_px: int = 64,
) -> DifferenceImage:
    """PSF-matched difference of a registered reference/new pair.

    Parameters
    ----------
    ref, new : ndarray, shape (ny, nx), e-
        Reduced images of the same pointing, registered, sky *included* (the sky
        enters the variance).
    read_noise_e : float
        Read noise per pixel, e-.
    kernel_half_px : int
        Half-size of the matching kernel (``2 k + 1`` pixels a side); it must
        hold the broader PSF's extra width.
    stamp_half_px : int
        Half-size of the star stamps the kernel is fitted on (and of the PSF).
    min_peak_snr : float
        A kernel star's peak pixel must exceed this times the sky rms.
    max_stars : int
        At most this many (the brightest) kernel stars.
    mismatch_fraction : float
        Fraction of the local star light added in quadrature to the difference's
        noise: the kernel's residual mismatch, which grows with the flux.
    background_box_px : int
        Mesh of the background estimate.

    Returns
    -------
    DifferenceImage

    Raises
    ------
    ValueError
        Bad shapes or options, or fewer than 5 stars to fit the kernel.
    """
    ref = np.asarray(ref, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != new.shape:
        raise ValueError(f"ref and new must be 2-D of one shape, got {ref.shape}, {new.shape}")
    if read_noise_e < 0:
        raise ValueError(f"read_noise_e must be >= 0, got {read_noise_e}")
    if kernel_half_px < 1 or stamp_half_px < kernel_half_px:
        raise ValueError(
            f"need 1 <= kernel_half_px <= stamp_half_px, got {kernel_half_px}, {stamp_half_px}"
        )
    margin = kernel_half_px + stamp_half_px
    if min(ref.shape) <= 2 * margin + 1:
        raise ValueError(f"images of shape {ref.shape} are too small for stamps of {margin} px")
    var_ref = np.clip(ref, 0.0, None) + read_noise_e**2
    var_new = np.clip(new, 0.0, None) + read_noise_e**2
    bg_ref = estimate_background(ref.astype(np.float32), box_size=background_box_px)
    bg_new = estimate_background(new.astype(np.float32), box_size=background_box_px)
    ref_bs = ref - bg_ref.background
    new_bs = new - bg_new.background
    y, x = _kernel_stars(
        ref_bs, bg_ref.rms, half=margin, min_peak_snr=min_peak_snr, max_stars=max_stars
    )
    if len(y) < 5:
        raise ValueError(
            f"only {len(y)} stars above {min_peak_snr} sigma to fit the PSF-matching kernel; "
            "lower min_peak_snr or use a larger image"
        )
    guess = 2.5
    fwhm_ref = measure_fwhm(ref_bs, x.astype(float), y.astype(float), guess_px=guess)
    fwhm_new = measure_fwhm(new_bs, x.astype(float), y.astype(float), guess_px=guess)
    convolved: Literal["ref", "new"] = "ref" if fwhm_ref <= fwhm_new else "new"
    sharp, broad, var_sharp, var_broad = (
        (ref_bs, new_bs, var_ref, var_new)
        if convolved == "ref"
        else (new_bs, ref_bs, var_new, var_ref)
    )
    kernel, offset, kept = _fit_kernel(
        sharp, broad, var_broad, y, x, kernel_half=kernel_half_px, stamp_half=stamp_half_px
    )
    matched = ndimage.correlate(sharp, kernel, mode="reflect") + offset
    var_matched = ndimage.correlate(var_sharp, kernel**2, mode="reflect")
    if convolved == "ref":
        ref_m, new_m, v_ref, v_new = matched, broad, var_matched, var_broad
    else:
        # Bring both to the new image's flux scale.
        scale = float(kernel.sum())
        ref_m, new_m = broad / scale, matched / scale
        v_ref, v_new = var_broad / scale**2, var_matched / scale**2
    diff = new_m - ref_m
    variance = v_ref + v_new + (mismatch_fraction * np.clip(ref_m, 0.0, None)) ** 2
    stamps = _stamps(broad, y[kept], x[kept], stamp_half_px)
    psf = np.median(stamps / stamps.sum(axis=(1, 2), keepdims=True), axis=0)
    psf /= psf.sum()
    score = ndimage.correlate(diff, psf, mode="constant") / np.sqrt(
        ndimage.correlate(variance, psf**2, mode="constant")
    )
    # Convolution correlates the matched image's noise, which the propagated
    # variance ignores: rescale the score to unit robust scatter.
    score /= median_abs_deviation(score, axis=None, scale="normal")
    # Within the kernel's half-width of the border the matched image misses the
    # light of stars beyond the edge: no detections there.
    score[:kernel_half_px] = score[-kernel_half_px:] = 0.0
    score[:, :kernel_half_px] = score[:, -kernel_half_px:] = 0.0
    f32 = np.float32
    return DifferenceImage(
        diff=diff.astype(f32),
        variance=variance.astype(f32),
        score=score.astype(f32),
        ref_matched=ref_m.astype(f32),
        new_matched=new_m.astype(f32),
        variance_ref=v_ref.astype(f32),
        variance_new=v_new.astype(f32),
        psf=psf,
        kernel=kernel,
        convolved=convolved,
        fwhm_ref_px=float(fwhm_ref),
        fwhm_new_px=float(fwhm_new),
        n_kernel_stars=int(kept.sum()),
    )


def _parabola_offset(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through three equally spaced samples, in [-0.5, 0.5]."""
    curvature = minus - 2.0 * centre + plus
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(curvature < 0, 0.5 * (minus - plus) / curvature, 0.0)
    return np.clip(off, -0.5, 0.5)


def detect_transients(
    difference: DifferenceImage, *, threshold: float = 5.0, min_separation_px: float | None = None
) -> TransientCandidates:
    """Peaks of ``|score|`` above ``threshold``.

    Parameters
    ----------
    difference : DifferenceImage
    threshold : float
        Detection threshold on the matched-filter S/N.
    min_separation_px : float, optional
        Two peaks closer than this are one (the higher); default: the matched FWHM.

    Returns
    -------
    TransientCandidates
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    sep = difference.fwhm_matched_px if min_separation_px is None else min_separation_px
    size = 2 * max(1, round(sep)) + 1
    s = np.abs(difference.score.astype(np.float64))
    peaks = (s == ndimage.maximum_filter(s, size=size, mode="constant")) & (s > threshold)
    y, x = np.nonzero(peaks)
    order = np.argsort(s[y, x])[::-1]
    y, x = y[order], x[order]
    ny, nx = s.shape
    # The parabola needs both neighbours: peaks on the border stay on the pixel.
    padded = np.pad(s, 1, mode="edge")
    yp, xp = y + 1, x + 1
    dx = np.where(
        (x > 0) & (x < nx - 1),
        _parabola_offset(padded[yp, xp - 1], padded[yp, xp], padded[yp, xp + 1]),
        0.0,
    )
    dy = np.where(
        (y > 0) & (y < ny - 1),
        _parabola_offset(padded[yp - 1, xp], padded[yp, xp], padded[yp + 1, xp]),
        0.0,
    )
    return TransientCandidates(x=x + dx, y=y + dy, snr=difference.score[y, x].astype(np.float64))


def measure_magdiff(
    difference: DifferenceImage,
    x: np.ndarray,
    y: np.ndarray,
    *,
    zp_mag: float,
    radius_px: float | None = None,
    min_snr: float = 3.0,
) -> Magdiff:
    """Magnitudes of transients in both images and their difference.

    Parameters
    ----------
    difference : DifferenceImage
    x, y : ndarray, shape (n,), pixels
        Positions (from :func:`detect_transients` or any localiser).
    zp_mag : float
        Zero point of the new image: ``m = -2.5 log10(flux_e) + zp_mag`` (the
        reference is on its flux scale after matching).
    radius_px : float, optional
        Aperture radius; default the matched FWHM (near the best S/N for
        faint sources).
    min_snr : float
        A flux below this times its error gives no magnitude.

    Returns
    -------
    Magdiff
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {x.shape}, {y.shape}")
    r = difference.fwhm_matched_px if radius_px is None else radius_px
    h = difference.psf.shape[0] // 2
    # Aperture correction from the empirical PSF (its stamp holds all but the
    # far wings).
    (frac,), _ = aperture_sums(difference.psf, np.array([h]), np.array([h]), r)

    def flux(image: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, v = aperture_sums(image, x, y, r, variance=var)
        return f / frac, np.sqrt(v) / frac

    f_ref, e_ref = flux(difference.ref_matched, difference.variance_ref)
    f_new, e_new = flux(difference.new_matched, difference.variance_new)
    f_diff, e_diff = flux(difference.diff, difference.variance)

    def mag(f: np.ndarray, e: np.ndarray) -> np.ndarray:
        good = f > min_snr * e
        return np.where(good, -2.5 * np.log10(np.where(good, f, 1.0)) + zp_mag, np.nan)

    mag_ref, mag_new = mag(f_ref, e_ref), mag(f_new, e_new)
    k = 2.5 / np.log(10.0)
    return Magdiff(
        flux_ref_e=f_ref,
        flux_ref_err_e=e_ref,
        flux_new_e=f_new,
        flux_new_err_e=e_new,
        flux_diff_e=f_diff,
        flux_diff_err_e=e_diff,
        mag_ref=mag_ref,
        mag_new=mag_new,
        delta_mag=mag_new - mag_ref,
        delta_mag_err=k * np.hypot(e_ref / f_ref, e_new / f_new),
        mag_change=mag(np.abs(f_diff), e_diff),
        mag_change_err=k * e_diff / np.abs(f_diff),
    )
