"""Records: the flat, JSON-safe dicts the log, the run dir and the parquet tables are made of."""
from __future__ import annotations

import math

import numpy as np


def is_flat(v) -> bool:
    """A value a flat record (a parquet column, a log field) can hold."""
    return v is None or isinstance(v, (str, int, float, bool))


def json_safe(value):
    """JSON-safe records: NaN/Inf → null, numpy scalars → Python, keys → str (lists and tuples → lists)."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
