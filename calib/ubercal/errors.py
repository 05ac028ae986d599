"""Errors of the ubercal fit."""

from __future__ import annotations

import numpy as np


class UbercalError(RuntimeError):
    """The ubercal system cannot be solved as posed."""


class DisconnectedGraphError(UbercalError):
    """The observation graph falls apart into groups of exposures that share no
    star; their relative zero points are unconstrained.

    Attributes
    ----------
    components : list of (ndarray, ndarray)
        Per component, largest first: the ``(expid, quadrant)`` of its zero-point
        parameters (quadrant is -1 for per-exposure zero points).
    """

    def __init__(self, components: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.components = components
        sizes = [len(e) for e, _ in components]
        lines = []
        for k, (e, q) in enumerate(components[:10]):
            exps = np.unique(e)
            shown = ", ".join(str(x) for x in exps[:8]) + (" ..." if len(exps) > 8 else "")
            quads = np.unique(q[q >= 0])
            lines.append(
                f"  component {k}: {len(e)} zero points, {len(exps)} exposures [{shown}]"
                + (f", quadrants {quads.tolist()}" if len(quads) else "")
            )
        super().__init__(
            f"observation graph has {len(components)} disconnected components "
            f"(zero points per component: {sizes}); their relative zero points are not "
            "constrained by any star. Solve them separately or add overlapping "
            "observations.\n" + "\n".join(lines)
        )

    def __reduce__(self) -> tuple[type, tuple[list[tuple[np.ndarray, np.ndarray]]]]:
        # Dask ships a task's exception back to the client by pickling it; the
        # default would call __init__ with the message instead of the components.
        return (type(self), (self.components,))


def _singular_error() -> UbercalError:
    return UbercalError(
        "the reduced normal matrix is singular: a combination of zero points, starflat "
        "cells or colour terms is not constrained by the data (e.g. starflat cells that "
        "no dithered star links, or a colour term with stars of a single colour). Use "
        "fewer starflat cells, per-exposure zero points, or more dithered exposures."
    )
