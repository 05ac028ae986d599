"""Which apertures touch masked pixels, as flag bits."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from calib.bits import (
    FLAG_COSMIC,
    FLAG_DEFECT,
    FLAG_SATURATED,
    MASK_BAD_FLAT,
    MASK_COSMIC,
    MASK_DEAD,
    MASK_HOT,
    MASK_SATURATED,
)


class MaskIndex:
    """KD-trees of the masked pixels, one per flag: flagging n stars costs
    O(n log m) for m masked pixels, whatever the image size, and the trees serve
    every aperture radius."""

    _GROUPS = (
        (MASK_SATURATED, FLAG_SATURATED),
        (MASK_HOT | MASK_DEAD | MASK_BAD_FLAT, FLAG_DEFECT),
        (MASK_COSMIC, FLAG_COSMIC),
    )

    def __init__(self, mask: np.ndarray) -> None:
        self.trees: list[tuple[int, cKDTree]] = []
        # One scan of the image: masked pixels are a few per cent of it.
        iy, ix = np.nonzero(mask)
        bits_at = mask[iy, ix]
        for bits, flag in self._GROUPS:
            sel = (bits_at & bits) != 0
            if sel.any():
                self.trees.append((flag, cKDTree(np.column_stack([ix[sel], iy[sel]]))))

    def flags(self, x: np.ndarray, y: np.ndarray, radius_px: float) -> np.ndarray:
        """Flags of circles of ``radius_px`` that touch a masked pixel."""
        out = np.zeros(len(x), dtype=np.int64)
        if len(x) == 0:
            return out
        # A pixel touches the circle when its centre is within r + half its diagonal.
        reach = radius_px + 0.7072
        points = np.column_stack([np.nan_to_num(x), np.nan_to_num(y)])
        for flag, tree in self.trees:
            dist, _ = tree.query(points, distance_upper_bound=reach + 1.0)
            out[dist <= reach] |= flag
        return out
