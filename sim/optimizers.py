"""The nevergrad optimizers a coefficient search can use, looked up by name (no torch: config validation reads this).

``get_optimizer(name)``: nevergrad's registry entry, a typo listing the common names. ``parallel_problem(name, B)``:
whether that optimizer can ask B candidates at once (``merge.search_batch``), checked before any work starts.
"""
from __future__ import annotations

import warnings

import numpy as np

# Names documented and tested; any other name in ``nevergrad.optimizers.registry`` works as well.
OPTIMIZERS = ("NGOpt", "Shiwa", "Cobyla", "CMA", "OnePlusOne", "TwoPointsDE", "PSO", "RandomSearch")


def get_optimizer(name: str) -> type:
    """The nevergrad optimizer class registered as ``name``; a typo lists the common names."""
    import nevergrad as ng

    try:
        return ng.optimizers.registry[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r} (merge.optimizer); known: {', '.join(OPTIMIZERS)} "
                         f"or any name in nevergrad.optimizers.registry") from None


def parallel_problem(name: str, batch: int, dimension: int = 2, budget: int = 40) -> str | None:
    """Why nevergrad's optimizer ``name`` cannot ask ``batch`` candidates at once here, or ``None``.

    Built with ``num_workers=batch`` on a ``dimension``-dimensional box (a sequential stage's (a, b)): optimizers that
    run sequentially by construction (Cobyla and the other scipy ones) refuse; ``NGOpt`` picks ``MetaModel`` (CMA with
    a quadratic surrogate) for parallel asks at these budgets, whose surrogate step calls ``float()`` on a 1-element
    array — an error from numpy 2.4 on (nevergrad issue #1612, unfixed in nevergrad 1.0.12)."""
    import nevergrad as ng
    from nevergrad.optimization.optimizerlib import _MetaModel

    opt_cls = get_optimizer(name)
    if getattr(opt_cls, "no_parallelization", False):
        return f"{name} asks one candidate at a time by construction"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = opt_cls(parametrization=ng.p.Array(shape=(dimension,), lower=-1.0, upper=1.0), budget=budget,
                          num_workers=batch)
        except (ValueError, TypeError) as exc:
            return f"{name} cannot ask candidates in parallel ({exc})"
        inner = opt
        while not isinstance(inner, _MetaModel) and isinstance(getattr(inner, "optim", None), ng.optimizers.base.Optimizer):
            inner = inner.optim
    if isinstance(inner, _MetaModel) and np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        return (f"{name} with {batch} workers runs nevergrad's MetaModel, whose surrogate step fails under numpy "
                f"{np.__version__} (nevergrad issue #1612); use e.g. TwoPointsDE, CMA, PSO or OnePlusOne")
    return None
