"""Linear filters from dataset moments: the Wiener filter and its locality mask, and the
windowed (patch) Wiener filter. They depend on the ops below them and on nothing above
(denoisers import filters, never the reverse)."""
from __future__ import annotations

from .wiener import DIAG_EPS, WienerFilter, locality_mask, mask_from_wiener_matrix, wiener_matrix
from .windowed import WindowedWiener

__all__ = ["DIAG_EPS", "WienerFilter", "WindowedWiener", "locality_mask", "mask_from_wiener_matrix", "wiener_matrix"]
