"""Mixture vs Fusion break-even: whether Mixture's accuracy gain over Fusion pays for its extra inference, per x."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_MAX_MS_PER_POINT", "mixture_breakeven", "stops_paying"]

# Mixture "pays" while each accuracy point (pp) it adds over Fusion costs at most this many ms of inference/image.
DEFAULT_MAX_MS_PER_POINT = 1.0


def mixture_breakeven(results: pd.DataFrame, max_ms_per_point: float = DEFAULT_MAX_MS_PER_POINT,
                      x: str = "contributors", mixture: str = "mixture", fusion: str = "fusion") -> pd.DataFrame:
    """Mixture's accuracy gain over Fusion and its extra inference cost, per contributor count.

    MedForge compares its two strategies, output-level Mixture (N forward passes) and parameter-level Fusion (one);
    ``mixture`` and ``fusion`` name the two strategies compared (the records' strategy names).

    Rule: at each ``x``, gain = mean ACC(mixture) − mean ACC(fusion) in percentage points (pp), extra = mean
    inference ms/image(mixture) − (fusion). Mixture *pays* at ``x`` when gain > 0 and extra / gain ≤
    ``max_ms_per_point``. Returns columns ``x``, ``gain_pp``, ``extra_ms``, ``ms_per_pp`` (NaN when gain ≤ 0),
    ``pays``; empty without both strategies.
    """
    need = {"acc", "infer_ms_per_image", "strategy", x}
    if results.empty or not need <= set(results.columns) or not {mixture, fusion} <= set(results["strategy"]):
        return pd.DataFrame(columns=[x, "gain_pp", "extra_ms", "ms_per_pp", "pays"])
    means = results[results["strategy"].isin((mixture, fusion))].groupby([x, "strategy"])[
        ["acc", "infer_ms_per_image"]].mean().unstack("strategy").dropna()
    out = pd.DataFrame({x: means.index,
                        "gain_pp": 100 * (means[("acc", mixture)] - means[("acc", fusion)]).to_numpy(),
                        "extra_ms": (means[("infer_ms_per_image", mixture)]
                                     - means[("infer_ms_per_image", fusion)]).to_numpy()})
    out["ms_per_pp"] = np.where(out["gain_pp"] > 0, out["extra_ms"] / out["gain_pp"].where(out["gain_pp"] > 0),
                                np.nan)
    out["pays"] = (out["gain_pp"] > 0) & (out["ms_per_pp"] <= max_ms_per_point)
    return out.reset_index(drop=True)


def stops_paying(table: pd.DataFrame, x: str) -> float | None:
    """Smallest ``x`` from which Mixture does not pay at any larger tested ``x`` (None if it pays at the last)."""
    if table.empty or bool(table["pays"].iloc[-1]):
        return None
    paying = table.index[table["pays"]]
    first_bad = paying.max() + 1 if len(paying) else 0
    return float(table[x].iloc[first_bad])
