"""Reference/new pairs with injected transients: deterministic, the truth table
agrees with the pixels, cutout labels point at the transient."""

from __future__ import annotations

import numpy as np
import pytest

from sim.transients import PairConfig, flux_for_snr, make_cutouts, simulate_pair

CONFIG = PairConfig(nx=256, ny=256, transients_per_mpix=150.0, min_separation_px=40.0)


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(CONFIG, seed=11)


def test_deterministic_from_the_seed(pair):
    again = simulate_pair(CONFIG, seed=11)
    np.testing.assert_array_equal(again.ref, pair.ref)
    np.testing.assert_array_equal(again.new, pair.new)
    np.testing.assert_array_equal(again.truth.x, pair.truth.x)
    other = simulate_pair(CONFIG, seed=12)
    assert not np.array_equal(other.truth.x[:3], pair.truth.x[:3])


def test_truth_table_is_consistent(pair):
    t = pair.truth
    assert len(t) >= 8
    assert set(t.kind) <= {"new", "brighten", "fade"}
    assert len(set(t.kind)) == 3
    assert np.all((t.snr >= CONFIG.snr_range[0]) & (t.snr <= CONFIG.snr_range[1]))
    new = t.kind == "new"
    assert np.all(np.isnan(t.mag_ref[new]))
    assert np.all(np.isnan(t.delta_mag[new]))
    assert np.all(t.delta_mag[t.kind == "brighten"] < 0)
    assert np.all(t.delta_mag[t.kind == "fade"] > 0)
    assert np.all(t.flux_change_e[t.kind == "fade"] < 0)
    d = np.hypot(t.x[:, None] - t.x[None, :], t.y[:, None] - t.y[None, :])
    assert d[~np.eye(len(t), dtype=bool)].min() >= CONFIG.min_separation_px
    edge = np.minimum.reduce([t.x, t.y, CONFIG.nx - 1 - t.x, CONFIG.ny - 1 - t.y])
    assert np.all(edge[t.near_edge] <= CONFIG.edge_px)
    np.testing.assert_allclose(
        np.abs(t.flux_change_e), flux_for_snr(t.snr, pair.fwhm_new_px, CONFIG), rtol=1e-12
    )


def test_injected_flux_change_is_in_the_pixels(pair):
    """The new-minus-reference light in a box around each isolated transient is
    its flux change, within 4 sigma of the box's noise (plus 1 % for the PSF wings
    outside the box)."""
    t = pair.truth
    h = 12
    ok = ~t.near_edge & ~t.near_bright
    ok &= (t.x > h) & (t.x < CONFIG.nx - 1 - h) & (t.y > h) & (t.y < CONFIG.ny - 1 - h)
    assert ok.sum() >= 5
    diff = pair.new.astype(np.float64) - pair.ref
    for i in np.flatnonzero(ok):
        cx, cy = round(t.x[i]), round(t.y[i])
        box = (slice(cy - h, cy + h + 1), slice(cx - h, cx + h + 1))
        measured = diff[box].sum()
        variance = (pair.ref[box].astype(np.float64) + pair.new[box]).sum()
        variance += 2 * box_area(h) * CONFIG.read_noise_e**2
        tol = 4 * np.sqrt(variance) + 0.01 * abs(t.flux_change_e[i])
        assert abs(measured - t.flux_change_e[i]) < tol, (i, measured, t.flux_change_e[i], tol)


def box_area(h: int) -> int:
    return (2 * h + 1) ** 2


def test_cutout_labels_point_at_the_transient(pair):
    cut = make_cutouts(pair, seed=3)
    t = pair.truth
    pos = cut.present
    assert pos.sum() == len(t)
    assert (~pos).sum() >= 1
    assert np.all((cut.xy[pos] >= 0) & (cut.xy[pos] <= 63))
    assert np.all(np.isnan(cut.xy[~pos]))
    # Every label is the transient's quadrant position in cutout coordinates.
    np.testing.assert_allclose(cut.xy[pos] + cut.origin[pos], np.column_stack([t.x, t.y]))
    # For clear transients the strongest difference pixel is the label's pixel or
    # one of its 8 neighbours (noise).
    clear = pos & (t.snr[np.maximum(cut.truth_index, 0)] > 30) & ~t.near_bright[cut.truth_index]
    assert clear.sum() >= 2
    for i in np.flatnonzero(clear):
        d = np.abs(cut.images[i, 1].astype(np.float64) - cut.images[i, 0])
        py, px = np.unravel_index(np.argmax(d), d.shape)
        assert abs(px - round(cut.xy[i, 0])) <= 1
        assert abs(py - round(cut.xy[i, 1])) <= 1
    # Negatives hold no transient.
    for i in np.flatnonzero(~pos):
        x0, y0 = cut.origin[i]
        inside = (t.x >= x0) & (t.x < x0 + 64) & (t.y >= y0) & (t.y < y0 + 64)
        assert not inside.any()


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="kind_weights"):
        PairConfig(kind_weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="nx and ny"):
        PairConfig(nx=32)
