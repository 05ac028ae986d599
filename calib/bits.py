"""Pixel mask bits and measurement flag bits: their one home.

Mask bits (``uint8``, per pixel of a reduced quadrant, :data:`MASK_BITS`). The
master flat's ``defects`` map uses the first two (1 hot, from the master bias; 2
dead, from the flat), the reduction adds the others:

===  ==========  ================================================================
bit  name        set when
===  ==========  ================================================================
1    hot         the master bias is far above its quadrant's level
2    dead        the master flat is far below its local level
4    saturated   raw >= ``SATURATE``, grown by one pixel for bleed edges
8    cosmic_ray  L.A.Cosmic-like detection
16   bad_flat    the flat is non-finite or below ``min_flat`` (pixel set to 0)
===  ==========  ================================================================

Flag bits of one forced measurement (``int64``, :data:`FLAG_BITS`, 0 = good):

===  ============  ==============================================================
bit  name          set when
===  ============  ==============================================================
1    saturated     a saturated (or bleed) pixel lies within the aperture
2    defect        a hot, dead or unusable-flat pixel lies within the aperture
4    edge          the aperture crosses the edge of the data section
8    crowded       neighbours (catalog stars, and detected sources the catalog
                   lacks) put more than ``crowd_max_contamination`` of the
                   star's flux in its aperture (Moffat-PSF estimate)
16   cosmic_ray    a cosmic-ray pixel lies within the aperture
32   centroid      the refined centroid of a bright star moved more than
                   ``max_centroid_shift_px``: measured at the forced position
64   no_flux       flux <= 0 or not finite: no magnitude
===  ============  ==============================================================
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

__all__ = [
    "FLAG_BITS",
    "FLAG_CENTROID",
    "FLAG_COSMIC",
    "FLAG_CROWDED",
    "FLAG_DEFECT",
    "FLAG_EDGE",
    "FLAG_NO_FLUX",
    "FLAG_SATURATED",
    "MASK_BAD_FLAT",
    "MASK_BITS",
    "MASK_COSMIC",
    "MASK_DEAD",
    "MASK_DEFECTS",
    "MASK_HOT",
    "MASK_SATURATED",
]

MASK_HOT = np.uint8(1)
MASK_DEAD = np.uint8(2)
MASK_SATURATED = np.uint8(4)
MASK_COSMIC = np.uint8(8)
MASK_BAD_FLAT = np.uint8(16)
MASK_DEFECTS = MASK_HOT | MASK_DEAD
"""The bits a master's ``defects`` map carries."""
MASK_BITS = MappingProxyType(
    {
        "hot": int(MASK_HOT),
        "dead": int(MASK_DEAD),
        "saturated": int(MASK_SATURATED),
        "cosmic_ray": int(MASK_COSMIC),
        "bad_flat": int(MASK_BAD_FLAT),
    }
)

FLAG_SATURATED = 1
FLAG_DEFECT = 2
FLAG_EDGE = 4
FLAG_CROWDED = 8
FLAG_COSMIC = 16
FLAG_CENTROID = 32
FLAG_NO_FLUX = 64
FLAG_BITS = MappingProxyType(
    {
        "saturated": FLAG_SATURATED,
        "defect": FLAG_DEFECT,
        "edge": FLAG_EDGE,
        "crowded": FLAG_CROWDED,
        "cosmic_ray": FLAG_COSMIC,
        "centroid": FLAG_CENTROID,
        "no_flux": FLAG_NO_FLUX,
    }
)
